"""One model kind's weights as another's start, as the official fine-tuning scripts begin (official
load_checkpoint into each task's model): a pretraining (or retrieval) model's towers become a task
model's towers.

  retrieval = the text encoder without the decoder's self-attention and LM head (+ momentum, queues)
  caption   = the image-grounded decoder (the shared weights with the decoder's self-attention, the LM head)
  vqa       = question encoder = the text encoder; answer decoder = the decoder
  nlvr      = the text encoder, its one cross-attention copied into both image branches (official
              BLIP_NLVR load_checkpoint: crossattention.self -> self0/self1, output.dense ->
              dense0/dense1); the merge layers and the head start fresh (they exist nowhere else)
"""
from __future__ import annotations

import logging
import sys

import jax
import numpy as np

log = logging.getLogger(__name__)

# kind -> kinds whose weights it can start from (besides its own)
SOURCES = {"retrieval": ("pretrain",), "caption": ("pretrain",), "vqa": ("pretrain",),
           "nlvr": ("pretrain", "retrieval")}


def encoder_view(params: dict) -> dict:
  """The encoder side of a pretraining model: the text encoder without the decoder's
  self-attention set and the LM head (what the momentum towers track)."""
  te = {}
  for k, v in params["text_encoder"].items():
    if k.startswith("lm_"):
      continue
    te[k] = {n: x for n, x in v.items() if n != "self_attn_dec"} if k.startswith("layer_") else v
  return te


def _twin(text_encoder: dict, fresh_encoder: dict) -> dict:
  """A text encoder with one cross-attention per layer -> NLVR2's pair per layer: both branches
  get the same weights; `merge` (the merging layers) comes from the fresh model."""
  out = {}
  for k, v in text_encoder.items():
    if not k.startswith("layer_"):
      out[k] = v
      continue
    layer = dict(v)
    cross = layer.pop("cross_attn")
    twin = {f"{n}{i}": jax.tree.map(np.array, cross[n]) for i in (0, 1) for n in ("query", "key", "value", "out")}
    twin["norm"] = cross["norm"]
    if "merge" in fresh_encoder[k]["cross_attn"]:
      twin["merge"] = fresh_encoder[k]["cross_attn"]["merge"]
    layer["cross_attn"] = twin
    out[k] = layer
  return out


def retarget(params: dict, extras: dict, src: str, dst: str, fresh: dict | None = None, name: str = "the checkpoint"):
  """(params, extras) of a `src` model as the start of a `dst` model. `fresh`: a freshly
  initialised `dst` params tree, for what the source does not have (NLVR2's merge layers and head)."""
  if src == dst:
    return params, extras
  if src not in SOURCES.get(dst, ()):
    raise ValueError(f"{name} is a {src!r} model; a {dst!r} model starts from a "
                     f"{' or '.join((dst,) + SOURCES.get(dst, ()))} checkpoint")
  te = encoder_view(params) if src == "pretrain" else params["text_encoder"]
  if dst == "nlvr":
    if fresh is None:
      raise ValueError("retarget to nlvr needs a fresh nlvr params tree (merge layers, head)")
    log.info("nlvr: both cross-attention branches from %s; merge layers and head initialised fresh", name)
    return {"visual_encoder": params["visual_encoder"], "text_encoder": _twin(te, fresh["text_encoder"]),
            "cls_hidden": fresh["cls_hidden"], "cls_out": fresh["cls_out"]}, {}
  decoder = {k: ({n: v for n, v in layer.items() if n != "self_attn_dec"} | {"self_attn": layer["self_attn_dec"]})
             if k.startswith("layer_") else layer for k, layer in params["text_encoder"].items()}
  if dst == "caption":
    return {"visual_encoder": params["visual_encoder"], "text_decoder": decoder}, {}
  if dst == "vqa":
    return {"visual_encoder": params["visual_encoder"], "text_encoder": te, "text_decoder": decoder}, {}
  return {"visual_encoder": params["visual_encoder"], "text_encoder": te, "vision_proj": params["vision_proj"],
          "text_proj": params["text_proj"], "temp": params["temp"], "itm_head": params["itm_head"]}, extras


def fresh_where_shapes_differ(params, fresh, name: str = "init.blip"):
  """Leaves whose shape differs from the model's are re-initialised, with a warning (the official
  load_checkpoint drops them: the VQA answer decoder of a ViT-L pretraining checkpoint)."""
  flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(fresh)[0]:
    got = flat.get(path)
    if got is None or got.shape != leaf.shape:
      print(f"warning: {name} has {'no' if got is None else got.shape} {jax.tree_util.keystr(path)} for the "
            f"model's {leaf.shape}: initialised fresh", file=sys.stderr, flush=True)
      got = leaf
    out.append(got)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(fresh), out)
