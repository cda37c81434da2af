"""Answering questions with the VQA model (official blip_vqa.py: generate, rank_answer).

The question is encoded once ([ENC] first, cross-attending to the image) and its token states are
the memory of the answer decoder. Two modes:

rank      (the official default with a candidate list, k_test 128). Step 1: the decoder on [DEC]
          alone gives p(first piece); the k candidates whose first piece is most probable are kept
          (ties broken by list order; torch.topk leaves them unspecified). Step 2: each kept
          candidate scores minus its summed label-smoothed (0.1) token loss, as the official
          computes it (not a log-likelihood); the best score wins.
generate  beam search from [DEC] over the question states (official: beam 3, max 10, min 1).

The official step 2 copies each question's states once per candidate and runs every candidate
padded to the longest of the whole list. Here the k candidates of a question are packed into one
row after a single [DEC]: each candidate's pieces sit at their own positions (1, 2, ...) and see
[DEC] and their own earlier pieces only, which is exactly the official computation of each
candidate, while the question states are read once per row. The prediction of a first piece is
step 1's (the [DEC] position is the same for every candidate), and the [SEP] position, whose
output the official discards, is never computed.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from blip_jax.models import generate as gen
from blip_jax.models.blip import Blip
from blip_jax.models.config import BlipConfig
from blip_jax.models.layers import MASK_VALUE

LABEL_SMOOTHING = 0.1  # official BertLMHeadModel: the rank score uses the training loss
PACK_MULTIPLE = 32  # packed rows are padded to a multiple of this (few compiled shapes)


@dataclasses.dataclass(frozen=True)
class Candidates:
  """A tokenized candidate answer list (answer_list.json)."""
  texts: tuple
  pieces: tuple  # per candidate: its word-piece ids (no [CLS]/[DEC], no [SEP])
  first: np.ndarray  # [C] the first target of each candidate: its first piece, or [SEP] if none


def tokenize_candidates(tokenizer, answers, sep_id: int) -> Candidates:
  """Checks and tokenizes a candidate list (official: tokenizer(answer_list), no truncation)."""
  if not isinstance(answers, (list, tuple)) or not answers:
    raise ValueError(f"candidate answers must be a non-empty list of strings, got "
                     f"{type(answers).__name__}{' (empty)' if isinstance(answers, (list, tuple)) else ''}")
  bad = [i for i, a in enumerate(answers) if not isinstance(a, str) or not a.strip()]
  if bad:
    raise ValueError(f"candidate answers must be non-empty strings; entry {bad[0]} is {answers[bad[0]]!r}"
                     f" ({len(bad)} such entries)")
  pieces = tuple(np.asarray(tokenizer.encode(a), np.int32) for a in answers)
  first = np.asarray([p[0] if len(p) else sep_id for p in pieces], np.int32)
  return Candidates(tuple(answers), pieces, first)


@functools.partial(jax.jit, static_argnums=(0,))
def question_states(cfg: BlipConfig, params, image_embeds, image_index, q_ids, q_mask):
  """Question encoder states [B, Lq, D] of questions about images image_embeds[image_index]."""
  return Blip(cfg).apply({"params": params}, image_embeds[image_index], q_ids, q_mask, method=Blip.vqa_question)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("k",))
def first_piece_topk(cfg: BlipConfig, params, states, q_mask, first, *, k: int):
  """Step 1: the decoder on [DEC] alone. Returns (top [B, k] candidate indices, their first-piece
  probabilities [B, k], their first-piece label-smoothed losses [B, k])."""
  start = jnp.full((states.shape[0], 1), cfg.text.dec_id, jnp.int32)
  logits = Blip(cfg).apply({"params": params}, states, q_mask, start, jnp.ones_like(start),
                           method=Blip.vqa_answer_logits)[:, 0]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  probs = jnp.exp(logp)[:, first]  # official: softmax, then the candidates' first pieces
  top_p, top = jax.lax.top_k(probs, k)
  nll = -jnp.take_along_axis(logp, first[top], axis=1)
  loss = (1.0 - LABEL_SMOOTHING) * nll + LABEL_SMOOTHING * -logp.mean(axis=-1, keepdims=True)
  return top, top_p, loss


def pack(cands: Candidates, top: np.ndarray, dec_id: int, sep_id: int, pad_id: int):
  """Host side of step 2: one row per question, [DEC] then the pieces of its k candidates.
  Returns ids, positions, segments (candidate slot 0..k-1; -1 for [DEC], -2 for padding) and
  targets (each piece's next piece, or [SEP] after the last one), all int32 [B, T]."""
  b, k = top.shape
  rows = []
  for q in range(b):
    ids, pos, seg, tgt = [dec_id], [0], [-1], [pad_id]
    for slot, c in enumerate(top[q]):
      p = cands.pieces[c]
      ids += p.tolist(); pos += range(1, len(p) + 1); seg += [slot] * len(p)
      tgt += p[1:].tolist() + [sep_id] if len(p) else []
    rows.append((ids, pos, seg, tgt))
  t = max(len(r[0]) for r in rows)
  t = -(-t // PACK_MULTIPLE) * PACK_MULTIPLE
  out = [np.full((b, t), fill, np.int32) for fill in (pad_id, 0, -2, pad_id)]
  for q, r in enumerate(rows):
    for arr, vals in zip(out, r):
      arr[q, :len(vals)] = vals
  return tuple(out)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("k",))
def packed_losses(cfg: BlipConfig, params, states, q_mask, ids, positions, segments, targets, *, k: int):
  """Step 2 on packed rows: each candidate slot's label-smoothed loss of its pieces after the first
  piece's prediction (the targets of its pieces' positions), summed: [B, k]."""
  i, j = segments[:, :, None], segments[:, None, :]
  idx = jnp.arange(ids.shape[1])
  sees = ((i == j) & (idx[None, None, :] <= idx[None, :, None])) | (idx == 0)[None, None, :]
  bias = jnp.where(sees, 0.0, MASK_VALUE)[:, None].astype(jnp.float32)
  logits = Blip(cfg).apply({"params": params}, states, q_mask, ids, positions, bias, method=Blip.vqa_packed_logits)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  tok = (1.0 - LABEL_SMOOTHING) * nll + LABEL_SMOOTHING * -logp.mean(axis=-1)
  valid = segments >= 0
  rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)
  return jnp.zeros((ids.shape[0], k), jnp.float32).at[rows, jnp.where(valid, segments, 0)].add(
      jnp.where(valid, tok, 0.0))


def rank(cfg: BlipConfig, params, states, q_mask, cands: Candidates, k: int = 128):
  """The official two-step rank. Returns (best [B] candidate indices, top [B, k], step-1
  probabilities [B, k], step-2 scores [B, k] = minus the summed label-smoothed loss)."""
  k = min(k, len(cands.texts))
  t = cfg.text
  top, top_p, first_loss = first_piece_topk(cfg, params, states, q_mask, jnp.asarray(cands.first), k=k)
  top = np.asarray(top)
  ids, pos, seg, tgt = pack(cands, top, t.dec_id, t.sep_id, t.pad_id)
  later = packed_losses(cfg, params, states, q_mask, ids, pos, seg, tgt, k=k)
  scores = -(np.asarray(first_loss) + np.asarray(later))
  best = top[np.arange(len(top)), scores.argmax(axis=1)]
  return best, top, np.asarray(top_p), scores


def generate(cfg: BlipConfig, params, states, q_mask, *, num_beams: int = 3, max_length: int = 10,
             min_length: int = 1, length_normalization: str = "official"):
  """Answer token ids [B, max_length] ([DEC] first) by beam search (greedy for num_beams=1) over the
  question states. The official passes an all-ones question mask, which with its 'longest' padding
  equals masking the padding for a question alone; here padding is always masked, so an answer
  does not depend on the other questions of its batch."""
  prompt = jnp.full((states.shape[0], 1), cfg.text.dec_id, jnp.int32)
  if num_beams > 1:
    tokens, _ = gen.beam_search(cfg, params, states, prompt, num_beams=num_beams, max_length=max_length,
                                min_length=min_length, length_normalization=length_normalization,
                                memory_mask=q_mask)
    return tokens
  return gen.greedy(cfg, params, states, prompt, max_length=max_length, min_length=min_length, memory_mask=q_mask)


def encode_questions(cfg: BlipConfig, params, tokenizer, image_embeds, image_index, questions, rows: int = 0):
  """Questions (already through pre_question) about image_embeds[image_index], tokenized to 35 and
  encoded; rows > 0 pads the batch to that many rows (one compiled shape). Returns (states, mask)."""
  q_ids, q_mask = tokenizer(list(questions), max_length=35)
  index = np.asarray(image_index, np.int32)
  if rows:  # the last row repeated
    q_ids, q_mask, index = (np.pad(np.asarray(a), [(0, rows - len(a))] + [(0, 0)] * (np.ndim(a) - 1), mode="edge")
                            for a in (q_ids, q_mask, index))
  return question_states(cfg, params, image_embeds, index, q_ids, q_mask), q_mask


def answers_from_states(cfg: BlipConfig, params, tokenizer, states, q_mask, cands: Candidates | None = None, *,
                        k: int = 128, **generate_kw) -> list:
  """One answer string per row: the rank's winner among `cands`, or the generated answer."""
  if cands is not None:
    return [cands.texts[b] for b in rank(cfg, params, states, q_mask, cands, k=k)[0]]
  return [tokenizer.decode(x) for x in np.asarray(generate(cfg, params, states, q_mask, **generate_kw))]
