"""Building blocks shared by the ViT and the MED text transformer.

Every parameter is created through `param_init(...)`, which attaches logical axis names, so the
trainer can shard params and optimizer state by rules (MaxText style). Params are float32; `dtype`
is the compute dtype.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
MASK_VALUE = -10000.0  # official BLIP/BERT additive mask value (transformers 4.15 get_extended_attention_mask)

# Logical axis names used on parameters. The trainer maps them to mesh axes with rules (data).
#   embed: model width (vision or text), mlp: FFN hidden, heads: attention projection output,
#   qkv: fused q/k/v output, vocab: vocabulary, proj: ITC projection, None: replicated.


def param_init(init: Callable, axes: Sequence[Optional[str]]) -> Callable:
  return nn.with_logical_partitioning(init, tuple(axes))


def normal(std: float = 0.02) -> Callable:
  return nn.initializers.normal(stddev=std)


def dense(features: int, axes: tuple, name: str, dtype: Dtype, std: float = 0.02) -> nn.Dense:
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=param_init(normal(std), axes),
      bias_init=param_init(nn.initializers.zeros, (axes[-1],)))


def layer_norm(eps: float, name: str, dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
      scale_init=param_init(nn.initializers.ones, ("norm",)),
      bias_init=param_init(nn.initializers.zeros, ("norm",)))


def gelu(x):
  return nn.gelu(x, approximate=False)  # exact erf GELU, as torch nn.GELU / BERT "gelu"


ATTENTION = ("auto", "xla", "cudnn", "einsum")
_said: set = set()


def _say_once(message: str) -> None:
  if message not in _said:
    _said.add(message)
    logging.getLogger(__name__).warning(message)


_TARGET: contextvars.ContextVar = contextvars.ContextVar("attention_target", default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
  """'auto' chooses for `platform` ("gpu", "tpu", "cpu") instead of this process's backend, while
  tracing for another machine (train/aot.py: a GPU or TPU step compiled on a CPU)."""
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)


def cudnn_unfit(q) -> str | None:
  """Why cuDNN's fused attention cannot take these inputs (None: it can). cuDNN's kernels take
  bfloat16 / float16 only, and head sizes that are multiples of 8 up to 128. (Its backward pass in
  jax 0.10.2 also wants even sequence lengths: dot_product_attention pads odd ones, e.g. the ViT's
  197 or 577 tokens.)"""
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN fused attention needs bfloat16 or float16 inputs, not {q.dtype}"
  depth = q.shape[-1]
  if depth % 8 or depth > 128:
    return f"cuDNN fused attention needs a head size that is a multiple of 8 up to 128, not {depth}"
  return None


def attention_implementation(requested: str, q) -> str:
  """'auto': cuDNN's fused kernel on NVIDIA GPUs where its constraints hold (said once where they do
  not), XLA's jax.nn.dot_product_attention on other accelerators, and the einsum path on CPUs, where
  XLA runs jax.nn's heads-in-the-middle einsums 1.2-2.4x slower (ViT-B/16 at 224 px, batch 8:
  32 vs 13 ms forward, 2 cores). 'cudnn' where it cannot run is an error."""
  if requested not in ATTENTION:
    raise ValueError(f"model attention {requested!r}: one of {ATTENTION}")
  if requested in ("xla", "einsum"):
    return requested
  why = cudnn_unfit(q)
  if requested == "cudnn":
    if why:
      raise ValueError(f"attention='cudnn': {why}; use 'auto' or 'xla'")
    return "cudnn"
  backend = _TARGET.get() or jax.default_backend()
  if backend != "gpu":
    return "einsum" if backend == "cpu" else "xla"
  if why:
    _say_once(f"attention 'auto' uses XLA here: {why}")
    return "xla"
  return "cudnn"


def dot_product_attention(q, k, v, bias=None, *, dropout_rate: float = 0.0, dropout_rng=None,
                          dtype: Dtype = jnp.float32, heads_first: bool = False, implementation: str = "auto"):
  """The one attention function of the package: jax.nn.dot_product_attention (XLA, or cuDNN's fused
  kernel that never materialises the [Lq, Lk] scores), or `einsum_attention` where probabilities
  are dropped out (training the text transformer: jax.nn's attention has no dropout) or asked for.

  q: [B, Lq, H, Dh]; k, v: [B, Lk, H, Dh], or [B, H, Lk, Dh] with heads_first (the layout of
  cached keys/values); bias: additive, broadcastable to [B, H, Lq, Lk]. Scores, bias and softmax are
  float32 whatever the compute dtype; the probabilities meet v in the compute dtype.
  """
  impl = "einsum" if (dropout_rate > 0.0 and dropout_rng is not None) else attention_implementation(
      implementation, q)
  if impl == "einsum":
    return einsum_attention(q, k, v, bias, dropout_rate=dropout_rate, dropout_rng=dropout_rng, dtype=dtype,
                            heads_first=heads_first)
  if heads_first:
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
  if bias is not None:
    bias = bias.astype(jnp.float32)
    if impl == "cudnn":  # cuDNN reads a bias over whole [Lq, Lk] score matrices
      bias = jnp.broadcast_to(bias, bias.shape[:2] + (q.shape[1], k.shape[1])).astype(dtype)
  lq, lk = q.shape[1], k.shape[1]
  if impl == "cudnn" and (lq % 2 or lk % 2):
    # jax 0.10.2's cuDNN backward refuses odd sequence lengths: one zero row is added to the queries
    # (its output is dropped) and to the keys and values, kept out of every softmax by cuDNN's
    # padding mask (the true key length) or, with a bias, by the mask value in the bias's new column
    pad = lambda t, n: jnp.pad(t, ((0, 0), (0, n % 2), (0, 0), (0, 0)))
    q, k, v = pad(q, lq), pad(k, lk), pad(v, lk)
    if bias is None:
      lengths = lambda n: jnp.full((q.shape[0],), n, jnp.int32)
      out = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths(lq), key_value_seq_lengths=lengths(lk),
                                         implementation=impl)
    else:
      bias = jnp.pad(bias, ((0, 0), (0, 0), (0, lq % 2), (0, 0)))
      bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, lk % 2)), constant_values=MASK_VALUE)
      out = jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=impl)
    return out[:, :lq]
  return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=impl)


def einsum_attention(q, k, v, bias=None, *, dropout_rate: float = 0.0, dropout_rng=None,
                     dtype: Dtype = jnp.float32, heads_first: bool = False):
  """Attention written out (the official code's matmul, softmax, dropout, matmul), with
  attention-probability dropout; the reference the fused path is tested against."""
  depth = q.shape[-1]
  # Heads-first batched matmuls: XLA:CPU runs einsums with the heads axis in the middle 2-4x slower
  # (per-batch transposes inside the dot); here the transposes are explicit, once.
  q = (q / jnp.sqrt(depth).astype(q.dtype)).transpose(0, 2, 1, 3)
  if not heads_first:
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  acc = None if q.dtype == jnp.float32 else jnp.float32
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=acc).astype(jnp.float32)
  if bias is not None:
    scores = scores + bias.astype(jnp.float32)
  probs = jax.nn.softmax(scores, axis=-1)
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(dtype), v.astype(dtype)).transpose(0, 2, 1, 3)


def padding_bias(mask):
  """[B, Lk] 1/0 key mask -> additive bias [B, 1, 1, Lk] (official: (1 - mask) * -10000)."""
  return ((1.0 - mask.astype(jnp.float32)) * MASK_VALUE)[:, None, None, :]


def causal_bias(q_pos, k_pos):
  """Additive bias [1, 1, Lq, Lk] letting query position i see keys at positions <= i."""
  allowed = k_pos[None, :] <= q_pos[:, None]
  return jnp.where(allowed, 0.0, MASK_VALUE)[None, None]


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example (timm DropPath)."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)
