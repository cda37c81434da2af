"""BLIP (Bootstrapping Language-Image Pre-training) in JAX/Flax."""
from blip_jax.api import BlipModel, load
from blip_jax.models.config import BlipConfig, TextConfig, VisionConfig, make_config, tiny_config
from blip_jax.tokenizers import BertTokenizer, SentencePieceTokenizer, pre_caption, pre_question

__all__ = ["BlipModel", "load", "BlipConfig", "TextConfig", "VisionConfig", "make_config", "tiny_config",
           "BertTokenizer", "SentencePieceTokenizer", "pre_caption", "pre_question"]
