"""Vision Transformer as BLIP uses it (official models/vit.py; timm style, pre-LN).

patch conv -> [CLS] + patches -> + learned position embedding -> pre-LN blocks (fused qkv) ->
final LayerNorm on all tokens. Output: all tokens [B, 1+N, D]; index 0 is [CLS].
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from blip_jax.models.config import VisionConfig
from blip_jax.models.layers import DropPath, Dtype, dense, dot_product_attention, gelu, layer_norm, normal, param_init


class Attention(nn.Module):
  cfg: VisionConfig
  dtype: Dtype

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    h = self.cfg.heads
    qkv = dense(3 * d, ("embed", "qkv"), "qkv", self.dtype)(x)  # rows [q; k; v] as official
    q, k, v = jnp.split(qkv.reshape(b, n, 3, h, d // h), 3, axis=2)
    out = dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], dtype=self.dtype,
                                implementation=self.cfg.attention)
    return dense(d, ("heads", "embed"), "proj", self.dtype)(out.reshape(b, n, d))


class Block(nn.Module):
  cfg: VisionConfig
  drop_path: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = self.cfg
    drop = DropPath(self.drop_path)
    x = x + drop(Attention(c, self.dtype, name="attn")(layer_norm(c.layer_norm_eps, "norm1", self.dtype)(x)),
                 deterministic=not train)
    y = layer_norm(c.layer_norm_eps, "norm2", self.dtype)(x)
    y = dense(c.mlp_dim, ("embed", "mlp"), "fc1", self.dtype)(y)
    y = dense(c.width, ("mlp", "embed"), "fc2", self.dtype)(gelu(y))
    return x + drop(y, deterministic=not train)


class ViT(nn.Module):
  cfg: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels, train: bool = False):
    """pixels: [B, H, W, 3] float (CLIP-normalised). Returns [B, 1 + N, D]."""
    c = self.cfg
    x = nn.Conv(c.width, (c.patch, c.patch), strides=(c.patch, c.patch), padding="VALID",
                dtype=self.dtype, param_dtype=jnp.float32, name="patch_embed",
                kernel_init=param_init(normal(0.02), (None, None, None, "embed")),
                bias_init=param_init(nn.initializers.zeros, ("embed",)))(pixels.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, c.width)
    cls = self.param("cls_token", param_init(normal(0.02), (None, None, "embed")), (1, 1, c.width))
    pos = self.param("pos_embed", param_init(normal(0.02), (None, None, "embed")),
                     (1, c.num_patches + 1, c.width))
    if x.shape[1] + 1 != pos.shape[1]:
      raise ValueError(f"image gives {x.shape[1]} patches but the model was built for "
                       f"{c.image_size}px ({c.num_patches} patches); resize the image or interpolate "
                       "the position embedding at load time")
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.width)).astype(x.dtype), x], axis=1)
    x = x + pos.astype(x.dtype)
    block = nn.remat(Block, static_argnums=(2,)) if c.remat else Block
    for i in range(c.depth):
      rate = c.drop_path * i / max(c.depth - 1, 1)  # linspace(0, rate, depth) as official
      x = block(c, rate, self.dtype, name=f"blocks_{i}")(x, train)
    return layer_norm(c.layer_norm_eps, "norm", self.dtype)(x)
