"""Multi-host start-up (jax.distributed.initialize() where the environment calls for it) and the
host-level collectives the loops and evaluations share."""
from __future__ import annotations

import os

import numpy as np


def maybe_initialize_distributed():
  """TPU pods (TPU VM metadata), SLURM (SLURM_* vars, one task per host) or explicit
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID: call jax.distributed.initialize()
  before any other JAX call. A single process does nothing."""
  import jax
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()  # cluster auto-detection (SLURM, TPU pod)


def sync_hosts(name: str) -> None:
  """A barrier of all processes (nothing with one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def allgather_strided(local: np.ndarray, n: int, count: int, index: int) -> np.ndarray:
  """Rows r of process p are global rows p + r * count (work split over hosts p, p+P, ...): gathers
  them all into [n, ...] on every process."""
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
