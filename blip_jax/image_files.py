"""Image files named on a command line (files, folders, globs) and their batched captioning
(`blip-jax caption`): results stream out in the input order, failures in place."""
from __future__ import annotations

import glob
import os
import sys
from typing import Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from blip_jax.parallel import DataParallel, decoding, map_ahead, pad_rows
from blip_jax.preprocess import preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def expand_images(specs: Sequence[str]) -> list[str]:
  """Files, folders (searched recursively for image extensions) and globs -> sorted unique paths,
  in the order given. A spec that names nothing is an error."""
  out: list[str] = []
  for spec in specs:
    if any(c in spec for c in "*?["):
      found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(spec):
      found = sorted(os.path.join(d, f) for d, _, files in os.walk(spec) for f in files
                     if f.lower().endswith(IMAGE_EXTENSIONS))
    elif os.path.isfile(spec):
      found = [spec]
    else:
      raise FileNotFoundError(f"{spec}: no such file or folder")
    if not found:
      raise FileNotFoundError(f"{spec}: matches no image files")
    out += found
  return list(dict.fromkeys(out))


def load_batches(paths: Sequence[str], size: int, batch_size: int
                 ) -> Iterator[tuple[list[str], list[str], Optional[np.ndarray], list[tuple[str, str]]]]:
  """Yields (paths, decoded paths, their pixels [n, size, size, 3] or None, [(path, error)]) per batch."""
  one = decoding(lambda path: preprocess([path], size)[0])
  chunks = (paths[i:i + batch_size] for i in range(0, len(paths), batch_size))
  for results in map_ahead(one, chunks):
    ok = [(p, x) for p, x, _ in results if x is not None]
    errors = [(p, e) for p, _, e in results if e is not None]
    yield [p for p, _, _ in results], [p for p, _ in ok], (np.stack([x for _, x in ok]) if ok else None), errors


def caption_files(model, paths: Sequence[str], *, batch_size: int = 16, prompt: str = "a picture of ",
                  progress: bool = True, **generate_kw):
  """Yields ('ok', path, [captions]) per decodable image and ('error', path, message) for the
  rest, in order. Batches are padded to one shape and split over this host's devices."""
  dp = DataParallel()
  rows = dp.round_batch(batch_size)
  model.params = dp.put_params(model.params)
  size = model.config.vision.image_size
  n = generate_kw.get("num_captions", 1)
  with tqdm(total=len(paths), unit="img", desc="captioning", file=sys.stderr, disable=not progress) as bar:
    for order, ok, pixels, errors in load_batches(list(paths), size, rows):
      captions = {}
      if ok:
        texts = model.generate(dp.put_batch(pad_rows(pixels, rows)), prompt, **generate_kw)
        captions = {path: (t if n > 1 else [t]) for path, t in zip(ok, texts[:len(ok)])}
      errors = dict(errors)
      for path in order:  # the input order, failures in place
        yield ("ok", path, captions[path]) if path in captions else ("error", path, errors[path])
      bar.update(len(order))
