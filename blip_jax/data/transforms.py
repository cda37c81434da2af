"""Image transforms in TF (graph mode, inside tf.data), deterministic per example.

Train (blip_facts §3.4, §5, §8.3): RandomResizedCrop (torchvision's sampling; scale from config,
bicubic) -> horizontal flip -> RandAugment(N=2, M=5) with the official op set -> uint8.
Eval: bicubic resize to a square. CLIP normalisation happens on the device (`normalize`), so the
host ships uint8.

Speed: JPEGs are decoded only inside the crop window, at a reduced DCT scale (1/2, 1/4) when the
crop is still at least the output size. EXIF orientation (which TF ignores) is read from the header;
the crop box is sampled in stored coordinates (the sampling distribution is symmetric under the
orientation's transpose/flips) and the orientation is applied to the small output square, which is
equivalent to orienting first.

Randomness comes from stateless ops keyed by a per-example seed, so a resumed run applies the
same augmentation to the same example.
"""
from __future__ import annotations

import math

import tensorflow as tf

from blip_jax.data.exif import orientation_np

FILL = 128  # official RandAugment fill colour


def _orientation(image_bytes):
  o = tf.numpy_function(orientation_np, [tf.strings.substr(image_bytes, 0, 1 << 16)], tf.int32, stateful=False)
  return tf.reshape(o, [])


def apply_orientation(img, o):
  """EXIF orientation o (1..8) applied to an HWC image."""
  branches = [
      lambda: img,                                      # 1
      lambda: img,                                      # 1
      lambda: tf.image.flip_left_right(img),            # 2 mirror
      lambda: tf.image.rot90(img, 2),                   # 3 rotate 180
      lambda: tf.image.flip_up_down(img),               # 4 mirror vertical
      lambda: tf.image.transpose(img),                  # 5 transpose
      lambda: tf.image.rot90(img, 3),                   # 6 rotate 90 CW
      lambda: tf.image.rot90(tf.image.transpose(img), 2),  # 7 transverse
      lambda: tf.image.rot90(img, 1),                   # 8 rotate 90 CCW
  ]
  return tf.switch_case(tf.clip_by_value(o, 0, 8), branches)


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


def _resize(img, size):
  # bicubic (Keys a=-0.5, as PIL) with antialiasing when shrinking, as PIL's resize
  out = tf.image.resize(tf.cast(img, tf.float32), [size, size], method="bicubic", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def decode_train(image_bytes, seed, size, scale=(0.2, 1.0), flip=True, randaug=True):
  h, w = tf.unstack(_shape(image_bytes))
  o = _orientation(image_bytes)
  y, x, ch, cw = sample_crop(seed, h, w, scale)
  img = _resize(_decode_crop(image_bytes, y, x, ch, cw, size), size)
  img = apply_orientation(img, o)
  img.set_shape([size, size, 3])
  if flip:
    img = tf.cond(tf.random.stateless_uniform([], seed + 3) < 0.5, lambda: tf.image.flip_left_right(img), lambda: img)
  if randaug:
    img = rand_augment(img, seed + 4)
  return img


def decode_eval(image_bytes, size):
  h, w = tf.unstack(_shape(image_bytes))
  img = _resize(_decode_crop(image_bytes, tf.constant(0), tf.constant(0), h, w, size), size)
  img = apply_orientation(img, _orientation(image_bytes))
  img.set_shape([size, size, 3])
  return img


# ---- RandAugment(N=2, M=5) as the official transform/randaugment.py behaves -----------------------
def _affine(img, m):
  """m: 2x3 forward affine (OpenCV warpAffine convention); bilinear, constant fill 128."""
  a = tf.concat([m, tf.constant([[0.0, 0.0, 1.0]])], axis=0)
  inv = tf.linalg.inv(a)  # ImageProjectiveTransform maps output -> input coordinates
  t = tf.reshape(tf.concat([inv[0], inv[1], inv[2, :2]], 0), [1, 8])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(img, tf.float32)[None], transforms=t, output_shape=tf.shape(img)[:2],
      fill_value=float(FILL), interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def _autocontrast(img):
  """PIL ImageOps.autocontrast per channel: lut = int(x * scale - lo * scale) in double precision."""
  x = tf.cast(img, tf.float64)
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  off = tf.where(hi > lo, -lo * scale, 0.0)
  return tf.cast(tf.clip_by_value(tf.floor(x * scale + off), 0, 255), tf.uint8)


def _equalize_channel(c):
  """PIL ImageOps.equalize on one channel."""
  hist = tf.math.bincount(tf.cast(tf.reshape(c, [-1]), tf.int32), minlength=256, maxlength=256)
  nonzero = tf.boolean_mask(hist, hist > 0)
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
  def eq():
    lut = (tf.cumsum(hist) - hist + step // 2) // step
    lut = tf.clip_by_value(lut, 0, 255)
    return tf.cast(tf.gather(lut, tf.cast(c, tf.int32)), tf.uint8)
  return tf.cond(step > 0, eq, lambda: c)


def _equalize(img):
  return tf.stack([_equalize_channel(img[..., i]) for i in range(3)], axis=-1)


def rand_augment(img, seed, n_ops: int = 2, magnitude: int = 5, max_level: int = 10):
  """Two ops drawn with replacement from the official list, each applied with p = 0.5.
  Brightness and Sharpness are no-ops at M=5 (factor 0.5 * 1.8 + 0.1 = 1.0) and so left out."""
  level = magnitude / max_level
  shear, translate, rotate = 0.3 * level, 10 * level, 30 * level  # +-0.15, +-5 px, +-15 deg
  h = tf.cast(tf.shape(img)[0], tf.float32)
  w = tf.cast(tf.shape(img)[1], tf.float32)
  for i in range(n_ops):
    s = seed + 10 * (i + 1)
    op = tf.random.stateless_uniform([], s, 0, 10, dtype=tf.int32)
    apply = tf.random.stateless_uniform([], s + 1) < 0.5
    sign = tf.where(tf.random.stateless_uniform([], s + 2) < 0.5, -1.0, 1.0)
    ang = sign * rotate * math.pi / 180
    cx, cy = (w - 1) / 2, (h - 1) / 2
    cos, sin = tf.cos(ang), tf.sin(ang)
    rot = tf.stack([tf.stack([cos, sin, (1 - cos) * cx - sin * cy]),
                    tf.stack([-sin, cos, sin * cx + (1 - cos) * cy])])
    branches = [
        lambda: img,  # Identity
        lambda: _autocontrast(img),
        lambda: img,  # Brightness at M=5
        lambda: img,  # Sharpness at M=5
        lambda: _equalize(img),
        lambda: _affine(img, tf.stack([[1.0, sign * shear, 0.0], [0.0, 1.0, 0.0]])),  # ShearX
        lambda: _affine(img, tf.stack([[1.0, 0.0, 0.0], [sign * shear, 1.0, 0.0]])),  # ShearY
        lambda: _affine(img, tf.stack([[1.0, 0.0, sign * translate], [0.0, 1.0, 0.0]])),  # TranslateX
        lambda: _affine(img, tf.stack([[1.0, 0.0, 0.0], [0.0, 1.0, sign * translate]])),  # TranslateY
        lambda: _affine(img, rot),  # Rotate about the centre
    ]
    img = tf.cond(apply, lambda: tf.switch_case(op, branches), lambda: img)
  return img


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


def is_valid_utf8(s):
  fixed = tf.strings.unicode_transcode(s, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)
  return tf.equal(fixed, s)
