"""Images/s of the training transform at 224 px on ../shared/data/coco_karpathy_mini:
ours (tf.data: fused crop-decode at reduced DCT scale, TF bicubic, RandAugment) against a PIL/NumPy
pipeline doing the official steps (PIL decode, RandomResizedCrop (0.2, 1) bicubic, flip,
RandomAugment(2, 5) ops, ToTensor + CLIP normalise; torchvision is not installable here).
Both end in normalised float32 [B, 224, 224, 3]. Each runs in its own process pinned to the same
core(s), measured in the same run.

  .venv/bin/python bench/input_pipeline.py [--cores 1] [--images 398] [--repeat 2]
"""
import argparse
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "coco_karpathy_mini"))
MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)


def paths(n):
  files = sorted(os.listdir(os.path.join(ROOT, "images")))
  return [os.path.join(ROOT, "images", f) for f in files][:n]


# ---- the PIL/NumPy reference pipeline ----------------------------------------------------------
def pil_pipeline(path, rng):
  from PIL import Image, ImageOps
  img = Image.open(path).convert("RGB")
  w, h = img.size
  area = w * h
  for _ in range(10):  # torchvision RandomResizedCrop.get_params
    a = area * rng.uniform(0.2, 1.0)
    r = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
    if 0 < cw <= w and 0 < ch <= h:
      x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
      break
  else:
    cw, ch, x, y = w, h, 0, 0
  img = img.resize((224, 224), Image.BICUBIC, box=(x, y, x + cw, y + ch))
  if rng.random() < 0.5:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  for _ in range(2):  # RandomAugment(2, 5): ops with replacement, each p=0.5
    op = rng.randint(0, 9)
    if rng.random() >= 0.5:
      continue
    s = -1 if rng.random() < 0.5 else 1
    fill = (128, 128, 128)
    if op == 1:
      img = ImageOps.autocontrast(img)
    elif op == 4:
      img = ImageOps.equalize(img)
    elif op == 5:
      img = img.transform(img.size, Image.AFFINE, (1, s * 0.15, 0, 0, 1, 0), Image.BILINEAR, fillcolor=fill)
    elif op == 6:
      img = img.transform(img.size, Image.AFFINE, (1, 0, 0, s * 0.15, 1, 0), Image.BILINEAR, fillcolor=fill)
    elif op == 7:
      img = img.transform(img.size, Image.AFFINE, (1, 0, s * 5, 0, 1, 0), Image.BILINEAR, fillcolor=fill)
    elif op == 8:
      img = img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, s * 5), Image.BILINEAR, fillcolor=fill)
    elif op == 9:
      img = img.rotate(s * 15, Image.BILINEAR, fillcolor=fill)
  return (np.asarray(img, np.float32) / 255.0 - MEAN) / STD


def run_pil(files, repeat, q):
  rng = random.Random(0)
  pil_pipeline(files[0], rng)
  t = time.perf_counter()
  n = 0
  for _ in range(repeat):
    batch = []
    for f in files:
      batch.append(pil_pipeline(f, rng))
      n += 1
      if len(batch) == 32:
        np.stack(batch); batch = []
  q.put(("pil", n / (time.perf_counter() - t)))


def run_ours(files, repeat, cores, q):
  os.environ["BLIP_TF_INTRA_THREADS"] = "1"
  os.environ["BLIP_TF_INTER_THREADS"] = str(cores)
  import tensorflow as tf
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  import blip_jax.data.tf_setup  # noqa: F401  (TF threading)
  from blip_jax.data import transforms as T
  FN = T.decode_train
  data = tf.constant([open(f, "rb").read() for f in files])
  def fn(i):
    seed = tf.stack([tf.constant(0, tf.int64), tf.cast(i, tf.int64)])
    return FN(tf.gather(data, i % len(files)), seed, 224, (0.2, 1.0))
  ds = tf.data.Dataset.range(len(files) * repeat).map(fn, num_parallel_calls=cores, deterministic=True).batch(32)
  opts = tf.data.Options()
  opts.threading.private_threadpool_size = cores
  opts.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(opts).prefetch(2)
  for _ in ds.take(1):  # warm up (graph build)
    pass
  t = time.perf_counter()
  n = 0
  for b in ds.as_numpy_iterator():
    x = (b.astype(np.float32) / 255.0 - MEAN) / STD  # same float32 output as the reference
    n += len(x)
  q.put(("ours", n / (time.perf_counter() - t)))


def pinned(target, cores, *args):
  os.sched_setaffinity(0, set(range(cores)))
  target(*args)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--cores", type=int, default=1)
  ap.add_argument("--images", type=int, default=398)
  ap.add_argument("--repeat", type=int, default=2)
  a = ap.parse_args()
  files = paths(a.images)
  ctx = mp.get_context("spawn")
  q = ctx.Queue()
  res = {}
  for name, target, args in (("pil", run_pil, (files, a.repeat, q)), ("ours", run_ours, (files, a.repeat, a.cores, q))):
    p = ctx.Process(target=pinned, args=(target, a.cores, *args))
    p.start(); p.join()
    k, v = q.get()
    res[k] = v
  per = lambda v: v / a.cores
  print(f"images: {len(files)} COCO photos x {a.repeat}, 224 px train transform, {a.cores} core(s) each, float32 output")
  print(f"PIL/NumPy (official steps): {res['pil']:8.1f} img/s  ({per(res['pil']):.1f} per core)")
  print(f"blip_jax tf.data          : {res['ours']:8.1f} img/s  ({per(res['ours']):.1f} per core)")
  print(f"ratio ours / PIL          : {res['ours'] / res['pil']:.2f}x")
  print(json.dumps({"pil_img_s": res["pil"], "ours_img_s": res["ours"], "ratio": res["ours"] / res["pil"], "cores": a.cores}))


if __name__ == "__main__":
  main()
