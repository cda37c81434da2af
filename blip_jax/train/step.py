"""The training step every task shares, one jitted, sharded, pure function: the task's objective
(blip_jax/objectives.py) differentiated over (micro)batches, AdamW, and for the kinds with ITC the
momentum towers and queues (official blip_pretrain.py / blip_retrieval.py: _momentum_update,
_dequeue_and_enqueue); the optimizer and the official learning-rate schedules.

State (a plain dict pytree, checkpointed as is):
  step, params (the model of the task's kind), opt_state (AdamW), rng, nonfinite_step, and for the
  kinds with ITC: momentum (EMA towers: ViT, text encoder, projections), image_queue / text_queue
  [Q, 256], idx_queue [Q, 2], queue_ptr.
Order inside a step, as official: EMA update of the momentum towers first, then the forward passes.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from blip_jax.checkpoints.retarget import encoder_view
from blip_jax.models.config import BlipConfig
from blip_jax.models.init import MOMENTUM_TOWERS, init_boxed
from blip_jax.objectives import batch_image_ids


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


def init_state(cfg: BlipConfig, tx: optax.GradientTransformation, loss_cfg: LossConfig, rng, *, boxed: bool = False):
  """A fresh state. boxed=True keeps the logical-axis boxes (for eval_shape -> shardings)."""
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


def make_train_step(cfg: BlipConfig, loss_cfg: LossConfig, tx: optax.GradientTransformation, lr_fn: Callable,
                    objective: Callable):
  """Returns step(state, batch) -> (state, metrics). Pure; jit it with shardings. objective: the
  task's loss (a blip_jax/objectives.py function)."""
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
      extra = {"momentum": momentum, "queues": queues, "alpha": alpha} if contrastive else None
      f = lambda p: objective(cfg, loss_cfg, p, mb, r, extra)
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
      ids_g = batch_image_ids(batch)
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
  e, constant within the epoch, no warm-up (official train_*.py: cosine_lr_schedule)."""
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
  # official: one parameter group, weight decay on every parameter (official pretrain.py: AdamW(model.parameters()))
  chain.append(optax.adamw(lr_fn, b1=opt["b1"], b2=opt["b2"], eps=opt["eps"], weight_decay=opt["weight_decay"]))
  return optax.chain(*chain), lr_fn
