"""Put on PYTHONPATH by the suite's multi-process runs (conftest.process_env): every process, not
only process 0, writes its compiled programs to the persistent compilation cache.

JAX lets only process 0 write, to spare a shared cache (GCS) from contending writers. The other
processes' programs have keys of their own (the process index is part of the compile options), so
without this each 2-process run compiled process 1's training step afresh, every time: about 11 s a
run on 2 cores. Here the cache is a local directory and the keys differ, so no two writers meet.
Nothing a test checks depends on it: a missing hook (another JAX) only makes the runs slower."""
import types

try:
  from jax._src import compiler, distributed
except ImportError:  # not a JAX this hook knows: compile as JAX does
  compiler = None


class _WritesAsProcessZero:
  """jax._src.distributed.global_state as compiler.py sees it: process 0 for the cache-write check,
  everything else (the client, the real process id's other uses are GPU-only) passed through."""
  process_id = 0

  def __getattr__(self, name):
    return getattr(distributed.global_state, name)


if compiler is not None and hasattr(compiler, "distributed"):
  compiler.distributed = types.SimpleNamespace(global_state=_WritesAsProcessZero())
