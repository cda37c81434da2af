"""CapFilt (BLIP paper §3.3): bootstrap a dataset with a captioner and a filter.

For every image of a source, the captioner (an image-grounded decoder, e.g. the COCO-finetuned
caption model) writes K synthetic captions by nucleus sampling; the filter (an image-grounded
encoder, e.g. the COCO-finetuned retrieval model) scores the image's original texts and each
synthetic caption with its ITM head, and a text is dropped when its match probability is below the
threshold (0.5: the ITM head's "unmatched" decision). Kept original and kept synthetic texts are
written as separate image-text pairs, in the input's format:

- BLIP JSON in  -> shards/NNNNN.json, merged into bootstrapped.json (same image paths and root);
- TFRecord in   -> shards/NNNNN.tfrecord, one output shard per input file, one record per pair;
- webdataset .tar in (img2dataset's default) -> shards/NNNNN.tar, the same way, one sample per pair.

Work is split in shards (JSON: `per_shard` images; TFRecord, tar: one input file), dealt round
robin to the processes; each process splits its batches over its own devices. A shard is written
to temporary names and committed by renaming; its stats file, renamed last, marks it done, so a
killed run resumes with no shard lost or done twice. Sampling draws from a key made of the seed,
the shard and the batch, so a resumed run writes exactly what an uninterrupted one writes.
At the end process 0 writes report.json and report.png (ITM score histograms).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import sys

import jax
import numpy as np
from tqdm import tqdm

from blip_jax import fs
from blip_jax.data.capfilt_io import JsonInput, TarInput, TFRecordInput, make_input  # noqa: F401  (capfilt.X)
from blip_jax.distributed import sync_hosts
from blip_jax.models.blip import Blip
from blip_jax.parallel import DataParallel, map_ahead, pad_rows
from blip_jax.preprocess import ImageDecodeError, preprocess, to_pil
from blip_jax.tokenizers import pre_caption

BINS = 20
KINDS = ("web", "synthetic")
EXAMPLES = 8  # synthetic captions a shard shows in the report (image, caption, ITM p(match))


@dataclasses.dataclass(frozen=True)
class CapFiltSettings:
  """Everything that decides the output (checked on resume). Decoding defaults are the official
  BLIP_Decoder.generate(sample=True) settings: top-p 0.9 (with transformers 4.15's default top-k 50),
  repetition penalty 1.1, max 30 / min 10 tokens counting the 4 prompt tokens."""
  threshold: float = 0.5
  num_captions: int = 1  # 0: no captioner, the filter alone; threshold 0: no filter, every text kept
  num_beams: int = 1  # > 1: beam search instead of sampling (the paper's comparison; top_p unused)
  top_p: float = 0.9
  top_k: int = 50  # transformers 4.15's default, which the official nucleus sampling inherits
  temperature: float = 1.0
  max_length: int = 30
  min_length: int = 10
  repetition_penalty: float = 1.1
  prompt: str = "a picture of "
  seed: int = 0
  batch_size: int = 16
  max_words: int = 30
  text_length: int = 35


# ---- the filter -------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0,))
def itm_match_prob(cfg, params, image_embeds, image_index, ids, mask):
  """p(match) of text j with image image_index[j]: the ITM head's 2-way softmax."""
  logits = Blip(cfg).apply({"params": params}, image_embeds[image_index], ids, mask, method=Blip.itm_logits)
  return jax.nn.softmax(logits, axis=-1)[:, 1]


class CapFilt:
  def __init__(self, captioner, filt, settings: CapFiltSettings, devices=None, workers: int = 8):
    if captioner.config.kind not in ("caption", "pretrain"):
      raise ValueError(f"the captioner must have a caption decoder; got a {captioner.config.kind} model")
    if not filt.config.has_itc:
      raise ValueError(f"the filter must have an ITM head (a retrieval or pretraining model); got {filt.config.kind}")
    for name, m in (("captioner", captioner), ("filter", filt)):
      if m.tokenizer is None:
        raise ValueError(f"the {name} checkpoint has no tokenizer: pass a vocab")
    self.captioner, self.filter, self.s, self.workers = captioner, filt, settings, workers
    self.dp = DataParallel(devices)
    self.rows = self.dp.round_batch(settings.batch_size)
    captioner.params = self.dp.put_params(captioner.params)
    filt.params = self.dp.put_params(filt.params)

  def _seed(self, shard: int, batch: int) -> int:
    return (self.s.seed * 1_000_003 + shard * 10_007 + batch) % (2 ** 31)

  def _batch(self, shard: int, index: int, items, pix_c, pix_f):
    """Captions and scores one batch of images -> ([(item, text, kind, score)], blank texts skipped)."""
    s, n = self.s, len(items)
    empty = 0
    if s.num_captions == 0:  # the filter alone (Table 1's "F" row): web texts only
      synthetic = [[] for _ in range(n)]
    else:
      synthetic = self.captioner.generate(
          self.dp.put_batch(pad_rows(pix_c, self.rows)), s.prompt, s.max_length, s.min_length,
          num_beams=s.num_beams, top_p=None if s.num_beams > 1 else s.top_p,
          top_k=s.top_k, temperature=s.temperature, repetition_penalty=s.repetition_penalty,
          num_captions=s.num_captions, seed=self._seed(shard, index))
      synthetic = [c if s.num_captions > 1 else [c] for c in synthetic[:n]]
    candidates = []  # (image row, item, text as written, kind, text as scored)
    for i, item in enumerate(items):
      for kind, texts in (("web", item["texts"]), ("synthetic", synthetic[i])):
        for t in texts:
          clean = pre_caption(t, s.max_words) if isinstance(t, str) else ""
          if not clean:
            empty += 1
            continue
          candidates.append((i, item, t, kind, clean))
    probs = self._score(pix_f, candidates)
    return [(item, t, kind, p) for (_, item, t, kind, _), p in zip(candidates, probs)], empty

  def _score(self, pixels, candidates):
    if not candidates:
      return []
    embeds = self.filter.encode_image(self.dp.put_batch(pad_rows(pixels, self.rows)))
    chunk = self.rows * (self.s.num_captions + 1)
    out = []
    for start in range(0, len(candidates), chunk):
      part = candidates[start:start + chunk]
      ids, mask = self.filter.tokenize([c[4] for c in part], max_length=self.s.text_length)
      index = np.asarray([c[0] for c in part], np.int32)
      args = [self.dp.put_batch(pad_rows(np.asarray(a), chunk)) for a in (index, ids, mask)]
      out += list(np.asarray(itm_match_prob(self.filter.config, self.filter.params, embeds, *args))[:len(part)])
    return out

  def _prepare(self, source, record):
    """(item, (captioner pixels, filter pixels) or None, error or None): decoded once, in a thread."""
    item, data = record
    if isinstance(data, str):
      return item, None, data
    try:
      image = to_pil(data)
    except ImageDecodeError as e:
      return item, None, f"{source.describe(item)}: {str(e).split(': ', 1)[-1]}"
    size_c, size_f = self.captioner.config.vision.image_size, self.filter.config.vision.image_size
    pix_c = preprocess([image], size_c)[0]
    return item, (pix_c, pix_c if size_f == size_c else preprocess([image], size_f)[0]), None

  def run_shard(self, source, shard: int, on_images=lambda n: None):
    """All pairs (kept or not) of a shard, and its stats. Images decode in threads, ahead of the
    devices."""
    stats = {"images": 0, "images_undecodable": 0, "texts_empty": 0}
    scored, errors = [], []
    records = source.read(shard)
    chunks = (records[r:r + self.rows] for r in range(0, len(records), self.rows))
    prepare = functools.partial(self._prepare, source)
    for index, prepared in enumerate(map_ahead(prepare, chunks, workers=self.workers)):
      errors += [e for _, _, e in prepared if e is not None]
      ok = [(item, pix) for item, pix, _ in prepared if pix is not None]
      if ok:
        pix_c = np.stack([p[0] for _, p in ok])
        pix_f = np.stack([p[1] for _, p in ok])
        pairs, empty = self._batch(shard, index, [item for item, _ in ok], pix_c, pix_f)
        scored += pairs
        stats["texts_empty"] += empty
      stats["images"] += len(prepared)
      on_images(len(prepared))
    stats["images_undecodable"] = len(errors)
    stats["errors"] = errors[:20]
    return scored, stats


def _shard_stats(scored, stats, threshold):
  for kind in KINDS:
    scores = np.asarray([p for _, _, k, p in scored if k == kind], np.float64)
    kept = int((scores >= threshold).sum())
    stats[f"{kind}_texts"] = len(scores)
    stats[f"{kind}_kept"] = kept
    stats[f"{kind}_dropped"] = len(scores) - kept
    stats[f"{kind}_score_sum"] = float(scores.sum())
    stats[f"{kind}_histogram"] = np.histogram(scores, bins=BINS, range=(0.0, 1.0))[0].tolist()
  return stats


def run(captioner, filt, source, out_dir: str, settings: CapFiltSettings, progress: bool = True) -> dict:
  """Runs (or resumes) CapFilt over `source` (JsonInput | TFRecordInput | TarInput) into out_dir."""
  shard_dir = fs.join(out_dir, "shards")
  check_settings(out_dir, source, settings)
  cf = CapFilt(captioner, filt, settings)
  mine = range(jax.process_index(), source.num_shards, jax.process_count())
  todo = [i for i in mine if not fs.exists(_stats_path(shard_dir, i))]
  counts = [source.count(i) for i in todo]
  total = None if None in counts else sum(counts)
  with tqdm(total=total, unit="img", desc="capfilt", file=sys.stderr, disable=not progress) as bar:
    bar.set_postfix(shards_done=f"{len(mine) - len(todo)}/{len(mine)}")
    for done, i in enumerate(todo):
      scored, stats = cf.run_shard(source, i, on_images=bar.update)
      kept = [x for x in scored if x[3] >= settings.threshold]
      data = fs.join(shard_dir, f"{i:05d}{source.ext}")
      tmp = fs.temp_sibling(data)
      source.write(tmp, kept)
      fs.publish(tmp, data)
      stats = _shard_stats(scored, stats, settings.threshold)
      # what the captioner wrote, kept or not: the first few of the shard, to read in the report
      stats["synthetic_examples"] = [[source.describe(item), text, round(float(p), 4)]
                                     for item, text, kind, p in scored if kind == "synthetic"][:EXAMPLES]
      stats["process"] = jax.process_index()
      fs.write_json(_stats_path(shard_dir, i), stats, indent=None)  # the shard is done
      bar.set_postfix(shards_done=f"{len(mine) - len(todo) + done + 1}/{len(mine)}")
  sync_hosts("capfilt shards done")
  if jax.process_index() != 0:
    return {}
  return finish(out_dir, source, settings)


def _stats_path(shard_dir, i):
  return fs.join(shard_dir, f"{i:05d}.stats.json")


def check_settings(out_dir: str, source, settings: CapFiltSettings):
  """Records the settings of a new run; refuses to resume a run made with other settings (its
  shards would mix two datasets). Cheap: call it before loading the models."""
  fs.makedirs(fs.join(out_dir, "shards"))
  settings = {**dataclasses.asdict(settings), "format": source.ext, "input_shards": source.num_shards,
              "images_per_shard": getattr(source, "per_shard", None),  # JSON input
              "batch_rows": DataParallel().round_batch(settings.batch_size)}  # the rows decide the samples
  fs.resume_settings(fs.join(out_dir, "capfilt_settings.json"), settings, "a CapFilt run",
                     write=jax.process_index() == 0)


def finish(out_dir: str, source, settings: CapFiltSettings) -> dict:
  """Sums the shard stats into report.json + report.png; for JSON input merges bootstrapped.json."""
  shard_dir = fs.join(out_dir, "shards")
  stats = [fs.read_json(_stats_path(shard_dir, i)) for i in range(source.num_shards)]
  total = lambda k: sum(s[k] for s in stats)
  report = {"settings": dataclasses.asdict(settings), "shards": source.num_shards,
            "images": total("images"), "images_undecodable": total("images_undecodable"),
            "texts_empty_skipped": total("texts_empty"),
            "undecodable_examples": [e for s in stats for e in s["errors"]][:20],
            "synthetic_examples": [e for s in stats for e in s.get("synthetic_examples", [])][:20]}
  for kind in KINDS:
    n = total(f"{kind}_texts")
    report[kind] = {"texts": n, "kept": total(f"{kind}_kept"), "dropped": total(f"{kind}_dropped"),
                    "kept_fraction": total(f"{kind}_kept") / n if n else None,
                    "mean_itm": total(f"{kind}_score_sum") / n if n else None,
                    "histogram": np.sum([s[f"{kind}_histogram"] for s in stats], axis=0).tolist()}
  report["histogram_bins"] = np.linspace(0, 1, BINS + 1).round(3).tolist()
  report["pairs_written"] = report["web"]["kept"] + report["synthetic"]["kept"]
  if source.ext == ".json":
    rows = []
    for i in range(source.num_shards):
      rows += fs.read_json(fs.join(shard_dir, f"{i:05d}.json"))
    out = fs.write_text(fs.join(out_dir, "bootstrapped.json"), json.dumps(rows))
    root = str(fs.path(source.root)) if source.root else ""
    report["output"] = {"kind": "json", "annotations": [out], "image_root": root}
  else:  # the input's shard format: what pretraining reads (data.source.kind)
    kind = "webdataset" if source.ext == ".tar" else "tfrecord"
    report["output"] = {"kind": kind, "files": fs.join(shard_dir, f"*{source.ext}")}
  fs.write_json(fs.join(out_dir, "report.json"), report)
  histogram_png(report, settings.threshold, fs.join(out_dir, "report.png"))
  return report


def histogram_png(report: dict, threshold: float, path: str):
  """Two histograms (web, synthetic) of the filter's ITM p(match), kept bins green, dropped red,
  the threshold marked (matplotlib)."""
  import matplotlib  # noqa: PLC0415  (slow to import: only here)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  edges = np.asarray(report["histogram_bins"])
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=False)
  for ax, kind in zip(axes, KINDS):
    counts = report[kind]["histogram"]
    colours = ["#3a7" if hi > threshold else "#c44" for hi in edges[1:]]
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=colours)
    ax.axvline(threshold, color="blue", linewidth=1.5)
    ax.set_title(f"{kind}: {report[kind]['kept']} kept / {report[kind]['texts']} texts", fontsize=10)
    ax.set_xlabel(f"ITM p(match); threshold {threshold:g}")
    ax.set_xlim(0, 1)
  axes[0].set_ylabel("texts")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  fs.write_bytes(path, buf.getvalue())
