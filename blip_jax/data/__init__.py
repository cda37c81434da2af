"""Input pipelines (tf.data). Importing this package limits TF's threads so the input pipeline
does not starve the JAX step on small machines (stack_notes §1b); it must happen before any TF op."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from blip_jax.quiet import quiet_import  # noqa: E402

tf = quiet_import("tensorflow")  # its banners muted unless BLIP_JAX_VERBOSE=1

tf.config.set_visible_devices([], "GPU")  # TF must never take accelerator memory from JAX
try:
  tf.config.threading.set_intra_op_parallelism_threads(int(os.environ.get("BLIP_TF_INTRA_THREADS", "1")))
  tf.config.threading.set_inter_op_parallelism_threads(int(os.environ.get("BLIP_TF_INTER_THREADS", "1")))
except RuntimeError:  # TF already ran an op in this process (a user's own code): keep its setting
  pass

from blip_jax.data.pipeline import DataError, InputPipeline, make_pipeline  # noqa: E402,F401
from blip_jax.data.sources import (JsonSource, SyntheticSource, TFDSSource, TFRecordSource,  # noqa: E402,F401
                                   make_source)
