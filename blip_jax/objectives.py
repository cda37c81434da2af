"""The paper's training objectives, one function each (the paper §3.2, §5; the official
models/blip_pretrain.py, blip_retrieval.py, blip.py, blip_vqa.py, blip_nlvr.py forward passes):
(params, batch) -> the task's loss, with the metrics it reports. A task (blip_jax/tasks) names its
objective; the shared step (blip_jax/train/step.py) takes it, differentiates it and updates.

Every objective has one signature, loss(cfg, loss_cfg, params, batch, rng, contrastive), and
returns (total, (metrics, image_feat_m, text_feat_m)); contrastive is None, or for the kinds with
ITC the step's {"momentum", "queues", "alpha"}, and the two momentum features go to the queues.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from blip_jax import losses
from blip_jax.models.blip import Blip
from blip_jax.models.config import BlipConfig
from blip_jax.models.init import momentum_config
from blip_jax.preprocess import CLIP_MEAN, CLIP_STD


def normalize_images(images):
  """uint8 [B, H, W, 3] from the input pipeline -> CLIP-normalised float32 (on the device)."""
  if images.dtype == jnp.uint8:
    return (images.astype(jnp.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
  return images


def batch_image_ids(batch):
  """The batch's image ids (split_ids pairs, int32 [B, 2]), or None."""
  ids = batch.get("image_id")
  if ids is None:
    return None
  if ids.ndim != 2 or ids.dtype != jnp.int32:
    raise ValueError(f"batch['image_id'] must be split_ids(...) int32 [B, 2], got {ids.dtype} {ids.shape}")
  return ids


def contrastive_keys(rng) -> dict:
  """The draws of one ITC/ITM forward: each forward its own dropout key (as separate torch forwards
  draw separate masks), and the ITM hard negatives (an image for each text, a text for each image).
  Named so that a test can replay the negatives (tests/test_official_training.py)."""
  k = jax.random.split(rng, 4)
  return {"dropout_unimodal": k[0], "dropout_multimodal": k[1], "negative_images": k[2], "negative_texts": k[3]}


def itc_itm_lm(cfg: BlipConfig, loss_cfg, params, batch, rng, contrastive):
  """Pretraining (official BLIP_Pretrain.forward): ITC with the momentum encoder's soft targets and
  queues, ITM on hard negatives, LM; retrieval fine-tuning (BLIP_Retrieval.forward): the same with
  image-id positives and no LM. The losses of one (micro)batch."""
  momentum, queues, alpha = contrastive["momentum"], contrastive["queues"], contrastive["alpha"]
  model, mom_model = Blip(cfg), Blip(momentum_config(cfg))
  temp = jnp.clip(params["temp"], loss_cfg.temp_min, loss_cfg.temp_max)
  pixels = normalize_images(batch["image"])
  ids, mask = batch["text_ids"], batch["text_mask"]
  keys = contrastive_keys(rng)

  def online(m):
    image_embeds = m.encode_image(pixels, train=True)
    image_feat = m.image_feat(image_embeds)
    text_feat = m.text_feat(ids, mask, train=True)
    return image_embeds, image_feat, text_feat
  image_embeds, image_feat, text_feat = model.apply({"params": params}, method=online,
                                                    rngs={"dropout": keys["dropout_unimodal"]})

  def mom(m):
    e = m.encode_image(pixels)
    return m.image_feat(e), m.text_feat(ids, mask)
  # the retrieval-kind module also declares temp and itm_head, which the momentum forward never reads
  mom_params = {**momentum, "temp": params["temp"], "itm_head": params["itm_head"]}
  image_feat_m, text_feat_m = jax.lax.stop_gradient(mom_model.apply({"params": mom_params}, method=mom))

  ids_all = batch_image_ids(batch)  # [G, 2] int32 or None
  idx = ids_all if loss_cfg.use_image_ids else None
  loss_itc, (sim_i2t, sim_t2i) = losses.itc_loss(
      image_feat, text_feat, image_feat_m, text_feat_m, queues["image_queue"], queues["text_queue"],
      temp, alpha, idx=idx, idx_queue=queues["idx_queue"])

  # ITM with hard negatives, sampled from the contrastive similarities. Official pretraining: the
  # in-batch columns of the ITC sims (online vs momentum keys), per device, +1e-4 floor. Official
  # retrieval (image-id positives): online vs online sims, no floor, over the whole global batch
  # ('global', negative_all_rank) or per data shard ('local'). Whenever the batch has image ids, no
  # pair of the same image is a negative (another caption of the image is a match).
  g = ids.shape[0]
  groups = loss_cfg.itm_groups if loss_cfg.itm_scope == "local" else 1
  if idx is None:
    w_t2i = losses.negative_weights(sim_t2i[:, :g], groups, idx=ids_all)
    w_i2t = losses.negative_weights(sim_i2t[:, :g], groups, idx=ids_all)
  else:
    s = image_feat @ text_feat.T / temp
    w_i2t = losses.negative_weights(s, groups, floor=0.0, idx=idx)
    w_t2i = losses.negative_weights(s.T, groups, floor=0.0, idx=idx)
  neg_image = losses.sample_negatives(keys["negative_images"], w_t2i)  # for each text, an image
  neg_text = losses.sample_negatives(keys["negative_texts"], w_i2t)  # for each image, a text

  def itm(m):
    pos = m.itm_logits(image_embeds, ids, mask, train=True)
    images = jnp.concatenate([image_embeds[neg_image], image_embeds], axis=0)
    texts = jnp.concatenate([ids, ids[neg_text]], axis=0)
    masks = jnp.concatenate([mask, mask[neg_text]], axis=0)
    neg = m.itm_logits(images, texts, masks, train=True)
    lm = m.lm_logits(image_embeds, ids, mask, train=True) if cfg.kind == "pretrain" else None
    return pos, neg, lm
  logits_pos, logits_neg, lm_logits = model.apply({"params": params}, method=itm,
                                                  rngs={"dropout": keys["dropout_multimodal"]})
  loss_itm, itm_acc = losses.itm_loss(logits_pos, logits_neg)
  # retrieval fine-tuning has no decoder: ITC + ITM only (official blip_retrieval)
  loss_lm = (losses.lm_loss(lm_logits, ids, mask, label_smoothing=loss_cfg.label_smoothing)
             if lm_logits is not None else jnp.zeros((), jnp.float32))
  total = loss_itc + loss_itm + loss_lm
  metrics = {"loss": total, "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_lm": loss_lm,
             "itm_acc": itm_acc}
  return total, (metrics, image_feat_m, text_feat_m)


def caption_lm(cfg: BlipConfig, loss_cfg, params, batch, rng, contrastive=None):
  """Caption fine-tuning (official BLIP_Decoder.forward): the image-grounded decoder's LM loss with
  label smoothing; [DEC] first, the prompt's tokens and padding not targets."""
  pixels = normalize_images(batch["image"])
  ids, mask = batch["text_ids"], batch["text_mask"]
  logits = Blip(cfg).apply({"params": params}, method=lambda m: m.lm_logits(m.encode_image(pixels, train=True), ids,
                                                                             mask, train=True), rngs={"dropout": rng})
  loss = losses.lm_loss(logits, ids, mask, label_smoothing=loss_cfg.label_smoothing,
                        prompt_length=loss_cfg.prompt_length)
  return loss, ({"loss": loss, "loss_lm": loss}, None, None)


def vqa_answers(cfg: BlipConfig, loss_cfg, params, batch, rng, contrastive=None):
  """VQA fine-tuning (official BLIP_VQA.forward): the question encoded once against the image; its
  states shared (not copied) by the question's A answers in the answer decoder; loss_vqa."""
  pixels = normalize_images(batch["image"])
  q_ids, q_mask = batch["question_ids"], batch["question_mask"]
  a_ids, a_mask = batch["answer_ids"], batch["answer_mask"]
  b, a, la = a_ids.shape

  def f(m):
    states = m.vqa_question(m.encode_image(pixels, train=True), q_ids, q_mask, train=True)
    return m.vqa_answer_logits(states, q_mask, a_ids.reshape(b * a, la), a_mask.reshape(b * a, la), train=True)
  logits = Blip(cfg).apply({"params": params}, method=f, rngs={"dropout": rng})
  loss = losses.vqa_loss(logits, a_ids, a_mask, batch["answer_weights"], label_smoothing=loss_cfg.label_smoothing)
  return loss, ({"loss": loss, "loss_vqa": loss}, None, None)


def nlvr_pair(cfg: BlipConfig, loss_cfg, params, batch, rng, contrastive=None):
  """NLVR2 fine-tuning (official BLIP_NLVR.forward): both images through the ViT, the sentence
  grounded in the pair, cross-entropy of the head on the label."""
  ids, mask = batch["text_ids"], batch["text_mask"]

  def f(m):
    e0 = m.encode_image(normalize_images(batch["image"]), train=True)
    e1 = m.encode_image(normalize_images(batch["image2"]), train=True)
    return m.nlvr_logits(e0, e1, ids, mask, train=True)
  logits = Blip(cfg).apply({"params": params}, method=f, rngs={"dropout": rng})
  loss, acc = losses.nlvr_loss(logits, batch["label"])
  return loss, ({"loss": loss, "loss_nlvr": loss, "nlvr_acc": acc}, None, None)
