"""VQA answering equals the official algorithm on transformers' BlipForQuestionAnswering modules
(same weights), and the VQA accuracy equals hand-computed values.

The rank reference below is a plain restatement of the official blip_vqa.rank_answer (blip_facts
§5.3) on transformers' PyTorch modules: question states repeated per candidate, candidates padded
to the longest of the list, torch's label-smoothed cross-entropy; nothing from blip_jax but the
weights (its tokenizer is transformers' BertTokenizer). As the existing VQA parity test, each
question runs alone and unpadded (transformers 5.24 drops the decoder's question mask).
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import blip_jax
from blip_jax.metrics.vqa import question_accuracy, vqa_accuracy
from blip_jax.tokenizers import pre_question
from conftest import COCO
from hf_ref import make_hf

DEC, ENC, SEP, PAD = 30522, 30523, 102, 0
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


def official_rank(hf, tok, pixels, question, answers, k):
  """blip_vqa.rank_answer for one question: returns {candidate: (step-1 prob, step-2 score)}, best."""
  q = tok([question], return_tensors="pt")["input_ids"]
  q[:, 0] = ENC
  a = tok(answers, padding="longest", return_tensors="pt")
  a_ids, a_att = a["input_ids"], a["attention_mask"]
  a_ids[:, 0] = DEC
  with torch.no_grad():
    img = hf.vision_model(pixel_values=torch.tensor(pixels[None]).permute(0, 3, 1, 2)).last_hidden_state
    states = hf.text_encoder(input_ids=q, encoder_hidden_states=img).last_hidden_state
    logits = hf.text_decoder(input_ids=a_ids[:1, :1], encoder_hidden_states=states).logits[:, 0]
    prob_first = F.softmax(logits, dim=1)[:, a_ids[:, 1]]
    top_p, top = torch.sort(prob_first, dim=1, descending=True, stable=True)  # ties: list order
    top_p, top = top_p[0, :k], top[0, :k]
    ids, att = a_ids[top], a_att[top]
    targets = ids.masked_fill(ids == PAD, -100)
    out = hf.text_decoder(input_ids=ids, attention_mask=att,
                          encoder_hidden_states=states.repeat_interleave(k, dim=0)).logits
    ce = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), targets[:, 1:].reshape(-1), reduction="none",
                         ignore_index=-100, label_smoothing=0.1).view(k, -1).sum(1)
  scores = -ce
  return {int(c): (float(p), float(s)) for c, p, s in zip(top, top_p, scores)}, int(top[scores.argmax()])


def test_rank_equals_the_official_two_step_rank(vqa, vocab_path):
  from transformers import BertTokenizer
  from blip_jax.models import answer as A
  hf, ours, qs, answers = vqa
  tok = BertTokenizer(vocab_path)
  paths = [os.path.join(COCO, e["image"]) for e in qs]
  questions = [pre_question(e["question"]) for e in qs]
  pixels = ours.preprocess(paths)
  cands = A.tokenize_candidates(ours.tokenizer, answers, SEP)
  embeds = ours.encode_image(pixels)
  q_ids, q_mask = ours.tokenizer(questions, max_length=35)  # padded: the decoder must mask it
  states = A.question_states(ours.config, ours.params, embeds, np.arange(len(qs)), q_ids, q_mask)
  best, top, top_p, scores = A.rank(ours.config, ours.params, states, q_mask, cands, k=K)
  reordered = 0
  for i in range(len(qs)):
    ref, ref_best = official_rank(hf, tok, pixels[i], questions[i], answers, K)
    got = {int(c): (float(p), float(s)) for c, p, s in zip(top[i], top_p[i], scores[i])}
    assert set(got) == set(ref), (i, sorted(got), sorted(ref))
    for c in ref:
      assert abs(got[c][0] - ref[c][0]) <= 1e-4 and abs(got[c][1] - ref[c][1]) <= 1e-4, (i, answers[c], got[c], ref[c])
    assert best[i] == ref_best, (i, answers[best[i]], answers[ref_best])
    by_step1 = sorted(ref, key=lambda c: (-ref[c][0], c))
    reordered += by_step1 != sorted(ref, key=lambda c: (-ref[c][1], c))
  assert reordered > 0, "step 2 never changed step 1's order: the test would not see a broken step 2"
  # the API gives the same answers (images and questions as a user passes them)
  assert ours.answer(paths, [e["question"] for e in qs], answers, k=K) == [answers[b] for b in best]


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
