"""Image captioning (the paper §5.2; official train_caption.py, eval_nocaps.py): generation over an
annotation file, COCO caption metrics, and the per-epoch evaluation of caption fine-tuning.

The official evaluation: every image of the split is resized (bicubic, 384) and captioned with the
prompt "a picture of " (beam 3, max 20, min 5 tokens counting the prompt; NoCaps adds a repetition
penalty 1.1); the captions are written in the COCO results format [{"image_id", "caption"}] and
scored with pycocoevalcap against the split's references (blip_jax.metrics.caption).

Across hosts (blip_jax.parallel.run_sharded): process p captions batches p, p+P, ...; the captions
(as UTF-8 bytes) are gathered, so every process returns all of them; within a host a batch is
split over the local devices.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import html
import io
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image

from blip_jax import fs, objectives
from blip_jax.api import require
from blip_jax.data.eval_sets import CaptionSet, read_caption_set  # noqa: F401 (the task's reader, re-exported)
from blip_jax.distributed import bytes_to_texts, texts_to_bytes
from blip_jax.metrics.caption import format_metrics as fm
from blip_jax.metrics.caption import score_captions
from blip_jax.models.generate import LENGTH_NORMALIZATIONS
from blip_jax.parallel import DataParallel, chunks, pad_rows, run_sharded
from blip_jax.preprocess import preprocess, to_pil
from blip_jax.tasks import Task

# The official settings (train_caption.py / configs/caption_coco.yaml, eval_nocaps.py / nocaps.yaml)
DECODING = {
    "coco": dict(num_beams=3, max_length=20, min_length=5, repetition_penalty=1.0, length_normalization="official"),
    "nocaps": dict(num_beams=3, max_length=20, min_length=5, repetition_penalty=1.1, length_normalization="official"),
}
PROMPT = "a picture of "
_CAPTION_BYTES = 1024  # a caption as gathered across hosts (20 tokens are far shorter)


# ---- generation ---------------------------------------------------------------------------------
def generate_captions(model, paths: list, *, batch_size: int = 32, prompt: str = PROMPT, progress: bool = True,
                      workers: int = 8, devices=None, **decoding):
  """Captions of `paths` (host p: batches p, p+P, ...; all gathered). Returns (captions [str | None],
  {index: error} of the undecodable images, {"encode_s", "decode_s", "images"} of this process)."""
  check_model(model)
  dp = DataParallel(devices)
  model.params = dp.put_params(model.params)
  size = model.config.vision.image_size
  rows = dp.round_batch(min(batch_size, max(-(-len(paths) // jax.process_count()), 1)))
  stats = {"encode_s": 0.0, "decode_s": 0.0, "images": 0}

  def predict(batch, decoded):
    good = [(j, x) for j, (_, x, _) in enumerate(decoded) if x is not None]
    if not good:
      return None
    t0 = time.time()
    embeds = model.encode_image(dp.put_batch(pad_rows(np.stack([x for _, x in good]), rows)))
    embeds.block_until_ready()
    t1 = time.time()
    texts = model.generate_from_embeds(embeds, prompt, **decoding)
    stats["encode_s"] += t1 - t0
    stats["decode_s"] += time.time() - t1
    stats["images"] += len(good)
    row = [None] * rows
    for (j, _), t in zip(good, texts):
      row[j] = t
    return texts_to_bytes(row, _CAPTION_BYTES)

  batches = chunks(len(paths), rows)
  every, bad = run_sharded(batches, predict, (rows, _CAPTION_BYTES + 1), np.uint8,
                           files=lambda b: [paths[i] for i in b], decode=lambda p: preprocess([p], size)[0],
                           desc="captioning", unit="img", progress=progress, workers=workers)
  captions = [None] * len(paths)
  errors = {}
  for b, batch in enumerate(batches):
    for i, t in zip(batch, bytes_to_texts(every[b])):
      captions[i] = t
      if paths[i] in bad:
        errors[i] = bad[paths[i]]
  return captions, errors, stats


def check_model(model, name: str = ""):
  require(model, "captioning", kinds=("caption", "pretrain"), name=name,
          hint="a caption decoder: a caption or pretraining checkpoint")


# ---- the evaluation -----------------------------------------------------------------------------
@dataclasses.dataclass
class CaptionResult:
  results: list  # [{"image_id", "caption"}] of the captioned images (the COCO results format)
  metrics: dict  # {"Bleu_4": ..., "CIDEr": ...} (pycocoevalcap's fractions); {} without references
  per_image: dict  # {metric: {image_id: value}}
  skipped_metrics: dict  # {metric: reason}
  skipped_images: list  # [(path, error)]
  captions: dict  # {image_id: caption}
  cset: CaptionSet
  stats: dict


def evaluate_captions(model, cset: CaptionSet, *, batch_size: int = 32, prompt: str = PROMPT, spice: str = "auto",
                      progress: bool = True, score: bool = True, **decoding) -> CaptionResult:
  """Captions every image of `cset` (official decoding unless overridden) and scores them."""
  decoding = {**DECODING["coco"], **decoding}
  t0 = time.time()
  caps, errors, stats = generate_captions(model, cset.paths, batch_size=batch_size, prompt=prompt,
                                          progress=progress, **decoding)
  stats["generate_s"] = time.time() - t0
  captions = {i: c for i, c in zip(cset.image_ids, caps) if c is not None}
  results = [{"image_id": i, "caption": c} for i, c in captions.items()]
  skipped_images = [(cset.paths[i], errors.get(i, "not decodable (on another host)"))
                    for i, c in enumerate(caps) if c is None]
  metrics, per, skipped = {}, {}, {}
  if not captions:
    raise ValueError(f"no image could be captioned: {len(skipped_images)} of {len(cset.paths)} undecodable")
  if cset.references is None:
    skipped["all"] = "no references: the annotations have no captions and no --gt was given"
  elif score:
    t0 = time.time()
    try:
      with contextlib.redirect_stdout(sys.stderr):  # pycocoevalcap prints its progress
        r = score_captions(cset.references, captions, spice=spice)
      metrics, per, skipped = r["metrics"], r["per_image"], r["skipped"]
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:  # no Java, a scorer's Java died
      skipped["all"] = f"scoring failed ({type(e).__name__}: {e}); the captions are written"
    stats["metrics_s"] = time.time() - t0
  stats["decoding"] = dict(decoding, prompt=prompt)
  return CaptionResult(results, metrics, per, skipped, skipped_images, captions, cset, stats)


def write_outputs(result: CaptionResult, out_dir: str, *, html_page: bool = False, thumbnail: int = 160) -> None:
  """DIR/captions.json (COCO results format; NoCaps: the evaluation server's file), DIR/metrics.json
  and, with html_page, DIR/captions.html. DIR may be a URL; each file appears whole."""
  fs.write_json(fs.join(out_dir, "captions.json"), result.results)
  fs.write_json(fs.join(out_dir, "metrics.json"), {
      **result.metrics, "skipped_metrics": result.skipped_metrics,
      "images": len(result.cset.paths), "captioned": len(result.results),
      "skipped_images": [{"path": p, "error": e} for p, e in result.skipped_images],
      "stats": result.stats}, indent=2)
  if html_page:
    fs.write_text(fs.join(out_dir, "captions.html"), render_html(result, thumbnail))


def render_html(result: CaptionResult, thumbnail: int = 160) -> str:
  """A page of thumbnails with the generated and reference captions and per-image CIDEr, worst first
  (images without a score last)."""


  cider = result.per_image.get("CIDEr", {})
  order = sorted(result.captions, key=lambda i: (i not in cider, cider.get(i, 0.0)))
  path_of = dict(zip(result.cset.image_ids, result.cset.paths))
  rows = []
  for i in order:
    try:
      img = to_pil(path_of[i])
      img.thumbnail((thumbnail, thumbnail), Image.BICUBIC)
      buf = io.BytesIO()
      img.convert("RGB").save(buf, "JPEG", quality=85)
      src = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except Exception:  # noqa: BLE001  (a thumbnail that fails leaves the row without a picture)
      src = ""
    refs = (result.cset.references or {}).get(i, [])
    score = f"{100 * cider[i]:.1f}" if i in cider else "-"
    rows.append(f'<tr><td><img src="{src}" alt="{html.escape(str(i))}"></td><td>{html.escape(str(i))}</td>'
                f"<td>{score}</td><td><b>{html.escape(result.captions[i])}</b></td>"
                f"<td>{'<br>'.join(html.escape(r) for r in refs)}</td></tr>")
  head = "  ".join(f"{k} {100 * v:.1f}" for k, v in result.metrics.items())
  return ("<!doctype html><meta charset='utf-8'><title>blip_jax captions</title>"
          "<style>body{font-family:sans-serif}td{vertical-align:top;padding:4px;border-bottom:1px solid #ddd}"
          "</style>"
          f"<h1>Captions ({len(order)} images)</h1><p>{html.escape(head)}</p>"
          "<p>Sorted by per-image CIDEr, worst first.</p><table><tr><th>image</th><th>id</th><th>CIDEr</th>"
          "<th>generated</th><th>references</th></tr>" + "".join(rows) + "</table>\n")


def format_metrics(result: CaptionResult) -> str:
  out = fm(result.metrics) or "no metrics"
  for k, why in result.skipped_metrics.items():
    out += f"\n{k} skipped: {why}"
  return out


# ---- fine-tuning (the shared trainer calls these) -----------------------------------------------
def check_training_config(c):
  """Eval splits readable (and their references complete), the decoding settings valid, before
  any compute."""
  if c.eval.length_normalization not in LENGTH_NORMALIZATIONS:
    raise ValueError(f"eval.length_normalization must be one of {LENGTH_NORMALIZATIONS}")
  if c.eval.spice not in ("auto", "download", "off"):
    raise ValueError("eval.spice must be auto, download or off")
  for split, path in c.eval.annotations.items():
    if path:
      cs = read_caption_set(path, c.eval.image_root, c.eval.gt.get(split, ""))
      if cs.references is None:
        raise ValueError(f"eval.annotations.{split} ({path}) has no captions to score against: give eval.gt.{split}")


def evaluate_splits(c, model) -> dict:
  """Captions and metrics of each eval split: {"val/CIDEr": .., "val/CIDEr+Bleu_4": .., ...}, and
  TensorBoard samples (the first eval.samples images of the first split with their captions)."""
  out, samples = {}, {}
  decoding = dict(num_beams=c.eval.num_beams, max_length=c.eval.max_length, min_length=c.eval.min_length,
                  repetition_penalty=c.eval.repetition_penalty, length_normalization=c.eval.length_normalization)
  for split, path in c.eval.annotations.items():
    if not path:
      continue
    cs = read_caption_set(path, c.eval.image_root, c.eval.gt.get(split, ""))
    r = evaluate_captions(model, cs, batch_size=c.eval.batch_size, prompt=c.data.pipeline.prompt,
                          spice=c.eval.spice, progress=False, **decoding)
    out.update({f"{split}/{k}": v for k, v in r.metrics.items()})
    if "CIDEr" in r.metrics:
      out[f"{split}/CIDEr+Bleu_4"] = r.metrics["CIDEr"] + r.metrics["Bleu_4"]  # official selection
    else:  # no best model is picked from this evaluation; training goes on
      print(f"warning: {split} not scored: {r.skipped_metrics}", file=sys.stderr)
    if not samples and c.eval.samples:
      ids = [i for i in cs.image_ids if i in r.captions][:c.eval.samples]
      path_of = dict(zip(cs.image_ids, cs.paths))

      imgs = np.stack([np.asarray(to_pil(path_of[i]).convert("RGB").resize((128, 128), Image.BICUBIC)) for i in ids])
      samples[f"{split}/captions"] = (imgs, [f"{i}: {r.captions[i]}  (reference: {cs.references[i][0]})" for i in ids])
  if samples:
    out["samples"] = samples
  return out


# official train_caption.py: the best epoch by val CIDEr + BLEU-4
TASK = Task("caption", "caption", objectives.caption_lm, check_config=check_training_config,
            evaluate=evaluate_splits, select="val/CIDEr+Bleu_4", shown=("CIDEr", "Bleu_4"))
