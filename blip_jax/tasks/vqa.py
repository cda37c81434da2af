"""Visual question answering (the paper §5.3; official models/blip_vqa.py, train_vqa.py): answering an
annotation file, the VQA accuracy, and the per-epoch evaluation of VQA fine-tuning.

Annotations (the official vqa_*.json files): [{"question_id", "question", "image", ["answer": [human
answers] | str], ["answers": [...]], ["answer_type"]}]; an entry without question_id is numbered
by its place in the file. Questions go through pre_question (35 tokens); an empty one is skipped
and counted. Questions are grouped by image, so an image asked several questions is decoded and
encoded once. Across hosts: process p answers batches p, p+P, ...; the answers are gathered, so
every process returns all of them.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import numpy as np

from blip_jax import fs, objectives
from blip_jax.api import require
from blip_jax.data.eval_sets import Question, read_answer_list, read_questions  # noqa: F401 (re-exported)
from blip_jax.distributed import bytes_to_texts, texts_to_bytes
from blip_jax.metrics.vqa import vqa_accuracy
from blip_jax.models import answer as A
from blip_jax.parallel import DataParallel, run_sharded
from blip_jax.preprocess import preprocess
from blip_jax.tasks import Task

# The official settings (configs/vqa.yaml, blip_vqa.py)
RANK_K = 128
GENERATE = dict(num_beams=3, max_length=10, min_length=1)
_ANSWER_BYTES = 256


def _batches(questions: list, batch_size: int) -> list:
  """Questions grouped by image, cut into batches of at most batch_size questions: [(image paths,
  question indices, image row of each question)]."""
  groups: dict = {}
  for i, q in enumerate(questions):
    groups.setdefault(q.path, []).append(i)
  out, paths, rows, where = [], [], [], []
  for path, idx in groups.items():
    for s in range(0, len(idx), batch_size):
      part = idx[s:s + batch_size]
      if len(rows) + len(part) > batch_size:
        out.append((paths, rows, where))
        paths, rows, where = [], [], []
      paths.append(path)
      rows += part
      where += [len(paths) - 1] * len(part)
  if rows:
    out.append((paths, rows, where))
  return out


def answer_questions(model, questions: list, candidates: Optional[list] = None, *, k: int = RANK_K,
                     batch_size: int = 16, progress: bool = True, workers: int = 8, devices=None,
                     length_normalization: str = "official", **generate):
  """Answers (rank over `candidates`, else generation). Returns ({question index: answer},
  {image path: error} of undecodable images, stats)."""
  check_model(model)
  cfg = model.config
  cands = A.tokenize_candidates(model.tokenizer, candidates, cfg.text.sep_id) if candidates is not None else None
  generate = {**GENERATE, **generate}
  dp = DataParallel(devices)
  model.params = dp.put_params(model.params)
  params, size, bs = model.params, cfg.vision.image_size, dp.round_batch(batch_size)
  batches = _batches(questions, bs)
  stats = {"encode_s": 0.0, "answer_s": 0.0, "questions": 0, "images": 0}

  def predict(batch, decoded):
    paths, rows, where = batch
    bad = {p for p, _, e in decoded if e is not None}
    keep = [j for j, w in enumerate(where) if paths[w] not in bad]
    if not keep:
      return None
    t0 = time.time()
    pix = np.zeros((bs, size, size, 3), np.float32)
    for j, (_, x, _) in enumerate(decoded):
      if x is not None:
        pix[j] = x
    embeds = model.encode_image(dp.put_batch(pix))
    states, q_mask = A.encode_questions(cfg, params, model.tokenizer, embeds, [where[j] for j in keep],
                                        [questions[rows[j]].question for j in keep], rows=bs)
    states.block_until_ready()
    t1 = time.time()
    texts = A.answers_from_states(cfg, params, model.tokenizer, states, q_mask, cands, k=k,
                                  length_normalization=length_normalization, **generate)
    stats["encode_s"] += t1 - t0
    stats["answer_s"] += time.time() - t1
    stats["questions"] += len(keep)
    stats["images"] += len(paths) - len(bad)
    row_texts = [None] * bs  # slot j: the batch's j-th question (None: its image failed)
    for n, j in enumerate(keep):
      row_texts[j] = texts[n]
    return texts_to_bytes(row_texts, _ANSWER_BYTES)

  every, errors = run_sharded(batches, predict, (bs, _ANSWER_BYTES + 1), np.uint8, files=lambda b: b[0],
                              decode=lambda p: preprocess([p], size)[0], desc="answering", unit="q",
                              size=lambda b: len(b[1]), progress=progress, workers=workers)
  answers = {}
  for b, (_, rows, _) in enumerate(batches):
    for i, a in zip(rows, bytes_to_texts(every[b])):
      if a is not None:
        answers[i] = a
  # every host reports every undecodable image
  errors.update({questions[i].path: "not decodable (on another host)" for _, rows, _ in batches for i in rows
                 if i not in answers and questions[i].path not in errors})
  return answers, errors, stats


def check_model(model, name: str = ""):
  require(model, "VQA", kinds=("vqa",), name=name, hint="a VQA checkpoint (or an official pretraining .pth, "
          "loaded with kind='vqa'; or fine-tune one: configs/vqa.py)")


@dataclasses.dataclass
class VQAResult:
  results: list  # [{"question_id", "answer"}] (the evaluation server's format)
  metrics: dict  # vqa_accuracy's figures ({} without reference answers)
  skipped: list  # [(question_id, reason)]
  stats: dict


def evaluate_vqa(model, questions: list, candidates: Optional[list] = None, *, skipped=(), batch_size: int = 16,
                 k: int = RANK_K, progress: bool = True, **generate) -> VQAResult:
  """Answers every question and, when the questions carry human answers, scores them."""
  t0 = time.time()
  answers, errors, stats = answer_questions(model, questions, candidates, k=k, batch_size=batch_size,
                                            progress=progress, **generate)
  stats["answer_total_s"] = time.time() - t0
  stats["mode"] = ("rank", {"k": k, "candidates": len(candidates)}) if candidates is not None else (
      "generate", {**GENERATE, **generate})
  results = [{"question_id": questions[i].question_id, "answer": a} for i, a in sorted(answers.items())]
  skipped = list(skipped) + [(q.question_id, f"image not decodable: {errors[q.path]}")
                             for i, q in enumerate(questions) if i not in answers and q.path in errors]
  # scored: the answered questions (the skipped ones are listed in metrics.json, not counted)
  refs = {questions[i].question_id: questions[i].answers for i in answers if questions[i].answers}
  metrics = {}
  if refs:
    pred = {questions[i].question_id: a for i, a in answers.items()}
    types = {q.question_id: q.answer_type for q in questions if q.answer_type}
    metrics = vqa_accuracy(pred, refs, types)
  return VQAResult(results, metrics, skipped, stats)


def write_outputs(result: VQAResult, out_dir: str) -> None:
  """DIR/answers.json ([{"question_id", "answer"}]) and DIR/metrics.json; each file appears whole."""
  fs.write_json(fs.join(out_dir, "answers.json"), result.results)
  m = dict(result.metrics)
  per = m.pop("per_question", {})
  fs.write_json(fs.join(out_dir, "metrics.json"), {
      **m, "answered": len(result.results),
      "skipped": [{"question_id": q, "reason": r} for q, r in result.skipped],
      "per_question": {str(k): v for k, v in per.items()}, "stats": result.stats}, indent=2)


def format_metrics(result: VQAResult) -> str:
  m = result.metrics
  parts = []
  if "overall" in m:
    types = "  ".join(f"{t} {v:.2f}" for t, v in m["perAnswerType"].items())
    parts.append(f"VQA accuracy {m['overall']:.2f} on {m['questions']} questions ({types})")
  if "exact_match" in m:
    parts.append(f"exact match {m['exact_match']:.2f} on {m['exact_match_questions']} single-answer questions")
  if result.skipped:
    parts.append(f"{len(result.skipped)} questions skipped (e.g. {result.skipped[0][1]})")
  return "\n".join(parts) or "no reference answers: nothing scored"


# ---- fine-tuning (the shared trainer calls these) -----------------------------------------------
def check_training_config(c):
  """Eval splits and the answer list readable, before any compute."""
  if c.eval.answer_list:
    read_answer_list(c.eval.answer_list)
  if c.eval.k < 1:
    raise ValueError("eval.k must be >= 1")
  for split, path in c.eval.annotations.items():
    if path:
      qs, _ = read_questions(path, c.eval.image_root)
      if not any(q.answers for q in qs):
        raise ValueError(f"eval.annotations.{split} ({path}) has no answers to score against")


def evaluate_splits(c, model) -> dict:
  """VQA accuracy of each eval split: {"val/overall": .., "val/exact_match": .., "val/accuracy": ..};
  accuracy (the selection metric) is the mean over every scored question of its score: the VQA
  accuracy of a question with human answer lists, exact match of one with a single answer."""
  candidates = read_answer_list(c.eval.answer_list) if c.eval.answer_list else None
  out = {}
  for split, path in c.eval.annotations.items():
    if not path:
      continue
    qs, skipped = read_questions(path, c.eval.image_root)
    r = evaluate_vqa(model, qs, candidates, skipped=skipped, batch_size=c.eval.batch_size, k=c.eval.k,
                     progress=False)
    m = r.metrics
    out.update({f"{split}/{key}": m[key] for key in ("overall", "exact_match") if key in m})
    out.update({f"{split}/{t}": v for t, v in m.get("perAnswerType", {}).items()})
    per = list(m.get("per_question", {}).values())
    out[f"{split}/accuracy"] = sum(per) / len(per) if per else 0.0
  return out


# official train_vqa.py keeps the last epoch; with eval.annotations.val set, the best by accuracy
TASK = Task("vqa", "vqa", objectives.vqa_answers, check_config=check_training_config, evaluate=evaluate_splits,
            select="val/accuracy", shown=("accuracy", "overall", "exact_match"), fresh_where_shapes_differ=True)
