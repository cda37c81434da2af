"""Batched captioning of image files (`blip-jax caption`), and the data-parallel placement that
CapFilt shares: params replicated, each batch split over this host's devices."""
from __future__ import annotations

import collections
import glob
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Sequence

import jax
import numpy as np

from blip_jax.preprocess import ImageDecodeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def expand_images(specs: Sequence[str]) -> list[str]:
  """Files, folders (searched recursively for image extensions) and globs -> sorted unique paths,
  in the order given. A spec that names nothing is an error."""
  out: list[str] = []
  for spec in specs:
    if any(c in spec for c in "*?["):
      found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(spec):
      found = sorted(os.path.join(d, f) for d, _, files in os.walk(spec) for f in files
                     if f.lower().endswith(IMAGE_EXTENSIONS))
    elif os.path.isfile(spec):
      found = [spec]
    else:
      raise FileNotFoundError(f"{spec}: no such file or folder")
    if not found:
      raise FileNotFoundError(f"{spec}: matches no image files")
    out += found
  return list(dict.fromkeys(out))


class DataParallel:
  """Replicates a model's params over this host's devices and splits batches over them."""

  def __init__(self, devices=None):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    self.devices = list(devices or jax.local_devices())
    mesh = Mesh(np.asarray(self.devices), ("data",))
    self.batch, self.replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

  def round_batch(self, batch_size: int) -> int:
    n = len(self.devices)
    return -(-batch_size // n) * n

  def put_params(self, params):
    return jax.device_put(params, self.replicated)

  def put_batch(self, array):
    return jax.device_put(np.asarray(array), self.batch)


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  """Pads the batch dimension to `rows` by repeating the last row (one compiled shape for all batches)."""
  if len(array) == rows:
    return array
  return np.concatenate([array, np.repeat(array[-1:], rows - len(array), axis=0)])


def map_ahead(fn, batches, workers: int = 4, ahead: int = 2):
  """Yields [fn(x) for x in batch] per batch, in order; fn runs in threads, `ahead` batches in
  advance of the consumer (image decoding overlapping the device's work)."""
  with ThreadPoolExecutor(max_workers=workers) as pool:
    queue: collections.deque = collections.deque()
    for batch in batches:
      queue.append([pool.submit(fn, x) for x in batch])
      if len(queue) > ahead:
        yield [f.result() for f in queue.popleft()]
    while queue:
      yield [f.result() for f in queue.popleft()]


def load_batches(paths: Sequence[str], size: int, batch_size: int
                 ) -> Iterator[tuple[list[str], list[str], Optional[np.ndarray], list[tuple[str, str]]]]:
  """Yields (paths, decoded paths, their pixels [n, size, size, 3] or None, [(path, error)]) per batch."""
  from blip_jax.preprocess import preprocess

  def one(path):
    try:
      return path, preprocess([path], size)[0], None
    except ImageDecodeError as e:
      return path, None, str(e)

  chunks = (paths[i:i + batch_size] for i in range(0, len(paths), batch_size))
  for results in map_ahead(one, chunks):
    ok = [(p, x) for p, x, _ in results if x is not None]
    errors = [(p, e) for p, _, e in results if e is not None]
    yield [p for p, _, _ in results], [p for p, _ in ok], (np.stack([x for _, x in ok]) if ok else None), errors


def caption_files(model, paths: Sequence[str], *, batch_size: int = 16, prompt: str = "a picture of ",
                  progress: bool = True, **generate_kw):
  """Yields ('ok', path, [captions]) per decodable image and ('error', path, message) for the
  rest, in order. Batches are padded to one shape and split over this host's devices."""
  from tqdm import tqdm
  dp = DataParallel()
  rows = dp.round_batch(batch_size)
  model.params = dp.put_params(model.params)
  size = model.config.vision.image_size
  n = generate_kw.get("num_captions", 1)
  with tqdm(total=len(paths), unit="img", desc="captioning", file=sys.stderr, disable=not progress) as bar:
    for order, ok, pixels, errors in load_batches(list(paths), size, rows):
      captions = {}
      if ok:
        texts = model.generate(dp.put_batch(pad_rows(pixels, rows)), prompt, **generate_kw)
        captions = {path: (t if n > 1 else [t]) for path, t in zip(ok, texts[:len(ok)])}
      errors = dict(errors)
      for path in order:  # the input order, failures in place
        yield ("ok", path, captions[path]) if path in captions else ("error", path, errors[path])
      bar.update(len(order))
