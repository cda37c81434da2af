"""The losses of the paper, each one short pure function (the paper §3.2; official blip_pretrain.py forward).

Shapes: G = global batch (all devices; jit sees global arrays, so "gathered across devices" is the
array itself and XLA inserts the all-gathers), Q = queue length, D = 256.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def same_id(a, b):
  """[N, M] equality of image ids a [N] and b [M], or a [N, 2] and b [M, 2] (64-bit ids as two int32
  halves, split_ids: a jitted step has no int64 unless x64 is on)."""
  eq = a[:, None] == b[None, :]
  return eq.all(axis=-1) if a.ndim == 2 else eq


def itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha,
             idx=None, idx_queue=None):
  """Image-text contrastive loss with momentum distillation (ALBEF/BLIP).

  Queries: online features [G, D]. Keys: momentum features of the whole global batch followed by the
  queues [Q, D]. Targets: alpha * softmax(momentum similarities) + (1 - alpha) * hard targets, where
  hard targets are the diagonal, or with image ids every key of the same image (normalised per row).
  Returns (loss, (sim_i2t, sim_t2i)) with sims [G, G + Q] already divided by temp.
  """
  image_keys = jnp.concatenate([image_feat_m, image_queue], axis=0)
  text_keys = jnp.concatenate([text_feat_m, text_queue], axis=0)
  if idx is None:
    hard = jnp.eye(image_feat.shape[0], image_keys.shape[0], dtype=jnp.float32)
  else:
    pos = same_id(idx, jnp.concatenate([idx, idx_queue])).astype(jnp.float32)
    hard = pos / pos.sum(axis=1, keepdims=True)
  sim_i2t_m = image_feat_m @ text_keys.T / temp
  sim_t2i_m = text_feat_m @ image_keys.T / temp
  targets_i2t = jax.lax.stop_gradient(alpha * jax.nn.softmax(sim_i2t_m, axis=1) + (1 - alpha) * hard)
  targets_t2i = jax.lax.stop_gradient(alpha * jax.nn.softmax(sim_t2i_m, axis=1) + (1 - alpha) * hard)
  sim_i2t = image_feat @ text_keys.T / temp
  sim_t2i = text_feat @ image_keys.T / temp
  loss_i2t = -jnp.sum(jax.nn.log_softmax(sim_i2t, axis=1) * targets_i2t, axis=1).mean()
  loss_t2i = -jnp.sum(jax.nn.log_softmax(sim_t2i, axis=1) * targets_t2i, axis=1).mean()
  return (loss_i2t + loss_t2i) / 2, (sim_i2t, sim_t2i)


def negative_weights(sim, groups: int, floor: float = 1e-4, idx=None):
  """Sampling weights of hard negatives from in-batch similarities sim [G, G] (query x candidate).

  groups > 1 ('local' scope, official pretraining): each device's slice of the batch samples only
  within itself; groups == 1 ('global' scope, official COCO retrieval: negative_all_rank) over the
  whole batch. Weights softmax(sim) within the group + floor (official pretraining 1e-4; retrieval
  0), zero for the pair itself and, when image ids idx are given, for every pair of the same image
  (another caption of the same image is no negative). Returns [G, G] weights (zero outside a row's
  group).
  """
  g = sim.shape[0]
  per = g // groups
  group = jnp.arange(g) // per
  same_group = group[:, None] == group[None, :]
  logits = jnp.where(same_group, sim, -jnp.inf)
  w = jnp.where(same_group, jax.nn.softmax(logits, axis=1) + floor, 0.0)
  same = jnp.eye(g, dtype=bool) if idx is None else same_id(idx, idx) | jnp.eye(g, dtype=bool)
  w = jnp.where(same, 0.0, w)
  return jax.lax.stop_gradient(w)


def sample_negatives(rng, weights):
  """One index per row, drawn with probability proportional to the row's weights (multinomial,
  not argmax). A row with no positive weight falls back to uniform over other rows."""
  g = weights.shape[0]
  ok = weights.sum(axis=1, keepdims=True) > 0
  weights = jnp.where(ok, weights, 1.0 - jnp.eye(g))
  return jax.random.categorical(rng, jnp.log(weights), axis=1)


def itm_loss(logits_pos, logits_neg):
  """ITM cross-entropy over B positive and 2B negative pairs; returns (loss, accuracy).
  A model that ignores its input and predicts the 1:2 prior sits at CE = H(1/3) = 0.6365 with
  accuracy 0.667: the 'ITM stuck' collapse is visible as that pair of numbers."""
  logits = jnp.concatenate([logits_pos, logits_neg], axis=0).astype(jnp.float32)
  labels = jnp.concatenate([jnp.ones(logits_pos.shape[0], jnp.int32), jnp.zeros(logits_neg.shape[0], jnp.int32)])
  logp = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.take_along_axis(logp, labels[:, None], axis=1).mean()
  acc = (jnp.argmax(logits, axis=-1) == labels).mean()
  return loss, acc


def lm_loss(logits, ids, mask, *, label_smoothing: float = 0.1, prompt_length: int = 0,
            reduction: str = "mean"):
  """Causal LM loss of the image-grounded decoder (official BertLMHeadModel).

  logits[:, t] predicts ids[:, t+1]; padding (mask 0) and the first `prompt_length` tokens are not
  targets; [SEP] is. Cross-entropy with label smoothing as torch: (1-e)*nll + e*mean_v(-log p_v).
  reduction 'mean': over all target tokens of the batch; 'none': summed per sequence [B].
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  targets = ids[:, 1:]
  valid = mask[:, 1:].astype(bool) & (jnp.arange(1, ids.shape[1]) >= prompt_length)[None]
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  smooth = -logp.mean(axis=-1)
  tok = ((1.0 - label_smoothing) * nll + label_smoothing * smooth) * valid
  if reduction == "none":
    return tok.sum(axis=1)
  return tok.sum() / jnp.maximum(valid.sum(), 1)


def vqa_loss(logits, answer_ids, answer_mask, weights, *, label_smoothing: float = 0.1):
  """VQA answer loss (official blip_vqa.forward): each answer's summed label-smoothed token loss,
  weighted (VQA: count / number of human answers; VG-QA: 0.2; padding answers: 0), summed over the
  batch's answers and divided by the number of questions. logits [B * A, La, V] of answer_ids /
  answer_mask [B, A, La]; weights [B, A]."""
  b, a, la = answer_ids.shape
  per_answer = lm_loss(logits, answer_ids.reshape(b * a, la), answer_mask.reshape(b * a, la),
                       label_smoothing=label_smoothing, reduction="none").reshape(b, a)
  return (weights * per_answer).sum() / b


def nlvr_loss(logits, labels):
  """NLVR2 (official BLIP_NLVR): cross-entropy of the 2-way head on the label (1: the sentence is
  true of the pair), mean over the batch. Returns (loss, accuracy)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))
  return loss, jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
