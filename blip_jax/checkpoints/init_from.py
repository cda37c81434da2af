"""Initialisation for pretraining as in the paper (the paper §3.4; official blip_pretrain.py):

- the ViT from a DeiT / timm ViT state dict (`deit_base_patch16_224-b5f2ef4d.pth`): same key names as
  official `visual_encoder.*` without the prefix; the classifier head is dropped, the position
  embedding is interpolated when the resolution differs;
- the text transformer from a transformers `bert-base-uncased` dir: embeddings (token types dropped,
  word embeddings resized to the model's vocab, the new [DEC]/[ENC] rows keep their random init),
  every layer's self-attention (also the decoder's set, as the official decoder is loaded from BERT
  too) and FFN, and the MLM head as the LM head. Cross-attention keeps its random init.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np

from blip_jax.checkpoints import mapping
from blip_jax.checkpoints.convert import params_from_state_dict
from blip_jax.checkpoints.torch_io import CheckpointError, read_hf_dir, read_state_dict_file
from blip_jax.models.config import BlipConfig
from blip_jax.models.init import param_shapes

log = logging.getLogger(__name__)


def _merge(dst: dict, src: dict):
  for k, v in src.items():
    if isinstance(v, dict):
      _merge(dst.setdefault(k, {}), v)
    else:
      dst[k] = v


def _copy_tree(tree):
  return {k: _copy_tree(v) if isinstance(v, dict) else np.array(v) for k, v in tree.items()}


def load_vit_into(params: dict, cfg: BlipConfig, path_or_sd) -> dict:
  """ViT weights from a timm/DeiT state dict (file path or dict)."""
  sd = read_state_dict_file(path_or_sd) if isinstance(path_or_sd, str) else path_or_sd
  sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
  if "dist_token" in sd:
    raise CheckpointError("distilled DeiT (dist_token) is not the ViT BLIP starts from; use "
                          "deit_base_patch16_224 (not *_distilled_*)")
  sd = {"visual_encoder." + k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.", "pre_logits."))}
  table = list(mapping.vit_entries(cfg, ("visual_encoder",), "visual_encoder."))
  vit, used = params_from_state_dict(sd, table, param_shapes(cfg))
  unused = sorted(set(sd) - used)
  if unused:
    raise CheckpointError(f"unexpected ViT keys: {unused[:10]}{' ...' if len(unused) > 10 else ''}")
  out = _copy_tree(params)
  _merge(out, vit)
  return out


def _bert_layer_entries(path: tuple, key: str):
  yield from mapping._attention(path + ("self_attn",), f"{key}.attention")
  yield from mapping._linear(path + ("fc1",), f"{key}.intermediate.dense")
  yield from mapping._linear(path + ("fc2",), f"{key}.output.dense")
  yield from mapping._norm(path + ("ffn_norm",), f"{key}.output.LayerNorm")


def load_bert_into(params: dict, cfg: BlipConfig, bert_dir: str, tower: Optional[str] = None) -> dict:
  """Text weights from a transformers BERT dir (BertModel, BertForMaskedLM or BertForPreTraining)."""
  _, sd = read_hf_dir(bert_dir)
  if any(k.startswith("bert.") for k in sd):
    sd = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in sd.items()}
  out = _copy_tree(params)
  towers = [tower] if tower else [t for t in ("text_encoder", "text_decoder") if t in out]
  shapes = param_shapes(cfg)
  for t in towers:
    node = out[t]
    word = np.asarray(sd["embeddings.word_embeddings.weight"])
    have = node["word_embeddings"]["embedding"]
    if word.shape[0] > have.shape[0] or word.shape[1] != have.shape[1]:
      raise CheckpointError(f"BERT word embeddings {word.shape} do not fit the model's {have.shape}")
    have[:word.shape[0]] = word  # rows past BERT's vocab ([DEC], [ENC]) keep their init
    table = [mapping.Entry((t, "position_embeddings", "embedding"), "embeddings.position_embeddings.weight", "copy")]
    table += mapping._norm((t, "embed_norm"), "embeddings.LayerNorm")
    for i in range(cfg.text.depth):
      table += _bert_layer_entries((t, f"layer_{i}"), f"encoder.layer.{i}")
    part, _ = params_from_state_dict(sd, table, shapes)
    _merge(out, part)
    if "self_attn_dec" in node["layer_0"]:  # pretraining: the decoder's self-attention from BERT too
      for i in range(cfg.text.depth):
        node[f"layer_{i}"]["self_attn_dec"] = _copy_tree(node[f"layer_{i}"]["self_attn"])
    if "lm_dense" in node and "cls.predictions.transform.dense.weight" in sd:
      head = list(mapping._linear((t, "lm_dense"), "cls.predictions.transform.dense"))
      head += mapping._norm((t, "lm_norm"), "cls.predictions.transform.LayerNorm")
      part, _ = params_from_state_dict(sd, head, shapes)
      _merge(out, part)
      bias = np.asarray(sd["cls.predictions.bias"])
      node["lm_bias"][:bias.shape[0]] = bias
  log.info("initialised %s from %s", towers, os.path.basename(bert_dir.rstrip("/")))
  return out
