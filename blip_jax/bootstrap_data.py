"""Stage 0 of the bootstrap loop (bootstrap.py): the data. Synthetic pairs with injected noise
(the demos and tests), or your own (BLIP JSON; the noisy part may be img2dataset shards), and with
shards the clean training part written as shards of the same format, so that pretraining (stages 1
and 4) reads one kind of source."""
from __future__ import annotations

import os

import numpy as np

from blip_jax import fs
from blip_jax.data import capfilt_io
from blip_jax.data.annotations import image_path, read_entries
from blip_jax.data.sources import synthetic_example

FORMATS = tuple(capfilt_io.FORMATS)  # json, tfrecord, webdataset


class BootstrapError(ValueError):
  """A configuration or data problem, named before the stage that needs it runs."""


def synthetic_data(d: str, cfg, seed: int = 0) -> dict:
  """Synthetic images (data.sources.synthetic_example) written as JPEG files with BLIP JSON:
  noisy.json (a `noise_fraction` share of captions replaced by another image's, different,
  caption; labels in noise_labels.json), clean_train.json, clean_val.json and heldout.json (the
  last two Karpathy-style, one caption per image, held-out captions all distinct). image_id: one
  per distinct true caption (images that nothing can tell apart are positives for each other)."""
  img_dir = fs.join(d, "images")
  fs.makedirs(img_dir)
  groups: dict = {}
  rng = np.random.RandomState(seed)

  def make(split, n, seed, unique=False):
    rows, seen, i = [], set(), 0
    while len(rows) < n:
      jpeg, caption = synthetic_example(i, cfg.image_size, seed)
      i += 1
      if unique and caption in seen:
        continue
      seen.add(caption)
      name = f"images/{split}_{len(rows):06d}.jpg"
      with open(os.path.join(d, name), "wb") as f:
        f.write(jpeg)
      rows.append({"image": name, "caption": caption, "image_id": groups.setdefault(caption, len(groups))})
      if unique and i > 100 * n:
        raise BootstrapError(f"data.heldout={n}: more distinct captions than the synthetic source has")
    return rows

  # disjoint generator seeds per part (SyntheticSource uses seed*3 + 1..3)
  base = 1000 + 10 * seed
  noisy = make("noisy", cfg.noisy, base + 1)
  clean = make("clean", cfg.clean + cfg.clean_val, base + 2)
  held = make("heldout", cfg.heldout, base + 3, unique=True)
  n_noise = int(round(cfg.noise_fraction * len(noisy)))
  noisy_idx = set(rng.permutation(len(noisy))[:n_noise].tolist())
  true_caps = [r["caption"] for r in noisy]
  labels = []
  for i, r in enumerate(noisy):
    if i in noisy_idx:  # a caption of another image, never one equal to this image's own
      while True:
        j = int(rng.randint(len(noisy)))
        if true_caps[j] != r["caption"]:
          break
      r["caption"] = true_caps[j]
    labels.append({"image": r["image"], "caption": r["caption"], "noisy": i in noisy_idx,
                   "true_caption": true_caps[i]})
  karpathy = lambda rows: [{"image": r["image"], "caption": [r["caption"]]} for r in rows]
  files = {"noisy": fs.join(d, "noisy.json"), "clean_train": fs.join(d, "clean_train.json"),
           "clean_val": fs.join(d, "clean_val.json"), "heldout": fs.join(d, "heldout.json"),
           "noise_labels": fs.join(d, "noise_labels.json")}
  fs.write_json(files["noisy"], noisy)
  fs.write_json(files["clean_train"], clean[:cfg.clean])
  fs.write_json(files["clean_val"], karpathy(clean[cfg.clean:]))
  fs.write_json(files["heldout"], karpathy(held))
  fs.write_json(files["noise_labels"], labels)
  return {"kind": "synthetic", "files": files, "image_root": d,
          "sizes": {"noisy": len(noisy), "noisy_injected": n_noise, "clean_train": cfg.clean,
                    "clean_val": cfg.clean_val, "heldout": len(held)}}


def noisy_format(files) -> str:
  """json | tfrecord | webdataset, from the noisy part's file names (one format)."""
  try:
    return capfilt_io.input_format(files)
  except ValueError as e:
    raise BootstrapError(f"data.json.noisy {e}") from None


def json_data(cfg) -> dict:
  """Your own data (the paper recipe: web pairs noisy, COCO + VG clean): the noisy part as BLIP
  JSON or as img2dataset shards (.tfrecord or .tar files or globs); the clean parts as BLIP JSON."""
  for key in ("noisy", "clean_train", "clean_val", "heldout"):
    for path in getattr(cfg.json, key):
      if not path:
        raise BootstrapError(f"data.json.{key} is empty")
      if not any(c in path for c in "*?[") and not fs.exists(path):
        raise BootstrapError(f"data.json.{key}: {path!r} does not exist")
  files = {k: list(getattr(cfg.json, k)) for k in ("noisy", "clean_train")}
  files.update(clean_val=cfg.json.clean_val[0], heldout=cfg.json.heldout[0])
  fmt = noisy_format(files["noisy"])
  if fmt != "json":
    from blip_jax.data.sources import match_files  # noqa: PLC0415  (TensorFlow: heavy)
    files["noisy"] = match_files(files["noisy"], fmt)
  return {"kind": "json", "format": fmt, "files": files, "image_root": cfg.json.image_root,
          "eval_image_root": cfg.json.eval_image_root or cfg.json.image_root, "sizes": {}}


def write_shards(entries: list, image_root: str, out_dir: str, fmt: str, per_shard: int) -> dict:
  """BLIP JSON entries -> shards of `fmt` (img2dataset's layouts): {"files", "written", "missing_images"}."""
  fs.makedirs(out_dir)
  tmp_json = fs.join(out_dir, "entries.json")
  fs.write_json(tmp_json, entries, indent=None)
  if fmt == "tfrecord":
    from blip_jax.data.shards import make_shards  # noqa: PLC0415  (TensorFlow: heavy)
    stats = make_shards([tmp_json], image_root, out_dir, per_shard=per_shard, progress=False)
    files = [fs.join(out_dir, f"{i:05d}.tfrecord") for i in range(stats["shards"])]
    return {"files": files, "written": stats["written"], "missing_images": stats["missing_images"]}
  from blip_jax.data import webdataset  # noqa: PLC0415
  files, written, missing = [], 0, 0
  for i in range(0, len(entries), per_shard):
    samples = []
    for k, e in enumerate(entries[i:i + per_shard], i):
      try:
        jpg = fs.path(image_path(e["image"], image_root)).read_bytes()
      except OSError:
        missing += 1
        continue
      captions = [e["caption"]] if isinstance(e["caption"], str) else e["caption"]
      for j, caption in enumerate(captions):  # a sample holds one text: one per caption, the image's key shared
        samples.append({"key": f"{k:09d}" + (f"_{j}" if j else ""), "image": jpg, "text": caption,
                        "meta": {"key": str(e.get("image_id", k)), "caption": caption, "status": "success"}})
    files.append(fs.join(out_dir, f"{i // per_shard:05d}.tar"))
    written += webdataset.write_shard(files[-1], samples)
  return {"files": files, "written": written, "missing_images": missing}


def shard_data(data: dict, d: str, cfg) -> dict:
  """With shards: the clean training part (and, for synthetic data, the noisy part) as shards of
  the chosen format, so that stages 1 and 4 read one kind of source."""
  fmt, files = data["format"], data["files"]
  if fmt == "json":
    return data
  counts = data.setdefault("counts", {})
  if data["kind"] == "synthetic":
    out = write_shards(fs.read_json(files["noisy"]), data["image_root"], fs.join(d, "noisy_shards"), fmt,
                       cfg.per_shard)
    files["noisy_json"], files["noisy"] = files["noisy"], out["files"]
    counts["noisy"] = {k: out[k] for k in ("written", "missing_images")}
  out = write_shards(read_entries(files["clean_train"]), data["image_root"], fs.join(d, "clean_shards"), fmt,
                     cfg.per_shard)
  files["clean_train_shards"] = out["files"]
  counts["clean_train"] = {k: out[k] for k in ("written", "missing_images")}
  return data


def clean_train(data: dict) -> list:
  """The clean training part as pretraining reads it: its shards where the noisy part is shards."""
  files = data["files"].get("clean_train_shards") or data["files"]["clean_train"]
  return [files] if isinstance(files, str) else list(files)


def stage0(c, d: str) -> dict:
  """The data, and its pairs counted once here: stage 1 trains on noisy + clean, stage 4 on clean +
  CapFilt's output, whose pairs CapFilt counts (a count of shards is a pass over them)."""
  if c.data.kind == "synthetic":
    data = synthetic_data(d, c.data.synthetic, c.seed)
    data["format"] = c.data.format
  else:
    data = json_data(c.data)
  data = shard_data(data, d, c.data)
  noisy = data["files"]["noisy"]  # a path (synthetic JSON) or a list
  data["pairs"] = {"noisy": count_pairs([noisy] if isinstance(noisy, str) else noisy, data["format"]),
                   "clean_train": count_pairs(clean_train(data), data["format"])}
  return data


def count_pairs(files: list, fmt: str) -> int:
  """Image-text pairs in annotation files (JSON, JSON lines) or shards, as training reads them."""
  if fmt == "json":
    return len(read_entries(files))
  if fmt == "webdataset":
    from blip_jax.data import webdataset  # noqa: PLC0415
    return webdataset.count_samples(files)
  from blip_jax.data.tf_setup import tf  # noqa: PLC0415  (TensorFlow: heavy)
  return int(sum(1 for f in files for _ in tf.data.TFRecordDataset(f)))
