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
import os
import sys
import time

import jax
import numpy as np

from blip_jax.models.blip import Blip
from blip_jax.models.config import BlipConfig
from blip_jax.metrics.retrieval import recall_at_k
from blip_jax.train.launch import allgather_strided


# ---- what is evaluated ----------------------------------------------------------------------------
@dataclasses.dataclass
class Gallery:
  """Images (or videos) and their captions: text t belongs to item txt2img[t]."""
  items: list  # file paths
  texts: list
  txt2img: np.ndarray
  img2txt: list
  video: bool = False

  def first(self, n: int) -> "Gallery":
    """The first n items with their captions (re-indexed)."""
    t = [t for i in range(n) for t in self.img2txt[i]]
    new = {old: j for j, old in enumerate(t)}
    return Gallery(self.items[:n], [self.texts[x] for x in t], self.txt2img[t],
                   [[new[x] for x in self.img2txt[i]] for i in range(n)], self.video)


def read_gallery(annotations: str, root: str = "", *, video: bool = False) -> Gallery:
  """Karpathy-style eval JSON ([{"image", "caption": [..] | str}]: entries of one image are merged),
  or with video=True the MSRVTT JSON lines ({"clip_name", "caption"}; videos at ROOT/clip_name.mp4).
  A file of the wrong shape fails here, naming the entry and what is missing."""
  from blip_jax.data.annotations import caption_groups, read_entries
  key = "clip_name" if video else "image"
  groups = caption_groups(read_entries(annotations), key, annotations)
  items, texts, txt2img, img2txt = [], [], [], []
  for i, g in enumerate(groups):
    items.append(os.path.join(root, str(g[key]) + ".mp4") if video else os.path.join(root, g[key]))
    img2txt.append(list(range(len(texts), len(texts) + len(g["texts"]))))
    texts += g["texts"]
    txt2img += [i] * len(g["texts"])
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


def length_bucket(length: int, max_length: int) -> int:
  """Tokens computed for a batch whose longest text has `length` tokens: the texts are padded to
  max_length (official 35) but trailing padding changes nothing (masked keys weigh exactly 0, and
  only the first position is read), so a batch runs at 16, 24 or the full length (3 compilations)."""
  return next(b for b in (16, 24, max_length) if b >= min(length, max_length))


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
  """Column indices of each row's k largest, in descending order (torch.topk's set)."""
  part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
  return np.take_along_axis(part, order, axis=1)


def candidate_rows(topk_i2t: np.ndarray, topk_t2i: np.ndarray, n_texts: int, per_row: int,
                   text_length: np.ndarray | None = None):
  """The union of both directions' candidate pairs, grouped by image into rows of at most
  `per_row` texts; an image's texts are ordered by `text_length` (when given), so each row holds
  texts of similar length. Returns (pairs: sorted keys image * n_texts + text, row images [R],
  row texts [R, per_row] padded with -1)."""
  i2t = np.repeat(np.arange(len(topk_i2t)), topk_i2t.shape[1]) * n_texts + topk_i2t.ravel()
  t2i = topk_t2i.ravel() * n_texts + np.repeat(np.arange(len(topk_t2i)), topk_t2i.shape[1])
  pairs = np.unique(np.concatenate([i2t, t2i]))  # sorted: by image, then text
  images, texts = pairs // n_texts, pairs % n_texts
  if text_length is not None:
    order = np.lexsort((texts, text_length[texts], images))  # by image, then length
    images, texts = images[order], texts[order]
  starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]])
  row_images, row_texts = [], []
  for s, e in zip(starts, np.r_[starts[1:], len(pairs)]):
    for a in range(s, e, per_row):
      t = texts[a:min(a + per_row, e)]
      row_images.append(images[s])
      row_texts.append(np.pad(t, (0, per_row - len(t)), constant_values=-1))
  return pairs, np.asarray(row_images, np.int64), np.asarray(row_texts, np.int64).reshape(-1, per_row)


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
  stats: dict  # pairs scored, rows, ITM FLOPs computed (padding included) and the official loop's, seconds per phase


def evaluate(model, gallery: Gallery, *, k: int = 256, batch_size: int = 32, texts_per_row: int = 0,
             rows_per_call: int = 0, frames: int = 8, max_words: int = 30, text_length: int = 35,
             reuse_kv: bool = True, progress: bool = True, workers: int = 8, devices=None) -> RetrievalResult:
  """The official k-candidate re-rank of `gallery` with `model` (a BlipModel with ITC/ITM heads).

  batch_size: images (videos) per encoder call and rows per ITM call (rounded up to the local
  devices); texts_per_row: candidate texts that share one image's keys/values (default min(k, 64));
  reuse_kv=False repeats the image tokens for each text (the official cost); devices: this
  process's devices to use (default all local ones).
  """
  from blip_jax.caption import DataParallel
  check_request(model, gallery, k)
  cfg = model.config
  dp = DataParallel(devices)
  params = dp.put_params(model.params)
  nf = frames if gallery.video else 1
  stats = {}

  t0 = time.time()
  ids, mask, blank = _tokenize(model, gallery.texts, max_words, text_length)
  text_feat = _text_features(cfg, params, dp, ids, mask, 4 * batch_size, progress)
  stats["text_s"] = time.time() - t0
  t0 = time.time()
  tokens, image_feat, ok, errors = _encode_items(cfg, params, dp, gallery, nf, batch_size, workers, progress)
  stats["image_s"] = time.time() - t0
  for _, e in sorted(errors.items()):
    print(f"warning: skipped {e}", file=sys.stderr)
  evaluated, keep_img, keep_txt, skipped = _drop_unreadable(gallery, ok, blank, errors)
  kk = min(k, len(keep_img), len(keep_txt))
  if kk < k:
    print(f"warning: k={k} lowered to {kk} (the gallery left after skipping)", file=sys.stderr)

  # ITC similarities, both directions' top-k, the union of their pairs in rows of one image each
  t0 = time.time()
  n_txt = len(keep_txt)
  sims = image_feat[keep_img] @ text_feat[keep_txt].T
  topk_i2t, topk_t2i = _topk(sims, kk), _topk(sims.T, kk)
  S = texts_per_row or min(kk, 64)
  pairs, row_img, row_txt = candidate_rows(topk_i2t, topk_t2i, n_txt, S, mask[keep_txt].sum(axis=1))
  itm, flops = _score_rows(cfg, params, dp, tokens, keep_img[row_img], np.where(row_txt < 0, -1, keep_txt[row_txt]),
                           ids, mask, rows_per_call or batch_size, reuse_kv, progress)
  stats["rerank_s"] = time.time() - t0

  # score matrices as official: ITM positive logit + cosine on each query's candidates, -100 elsewhere
  valid = row_txt >= 0
  pair_img, pair_txt = np.broadcast_to(row_img[:, None], row_txt.shape)[valid], row_txt[valid]
  pair_score = np.empty(len(pairs), np.float32)  # aligned with `pairs`
  pair_score[np.searchsorted(pairs, pair_img * n_txt + pair_txt)] = itm[valid] + sims[pair_img, pair_txt]
  score_i2t = np.full(sims.shape, -100.0, np.float32)
  score_t2i = np.full(sims.T.shape, -100.0, np.float32)
  ri = np.repeat(np.arange(len(keep_img)), kk)
  score_i2t[ri, topk_i2t.ravel()] = pair_score[np.searchsorted(pairs, ri * n_txt + topk_i2t.ravel())]
  rt = np.repeat(np.arange(n_txt), kk)
  score_t2i[rt, topk_t2i.ravel()] = pair_score[np.searchsorted(pairs, topk_t2i.ravel() * n_txt + rt)]
  metrics = recall_at_k(score_i2t, score_t2i, evaluated.txt2img, evaluated.img2txt)

  memory = (cfg.vision.num_patches + 1) * nf
  official = kk * (len(keep_img) + n_txt)
  stats.update(k=kk, pairs=len(pairs), rows=len(row_img), official_pairs=official, itm_flops=flops,
               official_itm_flops=itm_flops(cfg, official, official, text_length, memory))
  return RetrievalResult(metrics, score_i2t, score_t2i, sims, evaluated, skipped, stats)


def _tokenize(model, texts, max_words, text_length):
  """Texts cleaned as official (pre_caption) and tokenized; blank ones are marked to be dropped."""
  from blip_jax.tokenizers import pre_caption
  clean = [pre_caption(t, max_words) if isinstance(t, str) else "" for t in texts]
  ids, mask = model.tokenize([c or "." for c in clean], max_length=text_length)
  return np.asarray(ids, np.int32), np.asarray(mask, np.int32), {t for t, c in enumerate(clean) if not c}


def _text_features(cfg, params, dp, ids, mask, batch, progress):
  """ITC features of every text: this process computes texts p, p+P, ..., then all are gathered."""
  from blip_jax.caption import pad_rows
  P, me = jax.process_count(), jax.process_index()
  mine = np.arange(me, len(ids), P)
  rows = dp.round_batch(min(batch, max(len(mine), 1)))
  lengths = mask.sum(axis=1)
  order = np.argsort(lengths[mine], kind="stable")  # similar lengths together: less padding computed
  feats = np.zeros((len(mine), cfg.embed_dim), np.float32)
  with _bar(len(mine), "text features", progress) as bar:
    for s in range(0, len(mine), rows):
      at = order[s:s + rows]
      sel = mine[at]
      L = length_bucket(int(lengths[sel].max()), ids.shape[1])
      f = text_features(cfg, params, dp.put_batch(pad_rows(ids[sel, :L], rows)), dp.put_batch(pad_rows(mask[sel, :L], rows)))
      feats[at] = np.asarray(f)[:len(sel)]
      bar.update(len(sel))
  return allgather_strided(feats, len(ids), P, me)


def _encode_items(cfg, params, dp, gallery, frames, batch_size, workers, progress):
  """Decodes (threads, a batch ahead) and encodes this process's items p, p+P, ...

  Returns ({item: tokens [M, D]} of this process's items, kept on the host; ITC features [N, 256]
  and readable flags [N] of all items (gathered); {item: error} of this process's items)."""
  from blip_jax.caption import map_ahead, pad_rows
  from blip_jax.preprocess import ImageDecodeError, normalize, preprocess
  P, me = jax.process_count(), jax.process_index()
  size, n = cfg.vision.image_size, len(gallery.items)

  def load(i):
    try:
      if gallery.video:
        return i, normalize(read_video(gallery.items[i], frames, size)), None
      return i, preprocess([gallery.items[i]], size), None
    except ImageDecodeError as e:
      return i, None, str(e)
    except Exception as e:  # noqa: BLE001  (PyAV/FFmpeg raise many kinds; a bad file is skipped, not fatal)
      what = "video" if gallery.video else "image"
      return i, None, f"{gallery.items[i]}: cannot decode {what} ({type(e).__name__}: {e})"

  mine = np.arange(me, n, P)
  b = dp.round_batch(min(batch_size, max(len(mine), 1)))
  tokens, errors = {}, {}
  feat, ok = np.zeros((len(mine), cfg.embed_dim), np.float32), np.zeros(len(mine), bool)
  with _bar(len(mine), "videos" if gallery.video else "images", progress) as bar:
    for results in map_ahead(load, (mine[s:s + b] for s in range(0, len(mine), b)), workers=workers):
      good = [(i, x) for i, x, _ in results if x is not None]
      errors.update({i: e for i, _, e in results if e is not None})
      if good:
        e, f = encode_items(cfg, params, dp.put_batch(pad_rows(np.concatenate([x for _, x in good]), b * frames)),
                            frames)
        e, f = np.asarray(e), np.asarray(f)
        for r, (i, _) in enumerate(good):
          tokens[i] = e[r]
          feat[i // P], ok[i // P] = f[r], True  # item i is this process's row i // P
      bar.update(len(results))
  return tokens, allgather_strided(feat, n, P, me), allgather_strided(ok, n, P, me), errors


def _drop_unreadable(gallery, ok, blank, errors):
  """The gallery without undecodable items (and their texts) and blank texts, re-indexed.
  Returns (gallery, kept item indices, kept text indices, what was skipped)."""
  n_img = len(gallery.items)
  keep_img = np.flatnonzero(ok)
  keep_txt = np.asarray([t for t in range(len(gallery.texts)) if t not in blank and ok[gallery.txt2img[t]]],
                        np.int64)
  bad = [i for i in range(n_img) if not ok[i]]
  skipped = {"items": [(gallery.items[i], errors.get(i, "not decodable (on another host)")) for i in bad],
             "blank_texts": len(blank), "texts_of_skipped_items": int(sum(len(gallery.img2txt[i]) for i in bad))}
  if len(keep_img) == 0 or len(keep_txt) == 0:
    raise ValueError(f"nothing left to evaluate: {len(bad)} of {n_img} items undecodable, {len(blank)} blank texts")
  new = -np.ones(n_img, np.int64)
  new[keep_img] = np.arange(len(keep_img))
  txt2img = new[gallery.txt2img[keep_txt]]
  img2txt = [[] for _ in keep_img]
  for t, i in enumerate(txt2img):
    img2txt[i].append(t)
  evaluated = Gallery([gallery.items[i] for i in keep_img], [gallery.texts[t] for t in keep_txt], txt2img,
                      img2txt, gallery.video)
  return evaluated, keep_img, keep_txt, skipped


def _score_rows(cfg, params, dp, tokens, row_items, row_texts, ids, mask, per_call, reuse_kv, progress):
  """ITM positive logits [R, S] of candidate rows (row r: item row_items[r] with texts row_texts[r],
  -1 = padding). Each process scores the rows of the items whose tokens it holds (item % P); the
  scores are then gathered, so every process returns all rows."""
  from blip_jax.caption import pad_rows
  P, me = jax.process_count(), jax.process_index()
  S = row_texts.shape[1]
  owner = row_items % P
  mine = np.flatnonzero(owner == me)
  calls = -(-len(mine) // per_call)  # as few calls as per_call allows, evenly filled
  per_call = dp.round_batch(-(-len(mine) // max(calls, 1)) or 1)
  filled = np.where(row_texts < 0, row_texts[:, :1], row_texts)  # padding repeats the row's first text
  row_length = mask.sum(axis=1)[filled].max(axis=1)
  order = np.argsort(row_length[mine], kind="stable")  # rows of similar text length in one call
  local = np.zeros((len(mine), S), np.float32)
  flops = 0.0  # what this process computes, padding included
  with _bar(len(mine), "re-rank (ITM)", progress) as bar:
    for s in range(0, len(mine), per_call):
      at = order[s:s + per_call]
      sel = mine[at]
      txt = filled[sel].ravel()
      L = length_bucket(int(row_length[sel].max()), ids.shape[1])
      mem = np.stack([tokens[i] for i in row_items[sel]])
      mem = pad_rows(mem, per_call) if reuse_kv else pad_rows(np.repeat(mem, S, axis=0), per_call * S)
      out = itm_positive(cfg, params, dp.put_batch(mem), dp.put_batch(pad_rows(ids[txt, :L], per_call * S)),
                         dp.put_batch(pad_rows(mask[txt, :L], per_call * S)))
      local[at] = np.asarray(out)[:len(sel) * S].reshape(len(sel), S)
      flops += itm_flops(cfg, per_call * S, per_call if reuse_kv else per_call * S, L, mem.shape[1])
      bar.update(len(sel))
  itm = np.zeros(row_texts.shape, np.float32)
  if P == 1:
    itm[mine] = local
    return itm, flops
  from jax.experimental import multihost_utils
  pad = np.zeros((max(int(np.sum(owner == p)) for p in range(P)), S), np.float32)
  pad[:len(mine)] = local
  every = np.asarray(multihost_utils.process_allgather(pad))  # every process knows whose rows are whose
  for p in range(P):
    r = np.flatnonzero(owner == p)
    itm[r] = every[p, :len(r)]
  return itm, float(np.asarray(multihost_utils.process_allgather(np.float64(flops))).sum())


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
  """DIR/metrics.json, DIR/scores.npz, DIR/rankings.jsonl (each query's top `top`); DIR may be a
  URL; each file appears whole (written through a temporary name)."""
  import io
  from blip_jax import fs
  g = result.gallery
  fs.write_json(fs.join(out_dir, "metrics.json"), {
      **result.metrics, "k": result.stats["k"], "items": len(g.items), "texts": len(g.texts),
      "skipped_items": [{"path": p, "error": e} for p, e in result.skipped["items"]],
      "skipped_blank_texts": result.skipped["blank_texts"],
      "skipped_texts_of_skipped_items": result.skipped["texts_of_skipped_items"],
      "stats": result.stats}, indent=2)
  buf = io.BytesIO()
  np.savez(buf, score_matrix_i2t=result.score_i2t, score_matrix_t2i=result.score_t2i)
  fs.write_bytes(fs.join(out_dir, "scores.npz"), buf.getvalue())
  lines = []
  for i, row in enumerate(result.score_i2t):
    best = np.argsort(row)[::-1][:top]
    lines.append(json.dumps({"direction": "i2t", "query": g.items[i], "ground_truth": g.img2txt[i],
                             "top": [{"text": int(t), "caption": g.texts[t], "score": float(row[t]),
                                      "correct": int(t) in g.img2txt[i]} for t in best]}))
  for t, row in enumerate(result.score_t2i):
    best = np.argsort(row)[::-1][:top]
    lines.append(json.dumps({"direction": "t2i", "query": g.texts[t], "ground_truth": int(g.txt2img[t]),
                             "top": [{"item": int(i), "path": g.items[i], "score": float(row[i]),
                                      "correct": int(i) == int(g.txt2img[t])} for i in best]}))
  fs.write_text(fs.join(out_dir, "rankings.jsonl"), "\n".join(lines) + "\n")


def format_metrics(m: dict) -> str:
  return (f"text retrieval R@1/5/10 {m['txt_r1']:.2f}/{m['txt_r5']:.2f}/{m['txt_r10']:.2f} (mean {m['txt_r_mean']:.2f})  "
          f"image retrieval R@1/5/10 {m['img_r1']:.2f}/{m['img_r5']:.2f}/{m['img_r10']:.2f} "
          f"(mean {m['img_r_mean']:.2f})  r_mean {m['r_mean']:.2f}")


# ---- fine-tuning (the shared trainer calls these) -----------------------------------------------
def check_training_config(c):
  """Eval galleries readable and k within them, before any compute."""
  for path in c.eval.annotations.values():
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
