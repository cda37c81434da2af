"""Training tasks as plug-ins. The one trainer (blip_jax/train/trainer.py) runs every task and names
none: a task is one module here that defines `TASK`, a Task that brings everything that differs:
its model kind, its objective (the loss the shared step differentiates, blip_jax/objectives.py),
the loss terms its log line shows, the config checks made before any compute, and its evaluation
(each epoch, with the metric that picks the best checkpoint, or once at the end).

Adding a task: a new module blip_jax/tasks/<name>.py with TASK, a line in REGISTRY below, and its
recipe configs/<name>.py (c.task = "<name>").
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional

REGISTRY = {  # task name -> the module that defines its TASK
    "pretrain": "blip_jax.tasks.pretrain",
    "retrieval": "blip_jax.tasks.retrieval",
    "caption": "blip_jax.tasks.caption",
    "vqa": "blip_jax.tasks.vqa",
    "nlvr": "blip_jax.tasks.nlvr",
}


def _no_check(c) -> None:
  return None


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  model_kind: str  # the BlipConfig kind the task trains (its heads and its train state)
  objective: Callable  # loss(cfg, loss_cfg, params, batch, rng, contrastive): blip_jax/objectives.py
  # the log line's terms after the loss, formatted from the step's metrics, e.g. "itc {loss_itc:.4f}"
  log_terms: str = ""
  check_config: Callable = _no_check  # raises ValueError on a config that cannot run
  # (config, BlipModel) -> {"split/metric": value}, each epoch; an optional "samples" entry
  # {name: (uint8 images, [texts])} goes to TensorBoard as images and text
  evaluate: Optional[Callable] = None
  select: str = ""  # the metric (higher is better) that picks the best checkpoint
  shown: tuple = ()  # suffixes of the eval metrics printed after each evaluation
  # (config, BlipConfig, params, tokenizer) -> dict or None: once, after the last step, on process 0
  # (tasks without a per-epoch evaluation)
  final_evaluate: Optional[Callable] = None
  # when starting from a checkpoint of another size, weights whose shapes differ start fresh
  # (VQA from a ViT-L pretraining file: the decoder's cross-attention takes 768, not 1024)
  fresh_where_shapes_differ: bool = False


def get(name: str) -> Task:
  if name not in REGISTRY:
    raise ValueError(f"unknown task {name!r}: {', '.join(REGISTRY)}")
  return importlib.import_module(REGISTRY[name]).TASK


def log_line(task: Task, metrics: dict) -> str:
  """'loss 3.1234 itc 1.2000 ...': the step's loss and the task's terms."""
  return f"loss {metrics['loss']:.4f}" + (" " + task.log_terms.format(**metrics) if task.log_terms else "")
