"""Image transforms in TF (graph mode, inside tf.data), deterministic per example.

Train (official data/__init__.py: transform_train; data/randaugment.py): RandomResizedCrop
(torchvision's sampling; scale from config, bicubic) -> horizontal flip -> RandAugment(N=2, M=5)
with the official op set -> uint8.
Eval: bicubic resize to a square. CLIP normalisation happens on the device (`normalize`), so the
host ships uint8.

Speed: JPEGs are decoded by TF only inside the crop window (libjpeg-turbo partial decode), at a
reduced DCT scale (1/2, 1/4) when the crop is still at least twice the output size. Resizing and the
augmentation ops run in Pillow's C code (a numpy_function; Pillow releases the GIL), which on CPU is
several times faster than TF's antialiased resize and ImageProjectiveTransform; the geometric
RandAugment ops of one example are composed into a single warp. EXIF orientation (which TF ignores)
is read from the header; the crop box is sampled in stored coordinates (the sampling distribution is
symmetric under the orientation's transpose/flips) and the orientation is applied to the small output
square, which is equivalent to orienting first.

Randomness comes from stateless ops keyed by a per-example seed, so a resumed run applies the
same augmentation to the same example.
"""
from __future__ import annotations

import functools
import io
import math

import numpy as np
from PIL import Image, ImageOps

from blip_jax.data.exif import jpeg_orientation
from blip_jax.data.tf_setup import tf

FILL = 128  # official RandAugment fill colour


def _shape(image_bytes):
  """(height, width) in stored orientation, without decoding a JPEG."""
  return tf.cond(tf.io.is_jpeg(image_bytes),
                 lambda: tf.io.extract_jpeg_shape(image_bytes)[:2],
                 lambda: tf.shape(tf.io.decode_image(image_bytes, channels=3, expand_animations=False))[:2])


def sample_crop(seed, h, w, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
  """torchvision RandomResizedCrop.get_params: up to 10 tries, then a centre crop. -> y, x, ch, cw."""
  hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
  area = hf * wf
  s = tf.random.stateless_uniform([attempts], seed, scale[0], scale[1])
  logr = tf.random.stateless_uniform([attempts], seed + 1, math.log(ratio[0]), math.log(ratio[1]))
  r = tf.exp(logr)
  cw = tf.round(tf.sqrt(area * s * r))
  ch = tf.round(tf.sqrt(area * s / r))
  ok = (cw > 0) & (ch > 0) & (cw <= wf) & (ch <= hf)
  first = tf.argmax(tf.cast(ok, tf.int32))
  u = tf.random.stateless_uniform([2], seed + 2)
  def chosen():
    c_h, c_w = ch[first], cw[first]
    return (tf.floor(u[0] * (hf - c_h + 1)), tf.floor(u[1] * (wf - c_w + 1)), c_h, c_w)
  def fallback():
    in_ratio = wf / hf
    c_w = tf.where(in_ratio < ratio[0], wf, tf.where(in_ratio > ratio[1], tf.round(hf * ratio[1]), wf))
    c_h = tf.where(in_ratio < ratio[0], tf.round(wf / ratio[0]), hf)
    return (tf.floor((hf - c_h) / 2), tf.floor((wf - c_w) / 2), c_h, c_w)
  y, x, c_h, c_w = tf.cond(tf.reduce_any(ok), chosen, fallback)
  return tuple(tf.cast(v, tf.int32) for v in (y, x, c_h, c_w))


def _decode_crop(image_bytes, y, x, ch, cw, size):
  """Decodes only the crop (JPEG: fused, at the coarsest DCT scale that keeps >= size pixels)."""
  def jpeg():
    def at(r):
      def f():
        yy, xx = y // r, x // r
        hh = tf.maximum((y + ch) // r - yy, 1)
        ww = tf.maximum((x + cw) // r - xx, 1)
        return tf.io.decode_and_crop_jpeg(image_bytes, tf.stack([yy, xx, hh, ww]), channels=3, ratio=r)
      return f
    m = tf.minimum(ch, cw)
    idx = tf.cast(m >= 4 * size, tf.int32) + tf.cast(m >= 2 * size, tf.int32)
    return tf.switch_case(idx, [at(1), at(2), at(4)])
  def other():
    img = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    return img[y:y + ch, x:x + cw]
  return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)


def decode_train(image_bytes, seed, size, scale=(0.2, 1.0), flip=True, randaug=True):
  # JPEG: straight-line graph (tf.data map functions pay dearly for each cond/switch); others: Pillow
  return tf.cond(tf.io.is_jpeg(image_bytes),
                 lambda: _jpeg_train(image_bytes, seed, size, scale, flip, randaug),
                 lambda: decode_train_pil(image_bytes, seed, size, scale, flip, randaug))


def _jpeg_train(image_bytes, seed, size, scale, flip, randaug):
  h, w = tf.unstack(tf.io.extract_jpeg_shape(image_bytes)[:2])
  y, x, ch, cw = sample_crop(seed, h, w, scale)
  crop = tf.io.decode_and_crop_jpeg(image_bytes, tf.stack([y, x, ch, cw]), channels=3)
  u = tf.random.stateless_uniform([7], seed + 3)  # flip, then 2 x (op, apply, sign)
  return _finish(crop, image_bytes, u, size, flip, randaug)


def _finish(crop, image_bytes, u, size, flip, randaug):
  """One Python call per example: EXIF orientation from the header, Pillow resize and the rest."""
  header = tf.strings.substr(image_bytes, 0, 1 << 16)
  img = tf.numpy_function(functools.partial(_pil_finish, size=size, flip=flip, randaug=randaug),
                          [crop, header, u], tf.uint8, stateful=False)
  img.set_shape([size, size, 3])
  return img


def decode_eval(image_bytes, size):
  h, w = tf.unstack(_shape(image_bytes))
  crop = _decode_crop(image_bytes, tf.constant(0), tf.constant(0), h, w, size)
  return _finish(crop, image_bytes, tf.zeros([7]), size, False, False)


def decode_train_pil(image_bytes, seed, size, scale=(0.2, 1.0), flip=True, randaug=True):
  """The whole train transform in one Pillow call (no TF control flow in the map function)."""
  u = tf.random.stateless_uniform([30], seed)
  img = tf.numpy_function(functools.partial(_pil_train, size=size, scale=scale, flip=flip, randaug=randaug),
                          [image_bytes, u], tf.uint8, stateful=False)
  img.set_shape([size, size, 3])
  return img


def pil_crop_box(u, w, h, scale, ratio=(3 / 4, 4 / 3)):
  """torchvision RandomResizedCrop.get_params from 22 uniforms: (x, y, cw, ch)."""
  area = w * h
  for k in range(10):
    a = area * (scale[0] + (scale[1] - scale[0]) * u[2 * k])
    r = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[2 * k + 1])
    cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
    if 0 < cw <= w and 0 < ch <= h:
      return int(u[20] * (w - cw + 1)), int(u[21] * (h - ch + 1)), cw, ch
  in_ratio = w / h
  if in_ratio < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif in_ratio > ratio[1]:
    ch, cw = h, int(round(h * ratio[1]))
  else:
    cw, ch = w, h
  return (w - cw) // 2, (h - ch) // 2, cw, ch


def _pil_train(data, u, size, scale, flip, randaug):
  img = Image.open(io.BytesIO(data))
  o = jpeg_orientation(data[:1 << 16]) if img.format == "JPEG" else 1
  w, h = img.size
  x, y, cw, ch = pil_crop_box(u, w, h, scale)
  k = 1
  if img.format == "JPEG":  # DCT-domain downscale while the crop stays >= 2x the output
    while k < 8 and min(cw, ch) >= 2 * k * size:
      k *= 2
    if k > 1:
      img.draft("RGB", ((w + k - 1) // k, (h + k - 1) // k))
  sx, sy = img.size[0] / w, img.size[1] / h
  img = img.convert("RGB").resize((size, size), Image.BICUBIC, box=(x * sx, y * sy, (x + cw) * sx, (y + ch) * sy))
  return _orient_flip_augment(img, o, u[22:29], flip, randaug)


_TRANSPOSE = {2: [Image.FLIP_LEFT_RIGHT], 3: [Image.ROTATE_180], 4: [Image.FLIP_TOP_BOTTOM],
              5: [Image.TRANSPOSE], 6: [Image.ROTATE_270], 7: [Image.TRANSVERSE], 8: [Image.ROTATE_90]}


def _pil_finish(crop, header, u, size, flip, randaug):
  """uint8 crop -> bicubic resize (PIL, antialiased) -> EXIF orientation -> flip -> RandAugment."""
  if isinstance(header, np.ndarray):  # eager mode passes a 0-d object array, graph mode bytes
    header = header.item()
  img = Image.fromarray(crop).resize((size, size), Image.BICUBIC)
  return _orient_flip_augment(img, jpeg_orientation(bytes(header)), u, flip, randaug)


def _orient_flip_augment(img, orientation, u, flip, randaug):
  """u: 7 uniforms: the flip, then (op, apply, sign) for each of the two RandAugment draws."""
  for t in _TRANSPOSE.get(orientation, []):
    img = img.transpose(t)
  if flip and u[0] < 0.5:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  if randaug:
    img = pil_rand_augment(img, u[1:7])
  return np.asarray(img, np.uint8)


def _affine_matrix(op, sign, level, w, h):
  shear, translate, rotate = 0.3 * level * sign, 10 * level * sign, 30 * level * sign
  if op == 5:
    return np.array([[1, shear, 0], [0, 1, 0], [0, 0, 1]], np.float64)  # ShearX
  if op == 6:
    return np.array([[1, 0, 0], [shear, 1, 0], [0, 0, 1]], np.float64)  # ShearY
  if op == 7:
    return np.array([[1, 0, translate], [0, 1, 0], [0, 0, 1]], np.float64)  # TranslateX (pixels)
  if op == 8:
    return np.array([[1, 0, 0], [0, 1, translate], [0, 0, 1]], np.float64)  # TranslateY
  a = math.radians(rotate)  # Rotate about the centre (OpenCV getRotationMatrix2D)
  c, s = math.cos(a), math.sin(a)
  cx, cy = (w - 1) / 2, (h - 1) / 2
  return np.array([[c, s, (1 - c) * cx - s * cy], [-s, c, s * cx + (1 - c) * cy], [0, 0, 1]], np.float64)


def pil_rand_augment(img, u, n_ops: int = 2, magnitude: int = 5, max_level: int = 10):
  """RandomAugment(2, 5) as the official transform/randaugment.py behaves: ops drawn with
  replacement from (Identity, AutoContrast, Brightness, Sharpness, Equalize, ShearX, ShearY,
  TranslateX, TranslateY, Rotate), each applied with p = 0.5; Brightness and Sharpness are no-ops at
  M=5 (factor 0.5 * 1.8 + 0.1 = 1.0). Consecutive geometric ops are composed into one bilinear warp
  (fill 128), so an example pays for at most one. u: 6 uniforms (op, apply, sign) per draw."""
  level = magnitude / max_level
  pending = np.eye(3)
  for k in range(n_ops):
    op = min(int(u[3 * k] * 10), 9)
    if u[3 * k + 1] >= 0.5 or op in (0, 2, 3):
      continue
    if op in (1, 4):  # intensity ops see the image warped so far
      img = _warp(img, pending)
      pending = np.eye(3)
      img = ImageOps.autocontrast(img) if op == 1 else ImageOps.equalize(img)
    else:
      pending = _affine_matrix(op, -1.0 if u[3 * k + 2] < 0.5 else 1.0, level, *img.size) @ pending
  return _warp(img, pending)


def _warp(img, m):
  if np.allclose(m, np.eye(3)):
    return img
  inv = np.linalg.inv(m)  # PIL's AFFINE data maps output -> input
  return img.transform(img.size, Image.AFFINE, tuple(inv[:2].reshape(-1)), Image.BILINEAR,
                       fillcolor=(FILL, FILL, FILL))


# ---- text in TF (so empty captions can be dropped before batching) ---------------------------------
def tf_pre_caption(s, max_words: int = 50):
  """blip_jax.tokenizers.pre_caption in TF ops (identical on UTF-8 text)."""
  s = tf.strings.lower(s, encoding="utf-8")
  s = tf.strings.regex_replace(s, r'[.!"()*#:;~]', " ")
  s = tf.strings.regex_replace(s, r"\s{2,}", " ")
  s = tf.strings.regex_replace(s, r"\n+$", "")
  s = tf.strings.regex_replace(s, r"^ +| +$", "")
  words = tf.strings.split(s, " ")
  return tf.strings.reduce_join(words[:max_words], separator=" ")


def tf_pre_question(s, max_words: int = 50):
  s = tf.strings.lower(s, encoding="utf-8")
  s = tf.strings.regex_replace(s, r'[.!"()*#:;~]', "")
  s = tf.strings.regex_replace(s, r" +$", "")
  words = tf.strings.split(s, " ")
  return tf.strings.reduce_join(words[:max_words], separator=" ")


def tf_swap_left_right(s):
  """NLVR2's augmentation text (official nlvr_dataset): the words 'left' and 'right' exchanged,
  whole space-separated words only (pre_caption has left single spaces), so 'leftover' stays."""
  words = tf.strings.split(s, " ")
  words = tf.where(words == "left", "right", tf.where(words == "right", "left", words))
  return tf.strings.reduce_join(words, separator=" ")


def is_valid_utf8(s):
  fixed = tf.strings.unicode_transcode(s, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)
  return tf.equal(fixed, s)
