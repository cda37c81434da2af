"""Training tasks. The one trainer (blip_jax/train/trainer.py) runs every task; a task brings what
differs: its model kind, what to check in the config before any compute, and the evaluation run at
every epoch's end (with the metric that picks the best checkpoint). The loss step is shared
(blip_jax/train/step.py): the model kind and the loss config select the paper's losses."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  model_kind: str
  check_config: Callable = lambda c: None  # raises ValueError on a config that cannot run
  # (config, BlipModel) -> {"split/metric": value}, each epoch; an optional "samples" entry
  # {name: (uint8 images, [texts])} goes to TensorBoard as images and text
  evaluate: Optional[Callable] = None
  select: str = ""  # the metric (higher is better) that picks the best checkpoint
  shown: tuple = ()  # suffixes of the eval metrics printed after each evaluation


def get(name: str) -> Task:
  if name == "pretrain":
    return Task("pretrain", "pretrain")
  if name == "retrieval":
    from blip_jax.tasks import retrieval
    return Task("retrieval", "retrieval", retrieval.check_training_config, retrieval.evaluate_splits,
                select="val/r_mean", shown=("r1", "r_mean"))
  if name == "caption":
    from blip_jax.tasks import caption
    # official train_caption.py: the best epoch by val CIDEr + BLEU-4
    return Task("caption", "caption", caption.check_training_config, caption.evaluate_splits,
                select="val/CIDEr+Bleu_4", shown=("CIDEr", "Bleu_4"))
  if name == "vqa":
    from blip_jax.tasks import vqa
    # official train_vqa.py keeps the last epoch; with eval.annotations.val set, the best by accuracy
    return Task("vqa", "vqa", vqa.check_training_config, vqa.evaluate_splits, select="val/accuracy",
                shown=("accuracy", "overall", "exact_match"))
  if name == "nlvr":
    from blip_jax.tasks import nlvr
    # official train_nlvr.py: the best epoch by val accuracy
    return Task("nlvr", "nlvr", nlvr.check_training_config, nlvr.evaluate_splits, select="val/accuracy",
                shown=("accuracy",))
  raise ValueError(f"unknown task {name!r}: pretrain, retrieval, caption, vqa or nlvr")
