"""Data-parallel inference: params replicated over this host's devices, batches split over them, and
one runner for every sharded evaluation (caption, VQA, NLVR2, retrieval): batches split over hosts,
their files decoded in threads ahead of the devices (undecodable ones skipped and counted),
predicted, shown on a progress bar and gathered, so every host returns every batch's result.
CapFilt shares the placement and the decoding threads (its work is split by shard, not gathered)."""
from __future__ import annotations

import collections
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from blip_jax.distributed import allgather_strided
from blip_jax.preprocess import ImageDecodeError


class DataParallel:
  """Replicates a model's params over this host's devices and splits batches over them."""

  def __init__(self, devices=None):
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


def decoding(decode: Callable) -> Callable:
  """decode(path) -> array, as path -> (path, array or None, error or None): an ImageDecodeError
  (a missing, truncated or foreign file) is the file's error, never the run's."""
  def one(path):
    try:
      return path, decode(path), None
    except ImageDecodeError as e:
      return path, None, str(e)
  return one


def run_sharded(batches: Sequence, predict: Callable, row_shape: tuple, dtype, *,
                files: Optional[Callable] = None, decode: Optional[Callable] = None, desc: str = "",
                unit: str = "it", size: Callable = len, progress: bool = True, workers: int = 8):
  """The sharded-inference loop: host p runs batches p, p+P, ...; for each, files(batch) are decoded
  (decode(path) -> array, in threads a batch ahead) and predict(batch, decoded) returns the batch's
  result as one array of row_shape (None: nothing in it could be predicted, the row stays zero),
  where decoded is [(path, array or None, error or None)] in files(batch)'s order. Returns
  (results [len(batches), *row_shape] on every host, {path: error} of this host's undecodable files);
  each undecodable file is warned about on stderr."""
  count, me = jax.process_count(), jax.process_index()
  mine = list(range(me, len(batches), count))
  local = np.zeros((len(mine),) + tuple(row_shape), dtype)
  errors: dict = {}
  if files is None:
    loads = ([] for _ in mine)
  else:
    loads = map_ahead(decoding(decode), (files(batches[b]) for b in mine), workers=workers)
  with tqdm(total=sum(size(batches[b]) for b in mine), unit=unit, desc=desc, file=sys.stderr,
            disable=not progress, leave=False) as bar:
    for r, decoded in enumerate(loads):
      errors.update({p: e for p, _, e in decoded if e is not None})
      out = predict(batches[mine[r]], decoded)
      if out is not None:
        local[r] = out
      bar.update(size(batches[mine[r]]))
  for _, e in sorted(errors.items()):
    print(f"warning: skipped {e}", file=sys.stderr)
  return allgather_strided(local, len(batches), count), errors


def chunks(n: int, size: int) -> list:
  """[[0..size-1], [size..2size-1], ...] over range(n): the batches of run_sharded."""
  return [list(range(s, min(s + size, n))) for s in range(0, n, size)]
