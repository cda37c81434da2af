"""NLVR2 (blip_facts §5.4, §6.4): does a sentence hold for a pair of images. Predicting an
annotation file, the accuracy, and the per-epoch evaluation of NLVR2 fine-tuning.

Annotations (BLIP's nlvr_{train,dev,test}.json, §8.1): [{"images": [left, right], "sentence",
"label": "True" | "False"}]; NLVR2's own "identifier" is kept when present, else an example is
numbered by its place in the file. Sentences go through pre_caption(s, 40). The official
evaluation also swaps the pair at random (its dataset class augments every split); here the pair
is read in the file's order, so a run is deterministic.
"""
from __future__ import annotations

import dataclasses
import os
import random
import sys
import time
from typing import Optional

import numpy as np

MAX_WORDS = 40  # official nlvr_dataset: pre_caption(sentence, 40)


@dataclasses.dataclass
class Pair:
  example_id: object
  sentence: str  # after pre_caption(s, 40)
  paths: tuple  # (left image, right image)
  label: Optional[int]  # 1: the sentence is true of the pair; None: unknown


def _label(value, where: str) -> Optional[int]:
  if value is None:
    return None
  if isinstance(value, bool):
    return int(value)
  if str(value) in ("True", "False"):
    return int(str(value) == "True")
  raise ValueError(f"{where}: label {value!r} is neither 'True' nor 'False'")


def read_pairs(annotations, image_root: str = "") -> tuple[list, list]:
  """(pairs, skipped): the entries of one or more NLVR2 annotation files; skipped are
  (example_id, reason) of sentences left empty by pre_caption."""
  from blip_jax.data.annotations import read_entries
  from blip_jax.tokenizers import pre_caption
  out, skipped, seen = [], [], set()
  path = lambda p: p if os.path.isabs(p) or "://" in p else os.path.join(image_root, p)
  for n, e in enumerate(read_entries(annotations)):
    ok = isinstance(e, dict) and "sentence" in e and isinstance(e.get("images"), list) and len(e["images"]) == 2
    if not ok:
      raise ValueError(f"{annotations}: entry {n} is not {{'images': [left, right], 'sentence', 'label'}} (got "
                       f"{sorted(e) if isinstance(e, dict) else type(e).__name__}); NLVR2 annotations are BLIP's "
                       "nlvr_*.json")
    eid = e.get("identifier", n)
    if eid in seen:
      raise ValueError(f"{annotations}: identifier {eid!r} appears twice")
    seen.add(eid)
    sentence = pre_caption(e["sentence"], MAX_WORDS) if isinstance(e["sentence"], str) else ""
    if not sentence:
      skipped.append((eid, f"empty sentence {e['sentence']!r}"))
      continue
    out.append(Pair(eid, sentence, tuple(path(p) for p in e["images"]), _label(e.get("label"), f"entry {n}")))
  return out, skipped


def _bucket(length: int) -> int:
  """Token rows padded to a multiple of 16 (few compiled shapes; the official pads to the longest
  sentence of a batch and truncates nothing, neither does this)."""
  return max(16, -(-length // 16) * 16)


def predict(model, pairs: list, *, batch_size: int = 64, progress: bool = True, workers: int = 8, devices=None):
  """Logits of every pair. Returns ({pair index: (logit_false, logit_true)}, {image path: error} of
  undecodable images, stats). Batches are split over local devices and hosts (host p takes
  batches p, p+P, ...); every host returns every prediction."""
  import jax
  from tqdm import tqdm
  from blip_jax.caption import DataParallel, map_ahead
  from blip_jax.preprocess import ImageDecodeError, preprocess
  from blip_jax.train.launch import allgather_strided
  if model.config.kind != "nlvr":
    raise ValueError(f"the checkpoint is a {model.config.kind!r} model; NLVR2 needs an NLVR2 model (an NLVR2 "
                     "checkpoint, or fine-tune one: configs/nlvr.py)")
  if model.tokenizer is None:
    raise ValueError("the checkpoint has no tokenizer: pass --vocab path/to/vocab.txt")
  P, me = jax.process_count(), jax.process_index()
  dp = DataParallel(devices)
  model.params = dp.put_params(model.params)
  size = model.config.vision.image_size
  bs = dp.round_batch(batch_size)
  batches = [list(range(s, min(s + bs, len(pairs)))) for s in range(0, len(pairs), bs)]
  mine = list(range(me, len(batches), P))

  def load(path):
    try:
      return path, preprocess([path], size)[0], None
    except ImageDecodeError as e:
      return path, None, str(e)

  local = np.zeros((len(mine), bs, 3), np.float32)  # logit false, logit true, 1 where predicted
  errors, stats = {}, {"pairs": 0, "model_s": 0.0}
  paths_of = lambda b: [p for i in batches[b] for p in pairs[i].paths]
  with tqdm(total=sum(len(batches[b]) for b in mine), unit="pair", desc="nlvr2", file=sys.stderr,
            disable=not progress, leave=False) as bar:
    for r, loaded in enumerate(map_ahead(load, (paths_of(b) for b in mine), workers=workers)):
      rows = batches[mine[r]]
      bad = {p: e for p, _, e in loaded if e is not None}
      errors.update(bad)
      keep = [j for j, i in enumerate(rows) if not any(p in bad for p in pairs[i].paths)]
      if keep:
        t0 = time.time()
        pix = np.zeros((2, bs, size, size, 3), np.float32)
        for j in keep:
          pix[0, j], pix[1, j] = loaded[2 * j][1], loaded[2 * j + 1][1]
        sentences = [pairs[rows[j]].sentence if j in keep else "" for j in range(bs)]
        longest = max(len(model.tokenizer.encode(s)) + 2 for s in sentences)
        ids, mask = model.tokenizer(sentences, max_length=_bucket(longest), padding="max_length", truncation=False)
        logits = np.asarray(model.nlvr_logits(dp.put_batch(pix[0]), dp.put_batch(pix[1]), dp.put_batch(ids),
                                              dp.put_batch(mask)))
        stats["model_s"] += time.time() - t0
        stats["pairs"] += len(keep)
        local[r, keep, :2] = logits[keep]
        local[r, keep, 2] = 1.0
      bar.update(len(rows))
  every = allgather_strided(local, len(batches), P, me)
  out = {}
  for b, rows in enumerate(batches):
    for j, i in enumerate(rows):
      if every[b, j, 2] > 0:
        out[i] = (float(every[b, j, 0]), float(every[b, j, 1]))
  if P > 1:  # every host reports every undecodable image
    for i, p in enumerate(pairs):
      if i not in out and not any(x in errors for x in p.paths):
        errors.update({x: "not decodable (on another host)" for x in p.paths})
  for path, e in sorted(errors.items()):
    print(f"warning: skipped {e}", file=sys.stderr)
  return out, errors, stats


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
  skipped = list(skipped) + [(p.example_id, "image not decodable: " + "; ".join(errors[x] for x in p.paths if x in errors))
                             for i, p in enumerate(pairs) if i not in logits]
  metrics = {"accuracy": 100.0 * correct / scored, "scored": scored, "correct": correct} if scored else {}
  return NLVRResult(preds, metrics, skipped, stats)


def write_outputs(result: NLVRResult, out_dir: str) -> None:
  """DIR/predictions.json and DIR/metrics.json; each file appears whole."""
  from blip_jax import fs
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
  import argparse
  import json
  p = argparse.ArgumentParser(description=main.__doc__)
  p.add_argument("--coco", default="../shared/data/coco_karpathy_mini/captions_karpathy_val.json")
  p.add_argument("--images", type=int, default=16)
  p.add_argument("--out", required=True)
  a = p.parse_args(argv)
  from blip_jax import fs
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
