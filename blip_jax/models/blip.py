"""BLIP: one model for understanding and generation (Li et al. 2022), as a Flax linen module.

`Blip(config)` builds the towers of `config.kind` (see BlipConfig). Each method is one role of the
paper and a pure function of (params, inputs) through `model.apply(params, ..., method=...)`:

  encode_image  ViT tokens [B, 1+N, Dv]
  image_feat    ITC image feature  normalize(vision_proj(CLS))                 [B, 256]
  video_feat    ITC video feature  normalize(mean over frames of vision_proj(CLS))
  text_feat     ITC text feature   normalize(text_proj(unimodal encoder CLS)) [B, 256]
  itm_logits    ITM head on the image-grounded encoder's [ENC] state           [B, 2]
  lm_logits     image-grounded causal decoder, LM head                        [B, L, V]
  vqa_question  question encoder states (cross-attends to the image)          [B, Lq, D]
  vqa_answer_logits  answer decoder over question states                      [B, La, V]
  vqa_packed_logits  the same over packed candidate answers (answer ranking)   [B, T, V]
  nlvr_logits   NLVR2 head on the [ENC] state of the text grounded in two images [B, 2]
  decode        one incremental decoder call with the KV cache (generation)

Each role writes its own first token ([CLS] / [ENC] / [DEC]), so callers may pass ids from any
tokenizer call; passing ids that already carry it changes nothing.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip_jax.models.config import BlipConfig
from blip_jax.models.layers import dense, param_init
from blip_jax.models.med import TextTransformer
from blip_jax.models.vit import ViT

TEMP_INIT = 0.07


def _l2_normalize(x, eps=1e-12):
  # torch F.normalize: x / max(||x||, eps)
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _torch_linear_init(fan_in: int):
  """torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -1.0 / fan_in ** 0.5, 1.0 / fan_in ** 0.5)
  return init


def with_first_token(ids, token_id):
  return ids.at[:, 0].set(token_id)


class Blip(nn.Module):
  config: BlipConfig

  def setup(self):
    c = self.config
    dt = jnp.dtype(c.dtype)
    self.visual_encoder = ViT(c.vision, dt)
    if c.kind == "pretrain":  # encoder and decoder share all but self-attention
      self.text_encoder = TextTransformer(c.text, c.vision.width, decoder_self_attn=True,
                                          lm_head=True, dtype=dt)
    elif c.kind in ("retrieval", "vqa"):
      self.text_encoder = TextTransformer(c.text, c.vision.width, dtype=dt)
    elif c.kind == "nlvr":
      self.text_encoder = TextTransformer(c.text, c.vision.width, dtype=dt, twin_cross=True,
                                          fusion_layer=c.fusion_layer)
      # official cls_head: Linear(D, D) - ReLU - Linear(D, 2), torch's default Linear init
      uniform = _torch_linear_init(c.text.width)  # the fan-in of both layers
      torch_init = lambda axes: dict(kernel_init=param_init(uniform, axes), bias_init=param_init(uniform, axes[-1:]))
      self.cls_hidden = nn.Dense(c.text.width, dtype=dt, param_dtype=jnp.float32, name="cls_hidden",
                                 **torch_init(("embed", "mlp")))
      self.cls_out = nn.Dense(2, dtype=dt, param_dtype=jnp.float32, name="cls_out", **torch_init(("mlp", None)))
    if c.kind == "caption":
      self.text_decoder = TextTransformer(c.text, c.vision.width, lm_head=True, dtype=dt)
    elif c.kind == "vqa":  # the answer decoder attends to question states (text width)
      self.text_decoder = TextTransformer(c.text, c.text.width, lm_head=True, dtype=dt)
    if c.has_itc:
      self.vision_proj = dense(c.embed_dim, ("embed", "proj"), "vision_proj", dt)
      self.text_proj = dense(c.embed_dim, ("embed", "proj"), "text_proj", dt)
      self.itm_head = dense(2, ("embed", None), "itm_head", dt)
      self.temp = self.param("temp", param_init(lambda *_: jnp.array(TEMP_INIT, jnp.float32), ()))

  @property
  def decoder(self) -> TextTransformer:
    return self.text_encoder if self.config.kind == "pretrain" else self.text_decoder

  # ---- roles ------------------------------------------------------------------------------
  def encode_image(self, pixels, train: bool = False):
    return self.visual_encoder(pixels, train=train)

  def image_feat(self, image_embeds):
    return _l2_normalize(self.vision_proj(image_embeds[:, 0]))

  def video_feat(self, frame_embeds, frames: int):
    """Zero-shot video ITC feature (official eval_retrieval_video): the normalised mean over a
    video's frames of the projected [CLS]. frame_embeds [B * frames, 1+N, Dv] -> [B, 256]."""
    proj = self.vision_proj(frame_embeds[:, 0]).astype(jnp.float32)
    return _l2_normalize(proj.reshape(-1, frames, proj.shape[-1]).mean(axis=1))

  def text_embeds(self, ids, mask, train: bool = False):
    """Unimodal text encoder (mode 'text': no cross-attention), first token [CLS]."""
    ids = with_first_token(ids, self.config.text.cls_id)
    return self.text_encoder(ids, mask, train=train)

  def text_feat(self, ids, mask, train: bool = False):
    return _l2_normalize(self.text_proj(self.text_embeds(ids, mask, train)[:, 0]))

  def grounded_embeds(self, image_embeds, ids, mask, train: bool = False):
    """Image-grounded text encoder, first token [ENC]."""
    ids = with_first_token(ids, self.config.text.enc_id)
    return self.text_encoder(ids, mask, image_embeds, train=train)

  def itm_logits(self, image_embeds, ids, mask, train: bool = False):
    """ITM logits [B, 2] of B texts. image_embeds [B, M, Dv] (one image per text), or [B / G, M, Dv]
    with G consecutive texts per image: each image's cross-attention keys/values are then computed
    once for its G texts (the re-rank of retrieval evaluation)."""
    if ids.shape[0] % image_embeds.shape[0]:
      raise ValueError(f"{ids.shape[0]} texts do not group evenly over {image_embeds.shape[0]} images")
    return self.itm_head(self.grounded_embeds(image_embeds, ids, mask, train)[:, 0]).astype(jnp.float32)

  def lm_logits(self, image_embeds, ids, mask, train: bool = False):
    """Image-grounded causal decoder, first token [DEC]. Logits at position t predict token t+1."""
    ids = with_first_token(ids, self.config.text.dec_id)
    hidden = self.decoder(ids, mask, image_embeds, causal=True, train=train)
    return self.decoder.logits(hidden)

  def vqa_question(self, image_embeds, q_ids, q_mask, train: bool = False):
    return self.grounded_embeds(image_embeds, q_ids, q_mask, train)

  def vqa_answer_logits(self, question_states, q_mask, a_ids, a_mask, train: bool = False):
    """Answer decoder logits over question states [B, Lq, D]: answers a_ids [B, La], or [B * G, La]
    with G consecutive answers per question (the states are then shared, not copied)."""
    a_ids = with_first_token(a_ids, self.config.text.dec_id)
    hidden = self.text_decoder(a_ids, a_mask, question_states, q_mask, causal=True, train=train)
    return self.text_decoder.logits(hidden)

  def vqa_packed_logits(self, question_states, q_mask, ids, positions, self_bias):
    """Answer decoder logits of packed rows: one row per question holding [DEC] and the pieces of
    many candidate answers, each at its own positions and seeing [DEC] and its own earlier pieces
    (self_bias); ids [B, T] as given (no first token rewritten)."""
    hidden = self.text_decoder(ids, None, question_states, q_mask, causal=True, positions=positions,
                               self_bias=self_bias)
    return self.text_decoder.logits(hidden)

  def nlvr_logits(self, image0_embeds, image1_embeds, ids, mask, train: bool = False):
    """NLVR2 (official BLIP_NLVR.forward): the sentence, first token [ENC], attends to both images
    (one cross-attention each); the MLP head reads its [ENC] state. Returns [B, 2] float32."""
    ids = with_first_token(ids, self.config.text.enc_id)
    hidden = self.text_encoder(ids, mask, (image0_embeds, image1_embeds), train=train)[:, 0]
    return self.cls_out(nn.relu(self.cls_hidden(hidden))).astype(jnp.float32)

  def decode(self, ids, memory=None, memory_mask=None, *, position_offset=0):
    """One incremental decoder call on the KV cache (apply with mutable=['cache']).

    The first call (prefill) passes `memory` (image tokens, or question states for VQA), whose
    cross-attention keys/values are cached; later calls pass memory=None. `ids` are new tokens
    only; `position_offset` is the number of tokens already in the cache. The caller writes [DEC]
    as the first prompt token. Returns logits [B, L, V].
    """
    hidden = self.decoder(ids, None, memory, memory_mask, causal=True, decode=True,
                          position_offset=position_offset)
    return self.decoder.logits(hidden)

  def __call__(self, pixels, ids, mask, train: bool = False):
    """Runs every role the kind has (used by init)."""
    c = self.config
    image_embeds = self.encode_image(pixels, train)
    out = {"image_embeds": image_embeds}
    if c.has_itc:
      out["image_feat"] = self.image_feat(image_embeds)
      out["text_feat"] = self.text_feat(ids, mask, train)
      out["itm_logits"] = self.itm_logits(image_embeds, ids, mask, train)
    if c.kind in ("pretrain", "caption"):
      out["lm_logits"] = self.lm_logits(image_embeds, ids, mask, train)
    if c.kind == "nlvr":
      out["nlvr_logits"] = self.nlvr_logits(image_embeds, image_embeds, ids, mask, train)
    if c.kind == "vqa":
      q = self.vqa_question(image_embeds, ids, mask, train)
      out["answer_logits"] = self.vqa_answer_logits(q, mask, ids, mask, train)
    return out
