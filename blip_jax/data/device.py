"""Host batches -> global jax.Arrays, prefetched to the devices."""
from __future__ import annotations

import collections
from typing import Iterator

import jax
import numpy as np


def global_batch(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Each process passes its own rows; the result spans all processes' devices."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def prefetch_to_device(batches: Iterator, sharding, size: int = 2) -> Iterator:
  """Keeps `size` batches in flight on the devices (device_put is asynchronous).

  `batches` yields dicts, or (tag, dict) pairs whose tag travels with its batch (the trainer tags
  each batch with the input position after it, so a checkpoint records the last batch trained on,
  not the last one prefetched)."""
  queue = collections.deque()
  for b in batches:
    queue.append((b[0], global_batch(b[1], sharding)) if isinstance(b, tuple) else global_batch(b, sharding))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
