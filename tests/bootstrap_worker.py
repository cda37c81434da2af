"""One process of the 2-process bootstrap test: python bootstrap_worker.py WORKDIR [KILL_AT_STEP].
jax.distributed from the environment (conftest.process_env), the `:tiny` config (test_bootstrap's),
and, with KILL_AT_STEP, this process killed (SIGKILL, no clean-up) right after stage 1 has saved
that step's checkpoint: a host lost inside a stage."""
import os
import signal
import sys

from blip_jax import distributed

distributed.maybe_initialize_distributed()
import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", ""))
sys.path.insert(0, os.path.dirname(__file__))
from test_bootstrap import tiny_config  # noqa: E402

from blip_jax import bootstrap  # noqa: E402
from blip_jax.train import checkpointing  # noqa: E402

workdir = sys.argv[1]
kill_at = int(sys.argv[2]) if len(sys.argv) > 2 else 0
if kill_at:
  save = checkpointing.save

  def save_then_die(mngr, step, *a, **kw):
    save(mngr, step, *a, **kw)
    if step == kill_at:
      mngr.wait_until_finished()
      print(f"process {jax.process_index()}: killed after the step-{step} checkpoint", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)

  checkpointing.save = save_then_die
bootstrap.run(tiny_config(), workdir, log=lambda m: print(m, flush=True))
print(f"process {jax.process_index()} of {jax.process_count()}: finished", flush=True)
