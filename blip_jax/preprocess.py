"""Image preprocessing of the official eval transform (official data/__init__.py: transform_test).

PIL decode (EXIF orientation applied, any mode -> RGB) -> bicubic resize to a square, no crop
(PIL's BICUBIC, what torchvision's Resize does on PIL images and what transformers'
BlipImageProcessor does) -> /255 -> CLIP mean/std. Output float32 NHWC.
"""
from __future__ import annotations

import io
import os
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from blip_jax import fs

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)

ImageLike = Union[str, os.PathLike, bytes, np.ndarray, Image.Image]


class ImageDecodeError(ValueError):
  """An image file that is missing, truncated or not an image."""


def to_pil(image: ImageLike) -> Image.Image:
  if isinstance(image, Image.Image):
    img = image
  elif isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(f"array images must be uint8 HWC, got {image.dtype}")
    img = Image.fromarray(image if image.ndim == 3 else image[..., None].repeat(3, -1))
  else:
    name = "<bytes>" if isinstance(image, bytes) else os.fspath(image)
    try:
      if isinstance(image, bytes):
        image = io.BytesIO(image)
      elif "://" in str(image):  # gs://... through the one path layer
        image = io.BytesIO(fs.path(image).read_bytes())
      img = Image.open(image)
      img.load()  # decode now: truncated or corrupt files fail here, not later
      img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for undecodable data
      raise ImageDecodeError(f"{name}: cannot decode image ({e})") from None
  if img.mode != "RGB":
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
      img = img.convert("RGBA").convert("RGB")  # alpha dropped
    else:
      img = img.convert("RGB")  # L, CMYK, P, I;16 ...
  return img


def normalize(pixels_uint8: np.ndarray) -> np.ndarray:
  return ((pixels_uint8.astype(np.float32) / 255.0) - CLIP_MEAN) / CLIP_STD


def preprocess(images: ImageLike | Sequence[ImageLike], size: int) -> np.ndarray:
  """Paths, bytes, PIL images or uint8 HWC arrays -> float32 [B, size, size, 3]."""
  if isinstance(images, (str, os.PathLike, bytes, Image.Image)) or (
      isinstance(images, np.ndarray) and images.ndim == 3):
    images = [images]
  out = np.stack([np.asarray(to_pil(im).resize((size, size), Image.BICUBIC)) for im in images])
  return normalize(out)
