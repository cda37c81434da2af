"""Retrieval recall as the official `itm_eval` computes it (official train_retrieval.py), and the
k-candidate selection of its re-rank.

Image->text: the rank of a query image is the best rank of any of its ground-truth texts in the
row's descending order; text->image: the rank of the one ground-truth image. R@K = percent of
queries with rank < K; `*_r_mean` = mean of R@1/5/10; `r_mean` = mean of the two directions.
The order is numpy's argsort reversed, exactly as official, so ties (the -100 entries outside
the re-ranked candidates) are broken the same way.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

KEYS = ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean")


def ranks_i2t(score_i2t: np.ndarray, img2txt: Sequence[Sequence[int]]) -> np.ndarray:
  out = np.empty(len(score_i2t), np.int64)
  for i, row in enumerate(score_i2t):
    pos = np.empty(len(row), np.int64)
    pos[np.argsort(row)[::-1]] = np.arange(len(row))  # position of each text in the official order
    out[i] = pos[np.asarray(img2txt[i])].min()
  return out


def ranks_t2i(score_t2i: np.ndarray, txt2img: Sequence[int]) -> np.ndarray:
  out = np.empty(len(score_t2i), np.int64)
  for t, row in enumerate(score_t2i):
    out[t] = int(np.nonzero(np.argsort(row)[::-1] == txt2img[t])[0][0])
  return out


def recall_at_k(score_i2t: np.ndarray, score_t2i: np.ndarray, txt2img: Sequence[int],
                img2txt: Sequence[Sequence[int]]) -> dict:
  """The official metrics dict (percent): txt_r1/5/10, txt_r_mean, img_r1/5/10, img_r_mean, r_mean."""
  tr, ir = ranks_i2t(score_i2t, img2txt), ranks_t2i(score_t2i, txt2img)
  r = lambda ranks, k: 100.0 * float(np.mean(ranks < k))
  out = {"txt_r1": r(tr, 1), "txt_r5": r(tr, 5), "txt_r10": r(tr, 10),
         "img_r1": r(ir, 1), "img_r5": r(ir, 5), "img_r10": r(ir, 10)}
  out["txt_r_mean"] = (out["txt_r1"] + out["txt_r5"] + out["txt_r10"]) / 3
  out["img_r_mean"] = (out["img_r1"] + out["img_r5"] + out["img_r10"]) / 3
  out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
  return {k: out[k] for k in KEYS}


def topk(scores: np.ndarray, k: int) -> np.ndarray:
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
