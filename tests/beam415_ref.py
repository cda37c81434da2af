"""An independent, plain re-statement of transformers 4.15's beam search (BeamSearchScorer,
BeamHypotheses, generation_utils.beam_search) for one image at a time: Python lists of
hypotheses, one full forward of the caller's model per step (no cache), nothing shared with
blip_jax. The rule it encodes (the official BLIP pins transformers 4.15):

- scores: log_softmax of the last position, then the repetition penalty and min-length rule,
  plus the beam's running sum; the 2K best (beam, token) pairs of all beams, in order;
- a candidate ending in [SEP] among the first K ranks becomes a hypothesis without its [SEP]:
  score = sum / len(hyp) ** length_penalty, len counting the prompt; the others fill the K beams;
- the n-best list keeps K hypotheses; done when it holds K and (early_stopping or its worst score
  >= best candidate sum of the step / cur_len ** length_penalty), cur_len = length before the token;
- at max_length the K running beams of an image not done are added with their full length.
"""
import math

import numpy as np


class NBest:
  def __init__(self, k, length_penalty):
    self.k, self.lp, self.items, self.worst = k, length_penalty, [], 1e9

  def add(self, hyp, sum_logprobs):
    score = sum_logprobs / len(hyp) ** self.lp
    if len(self.items) < self.k or score > self.worst:
      self.items.append((score, list(hyp)))
      if len(self.items) > self.k:
        order = sorted((s, i) for i, (s, _) in enumerate(self.items))
        del self.items[order[0][1]]
        self.worst = order[1][0]
      else:
        self.worst = min(score, self.worst)

  def is_done(self, best_sum, cur_len, early_stopping):
    if len(self.items) < self.k:
      return False
    if early_stopping:
      return True
    return self.worst >= best_sum / cur_len ** self.lp


def beam_search_415(next_logits, prompt, *, num_beams, max_length, min_length=0, length_penalty=1.0,
                    repetition_penalty=1.0, early_stopping=False, sep_id=102, pad_id=0):
  """next_logits(list of token lists) -> float64 logits [n, V] of each sequence's next token.
  Returns (best token list with [SEP] appended when it fits, its score)."""
  k = num_beams
  beams = [list(prompt) for _ in range(k)]
  sums = [0.0] + [-1e9] * (k - 1)
  hyps = NBest(k, length_penalty)
  done = False
  cur_len = len(prompt)
  while True:
    logits = np.asarray(next_logits(beams), np.float64)
    cands = []
    for b, seq in enumerate(beams):
      z = logits[b] - logits[b].max()
      logp = z - math.log(np.exp(z).sum())
      if repetition_penalty != 1.0:
        for tok in set(seq):
          logp[tok] = logp[tok] * repetition_penalty if logp[tok] < 0 else logp[tok] / repetition_penalty
      if cur_len < min_length:
        logp[sep_id] = -math.inf
      for tok in range(len(logp)):
        cands.append((logp[tok] + sums[b], b, tok))
    cands.sort(key=lambda c: -c[0])
    cands = cands[:2 * k]
    new_beams, new_sums = [], []
    for rank, (score, b, tok) in enumerate(cands):
      if tok == sep_id:
        if rank < k:
          hyps.add(beams[b], score)
      else:
        new_beams.append(beams[b] + [tok])
        new_sums.append(score)
      if len(new_beams) == k:
        break
    done = done or hyps.is_done(cands[0][0], cur_len, early_stopping)
    beams, sums = new_beams, new_sums
    cur_len += 1
    if done or cur_len >= max_length:
      break
  if not done:
    for seq, score in zip(beams, sums):
      hyps.add(seq, score)
  score, best = max(hyps.items, key=lambda x: x[0])
  if len(best) < max_length:
    best = best + [sep_id]
  return best, score
