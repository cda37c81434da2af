"""One table between our parameter paths and PyTorch state-dict keys.

`official_table(config)` lists, for every parameter of our model, the official BLIP key that holds
it, the tied aliases the official checkpoint also stores (official med.py:
tie_encoder_decoder_weights), and how the tensor is laid out in torch. The HF layout is the same
table renamed (`to_hf_key`; transformers' modeling_blip.py): only vision keys change names, shapes
never do.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterator

import numpy as np

from blip_jax.models.config import BlipConfig

Path = tuple  # a path into the flax params tree, e.g. ('visual_encoder', 'blocks_0', 'attn', 'qkv', 'kernel')


@dataclasses.dataclass(frozen=True)
class Entry:
  path: Path
  key: str  # primary torch key
  layout: str  # 'linear' | 'conv' | 'copy'
  aliases: tuple = ()  # other keys that hold the same tensor in official files


def to_flax(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "linear":
    return np.ascontiguousarray(x.T)  # torch Linear [out, in] -> flax kernel [in, out]
  if layout == "conv":
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))  # OIHW -> HWIO
  return x


def to_torch(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "linear":
    return np.ascontiguousarray(x.T)
  if layout == "conv":
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
  return x


def _linear(path, key):
  yield Entry(path + ("kernel",), key + ".weight", "linear")
  yield Entry(path + ("bias",), key + ".bias", "copy")


def _norm(path, key):
  yield Entry(path + ("scale",), key + ".weight", "copy")
  yield Entry(path + ("bias",), key + ".bias", "copy")


def vit_entries(cfg: BlipConfig, root: Path, prefix: str) -> Iterator[Entry]:
  yield Entry(root + ("cls_token",), prefix + "cls_token", "copy")
  yield Entry(root + ("pos_embed",), prefix + "pos_embed", "copy")
  yield Entry(root + ("patch_embed", "kernel"), prefix + "patch_embed.proj.weight", "conv")
  yield Entry(root + ("patch_embed", "bias"), prefix + "patch_embed.proj.bias", "copy")
  for i in range(cfg.vision.depth):
    p, k = root + (f"blocks_{i}",), f"{prefix}blocks.{i}."
    yield from _norm(p + ("norm1",), k + "norm1")
    yield from _linear(p + ("attn", "qkv"), k + "attn.qkv")
    yield from _linear(p + ("attn", "proj"), k + "attn.proj")
    yield from _norm(p + ("norm2",), k + "norm2")
    yield from _linear(p + ("fc1",), k + "mlp.fc1")
    yield from _linear(p + ("fc2",), k + "mlp.fc2")
  yield from _norm(root + ("norm",), prefix + "norm")


def _attention(path, key):
  for n in ("query", "key", "value"):
    yield from _linear(path + (n,), f"{key}.self.{n}")
  yield from _linear(path + ("out",), f"{key}.output.dense")
  yield from _norm(path + ("norm",), f"{key}.output.LayerNorm")


def _twin_cross_attention(path, key, merge: bool):
  """NLVR2's pair of cross-attentions (official nlvr_encoder.py): self0/self1 and dense0/dense1,
  merge_layer in the merging layers, one LayerNorm."""
  for i in (0, 1):
    for n in ("query", "key", "value"):
      yield from _linear(path + (f"{n}{i}",), f"{key}.self{i}.{n}")
    yield from _linear(path + (f"out{i}",), f"{key}.output.dense{i}")
  if merge:
    yield from _linear(path + ("merge",), f"{key}.output.merge_layer")
  yield from _norm(path + ("norm",), f"{key}.output.LayerNorm")


def text_entries(cfg: BlipConfig, root: Path, prefix: str, *, cross: bool, lm_prefix: str | None = None,
                 dec_prefix: str | None = None, twin_cross: bool = False) -> Iterator[Entry]:
  """A TextTransformer at `root`, stored under `prefix` (e.g. 'text_encoder.').

  twin_cross (NLVR2): two cross-attentions per layer, merged from cfg.fusion_layer on.
  dec_prefix (pretraining): the decoder copy ('text_decoder.bert.'), which holds `self_attn_dec`
  and, as tied aliases, every shared weight. lm_prefix: where the LM head lives ('text_decoder.cls.').
  """
  def shared(entries):  # official pretraining stores shared weights under both prefixes
    for e in entries:
      if dec_prefix is None:
        yield e
      else:
        yield dataclasses.replace(e, key=dec_prefix + e.key[len(prefix):], aliases=(e.key,) + e.aliases)

  emb = prefix + "embeddings."
  word = Entry(root + ("word_embeddings", "embedding"), emb + "word_embeddings.weight", "copy")
  if lm_prefix is not None:
    word = dataclasses.replace(word, aliases=(lm_prefix + "predictions.decoder.weight",))
  yield from shared([word])
  yield from shared([Entry(root + ("position_embeddings", "embedding"), emb + "position_embeddings.weight", "copy")])
  yield from shared(_norm(root + ("embed_norm",), emb + "LayerNorm"))
  for i in range(cfg.text.depth):
    p, k = root + (f"layer_{i}",), f"{prefix}encoder.layer.{i}."
    yield from _attention(p + ("self_attn",), k + "attention")
    if dec_prefix is not None:
      yield from _attention(p + ("self_attn_dec",), f"{dec_prefix}encoder.layer.{i}.attention")
    if twin_cross:
      yield from _twin_cross_attention(p + ("cross_attn",), k + "crossattention", i >= cfg.fusion_layer)
    elif cross:
      yield from shared(_attention(p + ("cross_attn",), k + "crossattention"))
    yield from shared(_linear(p + ("fc1",), k + "intermediate.dense"))
    yield from shared(_linear(p + ("fc2",), k + "output.dense"))
    yield from shared(_norm(p + ("ffn_norm",), k + "output.LayerNorm"))
  if lm_prefix is not None:
    lp = lm_prefix + "predictions."
    yield from _linear(root + ("lm_dense",), lp + "transform.dense")
    yield from _norm(root + ("lm_norm",), lp + "transform.LayerNorm")
    yield Entry(root + ("lm_bias",), lp + "bias", "copy", aliases=(lp + "decoder.bias",))


def official_table(cfg: BlipConfig) -> list[Entry]:
  """Entries for the model params of `cfg` in the official layout."""
  k = cfg.kind
  out = list(vit_entries(cfg, ("visual_encoder",), "visual_encoder."))
  if k == "pretrain":
    out += text_entries(cfg, ("text_encoder",), "text_encoder.", cross=True,
                        lm_prefix="text_decoder.cls.", dec_prefix="text_decoder.bert.")
  if k in ("retrieval", "vqa"):
    out += text_entries(cfg, ("text_encoder",), "text_encoder.", cross=True)
  if k in ("caption", "vqa"):
    out += text_entries(cfg, ("text_decoder",), "text_decoder.bert.", cross=True,
                        lm_prefix="text_decoder.cls.")
  if k == "nlvr":  # official BLIP_NLVR: text_encoder (BertModel) + cls_head = Sequential(Linear, ReLU, Linear)
    out += text_entries(cfg, ("text_encoder",), "text_encoder.", cross=True, twin_cross=True)
    out += _linear(("cls_hidden",), "cls_head.0")
    out += _linear(("cls_out",), "cls_head.2")
  if cfg.has_itc:
    for n in ("vision_proj", "text_proj", "itm_head"):
      out += _linear((n,), n)
    out.append(Entry(("temp",), "temp", "copy"))
  return out


def momentum_table(cfg: BlipConfig) -> list[Entry]:
  """Momentum encoders of pretraining/retrieval checkpoints (ITC distillation), as a tree shaped
  like the retrieval model's towers: visual_encoder, text_encoder (one self-attention set), projs."""
  out = list(vit_entries(cfg, ("visual_encoder",), "visual_encoder_m."))
  out += text_entries(cfg, ("text_encoder",), "text_encoder_m.", cross=True)
  out += _linear(("vision_proj",), "vision_proj_m")
  out += _linear(("text_proj",), "text_proj_m")
  return out


# Training buffers kept beside the params (pretraining resumes from them).
BUFFER_KEYS = ("image_queue", "text_queue", "queue_ptr", "idx_queue", "ptr_queue")
# Keys that official files carry but that hold nothing we need (position_ids: arange buffers).
IGNORED = re.compile(r".*embeddings\.position_ids$")

_HF_VISION = [
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.norm\.", "vision_model.post_layernorm."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision_model.encoder.layers.\1.layer_norm\2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
]


def to_hf_key(key: str) -> str:
  for pat, rep in _HF_VISION:
    new, n = re.subn(pat, rep, key)
    if n:
      return new
  return key


def hf_table(cfg: BlipConfig, keep_temp: bool = False) -> list[Entry]:
  """The HF layout of a task model (HF has no pretraining class and stores no `temp`; loaders
  keep its entry with keep_temp=True and fill the default)."""
  if cfg.kind in ("pretrain", "nlvr"):
    raise ValueError(f"transformers has no BLIP {'pretraining' if cfg.kind == 'pretrain' else 'NLVR2'} class; "
                     "an HF export holds a caption, retrieval or vqa model")
  out = []
  for e in official_table(cfg):
    if e.key == "temp" and not keep_temp:
      continue
    out.append(dataclasses.replace(e, key=to_hf_key(e.key), aliases=tuple(to_hf_key(a) for a in e.aliases)))
  return out
