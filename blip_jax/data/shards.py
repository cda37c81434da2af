"""`blip-jax make-shards`: BLIP JSON + images -> TFRecord shards in img2dataset's format
(features jpg, txt, key; plus `captions` when an entry has several). Shards are written in parallel
(threads: file reads and TFRecord writes release the GIL; no fork beside JAX's threads),
each to a temporary name and renamed when complete, so an interrupted run resumes per shard. The
settings are recorded (make_shards.json); a rerun with other settings is refused, since its shards
would cut the entries differently. The output folder may be a URL (gs://...)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from blip_jax import fs
from blip_jax.data.annotations import read_entries

SHARD_NAME = "{:05d}.tfrecord"
SETTINGS = "make_shards.json"


def _bytes_feature(values):
  from blip_jax.data.tf_setup import tf  # noqa: PLC0415  (TensorFlow: heavy)
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _write_shard(args):
  from blip_jax.data.tf_setup import tf  # noqa: PLC0415  (TensorFlow: heavy)
  out_dir, index, start, entries, image_root = args
  final = fs.join(out_dir, SHARD_NAME.format(index))
  if fs.exists(final):
    return index, len(entries), 0, True
  tmp = fs.temp_sibling(final)
  written = missing = 0
  with tf.io.TFRecordWriter(tmp) as w:
    for k, e in enumerate(entries, start):
      image = e["image"]
      path = image if (image.startswith("/") or fs.is_url(image)) else fs.join(image_root, image)
      try:
        data = fs.path(path).read_bytes()
      except Exception:  # noqa: BLE001 (OSError locally; the storage client's errors for URLs)
        missing += 1
        continue
      caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
      feats = {"jpg": _bytes_feature([data]), "txt": _bytes_feature([caps[0].encode("utf-8")]),
               "key": _bytes_feature([str(e.get("image_id", k)).encode("utf-8")])}
      if len(caps) > 1:
        feats["captions"] = _bytes_feature([c.encode("utf-8") for c in caps])
      w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
      written += 1
  fs.publish(tmp, final)
  return index, written, missing, False


def make_shards(annotations: list[str], image_root: str, out_dir: str, per_shard: int = 1000,
                workers: int = 2, progress: bool = True) -> dict:
  entries = read_entries(annotations)
  settings = {"annotations": [str(fs.path(a)) for a in annotations],
              "image_root": str(fs.path(image_root)) if image_root else "",
              "per_shard": per_shard, "entries": len(entries)}
  fs.resume_settings(fs.join(out_dir, SETTINGS), settings, "shards")
  # one slice per shard (O(N) overall), entry numbers kept for the default keys
  starts = range(0, len(entries), per_shard)
  jobs = [(out_dir, i, s, entries[s:s + per_shard], image_root) for i, s in enumerate(starts)]
  stats = {"shards": len(jobs), "written": 0, "missing_images": 0, "already_done": 0}
  with ThreadPoolExecutor(max_workers=workers) as pool, \
      tqdm(total=len(entries), unit="ex", desc="shards", disable=not progress) as bar:
    for index, n, missing, done in pool.map(_write_shard, jobs):
      stats["written"] += n if not done else 0
      stats["missing_images"] += missing
      stats["already_done"] += int(done)
      bar.update(len(jobs[index][3]))
  fs.write_json(fs.join(out_dir, "manifest.json"), {"annotations": annotations, "entries": len(entries), **stats})
  return stats
