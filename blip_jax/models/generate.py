"""Caption generation on the KV-cached decoder (static shapes, one jit per configuration).

Greedy decoding as transformers' `generate` does it for BLIP: the prompt (first token [DEC]) is run
once, filling the self-attention cache and the cross-attention keys/values of the image; then one
token per step. `min_length` / `max_length` count the prompt tokens, as the official code counts
them. Finished sequences are padded with [PAD]. (Beam search and nucleus sampling: not yet.)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from blip_jax.models.config import BlipConfig
from blip_jax.models.decoding import decode_step, init_cache


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_length", "min_length"))
def greedy(cfg: BlipConfig, params, memory, prompt, *, max_length: int, min_length: int = 0, memory_mask=None):
  """memory [B, M, W] (image tokens, or question states for VQA); prompt [B, P] int32 starting with
  [DEC]. Returns tokens [B, max_length] (prompt included, [PAD] after [SEP])."""
  b, p = prompt.shape
  t_cfg = cfg.text
  cache = init_cache(cfg, b, max_length, memory.shape[1])
  logits, cache = decode_step(cfg, params, cache, prompt, memory, memory_mask)
  tokens = jnp.full((b, max_length), t_cfg.pad_id, jnp.int32).at[:, :p].set(prompt)
  vocab = jnp.arange(logits.shape[-1])

  def cond(s):
    t, _, _, _, done = s
    return (t < max_length) & ~jnp.all(done)

  def body(s):
    t, tokens, cache, last, done = s
    last = jnp.where((t < min_length) & (vocab == t_cfg.sep_id)[None], -jnp.inf, last)
    nxt = jnp.where(done, t_cfg.pad_id, jnp.argmax(last, axis=-1).astype(jnp.int32))
    tokens = tokens.at[:, t].set(nxt)
    done = done | (nxt == t_cfg.sep_id)
    logits, cache = decode_step(cfg, params, cache, nxt[:, None], position_offset=t)
    return t + 1, tokens, cache, logits[:, -1], done

  init = (jnp.asarray(p, jnp.int32), tokens, cache, logits[:, -1], jnp.zeros((b,), bool))
  return jax.lax.while_loop(cond, body, init)[1]
