"""VQA answering equals the official code: the two-step rank equals the official
BLIP_VQA.rank_answer (salesforce/BLIP's blip_vqa.py, tests/official_code.py) on its own weights;
generation equals transformers' BlipForQuestionAnswering.generate (the official generate needs
transformers 4.15's generation, and transformers' BLIP equals the official decoder,
parity_notes.md); the VQA accuracy equals hand-computed values.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import official_side as S
import pytest
import torch
import torch.nn.functional as F
from conftest import COCO
from hf_ref import make_hf

import blip_jax
from blip_jax.metrics.vqa import exact_match, question_accuracy, vqa_accuracy
from blip_jax.tokenizers import pre_question

ENC, SEP = 30523, 102
K = 12


@pytest.fixture(scope="module")
def vqa(tmp_path_factory, vocab_path):
  hf = make_hf("vqa", 1e-6, seed=5)
  d = tmp_path_factory.mktemp("hf_vqa")
  hf.save_pretrained(d)
  ours = blip_jax.load(str(d), vocab=vocab_path)
  with open(os.path.join(COCO, "vqa_v2_subset.json")) as f:
    entries = json.load(f)
  qs = entries[::35][:6]  # six questions on different images
  answers = sorted({e["answer"] for e in entries}) + ["red and white", "on the left side", "black and white cat"]
  return hf, ours, qs, answers


@pytest.fixture(scope="module")
def official_vqa(official_blip, tmp_path_factory, vocab_path):
  """The official BLIP_VQA at a small size (64 px, 128 wide), weights redrawn, saved as model_vqa.pth is and
  loaded by ours. A random model gives most questions one answer; this draw (seed 13) answers two
  of the six questions differently from the rest, so a mix-up of questions would show."""
  d = tmp_path_factory.mktemp("official_vqa")
  model = S.small_official(official_blip.blip_vqa.BLIP_VQA, d, image_size=64, width=128, drop_path=0.0, seed=13).eval()
  return model, blip_jax.load(str(S.save_pth(model, d / "model_vqa.pth")), vocab=vocab_path)


def official_rank(model, pixels, questions, answers, k):
  """The official forward(inference='rank', k_test=k) on a batch of questions (padded to the
  longest, as official), read through hooks on its answer decoder: its first call gives step 1's
  logits at [DEC], its second the k candidates' rows and their step-2 losses. Returns, per
  question, {candidate: (step-1 probability, step-2 score)} and the official answers."""
  calls = []
  hook = model.text_decoder.register_forward_hook(
      lambda mod, args, kwargs, out: calls.append((args[0] if args else kwargs["input_ids"], out)), with_kwargs=True)
  cands = model.tokenizer(answers, padding="longest", return_tensors="pt")  # as train_vqa.py's evaluation
  cands.input_ids[:, 0] = model.tokenizer.bos_token_id
  try:
    with torch.no_grad():
      best = model(S.nchw(pixels), questions, answer=cands, train=False, inference="rank", k_test=k)
  finally:
    hook.remove()
  (_, start), (rows, second) = calls
  cand = cands.input_ids
  index = {tuple(r.tolist()): i for i, r in enumerate(cand)}
  prob_first = F.softmax(start.logits[:, 0], dim=1)[:, cand[:, 1]]
  scores = (-second.loss).view(len(questions), k)
  out = []
  for q in range(len(questions)):
    chosen = [index[tuple(r.tolist())] for r in rows[q * k:(q + 1) * k]]
    out.append({c: (float(prob_first[q, c]), float(scores[q, j])) for j, c in enumerate(chosen)})
  return out, best.tolist()


def test_rank_equals_the_official_rank_answer(official_vqa, vqa):
  from blip_jax.models import answer as A
  model, ours = official_vqa
  _, _, qs, answers = vqa
  paths = [os.path.join(COCO, e["image"]) for e in qs]
  questions = [pre_question(e["question"]) for e in qs]
  pixels = ours.preprocess(paths)
  cands = A.tokenize_candidates(ours.tokenizer, answers, SEP)
  q_ids, q_mask = ours.tokenizer(questions, max_length=35)  # padded: the decoder must mask it
  states = A.question_states(ours.config, ours.params, ours.encode_image(pixels), np.arange(len(qs)), q_ids, q_mask)
  best, top, top_p, scores = A.rank(ours.config, ours.params, states, q_mask, cands, k=K)
  ref, ref_best = official_rank(model, pixels, questions, answers, K)
  reordered = 0
  for i in range(len(qs)):
    got = {int(c): (float(p), float(s)) for c, p, s in zip(top[i], top_p[i], scores[i])}
    # the k-th place may hold either of two candidates with the same first piece (equal step-1
    # probability: torch.topk breaks such ties its own way); every other candidate is the same
    kth = min(p for p, _ in ref[i].values())
    for c in set(got) ^ set(ref[i]):
      assert abs((got.get(c) or ref[i][c])[0] - kth) <= 1e-6, (i, answers[c], "outside a tie at the k-th place")
    for c in set(got) & set(ref[i]):
      assert abs(got[c][0] - ref[i][c][0]) <= 1e-4 and abs(got[c][1] - ref[i][c][1]) <= 1e-4, (i, answers[c], got[c], ref[i][c])
    assert best[i] == ref_best[i], (i, answers[best[i]], answers[ref_best[i]])
    by_step1 = sorted(ref[i], key=lambda c: (-ref[i][c][0], c))
    reordered += by_step1 != sorted(ref[i], key=lambda c: (-ref[i][c][1], c))
  assert reordered > 0, "step 2 never changed step 1's order: the test would not see a broken step 2"
  assert len(set(ref_best)) > 1, "every question got the same answer: the test would not see a mix-up"
  # the API gives the same answers (images and questions as a user passes them)
  assert ours.answer(paths, [e["question"] for e in qs], answers, k=K) == [answers[b] for b in ref_best]


def test_generate_equals_transformers_generate(vqa):
  from blip_jax.models import answer as A
  hf, ours, qs, _ = vqa
  paths = [os.path.join(COCO, e["image"]) for e in qs]
  pixels = ours.preprocess(paths)
  embeds = ours.encode_image(pixels)
  questions = [pre_question(e["question"]) for e in qs]
  q_ids, q_mask = ours.tokenizer(questions, max_length=35)
  states = A.question_states(ours.config, ours.params, embeds, np.arange(len(qs)), q_ids, q_mask)
  got = np.asarray(A.generate(ours.config, ours.params, states, q_mask, num_beams=3, max_length=10, min_length=1,
                              length_normalization="transformers"))
  for i in range(len(qs)):
    n = int(q_mask[i].sum())
    q = torch.tensor(q_ids[i:i + 1, :n].astype(np.int64))
    q[:, 0] = ENC
    with torch.no_grad():
      ref = hf.generate(input_ids=q, pixel_values=torch.tensor(pixels[i:i + 1]).permute(0, 3, 1, 2), num_beams=3,
                        max_length=10, min_length=1)[0].tolist()
    row = got[i].tolist()
    row = row[:row.index(SEP) + 1] if SEP in row else row
    ref = ref[:ref.index(SEP) + 1] if SEP in ref else ref
    assert row == ref, (i, row, ref)


def test_vqa_accuracy_by_hand():
  # 10 human answers; 'two' normalises to '2' on the prediction side (digits), the humans disagree so
  # their punctuation is normalised ('2!' -> '2 ' is not '2', '2.' -> '2')
  humans = ["2", "2", "2.", "two", "3", "3", "2!", "4", "2", "3"]
  # prediction 'two' -> '2' matches three plain '2' and '2.' ('two' and '2!' stay apart on the human
  # side): leaving out one of the four leaves 3 matches -> 1; any other, 4 -> 1. Accuracy 1.
  assert question_accuracy("two", humans) == pytest.approx(1.0)
  # prediction '3' (3 human '3'): leaving out a '3' leaves 2 -> 2/3 (3 times), else 3 -> 1 (7 times)
  assert question_accuracy("3", humans) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
  # prediction '4' (one '4'): leaving it out 0, else 1/3 (9 times)
  assert question_accuracy("The 4", humans) == pytest.approx(9 / 30)
  # articles, contractions and punctuation on the prediction
  assert question_accuracy("a dog", ["dog"] * 10) == 1.0
  assert question_accuracy("dont know", ["don't know"] * 3 + ["x"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10 / 1)
  assert question_accuracy("yes!", ["yes"] * 10) == 1.0
  # all humans agree: their answers are left as they are (the official quirk)
  assert question_accuracy("2", ["2."] * 10) == 0.0
  r = vqa_accuracy({1: "two", 2: "4", 3: "Dog.", 4: "cat"},
                   {1: humans, 2: humans, 3: ["dog"], 4: ["yes"] * 10},
                   {1: "number", 2: "number", 4: "yes/no"})
  assert r["questions"] == 3 and r["overall"] == pytest.approx(100 * (1 + 9 / 30 + 0) / 3)
  assert r["perAnswerType"] == pytest.approx({"number": 100 * (1 + 9 / 30) / 2, "yes/no": 0.0})
  assert r["exact_match"] == 100.0 and r["exact_match_questions"] == 1  # 'Dog.' -> 'dog'
  # the reference is normalised as the prediction is: punctuation, case, articles, number words
  assert exact_match("dog", "The Dog.") == 1.0 and exact_match("2", "two") == 1.0
  assert exact_match("dog", "cat") == 0.0
  r = vqa_accuracy({5: "dog", 6: "2"}, {5: ["A dog!"], 6: ["Two"]})
  assert r["exact_match"] == 100.0 and r["exact_match_questions"] == 2


def test_question_padding_is_masked_in_every_answer_path(vqa):
  """Bug: the answer decoder's question (memory) mask dropped in one path. Each question's padded
  positions are filled with large noise: rank (both steps), greedy and beam answers and the
  training logits stay the same; with the mask all ones the same noise changes them (so the test
  would see a path that ignores the mask)."""
  from blip_jax.models import answer as A
  from blip_jax.models.blip import Blip
  _, ours, qs, answers = vqa
  cfg, params = ours.config, ours.params
  embeds = ours.encode_image(ours.preprocess([os.path.join(COCO, e["image"]) for e in qs]))
  q_ids, q_mask = ours.tokenizer([pre_question(e["question"]) for e in qs], max_length=35)
  assert (q_mask == 0).any(axis=1).all()  # every question has padding
  states = np.asarray(A.question_states(cfg, params, embeds, np.arange(len(qs)), q_ids, q_mask))
  noisy = np.where(q_mask[..., None] == 1, states, 10 * np.random.RandomState(0).normal(size=states.shape))
  noisy = noisy.astype(np.float32)
  cands = A.tokenize_candidates(ours.tokenizer, answers, SEP)
  a_ids, a_mask = ours.tokenizer(["red and white"] * len(qs), max_length=8)

  def paths(mask):
    def run(s):
      _, top, top_p, scores = A.rank(cfg, params, s, mask, cands, k=K)
      logits = Blip(cfg).apply({"params": params}, s, mask, jnp.asarray(a_ids), a_mask, method=Blip.vqa_answer_logits)
      return (top, top_p, scores, np.asarray(A.generate(cfg, params, s, mask, num_beams=1, max_length=8)),
              np.asarray(A.generate(cfg, params, s, mask, num_beams=3, max_length=8)), np.asarray(logits))
    return run(states), run(noisy)
  clean, noise = paths(q_mask)
  for name, a, b in zip(("rank top", "rank p", "rank scores", "greedy", "beam", "logits"), clean, noise):
    np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name)
  unmasked = paths(np.ones_like(q_mask))
  assert np.abs(unmasked[0][2] - unmasked[1][2]).max() > 1e-2  # rank scores
  assert np.abs(unmasked[0][5] - unmasked[1][5]).max() > 1e-2  # training logits
