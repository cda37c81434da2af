"""Image-text retrieval (the paper §5.1, §5.5; official train_retrieval.py evaluation): the
k-candidate evaluation, for images and videos.

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

Across hosts (blip_jax.parallel.run_sharded): process p encodes batches p, p+P, ... of the images
and of the texts and keeps its images' tokens; features are all-gathered (small: [N, 256]); every
process derives the same candidate rows and scores those of its own images; the scores are
all-gathered. Each pair is scored by the same code
on the same inputs wherever it runs, so one device, 8 devices and 2 processes agree.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from blip_jax import fs, objectives
from blip_jax.api import require
from blip_jax.data.eval_sets import Gallery, read_gallery  # noqa: F401 (the task's reader, re-exported)
from blip_jax.data.video import read_video
from blip_jax.distributed import allgather_rows, allgather_sum
from blip_jax.metrics.retrieval import candidate_rows, recall_at_k, topk
from blip_jax.models.blip import Blip
from blip_jax.models.config import BlipConfig
from blip_jax.parallel import DataParallel, chunks, pad_rows, run_sharded
from blip_jax.preprocess import ImageDecodeError, normalize, preprocess
from blip_jax.tasks import Task
from blip_jax.tokenizers import pre_caption


# ---- what is evaluated ----------------------------------------------------------------------------
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
def length_bucket(length: int, max_length: int) -> int:
  """Tokens computed for a batch whose longest text has `length` tokens: the texts are padded to
  max_length (official 35) but trailing padding changes nothing (masked keys weigh exactly 0, and
  only the first position is read), so a batch runs at 16, 24 or the full length (3 compilations)."""
  return next(b for b in (16, 24, max_length) if b >= min(length, max_length))


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
  tokens, image_feat, ok, owner, errors = _encode_items(cfg, params, dp, gallery, nf, batch_size, workers, progress)
  stats["image_s"] = time.time() - t0
  evaluated, keep_img, keep_txt, skipped = _drop_unreadable(gallery, ok, blank, errors)
  kk = min(k, len(keep_img), len(keep_txt))
  if kk < k:
    print(f"warning: k={k} lowered to {kk} (the gallery left after skipping)", file=sys.stderr)

  # ITC similarities, both directions' top-k, the union of their pairs in rows of one image each
  t0 = time.time()
  n_txt = len(keep_txt)
  sims = image_feat[keep_img] @ text_feat[keep_txt].T
  topk_i2t, topk_t2i = topk(sims, kk), topk(sims.T, kk)
  S = texts_per_row or min(kk, 64)
  pairs, row_img, row_txt = candidate_rows(topk_i2t, topk_t2i, n_txt, S, mask[keep_txt].sum(axis=1))
  itm, flops = _score_rows(cfg, params, dp, tokens, owner, keep_img[row_img],
                           np.where(row_txt < 0, -1, keep_txt[row_txt]), ids, mask, rows_per_call or batch_size,
                           reuse_kv, progress)
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
  clean = [pre_caption(t, max_words) if isinstance(t, str) else "" for t in texts]
  ids, mask = model.tokenize([c or "." for c in clean], max_length=text_length)
  return np.asarray(ids, np.int32), np.asarray(mask, np.int32), {t for t, c in enumerate(clean) if not c}


def _text_features(cfg, params, dp, ids, mask, batch, progress):
  """ITC features of every text: batches of similar lengths (less padding computed), split over hosts."""
  lengths = mask.sum(axis=1)
  rows = dp.round_batch(min(batch, max(-(-len(ids) // jax.process_count()), 1)))
  order = np.argsort(lengths, kind="stable")
  batches = [order[s:s + rows] for s in range(0, len(ids), rows)]

  def predict(sel, _):
    L = length_bucket(int(lengths[sel].max()), ids.shape[1])
    f = text_features(cfg, params, dp.put_batch(pad_rows(ids[sel, :L], rows)),
                      dp.put_batch(pad_rows(mask[sel, :L], rows)))
    return np.asarray(f)

  every, _ = run_sharded(batches, predict, (rows, cfg.embed_dim), np.float32, desc="text features", progress=progress)
  feats = np.zeros((len(ids), cfg.embed_dim), np.float32)
  for b, sel in enumerate(batches):
    feats[sel] = every[b, :len(sel)]
  return feats


def _encode_items(cfg, params, dp, gallery, frames, batch_size, workers, progress):
  """Decodes (threads, a batch ahead) and encodes the items, batches split over hosts.

  Returns ({item: tokens [M, D]} of this process's items, kept on the host; ITC features [N, 256],
  readable flags [N] and owning process [N] of all items; {path: error} of this process's items)."""
  size, n = cfg.vision.image_size, len(gallery.items)
  b = dp.round_batch(min(batch_size, max(-(-n // jax.process_count()), 1)))
  tokens = {}

  def decode(path):
    try:
      return normalize(read_video(path, frames, size)) if gallery.video else preprocess([path], size)
    except ImageDecodeError:
      raise
    except Exception as e:  # noqa: BLE001  (PyAV/FFmpeg raise many kinds; a bad file is skipped, not fatal)
      what = "video" if gallery.video else "image"
      raise ImageDecodeError(f"{path}: cannot decode {what} ({type(e).__name__}: {e})") from None

  def predict(batch, decoded):
    good = [(i, x) for i, (_, x, _) in zip(batch, decoded) if x is not None]
    if not good:
      return None
    e, f = encode_items(cfg, params, dp.put_batch(pad_rows(np.concatenate([x for _, x in good]), b * frames)), frames)
    e, f = np.asarray(e), np.asarray(f)
    out = np.zeros((b, cfg.embed_dim + 1), np.float32)  # feature, 1 where readable
    for r, (i, _) in enumerate(good):
      tokens[i] = e[r]
      out[i - batch[0], :-1], out[i - batch[0], -1] = f[r], 1.0
    return out

  batches = chunks(n, b)
  every, errors = run_sharded(batches, predict, (b, cfg.embed_dim + 1), np.float32,
                              files=lambda batch: [gallery.items[i] for i in batch], decode=decode,
                              desc="videos" if gallery.video else "images", progress=progress, workers=workers)
  every = every.reshape(-1, cfg.embed_dim + 1)[:n]
  owner = (np.arange(n) // b) % jax.process_count()
  return tokens, every[:, :-1], every[:, -1] > 0, owner, errors


def _drop_unreadable(gallery, ok, blank, errors):
  """The gallery without undecodable items (and their texts) and blank texts, re-indexed.
  Returns (gallery, kept item indices, kept text indices, what was skipped)."""
  n_img = len(gallery.items)
  keep_img = np.flatnonzero(ok)
  keep_txt = np.asarray([t for t in range(len(gallery.texts)) if t not in blank and ok[gallery.txt2img[t]]],
                        np.int64)
  bad = [i for i in range(n_img) if not ok[i]]
  skipped = {"items": [(gallery.items[i], errors.get(gallery.items[i], "not decodable (on another host)"))
                       for i in bad],
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


def _score_rows(cfg, params, dp, tokens, item_owner, row_items, row_texts, ids, mask, per_call, reuse_kv, progress):
  """ITM positive logits [R, S] of candidate rows (row r: item row_items[r] with texts row_texts[r],
  -1 = padding). Each process scores the rows of the items whose tokens it holds (item_owner); the
  scores are then gathered, so every process returns all rows."""
  P, me = jax.process_count(), jax.process_index()
  S = row_texts.shape[1]
  owner = item_owner[row_items]
  mine = np.flatnonzero(owner == me)
  calls = -(-len(mine) // per_call)  # as few calls as per_call allows, evenly filled
  per_call = dp.round_batch(-(-len(mine) // max(calls, 1)) or 1)
  filled = np.where(row_texts < 0, row_texts[:, :1], row_texts)  # padding repeats the row's first text
  row_length = mask.sum(axis=1)[filled].max(axis=1)
  order = np.argsort(row_length[mine], kind="stable")  # rows of similar text length in one call
  local = np.zeros((len(mine), S), np.float32)
  flops = 0.0  # what this process computes, padding included
  with tqdm(total=len(mine), desc="re-rank (ITM)", file=sys.stderr, disable=not progress, leave=False) as bar:
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
  # every process knows whose rows are whose
  every = allgather_rows(local, max(int(np.sum(owner == p)) for p in range(P)))
  for p in range(P):
    r = np.flatnonzero(owner == p)
    itm[r] = every[p, :len(r)]
  return itm, allgather_sum(flops)


def check_request(model, gallery: Gallery, k: int):
  """Everything that can be refused before any compute."""
  check_gallery(gallery, k)
  check_model(model)


def check_model(model, name: str = ""):
  require(model, "retrieval", itc=True, name=name, hint="a retrieval or pretraining checkpoint")


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
  return (f"text retrieval R@1/5/10 {m['txt_r1']:.2f}/{m['txt_r5']:.2f}/{m['txt_r10']:.2f} "
          f"(mean {m['txt_r_mean']:.2f})  "
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


TASK = Task("retrieval", "retrieval", objectives.itc_itm_lm,
            log_terms="itc {loss_itc:.4f} itm {loss_itm:.4f} (acc {itm_acc:.3f}) lm {loss_lm:.4f} temp {temp:.4f}",
            check_config=check_training_config, evaluate=evaluate_splits, select="val/r_mean", shown=("r1", "r_mean"))
