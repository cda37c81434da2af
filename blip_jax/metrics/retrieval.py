"""Retrieval recall as the official `itm_eval` computes it (blip_facts §5.1).

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
