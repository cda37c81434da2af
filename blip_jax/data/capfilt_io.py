"""CapFilt's inputs and outputs (capfilt.py): the noisy pairs it reads, grouped by image, and the
kept pairs it writes, in the input's own format. Each input deals its work in shards; read(shard)
gives [(item, encoded image bytes or an error message)], so an unreadable image is counted with a
message and the rest goes on; write(path, [(item, text, kind, score)]) writes one output shard.

- BLIP JSON (JsonInput): `per_shard` images a shard; JSON out.
- img2dataset TFRecord (TFRecordInput) and webdataset .tar (TarInput): one output shard per input
  file, in the same layout.
"""
from __future__ import annotations

import json
from typing import Sequence

from blip_jax import fs
from blip_jax.data.annotations import caption_groups, image_path, read_entries


class JsonInput:
  """BLIP annotation JSON: entries grouped by image (first appearance order), `per_shard` images a shard."""
  ext = ".json"

  def __init__(self, annotations: Sequence[str], image_root: str, per_shard: int):
    self.images = caption_groups(read_entries(annotations), "image", ", ".join(annotations))
    self.root, self.per_shard = image_root, per_shard
    self.num_shards = -(-len(self.images) // per_shard)

  def shard_items(self, shard: int) -> list:
    return self.images[shard * self.per_shard:(shard + 1) * self.per_shard]

  def count(self, shard: int) -> int:
    return len(self.shard_items(shard))

  def read(self, shard: int):
    """-> [(item dict, encoded image bytes or an error message)]"""
    out = []
    for g in self.shard_items(shard):
      path = image_path(g["image"], self.root)
      try:
        out.append((g, fs.path(path).read_bytes()))
      except Exception as e:  # noqa: BLE001 (OSError locally; the storage client's errors for URLs)
        out.append((g, f"{path}: {getattr(e, 'strerror', None) or type(e).__name__}"))
    return out

  def describe(self, item) -> str:
    return item["image"]

  def write(self, path: str, pairs):
    rows = []
    for item, text, kind, score in pairs:
      row = {"image": item["image"], "caption": text, "kind": kind, "itm": round(float(score), 6)}
      if "image_id" in item:
        row["image_id"] = item["image_id"]
      rows.append(row)
    fs.path(path).write_text(json.dumps(rows))


class TFRecordInput:
  """img2dataset TFRecord shards (as TFRecordSource reads them): one output shard per input file."""
  ext = ".tfrecord"

  def __init__(self, files: Sequence[str]):
    from blip_jax.data.sources import TFRecordSource  # noqa: PLC0415  (TensorFlow: heavy)
    self.files = TFRecordSource(list(files)).files
    self.num_shards = len(self.files)

  def count(self, shard: int) -> None:
    return None  # unknown before reading the file

  def read(self, shard: int):
    """Records of one file. A record that does not parse (no `jpg`) and a file corrupt from some
    record on are counted as undecodable, with a message, and the rest goes on (as for JSON)."""
    from blip_jax.data.sources import TFRecordSource  # noqa: PLC0415  (TensorFlow: heavy)
    from blip_jax.data.tf_setup import tf  # noqa: PLC0415  (TensorFlow: heavy)
    out, name = [], self.files[shard]
    it = iter(tf.data.TFRecordDataset(name))
    n = 0
    while True:
      try:
        record = next(it)
      except StopIteration:
        break
      except tf.errors.OpError as e:  # truncated or corrupt from here on: nothing after it is readable
        out.append(({"key": f"{name}#{n}".encode(), "texts": []},
                    f"{name}: unreadable after record {n} ({type(e).__name__}: {e.message.splitlines()[0][:200]})"))
        break
      n += 1
      try:
        f = tf.io.parse_single_example(record, TFRecordSource.FEATURES)
      except tf.errors.InvalidArgumentError as e:
        out.append(({"key": f"{name}#{n - 1}".encode(), "texts": []},
                    f"{name} record {n - 1}: not an image record ({e.message.splitlines()[0][:200]})"))
        continue
      caps = [c.decode("utf-8", "replace") for c in tf.sparse.to_dense(f["captions"]).numpy()]
      texts = caps or [f["txt"].numpy().decode("utf-8", "replace")]
      jpg = f["jpg"].numpy()
      out.append(({"key": f["key"].numpy(), "texts": texts, "jpg": jpg}, jpg))
    return out

  def describe(self, item) -> str:
    return f"record key {item['key'].decode('utf-8', 'replace')!r}"

  def write(self, path: str, pairs):
    from blip_jax.data.tf_setup import tf  # noqa: PLC0415  (TensorFlow: heavy)
    feature = lambda v: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
    with tf.io.TFRecordWriter(path) as w:
      for item, text, kind, score in pairs:
        feats = {"jpg": feature(item["jpg"]), "txt": feature(text.encode("utf-8")), "key": feature(item["key"]),
                 "kind": feature(kind.encode()),
                 "itm": tf.train.Feature(float_list=tf.train.FloatList(value=[float(score)]))}
        w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())


class TarInput:
  """img2dataset webdataset `.tar` shards (data/webdataset.py), read in place: one output shard per
  input file, in the same layout; each kept pair is a sample `<key>_<n>` whose .json holds the
  image's key, the kind and the ITM score (so the pairs of one image share its image id)."""
  ext = ".tar"

  def __init__(self, files: Sequence[str]):
    from blip_jax.data.sources import WebDatasetSource  # noqa: PLC0415  (TensorFlow: heavy)
    self.files = WebDatasetSource(list(files)).files
    self.num_shards = len(self.files)

  def count(self, shard: int) -> None:
    return None

  def read(self, shard: int):
    from blip_jax.data import webdataset  # noqa: PLC0415
    out = []
    for s in webdataset.iter_samples(self.files[shard]):
      if "error" in s:
        out.append(({"key": s["key"], "texts": []}, s["error"]))
        continue
      item = {"key": s["key"], "texts": s["texts"] or [""], "jpg": s["image"]}  # no text: counted blank
      out.append((item, s["image"] or f"{self.files[shard]} sample {s['key']!r}: no image member"))
    return out

  def describe(self, item) -> str:
    return f"sample {item['key']!r}"

  def write(self, path: str, pairs):
    from blip_jax.data import webdataset  # noqa: PLC0415
    webdataset.write_shard(path, ({"key": f"{item['key']}_{n}", "image": item["jpg"], "text": text,
                                   "meta": {"key": item["key"], "kind": kind, "itm": round(float(score), 6)}}
                                  for n, (item, text, kind, score) in enumerate(pairs)))


FORMATS = {"json": (".json", ".jsonl"), "tfrecord": (".tfrecord",), "webdataset": (".tar",)}


def input_format(files: Sequence[str]) -> str:
  """json | tfrecord | webdataset, from the files' (or globs') extensions, one format for all."""
  found = {f for f, exts in FORMATS.items() for p in files if p.endswith(exts)}
  if len(found) != 1 or not all(p.endswith(sum(FORMATS.values(), ())) for p in files):
    raise ValueError(f"{list(files)}: give BLIP JSON, TFRecord (.tfrecord) or webdataset (.tar) files, one format")
  return found.pop()


def make_input(files: Sequence[str], image_root: str = "", per_shard: int = 1000):
  """The CapFilt input for annotation JSON, TFRecord or webdataset `.tar` files (by extension)."""
  fmt = input_format(files)
  return (JsonInput(list(files), image_root, per_shard) if fmt == "json"
          else TFRecordInput(files) if fmt == "tfrecord" else TarInput(files))
