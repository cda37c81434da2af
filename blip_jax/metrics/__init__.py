"""Evaluation metrics of the downstream tasks, with the official names and definitions."""
from blip_jax.metrics.retrieval import recall_at_k  # noqa: F401
