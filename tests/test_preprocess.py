"""Image preprocessing equals transformers' BlipImageProcessor (= official eval transform) and
handles odd JPEGs: EXIF orientation, grayscale, CMYK; a truncated file gives a clear error."""
import json
import os

import numpy as np
import pytest
from conftest import ODD
from transformers import BlipImageProcessor

from blip_jax.preprocess import CLIP_MEAN, CLIP_STD, ImageDecodeError, preprocess


def test_matches_hf_image_processor(coco):
  paths = [p for p, _ in coco[:3]]
  proc = BlipImageProcessor(size={"height": 224, "width": 224})
  from PIL import Image
  ref = proc([Image.open(p).convert("RGB") for p in paths], return_tensors="np")["pixel_values"]
  got = preprocess(paths, 224)
  assert got.shape == (3, 224, 224, 3) and got.dtype == np.float32
  assert np.abs(got - ref.transpose(0, 2, 3, 1)).max() <= 1e-5


def test_uint8_arrays_and_paths_agree(coco):
  from PIL import Image
  arr = np.asarray(Image.open(coco[0][0]).convert("RGB"))
  np.testing.assert_array_equal(preprocess(arr, 64), preprocess(coco[0][0], 64))


def _unnorm(x):
  return (x * CLIP_STD + CLIP_MEAN) * 255


@pytest.mark.parametrize("k", range(2, 9))
def test_exif_orientation(k):
  ref = _unnorm(preprocess(os.path.join(ODD, "hopper.jpg"), 128))
  got = _unnorm(preprocess(os.path.join(ODD, f"hopper_orientation_{k}.jpg"), 128))
  assert np.abs(got - ref).mean() < 8  # JPEG noise only
  assert np.abs(got[:, ::-1] - ref).mean() > 20  # a wrong orientation is far off


def test_grayscale_cmyk_and_shapes():
  gray = preprocess(os.path.join(ODD, "hopper_gray.jpg"), 32)
  assert gray.shape == (1, 32, 32, 3)
  np.testing.assert_allclose(_unnorm(gray)[..., 0], _unnorm(gray)[..., 1], atol=1e-3)
  cmyk = _unnorm(preprocess(os.path.join(ODD, "pil_sample_cmyk.jpg"), 100))
  rgb = _unnorm(preprocess(os.path.join(ODD, "pil_sample_rgb.jpg"), 100))
  assert np.abs(cmyk - rgb).mean() < 10
  with open(os.path.join(ODD, "manifest.json")) as f:
    good = [e["file"] for e in json.load(f) if e["decodes_with_pillow"]]
  assert preprocess([os.path.join(ODD, f) for f in good], 16).shape == (len(good), 16, 16, 3)


def test_truncated_and_missing_files_raise_clear_errors(tmp_path):
  with pytest.raises(ImageDecodeError, match="truncated_jpeg.jpg: cannot decode image"):
    preprocess(os.path.join(ODD, "truncated_jpeg.jpg"), 32)
  with pytest.raises(ImageDecodeError, match="nope.jpg"):
    preprocess(str(tmp_path / "nope.jpg"), 32)
