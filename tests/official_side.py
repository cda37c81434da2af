"""The official side of tests/test_official_training.py: small official models, the official
training loops' schedules restated from the official scripts (pretrain.py, train_*.py, utils.py:
not in the blip-vit package), the replayed ITM negatives, and the comparison of a final official
state dict with our train state. Shares no code with blip_jax's step, losses or optimizer."""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os

import numpy as np
import torch
from conftest import COCO

# One small size for the training runs: 64 wide with 2 heads of 32 (the training config names its
# heads), 2 layers (NLVR2 needs 8: its merge layers start at layer 6), a 32 px image of 2x2 patches.
WIDTH, DEPTH, HEADS, IMAGE = 64, 2, 2, 32


def med_config_file(tmp_dir, vocab_size: int, depth: int = DEPTH, width: int = WIDTH, heads: int = HEADS) -> str:
  """A med/bert config json as the official configs/*.json, small, dropout off (the official
  0.1 makes two runs incomparable); encoder_width = WIDTH serves both the image (vision width)
  and the VQA answer decoder (question states)."""
  cfg = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu",
         "hidden_dropout_prob": 0.0, "hidden_size": width, "initializer_range": 0.02,
         "intermediate_size": 2 * width, "layer_norm_eps": 1e-12, "max_position_embeddings": 64,
         "model_type": "bert", "num_attention_heads": heads, "num_hidden_layers": depth, "pad_token_id": 0,
         "type_vocab_size": 2, "vocab_size": vocab_size, "encoder_width": width, "add_cross_attention": True}
  path = os.path.join(tmp_dir, f"med_{vocab_size}_{depth}_{width}.json")
  with open(path, "w") as f:
    json.dump(cfg, f)
  return path


def reinit_(model: torch.nn.Module, seed: int):
  """Every parameter drawn anew (tied ones once): weights N(0, 0.05), LayerNorm scales 1 + N(0, 0.1),
  biases N(0, 0.02); with BERT's 0.02 attention is near uniform and bugs hide (parity_notes.md).
  Momentum copies are drawn too, so they differ from the online towers. temp keeps 0.07."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters(remove_duplicate=True):
      if name == "temp":
        continue
      if "LayerNorm" in name or ".norm" in name or name.startswith("norm"):
        std, mean = (0.1, 1.0) if name.endswith("weight") else (0.02, 0.0)
      else:
        std, mean = (0.02, 0.0) if name.endswith("bias") else (0.05, 0.0)
      p.copy_(mean + std * torch.randn(p.shape, generator=g))


def small_official(make, tmp_dir, *, vocab_size: int = 30524, depth: int = DEPTH, image_size: int = IMAGE,
                   width: int = WIDTH, drop_path=None, seed: int = 0, **kw):
  """An official model class (BLIP_Pretrain, BLIP_Retrieval, BLIP_Decoder, BLIP_VQA, BLIP_NLVR,
  BLIP_ITM) built at a small size, every weight redrawn (reinit_). Heads are 32 wide at the
  default width (a training config names its heads); width=128 gives 64-wide heads, the width
  blip_jax.load reads heads off for official files (which carry no config). drop_path None keeps
  the rate the class asks for (VQA, NLVR2: 0.1); a number overrides it."""
  import official_code
  heads = HEADS if width == WIDTH else width // 64
  official_code.SMALL_VIT.update(width=width, depth=DEPTH, heads=heads, patch=16, drop_path=drop_path)
  torch.manual_seed(0)
  model = make(med_config=med_config_file(str(tmp_dir), vocab_size, depth, width, heads), image_size=image_size,
               vit="base", **kw)
  reinit_(model, seed)
  return model


def state_dict_numpy(model) -> dict:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def save_pth(model, path) -> str:
  torch.save({"model": model.state_dict()}, path)
  return path


# ---- data -------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _val_captions() -> tuple:
  with open(os.path.join(COCO, "captions_karpathy_val.json")) as f:
    return tuple(c for a in json.load(f) for c in a["caption"])


def coco_captions(n: int, seed: int) -> list[str]:
  """n real COCO captions, pre_caption'd as the official datasets do (lower case, no '.')."""
  caps = _val_captions()  # read once: every step of every run draws from it
  r = np.random.RandomState(seed)
  out = []
  for i in r.choice(len(caps), n, replace=False):
    c = caps[i].lower()
    for ch in '.!"()*#:;~':
      c = c.replace(ch, " ")
    out.append(" ".join(c.split()[:30]))
  return out


def images(n: int, seed: int) -> np.ndarray:
  """[n, IMAGE, IMAGE, 3] float32 in the range of CLIP-normalised pixels."""
  return np.random.RandomState(seed).normal(0, 1, (n, IMAGE, IMAGE, 3)).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# ---- the official training loops' schedules (utils.py / pretrain.py / train_*.py) -------------------
def pretrain_lr(step, steps_per_epoch, init_lr, warmup_lr, warmup_steps, decay_rate, min_lr):
  """pretrain.py: step_lr_schedule at each epoch's start, then in epoch 0 warmup_lr_schedule on
  every step: lr = min(init_lr, warmup_lr + (init_lr - warmup_lr) * i / warmup_steps)."""
  epoch, i = divmod(step, steps_per_epoch)
  lr = max(min_lr, init_lr * decay_rate ** epoch)
  if epoch == 0:
    lr = min(init_lr, warmup_lr + (init_lr - warmup_lr) * i / warmup_steps)
  return lr


def pretrain_alpha(step, steps_per_epoch, alpha):
  """pretrain.py: alpha * min(1, (epoch * len(loader) + i) / (2 * len(loader)))."""
  return alpha * min(1.0, step / (2 * steps_per_epoch))


def cosine_lr(step, steps_per_epoch, max_epoch, init_lr, min_lr):
  """utils.cosine_lr_schedule, called once per epoch by every fine-tuning script."""
  epoch = step // steps_per_epoch
  return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr


def retrieval_alpha(step, steps_per_epoch, alpha):
  """train_retrieval.py: alpha in epochs > 0, alpha * min(1, i / len(loader)) in epoch 0."""
  epoch, i = divmod(step, steps_per_epoch)
  return alpha if epoch > 0 else alpha * min(1.0, i / steps_per_epoch)


def set_lr(optimizer, lr):
  for group in optimizer.param_groups:
    group["lr"] = lr


# ---- ITM hard negatives: ours drawn, given to the official code ----------------------------------
@contextlib.contextmanager
def replayed_multinomial(keys: dict, sample):
  """torch.multinomial replaced for one official forward: its two loops draw, row by row, a
  negative image for each text (weights_t2i) and then a negative text for each image
  (weights_i2t). Each row is a view of the official weight matrix; the replacement draws the whole
  matrix once with OUR sampler and key (`sample(key, weights)`, keys 'negative_images' and
  'negative_texts' of the step) and returns the row's index. Our step draws the same indices
  exactly when its weights equal the official ones (up to float noise): weights that differ
  change the draws and then the losses. Records every (weights, indices) drawn."""
  real = torch.multinomial
  drawn = []  # [(official weights [G, G], our indices [G])]
  calls = {"n": 0}

  def multinomial(row, num_samples, *a, **k):
    assert num_samples == 1 and row.dim() == 1 and row._base is not None, "a row of a weight matrix"
    full = row._base
    g = full.shape[1]
    which, b = divmod(calls["n"], full.shape[0])
    assert row.storage_offset() - full.storage_offset() == b * g, "rows drawn in order"
    if b == 0:
      w = full.detach().cpu().numpy().astype(np.float32)
      key = keys["negative_images" if which == 0 else "negative_texts"]
      drawn.append((w, np.asarray(sample(key, w))))
    calls["n"] += 1
    return torch.tensor([int(drawn[which][1][b])])

  torch.multinomial = multinomial
  try:
    yield drawn
  finally:
    torch.multinomial = real


# ---- comparison -------------------------------------------------------------------------------------
def flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = np.asarray(v)
  return out


def zero_gradient_elements(path: tuple, x: np.ndarray):
  """The elements whose gradient is zero in exact arithmetic, or None: attention key biases. A key
  bias adds q . b_k to every score of a query's row, and softmax ignores a constant added to a row,
  so both runs move them by rounding noise alone (Adam scales that noise up to steps of ~lr), and
  two correct runs differ there by up to the sum of the lrs. In our layout: `key/bias` of every
  text attention, and the middle third ([q; k; v]) of the ViT's fused `qkv/bias`."""
  if path[-1] == "bias" and path[-2] in ("key", "key0", "key1"):  # NLVR2: one key per image
    return np.ones(x.shape, bool)
  if path[-2:] == ("qkv", "bias"):
    mask = np.zeros(x.shape, bool)
    third = x.shape[-1] // 3
    mask[..., third:2 * third] = True
    return mask
  return None


def worst_difference(ours: dict, ref: dict, where: str, noise_bound: float = 0.0) -> dict:
  """Every leaf of ref present in ours with the same shape. Returns the worst leaf by absolute
  difference and by difference relative to the leaf's largest value: {'abs': (d, leaf), 'rel':
  (d, leaf)}. Elements with a zero exact gradient (zero_gradient_elements) are left out and
  asserted within noise_bound (absolute) instead."""
  a, b = flat(ours), flat(ref)
  assert set(a) == set(b), (where, sorted(set(a) ^ set(b))[:8])
  worst = {"abs": (0.0, None), "rel": (0.0, None)}
  for k in b:
    assert a[k].shape == b[k].shape, (where, k, a[k].shape, b[k].shape)
    diff = np.abs(a[k].astype(np.float64) - b[k])
    noise = zero_gradient_elements(k, b[k])
    if noise is not None:
      assert diff[noise].max() <= noise_bound, (where, k, float(diff[noise].max()), noise_bound)
      diff = np.where(noise, 0.0, diff)
    d = float(diff.max())
    worst["abs"] = max(worst["abs"], (d, k), key=lambda t: t[0])
    worst["rel"] = max(worst["rel"], (d / (float(np.max(np.abs(b[k]))) + 1e-6), k), key=lambda t: t[0])
  return worst


def moved(start: dict, end: dict) -> tuple:
  """(the smallest largest change of any leaf between two states, that leaf): every parameter must
  move far beyond the tolerance it is checked to."""
  a, b = flat(start), flat(end)
  out = []  # (largest change of an element, leaf)
  for k in a:
    change = np.abs(a[k] - b[k])
    noise = zero_gradient_elements(k, a[k])
    if noise is not None:  # moved by weight decay and rounding noise alone
      change = change[~noise]
    if change.size:
      out.append((float(change.max()), k))
  return min(out)
