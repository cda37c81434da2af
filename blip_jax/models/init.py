"""Parameter initialisation and shapes (shapes via eval_shape: no compute)."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip_jax.models.blip import Blip
from blip_jax.models.config import BlipConfig

MOMENTUM_TOWERS = ("visual_encoder", "text_encoder", "vision_proj", "text_proj")


def _dummy(cfg: BlipConfig, batch: int = 1, length: int = 4):
  s = cfg.vision.image_size
  return (jnp.zeros((batch, s, s, 3), jnp.float32), jnp.zeros((batch, length), jnp.int32),
          jnp.ones((batch, length), jnp.int32))


def init_boxed(cfg: BlipConfig, rng):
  """Params with their logical-axis metadata (nn.LogicallyPartitioned boxes)."""
  return Blip(cfg).init(rng, *_dummy(cfg))["params"]


def init_params(cfg: BlipConfig, rng=None):
  """Plain float32 params (boxes removed). Random init (normal 0.02, LayerNorm 1/0, temp 0.07)."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return nn.meta.unbox(jax.jit(functools.partial(init_boxed, cfg))(rng))


def _paths(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_paths(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v.shape
  return out


@functools.lru_cache(maxsize=32)
def _shapes(cfg: BlipConfig):
  boxed = jax.eval_shape(lambda: init_boxed(cfg, jax.random.PRNGKey(0)))
  return nn.meta.unbox(boxed)


def param_shapes(cfg: BlipConfig) -> dict:
  """{path tuple: shape} of the model's params."""
  return _paths(_shapes(cfg))


def logical_axes(cfg: BlipConfig):
  """The params tree with a PartitionSpec of logical axis names at each leaf."""
  boxed = jax.eval_shape(lambda: init_boxed(cfg, jax.random.PRNGKey(0)))
  return nn.get_partition_spec(boxed)


def momentum_config(cfg: BlipConfig) -> BlipConfig:
  """The momentum encoders have the retrieval model's towers (one self-attention set)."""
  return cfg.replace(kind="retrieval")


def momentum_shapes(cfg: BlipConfig) -> dict:
  shapes = _paths(_shapes(momentum_config(cfg)))
  return {p: s for p, s in shapes.items() if p[0] in MOMENTUM_TOWERS}
