"""Sources of raw examples, one interface.

A raw example is a dict of TF tensors:
  image     encoded image bytes (JPEG/PNG) [scalar string]      image2: second image (NLVR2)
  texts     caption(s) [K strings]; a question for VQA
  answers   VQA answers [A strings], weights [A float32]         label: NLVR2 [int32]
  image_id  int64 (contiguous per image for annotation files: all captions of an image share it)

Random-access sources (annotation JSON, synthetic) implement `__len__` and `lookup(index)`; the
pipeline permutes indices per epoch with a stateless index shuffle, so resuming at a position costs
nothing. Streaming sources (TFRecord shards, TFDS) implement `epoch_dataset(epoch, seed, host, hosts)`,
deterministic for a seed; the pipeline resumes them with skip() before any decoding.
"""
from __future__ import annotations

import io
import os
from collections import Counter
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from blip_jax.data.annotations import check_entries, image_path, read_entries
from blip_jax.data.tf_setup import tf

CORPUS_LIMIT = 2_000_000  # texts a streaming source gives a tokenizer (SentencePiece samples anyway)


class Source:
  task = "caption"  # caption | vqa | nlvr
  random_access = True
  name = "source"

  def __len__(self) -> int:
    raise NotImplementedError

  def lookup(self, index):
    raise NotImplementedError

  def epoch_dataset(self, epoch: int, seed: int, host: int, hosts: int) -> tf.data.Dataset:
    raise NotImplementedError

  def eval_texts(self):
    """(texts, txt2img, img2txt) over all captions of every image, for retrieval evaluation."""
    raise NotImplementedError(f"{type(self).__name__} has no evaluation captions")

  def corpus(self) -> list:
    """The source's texts, to train a tokenizer on (captions; VQA: questions and answers; NLVR2:
    sentences)."""
    return self.eval_texts()[0]


def _ragged(rows, dtype):
  return tf.ragged.constant(rows, dtype=dtype) if rows else tf.ragged.constant([[]], dtype=dtype)


class JsonSource(Source):
  """BLIP annotation files (official data/*_dataset.py formats) with an image root:

  - pretraining lists / Karpathy train: {"image", "caption": str, ["image_id"]}, one entry per caption;
  - Karpathy val/test: {"image", "caption": [str, ...]}, one entry per image;
  - VQA: {"question", "answer": str | [str], "image", ["dataset"]};
  - NLVR2: {"images": [a, b], "sentence", "label": "True" | "False"}.
  Images are read by TF at run time, so a missing file is a skipped example, not a crash.
  each_caption: an entry with a caption list becomes one example per caption (the official caption
  fine-tuning trains on every caption of an image); otherwise one of them is drawn per epoch.
  """

  def __init__(self, annotations: str | Sequence[str], image_root: str = "", task: Optional[str] = None,
               each_caption: bool = False):
    files = [annotations] if isinstance(annotations, str) else list(annotations)
    entries = read_entries(files)
    self.name = ",".join(os.path.basename(f) for f in files)
    e0 = entries[0]
    self.task = task or ("vqa" if "question" in e0 else "nlvr" if "images" in e0 else "caption")
    check_entries(entries, self.task, self.name)
    if each_caption and self.task == "caption":
      entries = [dict(e, caption=c) for e in entries
                 for c in (e["caption"] if isinstance(e["caption"], list) else [e["caption"]])]
    path = lambda p: image_path(p, image_root)
    ids: dict = {}
    image_key = lambda e: str(e.get("image_id", e.get("image", e.get("images", [""])[0])))
    img_ids = [ids.setdefault(image_key(e), len(ids)) for e in entries]
    self.entries = entries
    self.n = len(entries)
    self.t_image_id = tf.constant(np.asarray(img_ids, np.int64))
    if self.task == "nlvr":
      self.t_image = tf.constant([path(e["images"][0]) for e in entries])
      self.t_image2 = tf.constant([path(e["images"][1]) for e in entries])
      self.t_texts = _ragged([[e["sentence"]] for e in entries], tf.string)
      self.t_label = tf.constant([int(str(e["label"]) == "True") for e in entries], tf.int32)
    else:
      self.t_image = tf.constant([path(e["image"]) for e in entries])
    if self.task == "caption":
      caps = [e["caption"] if isinstance(e["caption"], list) else [e["caption"]] for e in entries]
      self.t_texts = _ragged(caps, tf.string)
    elif self.task == "vqa":
      self.t_texts = _ragged([[e["question"]] for e in entries], tf.string)
      answers, weights = [], []
      for e in entries:
        a = e.get("answer", [])
        if isinstance(a, str):  # VG-QA: one answer, weight 0.2 (official); a lone answer otherwise 1
          answers.append([a]); weights.append([0.2 if e.get("dataset") == "vg" else 1.0])
        else:
          c = Counter(a)
          answers.append(list(c)); weights.append([v / max(len(a), 1) for v in c.values()])
      self.t_answers = _ragged(answers, tf.string)
      self.t_weights = _ragged(weights, tf.float32)

  def __len__(self):
    return self.n

  def lookup(self, index):
    ex = {"image": tf.io.read_file(tf.gather(self.t_image, index)),
          "texts": self.t_texts[index], "image_id": tf.gather(self.t_image_id, index)}
    if self.task == "vqa":
      ex["answers"], ex["weights"] = self.t_answers[index], self.t_weights[index]
    if self.task == "nlvr":
      ex["image2"] = tf.io.read_file(tf.gather(self.t_image2, index))
      ex["label"] = tf.gather(self.t_label, index)
    return ex

  def corpus(self) -> list:
    if self.task == "vqa":
      out = []
      for e in self.entries:
        a = e.get("answer", [])
        out += [e["question"]] + ([a] if isinstance(a, str) else list(a))
      return out
    if self.task == "nlvr":
      return [e["sentence"] for e in self.entries]
    return self.eval_texts()[0]

  def eval_texts(self):
    texts, txt2img, img2txt = [], [], []
    for i, e in enumerate(self.entries):
      caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
      img2txt.append(list(range(len(texts), len(texts) + len(caps))))
      texts += caps
      txt2img += [i] * len(caps)
    return texts, np.asarray(txt2img), img2txt


def match_files(patterns: str | Sequence[str], what: str) -> list:
  """The files the patterns match, sorted (a plain path as given; globs local or gs:// through
  tf.io.gfile); none is an error naming `what` was looked for."""
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  found = sorted(f for p in patterns for f in (tf.io.gfile.glob(p) if any(c in p for c in "*?[") else [p]))
  if not found:
    raise ValueError(f"no {what} files match {patterns}")
  return found


class TFRecordSource(Source):
  """img2dataset TFRecord shards (features jpg, txt, key; `captions` as written by make-shards when an
  entry has several). Local paths or gs:// through tf.io.gfile."""
  random_access = False

  what = "TFRecord"  # the format, as errors name it

  def __init__(self, files: str | Sequence[str], shuffle_buffer: int = 10_000, cycle_length: int = 4):
    self.files = match_files(files, self.what)
    self.name = os.path.dirname(self.files[0]) or self.files[0]
    self.shuffle_buffer, self.cycle_length = shuffle_buffer, cycle_length

  def _file_texts(self, path):
    for record in tf.data.TFRecordDataset(path).map(self.parse):
      yield [t.decode("utf-8", "replace") for t in record["texts"].numpy()]

  def corpus(self, limit: int = CORPUS_LIMIT) -> list:
    """The shards' texts (up to `limit`), in file order: what a tokenizer is trained on."""
    out = []
    for f in self.files:
      for texts in self._file_texts(f):
        out += texts
        if len(out) >= limit:
          return out[:limit]
    return out

  FEATURES = {"jpg": tf.io.FixedLenFeature([], tf.string), "txt": tf.io.FixedLenFeature([], tf.string, ""),
              "key": tf.io.FixedLenFeature([], tf.string, ""), "captions": tf.io.VarLenFeature(tf.string)}

  @classmethod
  def parse(cls, record):
    f = tf.io.parse_single_example(record, cls.FEATURES)
    caps = tf.sparse.to_dense(f["captions"])
    texts = tf.cond(tf.size(caps) > 0, lambda: caps, lambda: f["txt"][None])
    return {"image": f["jpg"], "texts": texts,
            "image_id": tf.strings.to_hash_bucket_fast(f["key"], 2 ** 62)}

  def _file_dataset(self, path):
    return tf.data.TFRecordDataset(path)

  def epoch_dataset(self, epoch, seed, host, hosts):
    """Files permuted per epoch and dealt to hosts (records dealt, when hosts outnumber files),
    interleaved, through a seeded shuffle buffer; `_file_dataset` and `parse` are the format's."""
    order = np.random.RandomState((seed * 1_000_003 + epoch) % 2 ** 32).permutation(len(self.files))
    files = [self.files[i] for i in order]
    per_file = len(files) >= hosts
    if per_file:
      files = files[host::hosts]
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        self._file_dataset, cycle_length=self.cycle_length, num_parallel_calls=self.cycle_length,
        deterministic=True)
    if not per_file:
      ds = ds.shard(hosts, host)
    if self.shuffle_buffer > 1:
      ds = ds.shuffle(self.shuffle_buffer, seed=seed * 7919 + epoch, reshuffle_each_iteration=False)
    return ds.map(self.parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class WebDatasetSource(TFRecordSource):
  """webdataset `.tar` shards (img2dataset's default output: key.jpg + key.txt + key.json), read as
  streams in place (data/webdataset.py), files split over hosts and interleaved as TFRecords are.
  A sample's image id is its key (the .json's `key`, else the member name), hashed as TFRecords'."""

  what = "webdataset .tar"

  def _file_texts(self, path):
    from blip_jax.data import webdataset  # noqa: PLC0415
    for s in webdataset.iter_samples(path):
      yield s.get("texts", [])

  @staticmethod
  def _read(path):
    from blip_jax.data import webdataset  # noqa: PLC0415
    for s in webdataset.iter_samples(path.decode() if isinstance(path, bytes) else path):
      # a broken-off shard: one bad sample (no image), dropped and counted by the pipeline
      yield {"image": s.get("image", b""), "texts": s.get("texts") or [""], "key": s["key"]}

  def _file_dataset(self, path):
    return tf.data.Dataset.from_generator(self._read, args=(path,), output_signature={
        "image": tf.TensorSpec([], tf.string), "texts": tf.TensorSpec([None], tf.string),
        "key": tf.TensorSpec([], tf.string)})

  @staticmethod
  def parse(sample):
    return {"image": sample["image"], "texts": sample["texts"],
            "image_id": tf.strings.to_hash_bucket_fast(sample["key"], 2 ** 62)}


class TFDSSource(Source):
  """Any TFDS dataset with an image and text features, by name (e.g. 'coco_captions', or our
  'blip_coco_karpathy' built from a manual dir). Images are read undecoded."""
  random_access = False

  def __init__(self, name: str, split: str = "train", data_dir: Optional[str] = None,
               image_key: str = "image", text_key: Optional[str] = None, shuffle_buffer: int = 10_000):
    import tensorflow_datasets as tfds  # noqa: PLC0415  (heavy; TFDS sources only)

    from blip_jax.data import tfds_builders  # noqa: PLC0415,F401  (registers our builders)
    self.builder = tfds.builder(name, data_dir=data_dir)
    self.name, self.split, self.image_key = name, split, image_key
    feats = self.builder.info.features
    self.text_key = text_key or next((k for k in ("captions", "caption", "text") if k in feats), None)
    if image_key not in feats or self.text_key is None:
      raise ValueError(f"TFDS {name} needs an image feature {image_key!r} and a text feature; has {list(feats)}")
    self.shuffle_buffer = shuffle_buffer

  def _texts(self, ex):
    t = ex[self.text_key]
    if isinstance(t, dict):  # coco_captions: captions/{id, text}
      t = t["text"]
    return tf.reshape(t, [-1])

  def epoch_dataset(self, epoch, seed, host, hosts):
    import tensorflow_datasets as tfds  # noqa: PLC0415  (heavy; TFDS sources only)
    split = tfds.split_for_jax_process(self.split, process_index=host, process_count=hosts)
    read = tfds.ReadConfig(shuffle_seed=seed * 7919 + epoch, interleave_cycle_length=4)
    ds = self.builder.as_dataset(split=split, shuffle_files=True, read_config=read,
                                 decoders={self.image_key: tfds.decode.SkipDecoding()})
    if self.shuffle_buffer > 1:
      ds = ds.shuffle(self.shuffle_buffer, seed=seed * 7919 + epoch, reshuffle_each_iteration=False)
    def to_raw(ex):
      iid = ex.get("image_id", ex.get("image/id"))
      iid = tf.cast(iid, tf.int64) if iid is not None else tf.constant(-1, tf.int64)
      return {"image": ex[self.image_key], "texts": self._texts(ex), "image_id": tf.reshape(iid, [])}
    return ds.map(to_raw, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# ---- synthetic: deterministic image-caption pairs, no files ---------------------------------------
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 220), "yellow": (235, 210, 30),
          "white": (245, 245, 245), "purple": (140, 40, 170)}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (120, 120, 120), "brown": (110, 70, 30), "cyan": (60, 190, 200)}
COUNTS = ("one", "two", "three")
PLACES = {"on the left": (0.0, 0.0, 0.5, 1.0), "on the right": (0.5, 0.0, 1.0, 1.0),
          "at the top": (0.0, 0.0, 1.0, 0.5), "at the bottom": (0.0, 0.5, 1.0, 1.0)}


def synthetic_example(index: int, size: int, seed: int = 0):
  """(JPEG bytes, caption) of example `index`: count x colour x shape in a region on a background."""
  r = np.random.RandomState((seed * 1_000_003 + index) % 2 ** 32)
  shape, color = SHAPES[r.randint(3)], list(COLORS)[r.randint(len(COLORS))]
  bg, count = list(BACKGROUNDS)[r.randint(len(BACKGROUNDS))], r.randint(1, 4)
  place = list(PLACES)[r.randint(len(PLACES))]
  x0, y0, x1, y1 = (v * size for v in PLACES[place])
  img = Image.new("RGB", (size, size), BACKGROUNDS[bg])
  d = ImageDraw.Draw(img)
  rad = size * (0.07 + 0.03 * r.rand())
  for _ in range(count):
    cx, cy = r.uniform(x0 + rad, x1 - rad), r.uniform(y0 + rad, y1 - rad)
    box = (cx - rad, cy - rad, cx + rad, cy + rad)
    if shape == "circle":
      d.ellipse(box, fill=COLORS[color])
    elif shape == "square":
      d.rectangle(box, fill=COLORS[color])
    else:
      d.polygon([(cx, cy - rad), (cx - rad, cy + rad), (cx + rad, cy + rad)], fill=COLORS[color])
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=95)
  noun = shape + ("s" if count > 1 else "")
  return buf.getvalue(), f"{COUNTS[count - 1]} {color} {noun} {place} on a {bg} background"


class SyntheticSource(Source):
  """`num_examples` generated pairs; `split='val'` draws from a disjoint seed (held-out pairs)."""

  def __init__(self, num_examples: int = 2048, image_size: int = 64, seed: int = 0, split: str = "train"):
    self.name = f"synthetic-{split}"
    offset = {"train": 0, "val": 1, "test": 2}[split]
    data = [synthetic_example(i, image_size, seed * 3 + offset + 1) for i in range(num_examples)]
    self.images = [d[0] for d in data]
    self.captions = [d[1] for d in data]
    self.t_image = tf.constant(self.images)
    self.t_text = tf.constant(self.captions)
    # pairs with the same caption share an id: they are positives for each other (ITC with image ids,
    # ITM negatives, and retrieval recall), since nothing can tell them apart
    groups: dict = {}
    self.group_ids = np.asarray([groups.setdefault(c, len(groups)) for c in self.captions], np.int64)
    self.t_group = tf.constant(self.group_ids)
    self.n = num_examples

  def __len__(self):
    return self.n

  def lookup(self, index):
    return {"image": tf.gather(self.t_image, index), "texts": tf.gather(self.t_text, index)[None],
            "image_id": tf.gather(self.t_group, index)}

  def eval_texts(self):
    return list(self.captions), np.arange(self.n), [[i] for i in range(self.n)]


def make_source(cfg) -> Source:
  """From a config dict / ConfigDict: kind in json | tfrecord | tfds | synthetic."""
  kind = cfg["kind"]
  if kind == "json":
    return JsonSource(list(cfg["annotations"]), cfg.get("image_root", ""), cfg.get("task") or None,
                      bool(cfg.get("each_caption", False)))
  if kind == "tfrecord":
    return TFRecordSource(list(cfg["files"]) if not isinstance(cfg["files"], str) else cfg["files"],
                          cfg.get("shuffle_buffer", 10_000))
  if kind == "webdataset":
    return WebDatasetSource(list(cfg["files"]) if not isinstance(cfg["files"], str) else cfg["files"],
                            cfg.get("shuffle_buffer", 10_000))
  if kind == "tfds":
    return TFDSSource(cfg["name"], cfg.get("split", "train"), cfg.get("data_dir") or None,
                      cfg.get("image_key", "image"), cfg.get("text_key") or None, cfg.get("shuffle_buffer", 10_000))
  if kind == "synthetic":
    return SyntheticSource(cfg.get("num_examples", 2048), cfg.get("image_size", 64), cfg.get("seed", 0),
                           cfg.get("split", "train"))
  raise ValueError(f"unknown source kind {kind!r} (json, tfrecord, webdataset, tfds, synthetic)")
