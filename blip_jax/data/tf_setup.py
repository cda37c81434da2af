"""TensorFlow for the input pipelines, imported once: its start-up banners muted (blip_jax.quiet) and
its threads limited so the input pipeline does not starve the JAX step on small machines; this must
happen before any TF op, so every module of this package that uses TF takes `tf` from here."""
import os

from blip_jax.quiet import quiet_import

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = quiet_import("tensorflow")  # its banners muted unless BLIP_JAX_VERBOSE=1

tf.config.set_visible_devices([], "GPU")  # TF must never take accelerator memory from JAX
try:
  tf.config.threading.set_intra_op_parallelism_threads(int(os.environ.get("BLIP_TF_INTRA_THREADS", "1")))
  tf.config.threading.set_inter_op_parallelism_threads(int(os.environ.get("BLIP_TF_INTER_THREADS", "1")))
except RuntimeError:  # TF already ran an op in this process (a user's own code): keep its setting
  pass

# TensorBoard writers for the trainer: clu imports TensorFlow, so only once it is set up here
from clu import metric_writers  # noqa: E402,F401
