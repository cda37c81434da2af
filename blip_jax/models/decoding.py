"""KV-cache plumbing for incremental decoding (generation is built on `Blip.decode`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from blip_jax.models.blip import Blip
from blip_jax.models.config import BlipConfig


def memory_width(cfg: BlipConfig) -> int:
  return cfg.text.width if cfg.kind == "vqa" else cfg.vision.width


def init_cache(cfg: BlipConfig, batch: int, max_len: int, memory_len: int):
  """A zero cache for `batch` sequences of up to `max_len` tokens over `memory_len` memory tokens."""
  ids = jnp.zeros((batch, max_len), jnp.int32)
  memory = jnp.zeros((batch, memory_len, memory_width(cfg)), jnp.dtype(cfg.dtype))
  shapes = jax.eval_shape(lambda: Blip(cfg).init(jax.random.PRNGKey(0), ids, memory, method=Blip.decode))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def decode_step(cfg: BlipConfig, params, cache, ids, memory=None, memory_mask=None, position_offset=0):
  """Runs `ids` (new tokens) through the decoder on `cache`. Returns (logits [B, L, V], new cache)."""
  logits, mutated = Blip(cfg).apply({"params": params, "cache": cache}, ids, memory, memory_mask,
                                    position_offset=position_offset, method=Blip.decode, mutable=["cache"])
  return logits, mutated["cache"]
