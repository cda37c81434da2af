"""The input pipeline: a source -> per-host, deterministic, resumable batches of numpy arrays.

Order. Random-access sources: epoch e visits the global permutation index_shuffle(p; seed, e) of all
examples. Training: host h of H, with b examples per host batch, takes block h of every run of H*b
global positions (p = h*b .. h*b + b-1, then H*b + h*b ...), so the global batch of a step holds
positions in the same order on any number of hosts: a run on two hosts computes what one host
would (the bootstrap's 2-process test holds them equal). Evaluation: host h takes p = h, h + H, ...
Either way H hosts cover every example exactly once per epoch. Streaming sources: files are
permuted per epoch and split over hosts, then a seeded shuffle buffer. Each example's augmentation
is keyed by (seed, epoch, position), never by time or thread, so the same position always gives the
same pixels and caption choice.

Resume. `state()` = {epoch, position, skipped, ...} of the last batch handed out; `restore(state)`
rebuilds the epoch and starts at `position` (random access: by index; streaming: skip() on raw
records before any decoding), so a resumed run sees exactly the batches an uninterrupted one would.

Bad data. Examples whose image does not decode (missing, truncated, not an image) or whose text is
empty or not UTF-8 are dropped and counted (`skipped`) from the gaps in the positions that come
through; an epoch that yields nothing stops with an error naming the source.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import weakref
from typing import Iterator, Optional

import jax
import numpy as np

from blip_jax.data import transforms as T
from blip_jax.data.sources import Source, make_source
from blip_jax.data.tf_setup import tf

log = logging.getLogger(__name__)

TEXT_LENGTH = {"pretrain": 30, "retrieval": 35, "caption": 40, "vqa": 35, "nlvr": 64}


@dataclasses.dataclass
class PipelineConfig:
  batch_size: int = 8  # per host
  image_size: int = 224
  train: bool = True
  crop_scale: tuple = (0.2, 1.0)  # RandomResizedCrop scale: 0.2-1 pretraining, 0.5-1 finetuning
  flip: bool = True
  randaug: bool = True
  max_words: int = 30  # pre_caption word limit
  text_length: int = 30  # tokens, incl. special tokens
  prompt: str = ""  # e.g. 'a picture of ' for caption finetuning
  answer_length: int = 8
  max_answers: int = 10
  # NLVR2 training (official nlvr_dataset): with probability 0.5 the two images change places and
  # the words 'left' and 'right' in the sentence with them
  swap_pair: bool = True
  seed: int = 0
  threads: int = 2  # tf.data private thread pool
  prefetch: int = 2

  @classmethod
  def from_dict(cls, d) -> "PipelineConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - known)
    if bad:
      raise ValueError(f"unknown input pipeline keys {bad}; known: {sorted(known)}")
    if "crop_scale" in d:
      d["crop_scale"] = tuple(d["crop_scale"])
    return cls(**d)


def _seed(seed, epoch, position):
  return tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64), tf.cast(position, tf.int64)])


class DataError(ValueError):
  """The data cannot make a batch (every example bad, fewer than one batch): the run stops, naming it."""


_OPEN: "weakref.WeakSet[InputPipeline]" = weakref.WeakSet()


@atexit.register
def _close_open_pipelines():
  """A tf.data iterator over a stream of epochs (flat_map) that is still alive when the interpreter
  finalises hangs the process at exit (seen here with TF 2.21): every pipeline's iterator is let go
  first, e.g. after a run stopped by an exception or sys.exit."""
  for pipe in list(_OPEN):
    pipe.close()


class InputPipeline:
  """Iterates numpy batches: image uint8 [B,S,S,3], text_ids/text_mask int32 [B,L], image_id int64 [B]
  (+ question/answers for VQA, image2/label for NLVR2; eval batches add `valid`)."""

  def __init__(self, source: Source, tokenizer, cfg: PipelineConfig | dict, *,
               process_index: Optional[int] = None, process_count: Optional[int] = None):
    self.source, self.tokenizer = source, tokenizer
    self.cfg = cfg if isinstance(cfg, PipelineConfig) else PipelineConfig.from_dict(cfg)
    self.host = jax.process_index() if process_index is None else process_index
    self.hosts = jax.process_count() if process_count is None else process_count
    self.epoch, self.position, self.skipped = 0, 0, 0
    self._it = None
    _OPEN.add(self)
    if source.random_access:
      n = len(source)
      if self.cfg.train:  # blocks of b = batch_size positions (see the module's docstring); of the
        # epoch's remainder (less than one global batch) each host takes at most b - 1, spares for
        # bad examples, so that every host has the same number of batches an epoch
        b, run = self.cfg.batch_size, self.cfg.batch_size * self.hosts
        self.host_size = (n // run) * b + min(max(n % run - self.host * b, 0), b - 1)
      else:
        self.host_size = len(range(self.host, n, self.hosts))
      if self.cfg.train and self.host_size < self.cfg.batch_size:
        raise ValueError(f"{source.name}: {self.host_size} examples per host, fewer than one batch of "
                         f"{self.cfg.batch_size}")
    else:
      self.host_size = None

  # ---- state ----
  @property
  def steps_per_epoch(self) -> Optional[int]:
    return None if self.host_size is None else self.host_size // self.cfg.batch_size

  def state(self) -> dict:
    return {"epoch": int(self.epoch), "position": int(self.position), "skipped": int(self.skipped),
            "seed": int(self.cfg.seed), "hosts": int(self.hosts)}

  def close(self):
    """Lets go of the tf.data iterator (its threads and buffers); a later batch rebuilds it."""
    self._it = None

  def restore(self, state: dict):
    if state.get("hosts", self.hosts) != self.hosts or state.get("seed", self.cfg.seed) != self.cfg.seed:
      log.warning("restoring an input state saved with other hosts/seed: order will differ")
    self.epoch, self.position, self.skipped = state["epoch"], state["position"], state["skipped"]
    self._it = None

  # ---- the tf.data graph ----
  def _raw(self, epoch: int, start: int) -> tf.data.Dataset:
    """(position, raw example) from `start` on, for this host and epoch."""
    src, host, hosts, seed = self.source, self.host, self.hosts, self.cfg.seed
    if src.random_access:
      n = len(src)
      key = tf.stack([tf.constant(seed % 2 ** 31, tf.int64), tf.cast(epoch, tf.int64) * 7919 + 0x5EED])
      b = self.cfg.batch_size

      def lookup(k):  # k: this host's count -> the global position
        p = (k // b) * (b * hosts) + host * b + k % b if self.cfg.train else host + k * hosts
        idx = tf.random.experimental.index_shuffle(p, key, n - 1) if self.cfg.train else p
        return p, src.lookup(idx)
      return tf.data.Dataset.range(start, self.host_size).map(lookup, num_parallel_calls=tf.data.AUTOTUNE,
                                                              deterministic=True)
    ds = src.epoch_dataset(epoch, seed, host, hosts).enumerate().skip(start)
    return ds

  def _process(self, epoch):
    c, task = self.cfg, self.source.task

    def fn(position, raw):
      seed = _seed(c.seed, epoch, position)
      texts = raw["texts"]
      if c.train and task == "caption":  # one caption per image per epoch
        k = tf.random.stateless_uniform([], seed + 99, 0, tf.maximum(tf.size(texts), 1), dtype=tf.int32)
        text = texts[k]
      else:
        text = texts[0]
      ok = T.is_valid_utf8(text)
      text = tf.cond(ok, lambda: text, lambda: tf.constant(""))
      text = T.tf_pre_question(text) if task == "vqa" else T.tf_pre_caption(text, c.max_words)
      ok = ok & (tf.strings.length(text) > 0)
      if c.prompt:
        text = c.prompt + text
      if c.train:
        img = T.decode_train(raw["image"], seed, c.image_size, c.crop_scale, c.flip, c.randaug)
      else:
        img = T.decode_eval(raw["image"], c.image_size)
      out = {"position": position, "image": img, "text": text, "image_id": raw["image_id"], "ok": ok}
      if task == "vqa":
        answers = raw["answers"][:c.max_answers]
        out["answers"] = answers.to_tensor() if hasattr(answers, "to_tensor") else answers
        out["weights"] = raw["weights"][:c.max_answers]
      if task == "nlvr":  # both images get the training transform (official: the flip too)
        img2 = (T.decode_train(raw["image2"], seed + 1000, c.image_size, c.crop_scale, c.flip, c.randaug)
                if c.train else T.decode_eval(raw["image2"], c.image_size))
        if c.train and c.swap_pair:
          swap = tf.random.stateless_uniform([], seed + 2000) < 0.5
          img, img2 = tf.cond(swap, lambda: (img2, img), lambda: (img, img2))
          out["image"] = img
          out["text"] = tf.cond(swap, lambda: T.tf_swap_left_right(text), lambda: text)
        out["image2"], out["label"] = img2, raw["label"]
      return out
    return fn

  def _epoch_batches(self, epoch, start) -> tf.data.Dataset:
    """One epoch's batches from `start` on (epoch: a Python int or an int64 tensor)."""
    c = self.cfg
    ds = self._raw(epoch, start)
    ds = ds.map(self._process(epoch), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()  # undecodable images, missing files: counted by position gaps
    ds = ds.filter(lambda ex: ex["ok"])  # empty / non-UTF-8 texts: counted the same way
    # VQA answer lists differ in length: padded with '' and weight 0
    return ds.padded_batch(c.batch_size) if self.source.task == "vqa" else ds.batch(c.batch_size)

  def _streams_epochs(self) -> bool:
    """Training on a random-access source: every epoch from the current one on is one tf.data graph
    (built once, prefetching across epoch ends). Each epoch ends with an empty batch, the marker
    `__next__` closes the epoch on, as it does on the end of a one-epoch dataset. Rebuilding the
    graph every epoch cost about 0.3 s an epoch (tracing, and a cold prefetch buffer): most of the
    time of a small fine-tuning set's epoch. Streaming sources (shards) keep one graph per epoch:
    their file order is set in Python per epoch."""
    return self.cfg.train and self.source.random_access

  def dataset(self, epoch: int, start: int) -> tf.data.Dataset:
    c = self.cfg
    if self._streams_epochs():
      first = tf.constant(epoch, tf.int64)

      def one_epoch(e):
        batches = self._epoch_batches(e, tf.where(e == first, tf.constant(start, tf.int64), 0))
        end = tf.nest.map_structure(lambda spec: tf.zeros([0] + [d or 0 for d in spec.shape[1:]], spec.dtype),
                                    batches.element_spec)  # no rows (VQA's padded answers: no columns)
        return batches.concatenate(tf.data.Dataset.from_tensors(end))
      ds = tf.data.Dataset.range(epoch, 2 ** 62).flat_map(one_epoch)
    else:
      ds = self._epoch_batches(epoch, start)
    opts = tf.data.Options()
    opts.threading.private_threadpool_size = c.threads
    opts.threading.max_intra_op_parallelism = 1
    opts.deterministic = True
    return ds.with_options(opts).prefetch(c.prefetch)

  # ---- iteration ----
  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    c = self.cfg
    while True:
      if self._it is None:
        self._start, self._yielded = self.position, 0
        self._it = self.dataset(self.epoch, self.position).as_numpy_iterator()
      try:
        b = next(self._it)
      except StopIteration:
        self._end_epoch()
        if not c.train:
          raise
        continue
      pos = b["position"]
      n = len(pos)
      if n == 0:  # an epoch's end marker (see _streams_epochs): the next epoch follows in this stream
        self._end_epoch(next_in_stream=True)
        continue
      last = self._host_position(int(pos[-1]))
      if n < c.batch_size and c.train:  # the epoch's remainder: not a full batch, so dropped
        self._last_pos = last
        continue
      self.skipped += last + 1 - self.position - n
      self.position = last + 1
      self._yielded += n
      return self._finish(b)

  def _host_position(self, p: int) -> int:
    """This host's own count k of a random-access example's global position p (`lookup` inverted;
    k is what `position` and `_raw(start=)` count); streams count per host already."""
    if not self.source.random_access:
      return p
    if not self.cfg.train:
      return (p - self.host) // self.hosts
    b = self.cfg.batch_size
    return (p // (b * self.hosts)) * b + p % (b * self.hosts) - self.host * b

  def _end_epoch(self, next_in_stream: bool = False):
    if self.host_size is not None:
      last = max(getattr(self, "_last_pos", -1), self.position - 1)
      # examples after the last one delivered (bad ones and the dropped remainder); only bad
      # ones count, and bad ones are all that is missing when no remainder was seen.
      trailing = self.host_size - 1 - last
      self.skipped += max(trailing, 0)
    if self._yielded == 0 and self._start == 0:
      if getattr(self, "_last_pos", -1) >= 0 and self.cfg.train:
        raise DataError(f"source {self.source.name}: fewer good examples in epoch {self.epoch} than one batch "
                        f"of {self.cfg.batch_size} per host ({self.skipped} bad ones skipped)")
      raise DataError(f"source {self.source.name}: every example of epoch {self.epoch} was bad "
                      f"(undecodable image, missing file, or empty / non-UTF-8 text); "
                      f"{self.skipped} skipped so far")
    self._last_pos = -1
    self.epoch += 1 if self.cfg.train else 0
    self.position = 0 if self.cfg.train else self.position
    if next_in_stream:
      self._start, self._yielded = 0, 0
    else:
      self._it = None

  def _finish(self, b) -> dict:
    c, tok = self.cfg, self.tokenizer
    texts = [t.decode("utf-8") for t in b["text"]]
    ids, mask = tok(texts, max_length=c.text_length, padding="max_length")
    out = {"image": b["image"], "text_ids": ids, "text_mask": mask, "image_id": b["image_id"]}
    n = len(texts)
    if self.source.task == "vqa":
      out["question_ids"], out["question_mask"] = out.pop("text_ids"), out.pop("text_mask")
      ans = b["answers"]
      a_ids = np.zeros((n, c.max_answers, c.answer_length), np.int32)
      a_mask = np.zeros_like(a_ids)
      for i in range(n):
        for j, a in enumerate(ans[i][:c.max_answers]):
          if a:
            r_ids, r_mask = tok([a.decode("utf-8")], max_length=c.answer_length)
            a_ids[i, j], a_mask[i, j] = r_ids[0], r_mask[0]
      w = np.zeros((n, c.max_answers), np.float32)
      w[:, :b["weights"].shape[1]] = b["weights"][:, :c.max_answers]
      out.update(answer_ids=a_ids, answer_mask=a_mask, answer_weights=w)
    if self.source.task == "nlvr":
      out["image2"], out["label"] = b["image2"], b["label"]
    if not c.train:  # eval: pad the last batch to the static batch size, with a validity mask
      out["valid"] = np.ones(n, bool)
      if n < c.batch_size:
        out = {k: np.concatenate([v, np.zeros((c.batch_size - n,) + v.shape[1:], v.dtype)]) for k, v in out.items()}
    out["index"] = b["position"]  # global position of each example (-1: eval padding)
    if not c.train and n < c.batch_size:
      out["index"] = np.concatenate([b["position"], np.full(c.batch_size - n, -1)])
    return out

  def progress(self, state: Optional[dict] = None) -> float:
    """Epochs done as a float at `state` (default: now), e.g. a state saved with an earlier batch."""
    state = state or self.state()
    return state["epoch"] + (state["position"] / self.host_size if self.host_size else 0.0)


def make_pipeline(source_cfg, tokenizer, pipeline_cfg, **kw) -> InputPipeline:
  return InputPipeline(make_source(source_cfg), tokenizer, pipeline_cfg, **kw)


def batch_shapes(task: str, c: PipelineConfig | dict, n: int) -> dict:
  """{name: (shape, numpy dtype)} of the training batches of n examples that InputPipeline emits for
  a source of this task ("caption", "vqa" or "nlvr"; pretraining and retrieval read caption
  sources), without reading data: ahead-of-time compiles (blip_jax/train/aot.py) build their
  abstract batch from it. tests/test_data.py holds it against real batches of each task."""
  c = c if isinstance(c, PipelineConfig) else PipelineConfig.from_dict(c)
  s, length = c.image_size, c.text_length
  text = "question" if task == "vqa" else "text"
  out = {"image": ((n, s, s, 3), np.uint8), f"{text}_ids": ((n, length), np.int32),
         f"{text}_mask": ((n, length), np.int32), "image_id": ((n,), np.int64), "index": ((n,), np.int64)}
  if task == "vqa":
    a = (n, c.max_answers, c.answer_length)
    out.update(answer_ids=(a, np.int32), answer_mask=(a, np.int32), answer_weights=(a[:2], np.float32))
  if task == "nlvr":
    out.update(image2=((n, s, s, 3), np.uint8), label=((n,), np.int32))
  return out
