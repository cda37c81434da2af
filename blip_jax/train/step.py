"""The training step: ITC + ITM + LM in one jitted, sharded function (blip_facts §3.2); the
retrieval fine-tuning step is the same with image-id positives and no LM (§5.1); caption
fine-tuning is the LM loss alone, with the prompt's tokens not targets (§5.2); VQA fine-tuning is
the weighted answer loss of the answer decoder over the question states (§5.3); NLVR2
fine-tuning is the cross-entropy of the two-image classifier (§5.4).

State (a plain dict pytree, checkpointed as is):
  step, params (the model of the task's kind), opt_state (AdamW), rng, nonfinite_step, and for the
  kinds with ITC: momentum (EMA towers: ViT, text encoder, projections), image_queue / text_queue
  [Q, 256], idx_queue [Q, 2], queue_ptr.
Order inside a step, as official: EMA update of the momentum towers first, then the forward passes.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blip_jax import losses
from blip_jax.models.blip import Blip
from blip_jax.models.config import BlipConfig
from blip_jax.models.init import MOMENTUM_TOWERS, init_boxed, momentum_config
from blip_jax.preprocess import CLIP_MEAN, CLIP_STD


@dataclasses.dataclass(frozen=True)
class LossConfig:
  momentum: float = 0.995
  queue_size: int = 57600
  alpha: float = 0.4
  alpha_ramp_steps: int = 0  # linear ramp of alpha over these steps (official: 2 epochs)
  temp_min: float = 0.001
  temp_max: float = 0.5
  itm_scope: str = "local"  # local: per data shard (official pretraining) | global: whole batch
  itm_groups: int = 1  # number of data shards for 'local' (set by the trainer from the mesh)
  label_smoothing: float = 0.1
  use_image_ids: bool = False  # ITC positives by image id (retrieval finetuning)
  prompt_length: int = 0  # LM: the first tokens ([DEC] + prompt) are not targets (caption finetuning: 4)
  grad_accum: int = 1


def momentum_view(params: dict) -> dict:
  """The online weights that the momentum towers track: the encoder side of the pretraining model
  (the encoder's self-attention set, no decoder self-attention and no LM head)."""
  from blip_jax.checkpoints.retarget import encoder_view
  return {**{k: params[k] for k in MOMENTUM_TOWERS}, "text_encoder": encoder_view(params)}


NO_IMAGE = -100  # the image id of a queue entry no batch has written yet (official idx_queue init)


def official_buffers(buffers: dict, kind: str, queue_size: int, embed_dim: int) -> dict:
  """The train-state entries that a checkpoint's training buffers restore, as the official
  load_checkpoint does: each buffer the target model has under the same name and shape
  (pretraining: image_queue, text_queue, queue_ptr; retrieval: the queues, idx_queue, ptr_queue).
  A retrieval run started from a pretraining file takes its queues and starts its pointer at 0; a
  checkpoint of the same kind continues where it was. Queues (D, Q) -> [Q, D]; ids -> split_ids."""
  pointer = {"pretrain": "queue_ptr", "retrieval": "ptr_queue"}.get(kind)
  queue = lambda k: k in buffers and tuple(buffers[k].shape) == (embed_dim, queue_size)
  if pointer is None or not (queue("image_queue") and queue("text_queue")):
    return {}
  out = {"image_queue": np.asarray(buffers["image_queue"], np.float32).T,
         "text_queue": np.asarray(buffers["text_queue"], np.float32).T}
  if pointer in buffers and 0 <= int(buffers[pointer].reshape(-1)[0]) < queue_size:
    out["queue_ptr"] = np.int32(buffers[pointer].reshape(-1)[0])
  if kind == "retrieval" and tuple(np.shape(buffers.get("idx_queue"))) == (1, queue_size):
    out["idx_queue"] = split_ids(buffers["idx_queue"][0])
  return out


def split_ids(image_ids) -> np.ndarray:
  """int64 image ids [B] -> int32 [B, 2] (high, low halves), the form the step compares: a jitted
  step without x64 would truncate int64 to int32, and hashed TFRecord keys use 62 bits."""
  ids = np.asarray(image_ids, np.int64)
  return np.stack([(ids >> 32).astype(np.int32), (ids & 0xFFFFFFFF).astype(np.uint32).view(np.int32)], axis=-1)


def _image_ids(batch):
  ids = batch.get("image_id")
  if ids is None:
    return None
  if ids.ndim != 2 or ids.dtype != jnp.int32:
    raise ValueError(f"batch['image_id'] must be split_ids(...) int32 [B, 2], got {ids.dtype} {ids.shape}")
  return ids


def normalize_images(images):
  """uint8 [B, H, W, 3] from the input pipeline -> CLIP-normalised float32 (on the device)."""
  if images.dtype == jnp.uint8:
    return (images.astype(jnp.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
  return images


def init_state(cfg: BlipConfig, tx: optax.GradientTransformation, loss_cfg: LossConfig, rng, *, boxed: bool = False):
  """A fresh state. boxed=True keeps the logical-axis boxes (for eval_shape -> shardings)."""
  import flax.linen as nn
  k_params, k_queue, k_rng = jax.random.split(rng, 3)
  params = init_boxed(cfg, k_params)
  plain = nn.meta.unbox(params)
  state = {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": tx.init(params if boxed else plain),
      "rng": k_rng,
      "nonfinite_step": jnp.full((), -1, jnp.int32),
  }
  if cfg.has_itc:
    q = loss_cfg.queue_size
    qi, qt = jax.random.normal(k_queue, (2, q, cfg.embed_dim))
    norm = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)  # official: randn normalised per feature
    state.update({
        "momentum": momentum_view(params),  # jit outputs them as their own buffers
        "image_queue": norm(qi), "text_queue": norm(qt),
        "idx_queue": jnp.asarray(split_ids(np.full(q, NO_IMAGE))),  # image ids as split_ids pairs
        "queue_ptr": jnp.zeros((), jnp.int32),
    })
  return state if boxed else nn.meta.unbox(state)


def micro_key(state_rng, step, micro: int = 0):
  """The random key of one (micro)batch of one step: every draw of its forward derives from it."""
  return jax.random.fold_in(jax.random.fold_in(state_rng, step), micro)


def contrastive_keys(rng) -> dict:
  """The draws of one ITC/ITM forward: each forward its own dropout key (as separate torch forwards
  draw separate masks), and the ITM hard negatives (an image for each text, a text for each image).
  Named so that a test can replay the negatives (tests/test_official_training.py)."""
  k = jax.random.split(rng, 4)
  return {"dropout_unimodal": k[0], "dropout_multimodal": k[1], "negative_images": k[2], "negative_texts": k[3]}


def _forward(cfg: BlipConfig, loss_cfg: LossConfig, params, momentum, batch, queues, alpha, rng):
  """Losses of one (micro)batch. Returns (total, (metrics, image_feat_m, text_feat_m))."""
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
  image_embeds, image_feat, text_feat = model.apply({"params": params}, method=online, rngs={"dropout": keys["dropout_unimodal"]})

  def mom(m):
    e = m.encode_image(pixels)
    return m.image_feat(e), m.text_feat(ids, mask)
  # the retrieval-kind module also declares temp and itm_head, which the momentum forward never reads
  mom_params = {**momentum, "temp": params["temp"], "itm_head": params["itm_head"]}
  image_feat_m, text_feat_m = jax.lax.stop_gradient(mom_model.apply({"params": mom_params}, method=mom))

  ids_all = _image_ids(batch)  # [G, 2] int32 or None
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
  logits_pos, logits_neg, lm_logits = model.apply({"params": params}, method=itm, rngs={"dropout": keys["dropout_multimodal"]})
  loss_itm, itm_acc = losses.itm_loss(logits_pos, logits_neg)
  # retrieval fine-tuning has no decoder: ITC + ITM only (official blip_retrieval)
  loss_lm = (losses.lm_loss(lm_logits, ids, mask, label_smoothing=loss_cfg.label_smoothing)
             if lm_logits is not None else jnp.zeros((), jnp.float32))
  total = loss_itc + loss_itm + loss_lm
  metrics = {"loss": total, "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_lm": loss_lm,
             "itm_acc": itm_acc}
  return total, (metrics, image_feat_m, text_feat_m)


def _caption_forward(cfg: BlipConfig, loss_cfg: LossConfig, params, batch, rng):
  """Caption fine-tuning (official BLIP_Decoder.forward): the image-grounded decoder's LM loss with
  label smoothing; [DEC] first, the prompt's tokens and padding not targets."""
  pixels = normalize_images(batch["image"])
  ids, mask = batch["text_ids"], batch["text_mask"]
  logits = Blip(cfg).apply({"params": params}, method=lambda m: m.lm_logits(m.encode_image(pixels, train=True), ids,
                                                                             mask, train=True), rngs={"dropout": rng})
  loss = losses.lm_loss(logits, ids, mask, label_smoothing=loss_cfg.label_smoothing,
                        prompt_length=loss_cfg.prompt_length)
  return loss, ({"loss": loss, "loss_lm": loss}, None, None)


def _vqa_forward(cfg: BlipConfig, loss_cfg: LossConfig, params, batch, rng):
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


def _nlvr_forward(cfg: BlipConfig, loss_cfg: LossConfig, params, batch, rng):
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


def make_train_step(cfg: BlipConfig, loss_cfg: LossConfig, tx: optax.GradientTransformation, lr_fn: Callable):
  """Returns step(state, batch) -> (state, metrics). Pure; jit it with shardings."""
  contrastive = cfg.has_itc  # ITC/ITM kinds: momentum towers and queues

  def step(state, batch):
    s = state["step"]
    params = state["params"]
    if contrastive:
      temp = jnp.clip(params["temp"], loss_cfg.temp_min, loss_cfg.temp_max)
      ramp = jnp.minimum(1.0, s / loss_cfg.alpha_ramp_steps) if loss_cfg.alpha_ramp_steps else 1.0
      alpha = loss_cfg.alpha * ramp
      # 1. momentum update before the momentum forward (official order)
      m = loss_cfg.momentum
      momentum = jax.tree.map(lambda pm, p: m * pm + (1 - m) * p, state["momentum"], momentum_view(params))
      queues = {k: state[k] for k in ("image_queue", "text_queue", "idx_queue")}

    # 2. forward/backward, over micro-batches when accumulating
    k = loss_cfg.grad_accum
    def micro(carry, mb):
      grads_acc, i = carry
      r = micro_key(state["rng"], s, i)
      if contrastive:
        f = lambda p: _forward(cfg, loss_cfg, p, momentum, mb, queues, alpha, r)
      elif cfg.kind == "vqa":
        f = lambda p: _vqa_forward(cfg, loss_cfg, p, mb, r)
      elif cfg.kind == "nlvr":
        f = lambda p: _nlvr_forward(cfg, loss_cfg, p, mb, r)
      else:
        f = lambda p: _caption_forward(cfg, loss_cfg, p, mb, r)
      (_, (metrics, feat_i, feat_t)), grads = jax.value_and_grad(f, has_aux=True)(params)
      grads_acc = jax.tree.map(lambda a, g: a + g / k, grads_acc, grads)
      return (grads_acc, i + 1), (metrics, feat_i, feat_t)
    if k == 1:
      (grads, _), (metrics, feat_i, feat_t) = micro((jax.tree.map(jnp.zeros_like, params), 0), batch)
    else:
      mbs = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)
      (grads, _), (metrics, feat_i, feat_t) = jax.lax.scan(micro, (jax.tree.map(jnp.zeros_like, params), 0), mbs)
      metrics = jax.tree.map(jnp.mean, metrics)
      if contrastive:
        feat_i, feat_t = feat_i.reshape(-1, feat_i.shape[-1]), feat_t.reshape(-1, feat_t.shape[-1])

    # 3. AdamW update; temperature kept in range (official clamps in place each step)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new = {"step": s + 1, "params": new_params, "opt_state": opt_state, "rng": state["rng"]}
    if contrastive:
      new["params"] = {**new_params, "temp": jnp.clip(new_params["temp"], loss_cfg.temp_min, loss_cfg.temp_max)}
      # 4. enqueue the momentum features of the whole global batch
      g = feat_i.shape[0]
      ptr = state["queue_ptr"]
      upd = lambda q, x: jax.lax.dynamic_update_slice(q, x.astype(q.dtype), (ptr,) + (0,) * (q.ndim - 1))
      ids_g = _image_ids(batch)
      ids_g = jnp.full((g, 2), -100, jnp.int32) if ids_g is None else ids_g
      new.update({
          "momentum": momentum,
          "image_queue": upd(state["image_queue"], feat_i), "text_queue": upd(state["text_queue"], feat_t),
          "idx_queue": upd(state["idx_queue"], ids_g),
          "queue_ptr": (ptr + g) % state["image_queue"].shape[0],
      })
    # 5. a non-finite loss leaves the state as it was, records the step and keeps the state there
    # from then on (the loop reads nonfinite_step every step and stops; the checkpoints stay good)
    clean = state["nonfinite_step"] < 0
    finite = jnp.isfinite(metrics["loss"]) & clean
    keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)
    new = {k_: keep(v, state[k_]) if k_ not in ("step",) else v for k_, v in new.items()}
    new["nonfinite_step"] = jnp.where(finite | ~clean, state["nonfinite_step"], s)
    # any host's stop request (its rows of batch['stop']), as one value all hosts read
    stop = jnp.max(batch["stop"]) if "stop" in batch else jnp.zeros((), jnp.int32)
    metrics = {**metrics, "lr": lr_fn(s), "grad_norm": optax.tree.norm(grads), "stop": stop,
               "nonfinite_step": new["nonfinite_step"]}
    if contrastive:
      metrics.update(temp=temp, alpha=alpha)
    return new, metrics

  return step


def paper_schedule(lr: float, warmup_steps: int, warmup_lr: float, decay_rate: float, min_lr: float,
                   steps_per_epoch: int) -> Callable:
  """Official pretrain.py: in epoch 0, a linear warm-up from warmup_lr over warmup_steps (then lr);
  from epoch 1 on, lr * decay_rate ** epoch, floored at min_lr. A warm-up longer than epoch 0 is
  cut at its end, as the official warmup_lr_schedule runs in epoch 0 only."""
  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    warm = warmup_lr + (lr - warmup_lr) * step / max(warmup_steps, 1)
    epoch = jnp.floor(step / max(steps_per_epoch, 1))
    decayed = jnp.maximum(min_lr, lr * decay_rate ** epoch)
    return jnp.where(epoch == 0, jnp.minimum(warm, lr), decayed)
  return fn


def epoch_cosine_schedule(lr: float, min_lr: float, steps_per_epoch: int, epochs: int) -> Callable:
  """Official fine-tuning: lr_e = (lr - min_lr) * 0.5 * (1 + cos(pi * e / epochs)) + min_lr for epoch
  e, constant within the epoch, no warm-up (blip_facts §5)."""
  def fn(step):
    epoch = jnp.floor(jnp.asarray(step, jnp.float32) / max(steps_per_epoch, 1))
    return (lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / max(epochs, 1))) + min_lr
  return fn


def make_optimizer(opt: dict, steps_per_epoch: int, total_steps: int):
  if opt["schedule"] == "cosine_epoch":
    lr_fn = epoch_cosine_schedule(opt["lr"], opt["min_lr"], steps_per_epoch,
                                  -(-total_steps // max(steps_per_epoch, 1)))
  elif opt["schedule"] == "paper":
    lr_fn = paper_schedule(opt["lr"], opt["warmup_steps"], opt["warmup_lr"], opt["decay_rate"],
                           opt["min_lr"], steps_per_epoch)
  elif opt["schedule"] == "cosine":
    lr_fn = optax.warmup_cosine_decay_schedule(opt["warmup_lr"], opt["lr"], opt["warmup_steps"],
                                               max(total_steps, opt["warmup_steps"] + 1), opt["min_lr"])
  else:
    raise ValueError(f"optim.schedule must be 'paper', 'cosine' or 'cosine_epoch', got {opt['schedule']!r}")
  chain = []
  if opt.get("clip_grad_norm", 0) > 0:
    chain.append(optax.clip_by_global_norm(opt["clip_grad_norm"]))
  # official: one parameter group, weight decay on every parameter (blip_facts §3.6)
  chain.append(optax.adamw(lr_fn, b1=opt["b1"], b2=opt["b2"], eps=opt["eps"], weight_decay=opt["weight_decay"]))
  return optax.chain(*chain), lr_fn
