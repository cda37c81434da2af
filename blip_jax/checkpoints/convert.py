"""State dicts (official BLIP / HF transformers / DeiT / BERT) <-> our params trees."""
from __future__ import annotations

import logging
import re
from typing import Callable, Iterable, Optional

import jax
import numpy as np
from safetensors.numpy import save

from blip_jax import fs
from blip_jax.checkpoints import mapping
from blip_jax.checkpoints.interpolate import interpolate_pos_embed
from blip_jax.checkpoints.retarget import SOURCES, retarget
from blip_jax.checkpoints.torch_io import CheckpointError, read_hf_dir, read_pth
from blip_jax.models.config import BlipConfig, TextConfig, VisionConfig
from blip_jax.models.init import init_params, momentum_shapes, param_shapes

log = logging.getLogger(__name__)

HF_ARCHS = {
    "BlipForConditionalGeneration": "caption",
    "BlipForImageTextRetrieval": "retrieval",
    "BlipForQuestionAnswering": "vqa",
}


# ---- config inference -------------------------------------------------------------------------
def _count(sd, pattern):
  idx = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
  return max(idx) + 1 if idx else 0


def infer_kind(sd) -> str:
  has = lambda p: any(k.startswith(p) for k in sd)
  if has("cls_head.") and any(".crossattention.self0." in k for k in sd):
    return "nlvr"
  if has("text_decoder.") and has("itm_head."):
    return "pretrain"
  if has("text_decoder.") and has("text_encoder."):
    return "vqa"
  if has("text_decoder."):
    return "caption"
  if has("text_encoder.") and has("itm_head."):
    return "retrieval"
  raise CheckpointError("cannot tell the model kind: the state dict has neither text_encoder.* "
                        "with itm_head nor text_decoder.* keys")


def infer_official_config(sd, kind: Optional[str] = None, *, vision_heads: Optional[int] = None,
                          text_heads: Optional[int] = None, vision_eps: float = 1e-6,
                          image_size: Optional[int] = None) -> BlipConfig:
  """Official files carry no config: read it off the shapes (heads = width / 64 unless told)."""
  kind = kind or infer_kind(sd)
  try:
    width = sd["visual_encoder.cls_token"].shape[-1]
    patch = sd["visual_encoder.patch_embed.proj.weight"].shape[-1]
    n_pos = sd["visual_encoder.pos_embed"].shape[1] - 1
    vision = VisionConfig(
        width=width, depth=_count(sd, r"visual_encoder\.blocks\.(\d+)\."),
        heads=vision_heads or width // 64, mlp_dim=sd["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        patch=patch, image_size=image_size or int(round(n_pos ** 0.5)) * patch, layer_norm_eps=vision_eps)
    tp = "text_decoder.bert." if kind == "caption" else "text_encoder."
    tw = sd[tp + "embeddings.word_embeddings.weight"]
    text = TextConfig(
        width=tw.shape[1], depth=_count(sd, re.escape(tp) + r"encoder\.layer\.(\d+)\."),
        heads=text_heads or tw.shape[1] // 64, mlp_dim=sd[tp + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        vocab_size=tw.shape[0], max_positions=sd[tp + "embeddings.position_embeddings.weight"].shape[0])
  except KeyError as e:
    raise CheckpointError(f"not an official BLIP state dict: missing {e}") from None
  embed_dim = sd["vision_proj.weight"].shape[0] if "vision_proj.weight" in sd else 256
  extra = {}
  if kind == "nlvr":  # the first merging layer (official: 6); none stored: no layer merges
    merge = r"text_encoder\.encoder\.layer\.(\d+)\.crossattention\.output\.merge_layer\.weight$"
    merging = [int(m.group(1)) for k in sd if (m := re.match(merge, k))]
    extra["fusion_layer"] = min(merging) if merging else max(6, text.depth)
  return BlipConfig(kind=kind, vision=vision, text=text, embed_dim=embed_dim, **extra)


def infer_hf_config(hf: dict, *, vision_eps: Optional[float] = None) -> BlipConfig:
  archs = hf.get("architectures") or []
  kinds = [HF_ARCHS[a] for a in archs if a in HF_ARCHS]
  if not kinds:
    raise CheckpointError(f"config.json architectures {archs} is none of {sorted(HF_ARCHS)}")
  v, t = hf.get("vision_config", {}), hf.get("text_config", {})
  # defaults are transformers' BlipVisionConfig / BlipTextConfig defaults
  vision = VisionConfig(
      width=v.get("hidden_size", 768), depth=v.get("num_hidden_layers", 12),
      heads=v.get("num_attention_heads", 12), mlp_dim=v.get("intermediate_size", 3072),
      patch=v.get("patch_size", 16), image_size=v.get("image_size", 384),
      layer_norm_eps=vision_eps if vision_eps is not None else v.get("layer_norm_eps", 1e-5))
  text = TextConfig(
      width=t.get("hidden_size", 768), depth=t.get("num_hidden_layers", 12),
      heads=t.get("num_attention_heads", 8), mlp_dim=t.get("intermediate_size", 3072),
      vocab_size=t.get("vocab_size", 30524), max_positions=t.get("max_position_embeddings", 512),
      layer_norm_eps=t.get("layer_norm_eps", 1e-12), pad_id=t.get("pad_token_id", 0) or 0,
      sep_id=t.get("sep_token_id", 102) or 102, dec_id=t.get("bos_token_id", 30522) or 30522)
  return BlipConfig(kind=kinds[0], vision=vision, text=text,
                    embed_dim=hf.get("image_text_hidden_size", 256))


# ---- state dict -> params ---------------------------------------------------------------------
def _set(tree: dict, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def params_from_state_dict(sd: dict, table: Iterable[mapping.Entry], expected_shapes: dict, *,
                           strict: bool = True,
                           optional: dict | None = None, progress: Callable | None = None):
  """Fills a params tree from `sd` by `table`. Returns (params, used_keys).

  expected_shapes: {path: shape} of our model (from jax.eval_shape). pos_embed of another
  resolution is interpolated (bicubic, as official). `optional`: {path: default} for params a
  layout may not store (HF retrieval keeps no `temp`). Missing and mis-shaped keys are collected
  and raised together unless strict=False (then those params are left out).
  """
  params, used, missing, misshaped = {}, set(), [], []
  optional = optional or {}
  for e in table:
    used.update(a for a in e.aliases if a in sd)
    if e.key not in sd:
      alias = next((a for a in e.aliases if a in sd), None)
      if alias is None:
        if e.path in optional:
          _set(params, e.path, np.asarray(optional[e.path], np.float32))
          continue
        missing.append(e.key)
        continue
      key = alias
    else:
      key = e.key
    used.add(key)
    x = mapping.to_flax(np.asarray(sd[key]), e.layout)
    want = tuple(expected_shapes[e.path])
    if e.path[-1] == "pos_embed" and x.shape != want and x.ndim == 3 and x.shape[-1] == want[-1]:
      x = interpolate_pos_embed(x, want[1] - 1)
      log.info("interpolated %s from %d to %d positions", key, sd[key].shape[1], want[1])
    if tuple(x.shape) != want:
      misshaped.append(f"{key}: checkpoint {tuple(sd[key].shape)} vs model {want} (as {e.layout})")
      continue
    for a in e.aliases:
      if a in sd and key != a and not np.allclose(np.asarray(sd[a]), np.asarray(sd[key])):
        log.warning("tied alias %s differs from %s; using %s", a, key, key)
    _set(params, e.path, x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x)
    if progress:
      progress(1)
  if strict and (missing or misshaped):
    raise CheckpointError(_problems(missing=missing, misshaped=misshaped))
  return params, used


def _problems(*, missing=(), misshaped=(), unexpected=()):
  parts = []
  for title, items in (("missing keys", missing), ("mis-shaped keys", misshaped),
                       ("unexpected keys", unexpected)):
    if items:
      parts.append(f"{len(items)} {title}:\n  " + "\n  ".join(sorted(items)))
  return "checkpoint does not fit the model (pass strict=False for a partial load):\n" + "\n".join(parts)


def _expected_shapes(cfg: BlipConfig) -> dict:
  return param_shapes(cfg)


def load_state_dict(sd: dict, cfg: BlipConfig, layout: str = "official", *, strict: bool = True,
                    source_kind: Optional[str] = None, progress: Callable | None = None):
  """Converts an official or HF state dict to (params, extras).

  extras: {'momentum': params-like tree, 'buffers': {image_queue, ...}} when the file has them.
  Loading a file of another kind (e.g. a pretraining checkpoint into a caption model, as the
  official finetuning scripts do) ignores the towers the target does not have.
  """
  table = mapping.official_table(cfg) if layout == "official" else mapping.hf_table(cfg, keep_temp=True)
  # no `temp` in an HF retrieval model, nor in official blip_itm.py's BLIP_ITM: the official init
  optional = {("temp",): 0.07} if (cfg.kind == "retrieval" or (layout == "hf" and cfg.has_itc)) else {}
  params, used = params_from_state_dict(sd, table, _expected_shapes(cfg), strict=strict,
                                        optional=optional, progress=progress)
  extras = {}
  if layout == "official" and any(k.startswith("visual_encoder_m.") for k in sd) and cfg.has_itc:
    mom, mused = params_from_state_dict(sd, mapping.momentum_table(cfg), momentum_shapes(cfg),
                                        strict=strict, progress=progress)
    extras["momentum"], used = mom, used | mused
  buffers = {k: np.asarray(sd[k]) for k in mapping.BUFFER_KEYS if k in sd}
  if buffers:
    extras["buffers"] = buffers
    used |= set(buffers)
  unexpected = [k for k in sd if k not in used and not mapping.IGNORED.match(k)]
  if unexpected:
    other_kind = source_kind is not None and source_kind != cfg.kind
    if strict and not other_kind:
      raise CheckpointError(_problems(unexpected=unexpected))
    log.info("ignored %d keys the %s model does not use (e.g. %s)", len(unexpected), cfg.kind,
             unexpected[0])
  return params, extras


def load_official(path: str, kind: Optional[str] = None, *, image_size: Optional[int] = None,
                  vision_eps: float = 1e-6, vision_heads=None, text_heads=None, strict: bool = True,
                  sd: dict | None = None, progress=None):
  """An official BLIP .pth -> (config, params, extras). `kind` defaults to the file's own."""
  sd = read_pth(path) if sd is None else sd
  source_kind = infer_kind(sd)
  if kind == "nlvr" and source_kind != "nlvr":
    return _load_official_as_nlvr(sd, source_kind, path, image_size=image_size, vision_eps=vision_eps,
                                  vision_heads=vision_heads, text_heads=text_heads, strict=strict, progress=progress)
  cfg = infer_official_config(sd, kind or source_kind, vision_heads=vision_heads, text_heads=text_heads,
                              vision_eps=vision_eps, image_size=image_size)
  params, extras = load_state_dict(sd, cfg, "official", strict=strict, source_kind=source_kind,
                                   progress=progress)
  return cfg, params, extras


def _load_official_as_nlvr(sd, source_kind, path, *, strict, **kw):
  """A pretraining (or retrieval) .pth as the start of NLVR2 fine-tuning, as official BLIP_NLVR's
  load_checkpoint does: the file's own model, then its one cross-attention copied into both image
  branches; the merge layers and the head initialised fresh (seed 0)."""
  if source_kind not in SOURCES["nlvr"]:
    raise CheckpointError(f"{path} is a {source_kind} checkpoint; an NLVR2 model starts from a pretraining "
                          "(or retrieval) checkpoint")
  progress = kw.pop("progress")
  src_cfg = infer_official_config(sd, source_kind, **kw)
  params, _ = load_state_dict(sd, src_cfg, "official", strict=strict, progress=progress)
  cfg = src_cfg.replace(kind="nlvr")
  fresh = jax.tree.map(np.asarray, init_params(cfg))
  params, _ = retarget(params, {}, source_kind, "nlvr", fresh, name=path)
  return cfg, params, {}


def load_hf(path: str, *, vision_eps: Optional[float] = None, image_size: Optional[int] = None,
            strict: bool = True, progress=None):
  """A transformers save_pretrained dir -> (config, params). Tied LM-head keys are re-tied."""
  hf, sd = read_hf_dir(path)
  cfg = infer_hf_config(hf, vision_eps=vision_eps)
  if image_size:
    cfg = cfg.replace(vision=VisionConfig(**{**cfg.vision.__dict__, "image_size": image_size}))
  params, _ = load_state_dict(sd, cfg, "hf", strict=strict, progress=progress)
  return cfg, params


# ---- params -> HF dir -------------------------------------------------------------------------
def hf_config_dict(cfg: BlipConfig) -> dict:
  v, t = cfg.vision, cfg.text
  arch = {k: a for a, k in HF_ARCHS.items()}[cfg.kind]
  return {
      "architectures": [arch], "model_type": "blip", "image_text_hidden_size": cfg.embed_dim,
      "projection_dim": 512, "logit_scale_init_value": 2.6592, "label_smoothing": 0.0,
      "vision_config": {
          "model_type": "blip_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
          "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "image_size": v.image_size,
          "patch_size": v.patch, "layer_norm_eps": v.layer_norm_eps, "hidden_act": "gelu",
          "attention_dropout": 0.0},
      "text_config": {
          "model_type": "blip_text_model", "hidden_size": t.width, "intermediate_size": t.mlp_dim,
          "num_hidden_layers": t.depth, "num_attention_heads": t.heads, "vocab_size": t.vocab_size,
          "max_position_embeddings": t.max_positions, "layer_norm_eps": t.layer_norm_eps,
          "encoder_hidden_size": t.width if cfg.kind == "vqa" else v.width, "hidden_act": "gelu",
          "pad_token_id": t.pad_id, "bos_token_id": t.dec_id, "eos_token_id": 2, "sep_token_id": t.sep_id,
          "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "is_decoder": True},
  }


def to_state_dict(params: dict, table: Iterable[mapping.Entry], with_aliases: bool = False) -> dict:
  sd = {}
  for e in table:
    node = params
    for p in e.path:
      node = node[p]
    x = mapping.to_torch(np.asarray(node, np.float32), e.layout)
    sd[e.key] = x
    if with_aliases:
      for a in e.aliases:
        sd[a] = x
  return sd


def export_hf(params: dict, cfg: BlipConfig, out_dir: str, overwrite: bool = False) -> str:
  """Writes config.json + model.safetensors that transformers' BLIP classes load with no missing
  or unexpected keys (the tied LM-head aliases are left out, as save_pretrained does). Written to
  a temporary folder and renamed when complete; an existing non-empty out_dir needs overwrite."""

  fs.check_output(out_dir, overwrite, "export folder")
  fs.makedirs(fs.path(out_dir).parent)
  tmp = fs.temp_sibling(out_dir)
  fs.makedirs(tmp)
  sd = to_state_dict(params, mapping.hf_table(cfg))
  fs.write_bytes(fs.join(tmp, "model.safetensors"), save(sd, metadata={"format": "pt"}))
  fs.write_json(fs.join(tmp, "config.json"), hf_config_dict(cfg), indent=2)
  return fs.publish(tmp, out_dir)
