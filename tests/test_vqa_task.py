"""VQA fine-tuning learns (configs/vqa.py:demo on COCO-mini's VQA questions), the loss equals a
plain NumPy restatement of the official one, and `eval vqa` / `vqa` answer files as a user runs
them, bad input included."""
import json
import os
import sys

import numpy as np
import pytest
from conftest import COCO, ODD, small_copies

TRAIN = 32  # the first questions of COCO-mini's VQA subset: the fine-tuning test's data


# ---- the loss ------------------------------------------------------------------------------------
def test_vqa_loss_equals_the_official_formula():
  """loss = sum over answers of weight x (summed label-smoothed token loss) / number of questions;
  padding answers (weight 0, mask 0) add nothing; [DEC] is not a target."""
  import jax

  from blip_jax.losses import vqa_loss
  rng = np.random.RandomState(0)
  b, a, la, v = 3, 4, 5, 11
  ids = rng.randint(1, v, (b, a, la))
  mask = np.zeros((b, a, la), np.int32)
  lengths = [[3, 5, 0, 0], [4, 0, 0, 0], [2, 3, 4, 5]]
  for i in range(b):
    for j in range(a):
      mask[i, j, :lengths[i][j]] = 1
  weights = np.array([[0.6, 0.4, 0, 0], [1.0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4]], np.float32)
  logits = rng.randn(b * a, la, v).astype(np.float32)
  got = float(vqa_loss(logits, ids, mask, weights, label_smoothing=0.1))
  total = 0.0
  for i in range(b):
    for j in range(a):
      row = logits[i * a + j]
      for t in range(1, lengths[i][j]):  # position t-1 predicts token t
        logp = row[t - 1] - np.log(np.exp(row[t - 1]).sum())
        total += weights[i, j] * (0.9 * -logp[ids[i, j, t]] + 0.1 * -logp.mean())
  assert got == pytest.approx(total / b, rel=1e-5)
  assert jax.numpy.isfinite(got)


# ---- fine-tuning a tiny VQA model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  """configs/vqa.py:demo on the first TRAIN COCO-mini questions (suite time; the demo trains on all 207),
  evaluated (generation) on those training questions before and after."""
  from blip_jax.train.trainer import train
  from configs.vqa import get_config
  d = tmp_path_factory.mktemp("vqaft")
  with open(os.path.join(COCO, "vqa_v2_subset.json")) as f:
    questions = json.load(f)[:TRAIN]
  (d / "train.json").write_text(json.dumps(questions))
  c = get_config("demo")
  c.data.source.annotations = (str(d / "train.json"),)
  # 128 px copies of the photos for the 64 px model: decoding 640 px JPEGs would set the pace
  c.data.source.image_root = c.eval.image_root = str(small_copies({q["image"] for q in questions}, d / "images"))
  c.eval.annotations.val = str(d / "train.json")
  c.eval.at_start = True
  work = str(d / "w")
  result = train(c, work)
  return work, result


def test_finetuning_answers_training_questions(finetuned):
  work, result = finetuned
  with open(os.path.join(work, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if "eval/val/accuracy" in r]
  start, end = evals[0], evals[-1]
  assert start["step"] == 0 and end["step"] == result["step"]
  # questions with one answer (exact match), and a few with ten human answers (VQA accuracy)
  print("exact match", start["eval/val/exact_match"], "->", end["eval/val/exact_match"],
        "; VQA accuracy", start["eval/val/overall"], "->", end["eval/val/overall"])
  assert start["eval/val/exact_match"] < 5.0
  assert end["eval/val/exact_match"] > 40.0
  # the selection metric: every question's score averaged (exact match or VQA accuracy)
  with open(os.path.join(COCO, "vqa_v2_subset.json")) as f:
    n_multi = sum("answers" in e for e in json.load(f)[:TRAIN])  # questions with ten human answers
  assert n_multi >= 1
  assert end["eval/val/accuracy"] == pytest.approx(
      ((TRAIN - n_multi) * end["eval/val/exact_match"] + n_multi * end["eval/val/overall"]) / TRAIN)
  with open(os.path.join(work, "best", "best.json")) as f:
    best = json.load(f)
  assert best["step"] == result["step"] and best["value"] == pytest.approx(end["eval/val/accuracy"])


def _run(monkeypatch, capsys, *args):
  from blip_jax import cli
  monkeypatch.setattr(sys, "argv", ["blip-jax", *args])
  code = 0
  try:
    cli.main(list(args))
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
    if not isinstance(e.code, int) and e.code:
      print(e.code, file=sys.stderr)
  out = capsys.readouterr()
  return code, out.out, out.err


def test_eval_vqa_cli_ranks_scores_and_skips_bad_input(finetuned, tmp_path, monkeypatch, capsys):
  work, result = finetuned
  model = os.path.join(work, "best")
  with open(os.path.join(COCO, "vqa_v2_subset.json")) as f:
    every = json.load(f)
  entries = every[:TRAIN]  # the questions it was trained on
  answers = sorted({e["answer"] for e in every})  # candidates: every answer of the subset
  (tmp_path / "answer_list.json").write_text(json.dumps(answers))
  bad = [dict(entries[0], question_id=900, image=os.path.join(ODD, "truncated_jpeg.jpg")),
         dict(entries[1], question_id=901, question="..."),  # empty after pre_question
         dict(entries[2], question_id=902)]
  ann = [dict(e, question_id=i) for i, e in enumerate(entries)] + bad
  (tmp_path / "ann.json").write_text(json.dumps(ann))
  out = tmp_path / "out"
  code, stdout, stderr = _run(monkeypatch, capsys, "eval", "vqa", "--model", model, "--annotations",
                              str(tmp_path / "ann.json"), "--image-root", COCO, "--answers",
                              str(tmp_path / "answer_list.json"), "--out", str(out), "--quiet")
  assert code == 0, stderr
  got = json.loads((out / "answers.json").read_text())
  metrics = json.loads((out / "metrics.json").read_text())
  ids = {r["question_id"] for r in got}
  assert ids == set(range(len(entries))) | {902}  # every good question, nothing else
  assert all(r["answer"] in answers for r in got)  # rank answers come from the list
  assert {s["question_id"] for s in metrics["skipped"]} == {900, 901}
  assert "truncated" in stderr or "truncated" in json.dumps(metrics["skipped"])
  # the figures of metrics.json are the VQA accuracy of answers.json (computed here from scratch)
  from blip_jax.metrics.vqa import exact_match
  by_id = {r["question_id"]: r["answer"] for r in got}
  single = [e for e in ann if "answers" not in e and e["question_id"] in by_id]
  em = 100 * np.mean([exact_match(by_id[e["question_id"]], e["answer"]) for e in single])
  assert metrics["exact_match"] == pytest.approx(em) and metrics["exact_match"] > 40.0
  assert metrics["questions"] == sum("answers" in e for e in entries) and "perAnswerType" in metrics
  print(f"rank over {len(answers)} candidates: exact match {metrics['exact_match']:.1f}, VQA accuracy "
        f"{metrics['overall']:.1f}")

  # bad candidate lists, an existing --out, a checkpoint of another kind: one line each, exit 2/1
  (tmp_path / "empty.json").write_text("[]")
  (tmp_path / "nums.json").write_text("[1, 2]")
  for lst in ("empty.json", "nums.json"):
    code, _, err = _run(monkeypatch, capsys, "eval", "vqa", "--model", model, "--annotations",
                        str(tmp_path / "ann.json"), "--image-root", COCO, "--answers", str(tmp_path / lst),
                        "--out", str(tmp_path / "o2"))
    assert code == 2 and "non-empty JSON list of non-empty strings" in err and "Traceback" not in err
  code, _, err = _run(monkeypatch, capsys, "eval", "vqa", "--model", model, "--annotations", str(tmp_path / "ann.json"),
                      "--out", str(out))
  assert code == 2 and "--overwrite" in err


def test_vqa_command_answers_and_names_bad_input(finetuned, monkeypatch, capsys, tmp_path):
  work, _ = finetuned
  model = os.path.join(work, "best")
  img = os.path.join(COCO, "images", "COCO_val2014_000000006921.jpg")
  code, out, err = _run(monkeypatch, capsys, "vqa", "--model", model, "--image", img, "--image",
                        os.path.join(ODD, "truncated_jpeg.jpg"), "--image", img, "--question",
                        "What brand of laptop does the boy have?", "--question", "what color?", "--question", "...")
  lines = out.strip().split("\n")
  assert len(lines) == 3 and code == 1
  assert "<skipped" not in lines[0] and lines[0].split("\t")[2]
  assert "<skipped: image not decodable" in lines[1] and "<skipped: empty question>" in lines[2]

  # a checkpoint of another kind
  import flax.linen as nn
  import jax

  import blip_jax
  from blip_jax.api import BlipModel
  from blip_jax.models.init import init_boxed
  vqa = blip_jax.load(model)
  cfg = vqa.config.replace(kind="caption")
  BlipModel(cfg, nn.meta.unbox(init_boxed(cfg, jax.random.PRNGKey(0))), tokenizer=vqa.tokenizer).save(
      str(tmp_path / "cap"))
  code, out, err = _run(monkeypatch, capsys, "vqa", "--model", str(tmp_path / "cap"), "--image", img, "--question", "what?")
  assert code != 0 and "is a caption model; VQA needs a VQA checkpoint" in err and "Traceback" not in err
