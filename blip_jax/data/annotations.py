"""BLIP annotation files (the official code's data/*_dataset.py formats), read in one
place for training (JsonSource, TFDS builders), evaluation (caption sets, VQA questions, NLVR2
pairs, retrieval galleries), CapFilt and make-shards: the files, the entries each task needs and
where an entry's image is. Plain Python."""
from __future__ import annotations

import json
import os
from typing import Sequence

from blip_jax import fs


def read_entries(files: str | Sequence[str]) -> list:
  """The entries of one or more annotation files: JSON lists, or JSON lines (.jsonl, e.g. MSRVTT)."""
  files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
  entries = []
  for path in files:
    if not str(path).strip():
      raise FileNotFoundError("an annotation path is empty: give the JSON file(s) of the data")
    if not fs.exists(path) or fs.path(path).is_dir():
      raise FileNotFoundError(f"{path}: no such annotation file")
    text = fs.read_text(path)
    try:
      if str(path).endswith(".jsonl"):
        part = [json.loads(line) for line in text.splitlines() if line.strip()]
      else:
        part = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON{' lines' if str(path).endswith('.jsonl') else ''} ({e})") from None
    if not isinstance(part, list):
      raise ValueError(f"{path}: expected a list of entries, got a {type(part).__name__}")
    entries += part
  if not entries:
    raise ValueError(f"{files}: no entries")
  return entries


def caption_groups(entries: list, key: str = "image", source: str = "annotations", *,
                   captions_required: bool = True) -> list:
  """Caption entries grouped by image (or video: key='clip_name'), in order of first appearance:
  [{key: ..., "texts": [...], ["image_id"]}]. Entries may hold one caption (pretraining, Karpathy
  train) or a list (Karpathy val/test); with captions_required=False, none (images to caption,
  e.g. NoCaps {"image", "img_id"}: img_id is kept as image_id). An entry of another shape fails,
  naming it."""
  groups: dict = {}
  for n, e in enumerate(entries):
    if not isinstance(e, dict) or key not in e or ("caption" not in e and captions_required):
      raise ValueError(f"{source}: entry {n} has no {key!r} and 'caption' "
                       f"(got {sorted(e) if isinstance(e, dict) else type(e).__name__}); caption annotations are "
                       f"[{{{key!r}: ..., 'caption': str | [str, ...]}}, ...]")
    caps = e.get("caption", [])
    caps = caps if isinstance(caps, list) else [caps]
    if not all(isinstance(c, str) for c in caps):
      raise ValueError(f"{source}: entry {n}: captions must be strings")
    g = groups.setdefault(e[key], {key: e[key], "texts": []})
    g["texts"] += caps
    if "image_id" in e or "img_id" in e:
      g["image_id"] = e.get("image_id", e.get("img_id"))
  return list(groups.values())


def image_path(image: str, root: str = "") -> str:
  """Where an entry's image is: an absolute path or a URL (gs://...) as written, else under root."""
  return image if os.path.isabs(image) or fs.is_url(image) else os.path.join(root, image)


# what each task reads from an entry (NLVR2's label only where it is trained on)
NEEDS = {"caption": ("image", "caption"), "vqa": ("image", "question"), "nlvr": ("images", "sentence", "label")}


def check_entries(entries: list, task: str, name: str, *, labels: bool = True) -> None:
  """Every entry has what its task reads (NLVR2: two images); the first that does not is named.
  Web-data lists with URLs (BLIP's released ccs_filtered.json, laion_synthetic_*.json) must be
  downloaded first."""
  need = tuple(k for k in NEEDS[task] if labels or k != "label")
  for n, e in enumerate(entries):
    if isinstance(e, dict) and all(k in e for k in need):
      if "images" in need and not (isinstance(e["images"], list) and len(e["images"]) == 2):
        raise ValueError(f"{name}: entry {n}: 'images' must be a list of two paths (got {e['images']!r})")
      continue
    if isinstance(e, dict) and "url" in e and "image" not in e:
      raise ValueError(f"{name}: entry {n} has a 'url' but no 'image': this is a web-data list (as BLIP's "
                       "released ccs_filtered.json / laion_synthetic_*.json); download the images first, e.g. "
                       "img2dataset --input_format=json --url_col=url --caption_col=caption --output_format=tfrecord, "
                       "then train on the shards with data.source.kind=tfrecord")
    got = sorted(e) if isinstance(e, dict) else type(e).__name__
    raise ValueError(f"{name}: entry {n} lacks {[k for k in need if not isinstance(e, dict) or k not in e]} "
                     f"(has {got}); {task} annotations need {list(need)}")
