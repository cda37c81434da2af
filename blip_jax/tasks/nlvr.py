"""NLVR2 (the paper §5.4; official models/blip_nlvr.py, data/nlvr_dataset.py): does a sentence
hold for a pair of images. Predicting an annotation file, the accuracy, and the per-epoch
evaluation of NLVR2 fine-tuning.

Annotations (BLIP's nlvr_{train,dev,test}.json): [{"images": [left, right], "sentence",
"label": "True" | "False"}]; NLVR2's own "identifier" is kept when present, else an example is
numbered by its place in the file. Sentences go through pre_caption(s, 40). The official
evaluation also swaps the pair at random (its dataset class augments every split); here the pair
is read in the file's order, so a run is deterministic.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time

import numpy as np

from blip_jax import fs, objectives
from blip_jax.api import require
from blip_jax.data.eval_sets import Pair, read_pairs  # noqa: F401 (the task's reader, re-exported)
from blip_jax.parallel import DataParallel, chunks, run_sharded
from blip_jax.preprocess import preprocess
from blip_jax.tasks import Task


def _bucket(length: int) -> int:
  """Token rows padded to a multiple of 16 (few compiled shapes; the official pads to the longest
  sentence of a batch and truncates nothing, neither does this)."""
  return max(16, -(-length // 16) * 16)


def predict(model, pairs: list, *, batch_size: int = 64, progress: bool = True, workers: int = 8, devices=None):
  """Logits of every pair. Returns ({pair index: (logit_false, logit_true)}, {image path: error} of
  undecodable images, stats). Batches are split over local devices and hosts (host p takes
  batches p, p+P, ...); every host returns every prediction."""
  check_model(model)
  dp = DataParallel(devices)
  model.params = dp.put_params(model.params)
  size = model.config.vision.image_size
  bs = dp.round_batch(batch_size)
  stats = {"pairs": 0, "model_s": 0.0}

  def predict_batch(rows, decoded):
    bad = {p for p, _, e in decoded if e is not None}
    keep = [j for j, i in enumerate(rows) if not any(p in bad for p in pairs[i].paths)]
    if not keep:
      return None
    t0 = time.time()
    pix = np.zeros((2, bs, size, size, 3), np.float32)
    for j in keep:
      pix[0, j], pix[1, j] = decoded[2 * j][1], decoded[2 * j + 1][1]
    sentences = [pairs[rows[j]].sentence if j in keep else "" for j in range(bs)]
    longest = max(len(model.tokenizer.encode(s)) + 2 for s in sentences)
    ids, mask = model.tokenizer(sentences, max_length=_bucket(longest), padding="max_length", truncation=False)
    logits = np.asarray(model.nlvr_logits(dp.put_batch(pix[0]), dp.put_batch(pix[1]), dp.put_batch(ids),
                                          dp.put_batch(mask)))
    stats["model_s"] += time.time() - t0
    stats["pairs"] += len(keep)
    out = np.zeros((bs, 3), np.float32)  # logit false, logit true, 1 where predicted
    out[keep, :2], out[keep, 2] = logits[keep], 1.0
    return out

  batches = chunks(len(pairs), bs)
  every, errors = run_sharded(batches, predict_batch, (bs, 3), np.float32,
                              files=lambda rows: [p for i in rows for p in pairs[i].paths],
                              decode=lambda p: preprocess([p], size)[0], desc="nlvr2", unit="pair",
                              progress=progress, workers=workers)
  out = {}
  for b, rows in enumerate(batches):
    for j, i in enumerate(rows):
      if every[b, j, 2] > 0:
        out[i] = (float(every[b, j, 0]), float(every[b, j, 1]))
  for i, p in enumerate(pairs):  # every host reports every undecodable image
    if i not in out and not any(x in errors for x in p.paths):
      errors.update({x: "not decodable (on another host)" for x in p.paths})
  return out, errors, stats


def check_model(model, name: str = ""):
  require(model, "NLVR2", kinds=("nlvr",), name=name, hint="an NLVR2 checkpoint (model_base_nlvr.pth, or fine-tune "
          "one: configs/nlvr.py)")


@dataclasses.dataclass
class NLVRResult:
  predictions: list  # [{"example_id", "prediction": "True" | "False", "p_true", ["label"]}]
  metrics: dict  # {"accuracy" (percent), "scored", "correct"} ({} without labels)
  skipped: list  # [(example_id, reason)]
  stats: dict


def evaluate_nlvr(model, pairs: list, *, skipped=(), batch_size: int = 64, progress: bool = True) -> NLVRResult:
  """Predicts every pair and, where the pairs carry labels, the accuracy (percent) over the
  predicted ones (pairs with an undecodable image are listed as skipped, not scored)."""
  t0 = time.time()
  logits, errors, stats = predict(model, pairs, batch_size=batch_size, progress=progress)
  stats["total_s"] = time.time() - t0
  preds, correct, scored = [], 0, 0
  for i, (l0, l1) in sorted(logits.items()):
    p = pairs[i]
    row = {"example_id": p.example_id, "prediction": "True" if l1 > l0 else "False",
           "p_true": float(1.0 / (1.0 + np.exp(l0 - l1)))}
    if p.label is not None:
      row["label"] = "True" if p.label else "False"
      scored += 1
      correct += int((l1 > l0) == bool(p.label))
    preds.append(row)
  why = lambda p: "image not decodable: " + "; ".join(errors[x] for x in p.paths if x in errors)
  skipped = list(skipped) + [(p.example_id, why(p))
                             for i, p in enumerate(pairs) if i not in logits]
  metrics = {"accuracy": 100.0 * correct / scored, "scored": scored, "correct": correct} if scored else {}
  return NLVRResult(preds, metrics, skipped, stats)


def write_outputs(result: NLVRResult, out_dir: str) -> None:
  """DIR/predictions.json and DIR/metrics.json; each file appears whole."""
  fs.write_json(fs.join(out_dir, "predictions.json"), result.predictions, indent=1)
  fs.write_json(fs.join(out_dir, "metrics.json"), {
      **result.metrics, "predicted": len(result.predictions),
      "skipped": [{"example_id": e, "reason": r} for e, r in result.skipped], "stats": result.stats}, indent=2)


def format_metrics(result: NLVRResult) -> str:
  m, parts = result.metrics, []
  if m:
    parts.append(f"accuracy {m['accuracy']:.2f} ({m['correct']} of {m['scored']} pairs)")
  if result.skipped:
    parts.append(f"{len(result.skipped)} pairs skipped (e.g. {result.skipped[0][1]})")
  return "\n".join(parts) or "no labels: nothing scored"


# ---- fine-tuning (the shared trainer calls these) -----------------------------------------------
def check_training_config(c):
  """The training annotations are NLVR2 files; eval splits readable and labelled, before any compute."""
  if c.data.source.kind == "json" and c.data.source.task != "nlvr":
    raise ValueError("data.source.task must be 'nlvr' for NLVR2 fine-tuning")
  for split, path in c.eval.annotations.items():
    if path:
      pairs, _ = read_pairs(path, c.eval.image_root)
      if not any(p.label is not None for p in pairs):
        raise ValueError(f"eval.annotations.{split} ({path}) has no labels to score against")


def evaluate_splits(c, model) -> dict:
  """Accuracy (percent) of each eval split: {"val/accuracy": .., "test/accuracy": ..}; the official
  keeps the epoch with the best val accuracy and reports its test accuracy."""
  out = {}
  for split, path in c.eval.annotations.items():
    if path:
      pairs, skipped = read_pairs(path, c.eval.image_root)
      r = evaluate_nlvr(model, pairs, skipped=skipped, batch_size=c.eval.batch_size, progress=False)
      out[f"{split}/accuracy"] = r.metrics.get("accuracy", 0.0)
  return out


# official train_nlvr.py: the best epoch by val accuracy
TASK = Task("nlvr", "nlvr", objectives.nlvr_pair, log_terms="(acc {nlvr_acc:.3f})", check_config=check_training_config,
            evaluate=evaluate_splits, select="val/accuracy", shown=("accuracy",))


# ---- demo data ----------------------------------------------------------------------------------
def caption_pairs(entries: list, captions, seed: int = 0, repeats: int = 1) -> list:
  """NLVR2-style pairs from a caption set ([{"image", "caption": [...]}], e.g. COCO Karpathy), for
  demos and tests: for each image and each caption index in `captions`, `repeats` times, a true
  pair (the image and another one, in random order, with that caption) and a false pair (two
  other images with it). Needs at least 3 images."""
  if len(entries) < 3:
    raise ValueError("caption_pairs needs at least 3 images")
  rng = random.Random(seed)
  out = []
  for i, e in enumerate(entries):
    others = [j for j in range(len(entries)) if j != i]
    for c in [c for c in captions for _ in range(repeats)]:
      j = rng.choice(others)
      pair = [e["image"], entries[j]["image"]]
      rng.shuffle(pair)
      out.append({"images": pair, "sentence": e["caption"][c], "label": "True"})
      a, b = rng.sample(others, 2)
      out.append({"images": [entries[a]["image"], entries[b]["image"]], "sentence": e["caption"][c], "label": "False"})
  return out


def demo_pairs(entries: list, images: int = 16, dev_size: int = 512) -> tuple[list, list]:
  """(train, dev) of the NLVR2 demo and its test: the first `images` images; train: captions 0-3,
  each 8 times with new partners; dev: `dev_size` new pairs of the same sentences, half true, none
  whose (sentence, image pair) is in train (so a memorised pair scores nothing)."""
  entries = entries[:images]
  train = caption_pairs(entries, range(4), seed=0, repeats=8)
  seen = {(p["sentence"], frozenset(p["images"])) for p in train}
  new = [p for p in caption_pairs(entries, range(4), seed=7, repeats=16)
         if (p["sentence"], frozenset(p["images"])) not in seen]
  half = dev_size // 2
  dev = [p for p in new if p["label"] == "True"][:half] + [p for p in new if p["label"] == "False"][:half]
  if len(dev) != 2 * half:
    raise ValueError(f"{images} images give only {len(dev)} new balanced pairs; ask for fewer")
  return train, dev


def retrieval_demo_annotations(entries: list, images: int = 32) -> tuple[list, list]:
  """(train, held) for the retrieval run the NLVR2 demo starts from: the first `images` images,
  captions 0-3 to train on (one entry each, with its image id), the 5th held out for val."""
  entries = entries[:images]
  train = [{"image": e["image"], "caption": c, "image_id": f"coco_{e['image_id']}"} for e in entries
           for c in e["caption"][:4]]
  return train, [{"image": e["image"], "caption": [e["caption"][4]]} for e in entries]


def main(argv=None):
  """python -m blip_jax.tasks.nlvr --out DIR: the demo's files from COCO-mini: train.json and
  dev.json (see demo_pairs), retrieval_train.json and retrieval_held.json for the retrieval run it
  starts from (see retrieval_demo_annotations)."""
  p = argparse.ArgumentParser(description=main.__doc__)
  p.add_argument("--coco", default="../shared/data/coco_karpathy_mini/captions_karpathy_val.json")
  p.add_argument("--images", type=int, default=16)
  p.add_argument("--out", required=True)
  a = p.parse_args(argv)
  train, dev = demo_pairs(json.loads(fs.read_text(a.coco)), a.images)
  fs.makedirs(a.out)
  fs.write_json(fs.join(a.out, "train.json"), train)
  fs.write_json(fs.join(a.out, "dev.json"), dev)
  r_train, r_held = retrieval_demo_annotations(json.loads(fs.read_text(a.coco)))
  fs.write_json(fs.join(a.out, "retrieval_train.json"), r_train)
  fs.write_json(fs.join(a.out, "retrieval_held.json"), r_held)
  print(f"wrote {a.out}/train.json ({len(train)} pairs), dev.json ({len(dev)} pairs), retrieval_train.json, "
        "retrieval_held.json")


if __name__ == "__main__":
  main()
