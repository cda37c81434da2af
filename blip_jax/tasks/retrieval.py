"""Image-text retrieval (blip_facts §5.1, §5.5): the k-candidate evaluation, for images and videos.

The official evaluation: ITC cosine similarities of every image with every text; each image's top-k
texts and each text's top-k images are re-ranked with score = ITM positive logit + cosine, every
other entry is -100; recall with the official definitions (blip_jax.metrics.retrieval).

Same scores, less work than the official loop (one image or text at a time, the image's tokens
repeated for each of its k candidates):
- A pair's score does not depend on the direction that found it, so the union of both directions'
  candidate pairs is scored once.
- Pairs are grouped by image into rows of `texts_per_row` texts of one image. Blip.itm_logits with
  grouped memory projects each image's cross-attention keys/values once per layer for its whole
  row (at ViT-B/384 + BERT-base these projections are ~70% of the official ITM FLOPs). Many rows
  go to one jit call, split over the local devices, with static shapes (rows padded).
- Image tokens ([N, 1+P, D] float32: 8.9 GB for COCO 5K at ViT-B/384) stay in host memory and
  stream to the devices one call of rows at a time; a device holds the params and one call's rows.

Across hosts: process p encodes images and texts p, p+P, p+2P, ... and keeps its images' tokens;
features are all-gathered (small: [N, 256]); every process derives the same candidate rows and
scores those of its own images; the scores are all-gathered. Each pair is scored by the same code
on the same inputs wherever it runs, so one device, 8 devices and 2 processes agree.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blip_jax.models.blip import Blip
from blip_jax.models.config import BlipConfig
from blip_jax.metrics.retrieval import recall_at_k

log = logging.getLogger(__name__)


# ---- what is evaluated ----------------------------------------------------------------------------
@dataclasses.dataclass
class Gallery:
  """Images (or videos) and their captions: text t belongs to item txt2img[t]."""
  items: list  # file paths
  texts: list
  txt2img: np.ndarray
  img2txt: list
  video: bool = False


def read_gallery(annotations: str, root: str = "", *, video: bool = False) -> Gallery:
  """Karpathy-style eval JSON ([{"image", "caption": [..] | str}]: entries of one image are merged),
  or with video=True the MSRVTT JSON lines ({"clip_name", "caption"}; videos at ROOT/clip_name.mp4).
  A file of the wrong shape fails here, naming the entry and what is missing."""
  if not os.path.isfile(annotations):
    raise FileNotFoundError(f"{annotations}: no such annotation file")
  with open(annotations) as f:
    text = f.read()
  if video:
    try:
      entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
      raise ValueError(f"{annotations}: not JSON lines ({e})") from None
    key, path = "clip_name", lambda e: os.path.join(root, str(e["clip_name"]) + ".mp4")
  else:
    try:
      entries = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{annotations}: not JSON ({e})") from None
    key, path = "image", lambda e: os.path.join(root, e["image"])
  if not isinstance(entries, list) or not entries:
    raise ValueError(f"{annotations}: expected a non-empty list of entries with {key!r} and 'caption'")
  items, index, texts, txt2img, img2txt = [], {}, [], [], []
  for n, e in enumerate(entries):
    if not isinstance(e, dict) or key not in e or "caption" not in e:
      raise ValueError(f"{annotations}: entry {n} has no {key!r} and 'caption' "
                       f"(got {sorted(e) if isinstance(e, dict) else type(e).__name__}); a retrieval "
                       f"gallery is [{{{key!r}: ..., 'caption': [...]}}, ...]")
    caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
    if not all(isinstance(c, str) for c in caps):
      raise ValueError(f"{annotations}: entry {n}: captions must be strings")
    p = path(e)
    i = index.setdefault(p, len(items))
    if i == len(items):
      items.append(p)
      img2txt.append([])
    for c in caps:
      img2txt[i].append(len(texts))
      texts.append(c)
      txt2img.append(i)
  return Gallery(items, texts, np.asarray(txt2img, np.int64), img2txt, video)


# ---- device functions (one compilation per config and shape) --------------------------------------
@functools.partial(jax.jit, static_argnums=(0, 3))
def encode_items(cfg: BlipConfig, params, pixels, frames: int = 1):
  """pixels [B * frames, S, S, 3] -> (tokens [B, frames * (1+P), D], ITC feature [B, 256])."""
  def f(m):
    e = m.encode_image(pixels)
    feat = m.image_feat(e) if frames == 1 else m.video_feat(e, frames)
    return e.reshape(e.shape[0] // frames, -1, e.shape[-1]), feat
  return Blip(cfg).apply({"params": params}, method=f)


@functools.partial(jax.jit, static_argnums=0)
def text_features(cfg: BlipConfig, params, ids, mask):
  return Blip(cfg).apply({"params": params}, ids, mask, method=Blip.text_feat)


@functools.partial(jax.jit, static_argnums=0)
def itm_positive(cfg: BlipConfig, params, image_tokens, ids, mask):
  """Raw positive ITM logit of each text; image_tokens [R, M, D] for R rows of len(ids) / R texts
  (grouped: keys/values once per image), or [len(ids), M, D] (one image per text)."""
  return Blip(cfg).apply({"params": params}, image_tokens, ids, mask, method=Blip.itm_logits)[:, 1]


def itm_flops(cfg: BlipConfig, pairs: int, rows: int, text_length: int, memory: int) -> float:
  """Matmul FLOPs of ITM forwards: per text token (self-attn, cross q/out, FFN, attention scores)
  for every pair, and the cross-attention key/value projections once per row of memory
  (rows == pairs when nothing is shared)."""
  t = cfg.text
  d, f = t.width, t.mlp_dim
  per_token = 2 * (4 * d * d + 2 * d * d + 2 * d * f) + 4 * text_length * d + 4 * memory * d
  kv = 2 * 2 * memory * cfg.vision.width * d
  return t.depth * (pairs * text_length * per_token + rows * kv)


# ---- host helpers ---------------------------------------------------------------------------------
def _bar(total, desc, progress):
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, unit="it", file=sys.stderr, disable=not progress, leave=False)


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
  """Column indices of each row's k largest, in descending order (torch.topk's set)."""
  part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
  return np.take_along_axis(part, order, axis=1)


def _allgather_strided(local: np.ndarray, n: int, count: int, index: int) -> np.ndarray:
  """Rows r of process p are global rows p + r * count: gathers them all into [n, ...]."""
  if count == 1:
    return local
  from jax.experimental import multihost_utils
  per = -(-n // count)
  pad = np.zeros((per,) + local.shape[1:], local.dtype)
  pad[:len(local)] = local
  every = np.asarray(multihost_utils.process_allgather(pad))  # [P, per, ...]
  out = np.empty((n,) + local.shape[1:], local.dtype)
  for p in range(count):
    rows = np.arange(p, n, count)
    out[rows] = every[p, :len(rows)]
  return out


def candidate_rows(topk_i2t: np.ndarray, topk_t2i: np.ndarray, n_texts: int, per_row: int):
  """The union of both directions' candidate pairs, grouped by image into rows of at most
  `per_row` texts: (row images [R], row texts [R, per_row] padded with -1)."""
  i2t = np.repeat(np.arange(len(topk_i2t)), topk_i2t.shape[1]) * n_texts + topk_i2t.ravel()
  t2i = topk_t2i.ravel() * n_texts + np.repeat(np.arange(len(topk_t2i)), topk_t2i.shape[1])
  pairs = np.unique(np.concatenate([i2t, t2i]))  # sorted: by image, then text
  images, texts = pairs // n_texts, pairs % n_texts
  starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]])
  row_images, row_texts = [], []
  for s, e in zip(starts, np.r_[starts[1:], len(pairs)]):
    for a in range(s, e, per_row):
      t = texts[a:min(a + per_row, e)]
      row_images.append(images[s])
      row_texts.append(np.pad(t, (0, per_row - len(t)), constant_values=-1))
  return np.asarray(row_images, np.int64), np.asarray(row_texts, np.int64).reshape(-1, per_row)


def read_video(path: str, frames: int, size: int) -> np.ndarray:
  """`frames` frames of a video sampled as the official (indices np.arange(0, n, n / frames)),
  each resized (bicubic) to size x size: uint8 [frames, size, size, 3]. PyAV (FFmpeg) decodes."""
  import av
  from PIL import Image
  with av.open(path) as container:
    stream = container.streams.video[0]
    n = stream.frames
    if n <= 0:  # some containers do not record the count: count by decoding
      n = sum(1 for _ in container.decode(stream))
      container.seek(0)
    if n <= 0:
      raise ValueError("no frames")
    want = np.arange(0, n, n / frames).astype(int)[:frames]
    wanted, picked = set(want.tolist()), {}
    for i, frame in enumerate(container.decode(stream)):
      if i in wanted:
        picked[i] = frame.to_image().convert("RGB").resize((size, size), Image.BICUBIC)
      if i >= want[-1]:
        break
  missing = [int(i) for i in want if i not in picked]
  if missing:
    raise ValueError(f"frames {missing} of {n} could not be decoded")
  return np.stack([np.asarray(picked[int(i)]) for i in want])


# ---- the evaluation ---------------------------------------------------------------------------
@dataclasses.dataclass
class RetrievalResult:
  metrics: dict
  score_i2t: np.ndarray  # [items, texts]
  score_t2i: np.ndarray  # [texts, items]
  sims: np.ndarray  # ITC cosine [items, texts]
  gallery: Gallery  # what was evaluated (undecodable items and blank captions removed)
  skipped: dict  # {"items": [(path, error)], "blank_texts": n, "texts_of_skipped_items": n}
  stats: dict  # pairs scored, rows, FLOPs, seconds per phase


def evaluate(model, gallery: Gallery, *, k: int = 256, batch_size: int = 32, texts_per_row: int = 0,
             rows_per_call: int = 0, frames: int = 8, max_words: int = 30, text_length: int = 35,
             reuse_kv: bool = True, progress: bool = True, workers: int = 8, devices=None) -> RetrievalResult:
  """The official k-candidate re-rank of `gallery` with `model` (a BlipModel with ITC/ITM heads).

  batch_size: images (videos) per encoder call; texts_per_row: candidate texts that share one
  image's keys/values (default min(k, 64)); rows_per_call: rows per ITM call (default: batch_size, rounded to the
  local devices); reuse_kv=False repeats the image tokens for each text (the official cost);
  devices: this process's devices to use (default all local ones).
  """
  from blip_jax.caption import DataParallel, map_ahead, pad_rows
  from blip_jax.preprocess import ImageDecodeError, normalize, preprocess
  from blip_jax.tokenizers import pre_caption
  cfg = model.config
  check_request(model, gallery, k)
  P, me = jax.process_count(), jax.process_index()
  dp = DataParallel(devices)
  params = dp.put_params(model.params)
  stats = {}

  # 1. texts: cleaned as official (blank ones dropped and counted), features of this process's share
  t0 = time.time()
  clean = [pre_caption(t, max_words) if isinstance(t, str) else "" for t in gallery.texts]
  blank = {t for t, c in enumerate(clean) if not c}
  ids, mask = model.tokenize([c or "." for c in clean], max_length=text_length)
  ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
  n_txt = len(clean)
  mine = np.arange(me, n_txt, P)
  rows = dp.round_batch(max(batch_size, 1) * 4)
  feats = []
  with _bar(len(mine), "text features", progress) as bar:
    for s in range(0, len(mine), rows):
      sel = mine[s:s + rows]
      f = text_features(cfg, params, dp.put_batch(pad_rows(ids[sel], rows)), dp.put_batch(pad_rows(mask[sel], rows)))
      feats.append(np.asarray(f)[:len(sel)])
      bar.update(len(sel))
  text_feat = _allgather_strided(np.concatenate(feats) if feats else np.zeros((0, cfg.embed_dim), np.float32),
                                 n_txt, P, me)
  stats["text_s"] = time.time() - t0

  # 2. images (videos): decoded in threads a batch ahead, encoded; tokens of this process's share kept on host
  t0 = time.time()
  size = cfg.vision.image_size
  nf = frames if gallery.video else 1
  n_img = len(gallery.items)
  mine_img = np.arange(me, n_img, P)

  def load(i):
    try:
      if gallery.video:
        return i, normalize(read_video(gallery.items[i], nf, size)), None
      return i, preprocess([gallery.items[i]], size), None
    except ImageDecodeError as e:
      return i, None, str(e)
    except Exception as e:  # noqa: BLE001  (PyAV/FFmpeg raise many kinds; a bad file is skipped, not fatal)
      return i, None, f"{gallery.items[i]}: cannot decode video ({type(e).__name__}: {e})"

  b = dp.round_batch(batch_size)
  tokens = {}  # global item index -> [M, D] host array
  image_feat_local = np.zeros((len(mine_img), cfg.embed_dim), np.float32)
  ok_local = np.zeros(len(mine_img), bool)
  errors = {}
  where = {int(i): r for r, i in enumerate(mine_img)}
  chunks = (mine_img[s:s + b] for s in range(0, len(mine_img), b))
  with _bar(len(mine_img), "videos" if gallery.video else "images", progress) as bar:
    for results in map_ahead(load, chunks, workers=workers):
      good = [(i, x) for i, x, _ in results if x is not None]
      errors.update({i: e for i, _, e in results if e is not None})
      if good:
        pix = np.concatenate([x for _, x in good])
        e, f = encode_items(cfg, params, dp.put_batch(pad_rows(pix, b * nf)), nf)
        e, f = np.asarray(e), np.asarray(f)
        for r, (i, _) in enumerate(good):
          tokens[i] = e[r]
          image_feat_local[where[i]], ok_local[where[i]] = f[r], True
      bar.update(len(results))
  image_feat = _allgather_strided(image_feat_local, n_img, P, me)
  ok = _allgather_strided(ok_local, n_img, P, me)
  stats["image_s"] = time.time() - t0
  for i, e in sorted(errors.items()):
    print(f"warning: skipped {e}", file=sys.stderr)

  # 3. drop what could not be read: undecodable items with their texts, blank texts
  keep_img = np.flatnonzero(ok)
  keep_txt = np.asarray([t for t in range(n_txt) if t not in blank and ok[gallery.txt2img[t]]], np.int64)
  skipped = {"items": [(gallery.items[i], errors.get(i, "not decodable on another host"))
                       for i in range(n_img) if not ok[i]],
             "blank_texts": len(blank), "texts_of_skipped_items": int(sum(len(gallery.img2txt[i]) for i in range(n_img) if not ok[i]))}
  if len(keep_img) == 0 or len(keep_txt) == 0:
    raise ValueError(f"nothing left to evaluate: {len(skipped['items'])} of {n_img} items undecodable, "
                     f"{len(blank)} blank texts")
  new_img = -np.ones(n_img, np.int64)
  new_img[keep_img] = np.arange(len(keep_img))
  txt2img = new_img[gallery.txt2img[keep_txt]]
  img2txt = [[] for _ in keep_img]
  for t, i in enumerate(txt2img):
    img2txt[i].append(t)
  evaluated = Gallery([gallery.items[i] for i in keep_img], [gallery.texts[t] for t in keep_txt], txt2img,
                      img2txt, gallery.video)
  kk = min(k, len(keep_img), len(keep_txt))
  if kk < k:
    print(f"warning: k={k} lowered to {kk} (the gallery left after skipping)", file=sys.stderr)

  # 4. ITC similarities and both directions' top-k; the union of pairs grouped by image
  t0 = time.time()
  sims = image_feat[keep_img] @ text_feat[keep_txt].T
  topk_i2t, topk_t2i = _topk(sims, kk), _topk(sims.T, kk)
  S = texts_per_row or min(kk, 64)
  row_img, row_txt = candidate_rows(topk_i2t, topk_t2i, len(keep_txt), S)
  owner = keep_img[row_img] % P  # the process that holds the image's tokens
  my_rows = np.flatnonzero(owner == me)
  per_call = dp.round_batch(rows_per_call or batch_size)
  local_scores = np.zeros((len(my_rows), S), np.float32)
  sub_ids, sub_mask = ids[keep_txt], mask[keep_txt]
  with _bar(len(my_rows), "re-rank (ITM)", progress) as bar:
    for s in range(0, len(my_rows), per_call):
      sel = my_rows[s:s + per_call]
      txt = row_txt[sel]
      txt = np.where(txt < 0, txt[:, :1], txt)  # padding repeats the row's first text
      mem = np.stack([tokens[keep_img[row_img[r]]] for r in sel])
      if reuse_kv:
        mem = pad_rows(mem, per_call)
      else:
        mem = pad_rows(np.repeat(mem, S, axis=0), per_call * S)
      out = itm_positive(cfg, params, dp.put_batch(mem), dp.put_batch(pad_rows(sub_ids[txt.ravel()], per_call * S)),
                         dp.put_batch(pad_rows(sub_mask[txt.ravel()], per_call * S)))
      local_scores[s:s + len(sel)] = np.asarray(out)[:len(sel) * S].reshape(len(sel), S)
      bar.update(len(sel))
  # gather every process's rows (each process knows which rows every other one scored)
  itm = np.zeros((len(row_img), S), np.float32)
  if P == 1:
    itm[my_rows] = local_scores
  else:
    from jax.experimental import multihost_utils
    per = max(int(np.sum(owner == p)) for p in range(P))
    pad = np.zeros((per, S), np.float32)
    pad[:len(my_rows)] = local_scores
    every = np.asarray(multihost_utils.process_allgather(pad))
    for p in range(P):
      r = np.flatnonzero(owner == p)
      itm[r] = every[p, :len(r)]
  stats["rerank_s"] = time.time() - t0

  # 5. score matrices as official: ITM positive logit + cosine on the candidates, -100 elsewhere
  valid = row_txt >= 0
  pair_img = np.broadcast_to(row_img[:, None], row_txt.shape)[valid]
  pair_txt = row_txt[valid]
  pair_score = itm[valid] + sims[pair_img, pair_txt]
  lookup = dict(zip((pair_img * len(keep_txt) + pair_txt).tolist(), pair_score.tolist()))
  score_i2t = np.full(sims.shape, -100.0, np.float32)
  score_t2i = np.full(sims.T.shape, -100.0, np.float32)
  ri = np.repeat(np.arange(len(keep_img)), kk)
  score_i2t[ri, topk_i2t.ravel()] = [lookup[i * len(keep_txt) + t] for i, t in zip(ri, topk_i2t.ravel())]
  rt = np.repeat(np.arange(len(keep_txt)), kk)
  score_t2i[rt, topk_t2i.ravel()] = [lookup[i * len(keep_txt) + t] for t, i in zip(rt, topk_t2i.ravel())]
  metrics = recall_at_k(score_i2t, score_t2i, txt2img, img2txt)

  memory = int(next(iter(tokens.values())).shape[0]) if tokens else (cfg.vision.num_patches + 1) * nf
  official_pairs = kk * (len(keep_img) + len(keep_txt))
  stats.update(k=kk, pairs=int(valid.sum()), rows=len(row_img), official_pairs=official_pairs,
               itm_flops=itm_flops(cfg, int(valid.sum()) if reuse_kv else len(row_img) * S,
                                   len(row_img) if reuse_kv else len(row_img) * S, text_length, memory),
               official_itm_flops=itm_flops(cfg, official_pairs, official_pairs, text_length, memory))
  return RetrievalResult(metrics, score_i2t, score_t2i, sims, evaluated, skipped, stats)


def check_request(model, gallery: Gallery, k: int):
  """Everything that can be refused before any compute."""
  check_gallery(gallery, k)
  check_model(model)


def check_model(model):
  if not model.config.has_itc:
    raise ValueError(f"a {model.config.kind!r} model has no ITC projections and ITM head; retrieval needs a "
                     "retrieval or pretraining checkpoint")
  if model.tokenizer is None:
    raise ValueError("the checkpoint has no tokenizer: pass --vocab path/to/vocab.txt")


def check_gallery(gallery: Gallery, k: int):
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if k > len(gallery.items) or k > len(gallery.texts):
    raise ValueError(f"k={k} is larger than the gallery ({len(gallery.items)} "
                     f"{'videos' if gallery.video else 'images'}, {len(gallery.texts)} texts); the official "
                     f"settings are k=256 for COCO 5K, 128 for Flickr30K 1K and MSRVTT")


def write_outputs(result: RetrievalResult, out_dir: str, top: int = 10) -> None:
  """DIR/metrics.json, DIR/scores.npz, DIR/rankings.jsonl (each query's top `top`)."""
  os.makedirs(out_dir, exist_ok=True)
  g = result.gallery
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump({**result.metrics, "k": result.stats["k"], "items": len(g.items), "texts": len(g.texts),
               "skipped_items": [{"path": p, "error": e} for p, e in result.skipped["items"]],
               "skipped_blank_texts": result.skipped["blank_texts"],
               "skipped_texts_of_skipped_items": result.skipped["texts_of_skipped_items"],
               "stats": result.stats}, f, indent=2)
  np.savez(os.path.join(out_dir, "scores.npz"), score_matrix_i2t=result.score_i2t,
           score_matrix_t2i=result.score_t2i)
  with open(os.path.join(out_dir, "rankings.jsonl"), "w") as f:
    for i, row in enumerate(result.score_i2t):
      best = np.argsort(row)[::-1][:top]
      f.write(json.dumps({"direction": "i2t", "query": g.items[i], "ground_truth": g.img2txt[i],
                          "top": [{"text": int(t), "caption": g.texts[t], "score": float(row[t]),
                                   "correct": int(t) in g.img2txt[i]} for t in best]}) + "\n")
    for t, row in enumerate(result.score_t2i):
      best = np.argsort(row)[::-1][:top]
      f.write(json.dumps({"direction": "t2i", "query": g.texts[t], "ground_truth": int(g.txt2img[t]),
                          "top": [{"item": int(i), "path": g.items[i], "score": float(row[i]),
                                   "correct": int(i) == int(g.txt2img[t])} for i in best]}) + "\n")


def format_metrics(m: dict) -> str:
  return (f"text retrieval R@1/5/10 {m['txt_r1']:.2f}/{m['txt_r5']:.2f}/{m['txt_r10']:.2f} (mean {m['txt_r_mean']:.2f})  "
          f"image retrieval R@1/5/10 {m['img_r1']:.2f}/{m['img_r5']:.2f}/{m['img_r10']:.2f} "
          f"(mean {m['img_r_mean']:.2f})  r_mean {m['r_mean']:.2f}")


# ---- fine-tuning (the shared trainer calls these) -----------------------------------------------
def check_training_config(c):
  """Eval galleries readable and k within them, before any compute."""
  if not any(c.eval.annotations.values()):
    return
  for split, path in c.eval.annotations.items():
    if path:
      check_gallery(read_gallery(path, c.eval.image_root), c.eval.k)


def evaluate_splits(c, model) -> dict:
  """The k-candidate evaluation of each eval split: {"val/r_mean": ..., "test/txt_r1": ...}."""
  out = {}
  for split, path in c.eval.annotations.items():
    if path:
      r = evaluate(model, read_gallery(path, c.eval.image_root), k=c.eval.k, batch_size=c.eval.batch_size,
                   progress=False)
      out.update({f"{split}/{name}": v for name, v in r.metrics.items()})
  return out
