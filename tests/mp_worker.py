"""Worker for the multi-process test: python mp_worker.py PROC_ID NUM_PROCS PORT LOCAL_DEVICES OUT."""
import json
import os
import sys

pid, nproc, port, ndev, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", ndev)
if nproc > 1:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
                             initialization_timeout=120)
jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_CACHE_DIR", os.path.expanduser("~/.cache/blip_jax_jax")))
sys.path.insert(0, os.path.dirname(__file__))
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from pretrain_util import run_steps, tiny_config  # noqa: E402

mesh = jax.make_mesh((jax.device_count(), 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
metrics, params = run_steps(tiny_config(), mesh)
with open(out, "w") as f:
  json.dump({"losses": [m["loss"] for m in metrics], "devices": jax.device_count(), "processes": jax.process_count()}, f)
# every parameter, every value (keyed by its tree path)
np.savez(out[:-len(".json")] + ".npz", **{jax.tree_util.keystr(k): np.asarray(v)
                                          for k, v in jax.tree_util.tree_leaves_with_path(params)})
if nproc > 1:
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("done")
  jax.distributed.shutdown()
