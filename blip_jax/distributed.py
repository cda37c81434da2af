"""Multi-host start-up (jax.distributed.initialize() where the environment calls for it) and the
host-level collectives that training, checkpoints, evaluation and CapFilt share. The lowest room of
the package: it imports nothing of blip_jax."""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def maybe_initialize_distributed():
  """TPU pods (TPU VM metadata), SLURM (SLURM_* vars, one task per host) or explicit
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID: call jax.distributed.initialize()
  before any other JAX call. A single process does nothing."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()  # cluster auto-detection (SLURM, TPU pod)


def sync_hosts(name: str) -> None:
  """A barrier of all processes (nothing with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def allgather_strided(local: np.ndarray, n: int, count: int) -> np.ndarray:
  """Rows r of process p are global rows p + r * count (work split over hosts p, p+P, ...): gathers
  them all into [n, ...] on every process."""
  if count == 1:
    return local
  per = -(-n // count)
  pad = np.zeros((per,) + local.shape[1:], local.dtype)
  pad[:len(local)] = local
  every = np.asarray(multihost_utils.process_allgather(pad))  # [P, per, ...]
  out = np.empty((n,) + local.shape[1:], local.dtype)
  for p in range(count):
    rows = np.arange(p, n, count)
    out[rows] = every[p, :len(rows)]
  return out


def texts_to_bytes(texts, width: int = 1024) -> np.ndarray:
  """Strings (or None) -> uint8 [n, width + 1] for a gather across hosts: UTF-8 bytes (cut to
  width), the last byte 1 where there is a string."""
  buf = np.zeros((len(texts), width + 1), np.uint8)
  for r, t in enumerate(texts):
    if t is not None:
      b = t.encode("utf-8")[:width]
      buf[r, :len(b)], buf[r, -1] = np.frombuffer(b, np.uint8), 1
  return buf


def bytes_to_texts(buf: np.ndarray) -> list:
  """texts_to_bytes, inverted (None where there was none)."""
  return [bytes(row[:-1]).rstrip(b"\0").decode("utf-8", "ignore") if row[-1] else None for row in buf]


def allgather_values(values: dict) -> list:
  """Every process's dict of integers (the same keys everywhere), in process order; one process: [values]."""
  if jax.process_count() == 1:
    return [values]
  keys = sorted(values)
  rows = multihost_utils.process_allgather(np.array([int(values[k]) for k in keys], np.int32))
  return [dict(zip(keys, (int(v) for v in row))) for row in np.asarray(rows).reshape(jax.process_count(), -1)]


def allgather_rows(local: np.ndarray, rows: int) -> np.ndarray:
  """Each process's local rows (at most `rows` of them, the same trailing shape everywhere) padded
  to `rows` and gathered: [P, rows, ...] on every process."""
  pad = np.zeros((rows,) + local.shape[1:], local.dtype)
  pad[:len(local)] = local
  return np.asarray(multihost_utils.process_allgather(pad))


def allgather_sum(value: float) -> float:
  """The sum over processes of one number."""
  if jax.process_count() == 1:
    return float(value)
  return float(np.asarray(multihost_utils.process_allgather(np.float64(value))).sum())
