"""Caption generation on the KV-cached decoder: greedy, beam search, nucleus sampling.

Each decoder is one jit per configuration with static shapes (defaults are bound before the call,
so spelling one out costs no compilation): the prompt (first token [DEC]) is run once, filling the
self-attention cache and the cross-attention keys/values of the image; then one token per step
inside `lax.while_loop`, which stops as soon as every sequence is done.
Decoding follows transformers' `generate` as the official BLIP calls it (token ids are tested
identical to transformers 5.24):

- `min_length` / `max_length` count the prompt tokens, as the official code counts them;
- the repetition penalty divides positive and multiplies negative scores of every token already in
  the sequence, prompt included (on logits for greedy/sampling, on log-probs for beam search);
- beam search keeps the 2K best continuations of all beams and retires those ending in [SEP]. Two
  length normalisations (`length_normalization`):
  "official" (transformers 4.15, which the official BLIP pins and which produced the paper's
  numbers): a hypothesis scores sum(log p) / len ** length_penalty, len = the prompt and the
  generated tokens before [SEP] (a hypothesis cut at max_length: all max_length tokens); an image
  is done when K hypotheses are in and the best of this step's 2K candidate sums, divided by the
  current length, cannot beat the worst of them;
  "transformers" (current transformers, tested equal to 5.24): sum(log p) / new_tokens **
  length_penalty, new tokens counted with [SEP], and the best live beam over its new tokens for the
  stopping heuristic. Both stop an image at once when all K are done with early_stopping=True;
- sampling applies temperature, then top-k, then top-p (nucleus) before drawing.

Outputs are [B * n, max_length] token ids (n sequences per image, image-major, as transformers
returns them), prompt included, [PAD] after [SEP].
"""
from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp

from blip_jax.models.config import BlipConfig
from blip_jax.models.decoding import decode_step, init_cache

_SELF_CACHE = ("cached_key", "cached_value", "cached_mask")  # per sequence; cross_* are per image


def _seen_tokens(ids, vocab: int):
  """[N, L] ids -> [N, V] bool: which tokens occur in each sequence."""
  rows = jnp.arange(ids.shape[0])[:, None]
  return jnp.zeros((ids.shape[0], vocab), bool).at[rows, ids].set(True)


def _penalize(scores, seen, t, *, sep_id: int, min_length: int, repetition_penalty: float):
  """transformers' RepetitionPenalty and MinLength processors on [N, V] scores at length t."""
  if repetition_penalty != 1.0:
    scores = jnp.where(seen, jnp.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty),
                       scores)
  if min_length > 0:  # one column, not a pass over the vocabulary
    scores = scores.at[:, sep_id].set(jnp.where(t < min_length, -jnp.inf, scores[:, sep_id]))
  return scores


def first_argmax(scores):
  """argmax over the last axis (first index of the maximum, as torch's): two plain reductions,
  about 3x faster than XLA:CPU's variadic argmax reduce over a 30k vocabulary."""
  top = jnp.max(scores, axis=-1, keepdims=True)
  iota = jnp.arange(scores.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(scores == top, iota, scores.shape[-1]), axis=-1)


def warp_logits(logits, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Temperature, then top-k, then top-p (nucleus): tokens outside the kept set get -inf.

  Top-p keeps the most probable tokens until their mass reaches top_p (at least one token).
  """
  if temperature != 1.0:
    logits = logits / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more probable tokens
    drop_sorted = mass_before >= top_p
    drop_sorted = drop_sorted.at[..., 0].set(False)
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
  return logits


def _prefill(cfg, params, memory, prompt, memory_mask, copies: int, max_length: int):
  """Repeats each image `copies` times, runs the prompt; returns (last logits [N, V], cache)."""
  if copies > 1:
    memory = jnp.repeat(memory, copies, axis=0)
    prompt = jnp.repeat(prompt, copies, axis=0)
    memory_mask = None if memory_mask is None else jnp.repeat(memory_mask, copies, axis=0)
  cache = init_cache(cfg, prompt.shape[0], max_length, memory.shape[1])
  logits, cache = decode_step(cfg, params, cache, prompt, memory, memory_mask)
  return prompt, logits[:, -1].astype(jnp.float32), cache


def _token_by_token(cfg, params, memory, prompt, memory_mask, choose, *, copies, max_length, min_length,
                    repetition_penalty):
  """The greedy / sampling loop: `choose(step, scores [N, V]) -> ids [N]`."""
  t_cfg = cfg.text
  prompt, logits, cache = _prefill(cfg, params, memory, prompt, memory_mask, copies, max_length)
  n, p = prompt.shape
  tokens = jnp.full((n, max_length), t_cfg.pad_id, jnp.int32).at[:, :p].set(prompt)
  track = repetition_penalty != 1.0  # which tokens each sequence holds: only the penalty reads it
  seen = _seen_tokens(prompt, logits.shape[-1]) if track else jnp.zeros((n, 0), bool)

  def cond(s):
    t, _, _, _, _, done = s
    return (t < max_length) & ~jnp.all(done)

  def body(s):
    t, tokens, seen, cache, last, done = s
    scores = _penalize(last, seen, t, sep_id=t_cfg.sep_id, min_length=min_length,
                       repetition_penalty=repetition_penalty)
    nxt = jnp.where(done, t_cfg.pad_id, choose(t, scores).astype(jnp.int32))
    tokens = tokens.at[:, t].set(nxt)
    if track:
      seen = seen.at[jnp.arange(n), nxt].set(True)
    done = done | (nxt == t_cfg.sep_id)
    logits, cache = decode_step(cfg, params, cache, nxt[:, None], position_offset=t)
    return t + 1, tokens, seen, cache, logits[:, -1].astype(jnp.float32), done

  init = (jnp.asarray(p, jnp.int32), tokens, seen, cache, logits, jnp.zeros((n,), bool))
  return jax.lax.while_loop(cond, body, init)[1]


def _jit(*static_argnames):
  """jax.jit with the config and `static_argnames` static, called with every argument spelled out
  (defaults bound), so that callers that do and do not pass a default share one compilation."""
  def wrap(fn):
    jitted = jax.jit(fn, static_argnums=(0,), static_argnames=static_argnames)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
      bound = signature.bind(*args, **kwargs)
      bound.apply_defaults()
      return jitted(*bound.args, **bound.kwargs)
    return call
  return wrap


@_jit("max_length", "min_length", "repetition_penalty")
def greedy(cfg: BlipConfig, params, memory, prompt, *, max_length: int, min_length: int = 0,
           repetition_penalty: float = 1.0, memory_mask=None):
  """memory [B, M, W] (image tokens, or question states for VQA); prompt [B, P] int32 starting with
  [DEC]. Returns tokens [B, max_length]."""
  choose = lambda t, scores: first_argmax(scores)
  return _token_by_token(cfg, params, memory, prompt, memory_mask, choose, copies=1, max_length=max_length,
                         min_length=min_length, repetition_penalty=repetition_penalty)


@_jit("max_length", "min_length", "repetition_penalty", "temperature", "top_k", "top_p", "num_return_sequences")
def sample(cfg: BlipConfig, params, memory, prompt, rng, *, max_length: int, min_length: int = 0,
           top_p: float = 0.9, top_k: int = 0, temperature: float = 1.0, repetition_penalty: float = 1.0,
           num_return_sequences: int = 1, memory_mask=None):
  """Nucleus sampling, `num_return_sequences` per image. Deterministic for a given `rng`.
  Returns tokens [B * num_return_sequences, max_length]."""
  def choose(t, scores):
    scores = warp_logits(scores, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(jax.random.fold_in(rng, t), scores, axis=-1)
  return _token_by_token(cfg, params, memory, prompt, memory_mask, choose, copies=num_return_sequences,
                         max_length=max_length, min_length=min_length, repetition_penalty=repetition_penalty)


LENGTH_NORMALIZATIONS = ("official", "transformers")


@_jit("num_beams", "max_length", "min_length", "length_penalty", "repetition_penalty", "early_stopping",
      "num_return_sequences", "length_normalization")
def beam_search(cfg: BlipConfig, params, memory, prompt, *, num_beams: int, max_length: int,
                min_length: int = 0, length_penalty: float = 1.0, repetition_penalty: float = 1.0,
                early_stopping=False, num_return_sequences: int = 1, length_normalization: str = "official",
                memory_mask=None):
  """Beam search with `num_beams` beams per image (transformers' vectorised algorithm).

  early_stopping: False (the length heuristic), True (stop when K hypotheses are done) or "never"
  (transformers only). length_normalization: "official" (transformers 4.15, the paper's run) or
  "transformers" (current transformers); see the module docstring. Returns (tokens
  [B * num_return_sequences, max_length], scores [B * R]), best first per image; scores are
  length-penalised sums of log-probabilities.
  """
  if not 1 <= num_return_sequences <= num_beams:
    raise ValueError(f"num_return_sequences must be in 1..num_beams, got {num_return_sequences}")
  if length_normalization not in LENGTH_NORMALIZATIONS:
    raise ValueError(f"length_normalization must be one of {LENGTH_NORMALIZATIONS}, got {length_normalization!r}")
  official = length_normalization == "official"
  if official and early_stopping == "never":
    raise ValueError('early_stopping="never" does not exist in transformers 4.15 (length_normalization="official")')
  t_cfg = cfg.text
  k = num_beams
  b, p = prompt.shape
  prompt_k, logits, cache = _prefill(cfg, params, memory, prompt, memory_mask, k, max_length)
  vocab = logits.shape[-1]
  keep = 2 * k  # continuations kept per step: enough for k live beams even if k of them just ended
  top_k_mask = jnp.arange(keep) < k
  neg = jnp.float32(-1e9)
  batch_offset = jnp.arange(b)[:, None] * k

  def gather(x, idx):  # x [b, m, ...], idx [b, j] -> [b, j, ...]
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  running = jnp.full((b, k, max_length), t_cfg.pad_id, jnp.int32).at[:, :, :p].set(prompt[:, None])
  track = repetition_penalty != 1.0  # which tokens each beam holds: only the penalty reads it
  seen = _seen_tokens(prompt_k, vocab) if track else jnp.zeros((b * k, 0), bool)
  state = dict(
      t=jnp.asarray(p, jnp.int32), running=running, seen=seen, cache=cache, last=logits,
      running_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(neg),
      sequences=running, scores=jnp.full((b, k), neg), finished=jnp.zeros((b, k), bool),
      improvable=jnp.ones((b, 1), bool), go_on=jnp.asarray(True))

  def body(s):
    t = s["t"]
    logp = _penalize(jax.nn.log_softmax(s["last"], axis=-1), s["seen"], t, sep_id=t_cfg.sep_id,
                     min_length=min_length, repetition_penalty=repetition_penalty)
    logp = (logp.reshape(b, k, vocab) + s["running_scores"][:, :, None]).reshape(b, k * vocab)
    top_logp, top_idx = jax.lax.top_k(logp, keep)
    parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seqs = gather(s["running"], parent).at[:, :, t].set(token)
    ends = (token == t_cfg.sep_id) | (t + 1 >= max_length)

    # The k best continuations that did not end go on.
    live_logp = top_logp + jnp.where(ends, neg, 0.0)
    nxt = jax.lax.top_k(live_logp, k)[1]
    running, running_scores = gather(top_seqs, nxt), gather(live_logp, nxt)
    parent_flat = (gather(parent, nxt) + batch_offset).reshape(-1)
    token_flat = gather(token, nxt).reshape(-1)

    def merge(sequences, scores, finished, cand_seqs, cand_scores, cand_done):
      """The k best of the hypotheses so far and the candidates that retire now."""
      cand_scores = jnp.where(cand_done, cand_scores, cand_scores + neg)
      m_scores = jnp.concatenate([scores, cand_scores], axis=1)
      best = jax.lax.top_k(m_scores, k)[1]
      return (gather(jnp.concatenate([sequences, cand_seqs], axis=1), best), gather(m_scores, best),
              gather(jnp.concatenate([finished, cand_done], axis=1), best))

    t1 = t + 1
    if official:
      # transformers 4.15: [SEP] among the top k retires the hypothesis without its [SEP] (length t);
      # is_done compares the worst retired score with this step's best candidate sum / t
      is_sep = token == t_cfg.sep_id
      sequences, scores, finished = merge(
          s["sequences"], s["scores"], s["finished"], top_seqs, top_logp / t.astype(jnp.float32) ** length_penalty,
          is_sep & top_k_mask[None] & s["improvable"])
      worst = jnp.min(jnp.where(finished, scores, -neg), axis=1, keepdims=True)
      enough = jnp.all(finished, axis=1, keepdims=True)
      # the best candidate is top_logp[:, 0]; a max over the 2k values gives the same number, while
      # slicing the top_k output here made XLA:CPU sort the whole [b, k * vocab] row every step (10x)
      can_beat = jnp.max(top_logp, axis=1, keepdims=True) / t.astype(jnp.float32) ** length_penalty > worst
      done = enough & (True if early_stopping is True else ~can_beat)
      improvable = s["improvable"] & ~done
      # finalize at max_length: the k best continuations that did not end retire with all t + 1
      # tokens, for images not done
      live_rank = jnp.cumsum(~is_sep, axis=1) - 1
      cut = (t1 >= max_length) & ~is_sep & (live_rank < k) & improvable
      sequences, scores, finished = merge(sequences, scores, finished, top_seqs,
                                          top_logp / t1.astype(jnp.float32) ** length_penalty, cut)
      go_on = jnp.any(improvable) & (t1 < max_length)
    else:
      # Those among the top k that ended compete with the hypotheses done so far.
      just_done = ends & top_k_mask[None]
      full = jnp.all(s["finished"], axis=-1, keepdims=True) & (early_stopping is True)
      sequences, scores, finished = merge(
          s["sequences"], s["scores"], s["finished"], top_seqs,
          top_logp / ((t + 1 - p).astype(jnp.float32) ** length_penalty), just_done & ~full & s["improvable"])

      # Can a live beam still beat the worst finished hypothesis? (transformers' heuristic)
      if early_stopping == "never" and length_penalty > 0.0:
        best_len = jnp.float32(max_length - p)
      else:
        best_len = (t1 - p).astype(jnp.float32)
      best_running = running_scores[:, :1] / best_len ** length_penalty
      worst_done = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), neg)
      improvable = s["improvable"] & jnp.any(best_running > worst_done, axis=-1, keepdims=True)
      go_on = (jnp.any(improvable) & ~(jnp.all(finished) & (early_stopping is True)) & ~jnp.all(ends)
               & (t1 < max_length))

    cache = jax.tree_util.tree_map_with_path(
        lambda path, x: x[parent_flat] if path[-1].key in _SELF_CACHE else x, s["cache"])
    seen = s["seen"][parent_flat].at[jnp.arange(b * k), token_flat].set(True) if track else s["seen"]
    logits, cache = decode_step(cfg, params, cache, token_flat[:, None], position_offset=t)
    return dict(t=t1, running=running, seen=seen, cache=cache, last=logits[:, -1].astype(jnp.float32),
                running_scores=running_scores, sequences=sequences, scores=scores, finished=finished,
                improvable=improvable, go_on=go_on)

  s = jax.lax.while_loop(lambda s: s["go_on"], body, state)
  r = num_return_sequences
  tokens = s["sequences"][:, :r]  # positions after [SEP] were never written: [PAD]
  return tokens.reshape(b * r, max_length), s["scores"][:, :r].reshape(b * r)
