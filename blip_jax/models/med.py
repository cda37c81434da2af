"""The MED text transformer (official models/med.py: BERT-base with cross-attention in every layer).

Embeddings: word + absolute position -> LayerNorm -> dropout (no token types).
Layer: self-attention -> [cross-attention to image (or question) tokens] -> FFN; post-LN, eps 1e-12.
The pretraining model keeps two self-attention sets per layer (`self_attn` for the encoder roles,
`self_attn_dec` for the decoder) and shares everything else, which is exactly the official
tie_encoder_decoder_weights(skip_key='/attention') sharing (official blip_pretrain.py).

Incremental decoding (`decode=True`) keeps a self-attention KV cache in the 'cache' collection and
computes the cross-attention keys/values once per image (stored in the same collection).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip_jax.models.config import TextConfig
from blip_jax.models.layers import (
  Dtype,
  causal_bias,
  dense,
  dot_product_attention,
  gelu,
  layer_norm,
  normal,
  padding_bias,
  param_init,
)


class BertAttention(nn.Module):
  """Self- or cross-attention block with output dense, dropout, residual and post-LayerNorm."""
  cfg: TextConfig
  is_cross: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, x, kv=None, bias=None, *, causal: bool = False, decode: bool = False,
               key_mask=None, train: bool = False):
    c = self.cfg
    b, l, d = x.shape
    h = c.heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], h, d // h)
    q = split(dense(d, ("embed", "heads"), "query", self.dtype)(x))
    heads_first = False
    if self.is_cross:
      if decode and kv is None:  # keys/values of the memory were computed once, at prefill
        k, v, bias = (self.get_variable("cache", n) for n in ("cross_key", "cross_value", "cross_bias"))
      else:
        k = split(dense(d, ("embed", "heads"), "key", self.dtype)(kv))
        v = split(dense(d, ("embed", "heads"), "value", self.dtype)(kv))
        if decode:
          if bias is None:
            bias = jnp.zeros((kv.shape[0], 1, 1, kv.shape[1]), jnp.float32)
          k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # cached heads-first: read every step
          self.put_variable("cache", "cross_key", k)
          self.put_variable("cache", "cross_value", v)
          self.put_variable("cache", "cross_bias", bias)
      heads_first = decode
    else:
      k = split(dense(d, ("embed", "heads"), "key", self.dtype)(x))
      v = split(dense(d, ("embed", "heads"), "value", self.dtype)(x))
      if decode:
        k, v, bias = self._update_cache(k, v, key_mask)
        heads_first = True
      elif causal:
        pos = jnp.arange(l)
        bias = causal_bias(pos, pos) + (0.0 if bias is None else bias)
    # Grouped memory (ITM re-ranking): B texts over B/G images, G consecutive texts per image. Each
    # image's keys/values are projected once and its G texts attend as one row of G*L queries
    # (cross-attention queries are independent of each other, so this equals repeating the image).
    group = b // k.shape[0] if (self.is_cross and not heads_first) else 1
    if group > 1:
      q = q.reshape(k.shape[0], group * l, h, d // h)
    rng = self.make_rng("dropout") if (train and c.dropout > 0) else None
    out = dot_product_attention(q, k, v, bias, dropout_rate=c.dropout if train else 0.0,
                                dropout_rng=rng, dtype=self.dtype, heads_first=heads_first,
                                implementation=c.attention)
    out = dense(d, ("heads", "embed"), "out", self.dtype)(out.reshape(b, l, d))
    out = nn.Dropout(c.dropout)(out, deterministic=not train)
    return layer_norm(c.layer_norm_eps, "norm", self.dtype)(out + x)

  def _update_cache(self, k, v, key_mask):
    """Writes this chunk's keys/values at the cache index; returns full keys/values and the bias."""
    b, l, h, dh = k.shape
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # cached heads-first [B, H, L, Dh]
    # At init the cache is created with the length of the dummy input: that is the max length.
    ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    cm = self.variable("cache", "cached_mask", jnp.zeros, (b, l), jnp.float32)
    ci = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    idx = ci.value
    ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, 0, idx, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, 0, idx, 0))
    m = jnp.ones((b, l), jnp.float32) if key_mask is None else key_mask.astype(jnp.float32)
    cm.value = jax.lax.dynamic_update_slice(cm.value, m, (0, idx))
    ci.value = idx + l
    max_len = ck.value.shape[2]
    bias = causal_bias(idx + jnp.arange(l), jnp.arange(max_len)) + padding_bias(cm.value)
    return ck.value, cv.value, bias


class TwinCrossAttention(nn.Module):
  """NLVR2's cross-attention (official nlvr_encoder.py): the text attends to each of two images
  with its own query/key/value and output dense (suffix 0 / 1). Below the fusion layer the two
  outputs are averaged; from it on they are concatenated and merged by a linear 2D -> D (no
  activation). Then one dropout, residual and LayerNorm, shared."""
  cfg: TextConfig
  merge: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, x, memories, biases, train: bool = False):
    c = self.cfg
    b, l, d = x.shape
    split = lambda t: t.reshape(t.shape[0], t.shape[1], c.heads, d // c.heads)
    outs = []
    for i, (kv, bias) in enumerate(zip(memories, biases)):
      q = split(dense(d, ("embed", "heads"), f"query{i}", self.dtype)(x))
      k = split(dense(d, ("embed", "heads"), f"key{i}", self.dtype)(kv))
      v = split(dense(d, ("embed", "heads"), f"value{i}", self.dtype)(kv))
      rng = self.make_rng("dropout") if (train and c.dropout > 0) else None
      out = dot_product_attention(q, k, v, bias, dropout_rate=c.dropout if train else 0.0, dropout_rng=rng,
                                  dtype=self.dtype, implementation=c.attention)
      outs.append(dense(d, ("heads", "embed"), f"out{i}", self.dtype)(out.reshape(b, l, d)))
    if self.merge:
      y = dense(d, ("mlp", "embed"), "merge", self.dtype)(jnp.concatenate(outs, axis=-1))
    else:
      y = (outs[0] + outs[1]) / 2
    y = nn.Dropout(c.dropout)(y, deterministic=not train)
    return layer_norm(c.layer_norm_eps, "norm", self.dtype)(y + x)


class BertLayer(nn.Module):
  cfg: TextConfig
  has_cross: bool
  decoder_self_attn: bool  # pretraining: a second self-attention set used by the decoder role
  dtype: Dtype
  twin_cross: bool = False  # NLVR2: memory is a pair of images, one cross-attention each
  merge: bool = False  # NLVR2: this layer merges the pair by a linear layer (else averages)

  @nn.compact
  def __call__(self, x, bias, memory=None, memory_bias=None, *, causal=False, decode=False,
               key_mask=None, train=False):
    c = self.cfg
    name = "self_attn_dec" if (causal and self.decoder_self_attn) else "self_attn"
    if self.decoder_self_attn and self.is_initializing():
      # create both self-attention sets whatever role init is traced with
      other = "self_attn" if name == "self_attn_dec" else "self_attn_dec"
      BertAttention(c, False, self.dtype, name=other)(x, bias=bias)
    x = BertAttention(c, False, self.dtype, name=name)(
        x, bias=bias, causal=causal, decode=decode, key_mask=key_mask, train=train)
    if self.has_cross and self.twin_cross:
      x = TwinCrossAttention(c, self.merge, self.dtype, name="cross_attn")(x, memory, memory_bias, train=train)
    elif self.has_cross and (memory is not None or decode):
      x = BertAttention(c, True, self.dtype, name="cross_attn")(
          x, memory, memory_bias, decode=decode, train=train)
    y = dense(c.mlp_dim, ("embed", "mlp"), "fc1", self.dtype)(x)
    y = dense(c.width, ("mlp", "embed"), "fc2", self.dtype)(gelu(y))
    y = nn.Dropout(c.dropout)(y, deterministic=not train)
    return layer_norm(c.layer_norm_eps, "ffn_norm", self.dtype)(y + x)


class TextTransformer(nn.Module):
  """BERT-style MED. Roles are chosen per call:

  unimodal encoder:        memory=None,  causal=False   (ITC, [CLS])
  image-grounded encoder:  memory=image, causal=False   (ITM / VQA question, [ENC])
  image-grounded decoder:  memory=image, causal=True    (LM, [DEC]); uses `self_attn_dec` if present
  NLVR2 encoder:           memory=(image0, image1)      (twin_cross: one cross-attention per image)
  """
  cfg: TextConfig
  cross_width: Optional[int] = None  # None: no cross-attention layers
  decoder_self_attn: bool = False
  lm_head: bool = False
  dtype: Dtype = jnp.float32
  twin_cross: bool = False  # NLVR2: two cross-attentions per layer, memory = (image0, image1)
  fusion_layer: int = 6  # NLVR2: layers from this one on merge the pair by a linear layer

  def setup(self):
    c = self.cfg
    self.word_embeddings = nn.Embed(
        c.vocab_size, c.width, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=param_init(normal(0.02), ("vocab", "embed")), name="word_embeddings")
    self.position_embeddings = nn.Embed(
        c.max_positions, c.width, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=param_init(normal(0.02), (None, "embed")), name="position_embeddings")
    self.embed_norm = layer_norm(c.layer_norm_eps, "embed_norm", self.dtype)
    self.embed_dropout = nn.Dropout(c.dropout)
    self.layers = [BertLayer(c, self.cross_width is not None, self.decoder_self_attn, self.dtype,
                             twin_cross=self.twin_cross, merge=self.twin_cross and i >= self.fusion_layer,
                             name=f"layer_{i}") for i in range(c.depth)]
    if self.lm_head:
      self.lm_dense = dense(c.width, ("embed", "embed_out"), "lm_dense", self.dtype)
      self.lm_norm = layer_norm(c.layer_norm_eps, "lm_norm", self.dtype)
      self.lm_bias = self.param("lm_bias", param_init(nn.initializers.zeros, ("vocab",)),
                                (c.vocab_size,))

  def __call__(self, ids, mask=None, memory=None, memory_mask=None, *, causal=False, decode=False,
               position_offset=0, positions=None, self_bias=None, train=False):
    """ids [B, L] int; mask [B, L] 1/0; memory [B, M, W], or [B / G, M, W] shared by G consecutive
    rows (one image's tokens for G candidate texts). Packed rows (several sequences in one row,
    VQA answer ranking) pass their own `positions` [B, L] and self-attention bias `self_bias`
    [B, 1, L, L] (which then replaces the padding mask). Returns hidden states [B, L, D]."""
    if mask is None:
      mask = jnp.ones(ids.shape, jnp.int32)
    if positions is None:
      x = self.word_embeddings(ids) + self.position_embeddings(position_offset + jnp.arange(ids.shape[1]))[None]
    else:
      x = self.word_embeddings(ids) + self.position_embeddings(positions)
    x = self.embed_dropout(self.embed_norm(x), deterministic=not train)
    bias = None if decode else (padding_bias(mask) if self_bias is None else self_bias)
    memory_bias = None
    if self.twin_cross:  # a pair of memories (and of masks, or None)
      memory_bias = tuple(None if m is None else padding_bias(m) for m in (memory_mask or (None, None)))
    elif memory is not None and memory_mask is not None:
      memory_bias = padding_bias(memory_mask)
    for layer in self.layers:
      x = layer(x, bias, memory, memory_bias, causal=causal, decode=decode, key_mask=mask,
                train=train)
    return x

  def logits(self, hidden):
    """LM head: dense -> GELU -> LayerNorm -> tied word embeddings + bias. [B, L, V] float32."""
    h = self.lm_norm(gelu(self.lm_dense(hidden)))
    return self.word_embeddings.attend(h).astype(jnp.float32) + self.lm_bias
