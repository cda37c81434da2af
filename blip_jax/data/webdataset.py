"""webdataset `.tar` shards, img2dataset's default output: read in place, written in its layout.

A shard is a tar whose members are grouped into samples by key (the member's name up to its first
dot): `000000012.jpg` (the image), `000000012.txt` (its text), `000000012.json` (img2dataset's
metadata: key, url, caption, status, ...). Members of a sample are adjacent, so a shard is read as a
stream (tarfile's "r|" mode through epath: local files and gs:// alike), never unpacked to disk.

Bad input is kept countable, not fatal: a sample with no image or no text comes out with an empty
image or no texts, so the training pipeline drops and counts it like any undecodable image; a shard
that breaks off (truncated, corrupt headers) ends there with one such bad sample standing for what
was lost, and the error named.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Iterator, Sequence

from blip_jax import fs

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _split(name: str) -> tuple[str, str]:
  base = os.path.basename(name)
  key, _, ext = base.partition(".")
  return os.path.join(os.path.dirname(name), key), ext.lower()


def iter_samples(path: str) -> Iterator[dict]:
  """The samples of one shard, in order: {"key", "image" (bytes, b"" if none), "texts" (list),
  "meta" (the .json member, {} if none)}; a shard that breaks off ends with {"key", "error"}."""
  current, fields = None, {}

  def sample(key, f):
    meta = {}
    if "json" in f:
      try:
        meta = json.loads(f["json"].decode("utf-8"))
      except (UnicodeDecodeError, ValueError):
        meta = {}
    image = next((f[e] for e in IMAGE_EXTS if e in f), b"")
    text = f.get("txt")
    texts = [text.decode("utf-8", "replace")] if text is not None else []
    return {"key": str(meta.get("key") or os.path.basename(key)), "image": image, "texts": texts, "meta": meta}

  n = 0
  try:
    with fs.path(path).open("rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
      for member in tar:
        if not member.isfile():
          continue
        key, ext = _split(member.name)
        if key != current and current is not None:
          yield sample(current, fields)
          n += 1
          fields = {}
        current = key
        fields[ext] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, OSError) as e:
    yield {"key": f"{os.path.basename(path)}#{n}", "error": f"{path}: unreadable after sample {n} "
                                                             f"({type(e).__name__}: {str(e)[:200]})"}
    return
  if current is not None:
    yield sample(current, fields)


def count_samples(paths: Sequence[str]) -> int:
  return sum(1 for p in paths for s in iter_samples(p) if "error" not in s)


def write_shard(path: str, samples) -> int:
  """Writes samples {"key", "image" (JPEG bytes), "text", "meta"} as one webdataset shard (key.jpg,
  key.txt, key.json), through a temporary name. Returns the number written."""
  tmp = fs.temp_sibling(path)
  n = 0
  with fs.path(tmp).open("wb") as raw, tarfile.open(fileobj=raw, mode="w|") as tar:
    for s in samples:
      for ext, data in (("jpg", s["image"]), ("txt", s["text"].encode("utf-8")),
                        ("json", json.dumps(s.get("meta", {})).encode("utf-8"))):
        info = tarfile.TarInfo(f"{s['key']}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
      n += 1
  fs.publish(tmp, path)
  return n
