"""The reading layer: annotation files and evaluation sets (plain Python: annotations.py,
eval_sets.py, video.py) and the tf.data input pipelines of training (sources.py, transforms.py,
pipeline.py, shards.py). TensorFlow (tf_setup.py) is imported when a pipeline name below is first
used, so the plain readers (evaluation, the CLI) do not pay for it."""
import importlib

_PIPELINE = {"DataError": "pipeline", "InputPipeline": "pipeline", "make_pipeline": "pipeline",
             "batch_shapes": "pipeline",
             "JsonSource": "sources", "SyntheticSource": "sources", "TFDSSource": "sources",
             "TFRecordSource": "sources", "WebDatasetSource": "sources", "make_source": "sources", "tf": "tf_setup"}


def __getattr__(name):
  if name in _PIPELINE:
    return getattr(importlib.import_module(f"blip_jax.data.{_PIPELINE[name]}"), name)
  raise AttributeError(f"module 'blip_jax.data' has no attribute {name!r}")
