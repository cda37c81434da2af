"""TFDS builders for the Karpathy splits of COCO and Flickr30k, read from a local manual dir that
holds BLIP's annotation JSONs and the images (nothing is downloaded):

  manual_dir/coco_karpathy_{train,val,test}.json   (or flickr30k_{train,val,test}.json)
  manual_dir/<the 'image' paths inside them>

Train files have one entry per caption; val/test one per image with a caption list; both become one
example per image with all its captions. Splits whose JSON is absent are left out.
"""
from __future__ import annotations

import os

import tensorflow_datasets as tfds

from blip_jax.data.annotations import caption_groups, read_entries
from blip_jax.data.tf_setup import tf


class _KarpathyBuilder(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "BLIP Karpathy-split annotations, one example per image."}
  PREFIX = ""

  @property
  def MANUAL_DOWNLOAD_INSTRUCTIONS(self):
    return (f"Put {self.PREFIX}_{{train,val,test}}.json (BLIP's annotation files) and the images "
            "they name, at those relative paths, in the manual dir.")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "image_id": tf.int64,
        "filename": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    d = dl_manager.manual_dir
    return {s: self._generate_examples(d, d / f"{self.PREFIX}_{s}.json")
            for s in ("train", "val", "test") if (d / f"{self.PREFIX}_{s}.json").exists()}

  def _generate_examples(self, root, ann_path):
    for i, g in enumerate(caption_groups(read_entries(str(ann_path)), "image", str(ann_path))):
      image, caps = g["image"], g["texts"]
      path = os.path.join(root, image)
      if not os.path.exists(path):
        continue  # missing images are left out of the built dataset (and logged by TFDS counts)
      yield image, {"image": path, "captions": caps, "image_id": i, "filename": os.path.basename(image)}


class BlipCocoKarpathy(_KarpathyBuilder):
  """COCO captions, Karpathy splits (registered as 'blip_coco_karpathy')."""
  PREFIX = "coco_karpathy"


class BlipFlickr30k(_KarpathyBuilder):
  """Flickr30k, Karpathy splits (registered as 'blip_flickr30k')."""
  PREFIX = "flickr30k"
