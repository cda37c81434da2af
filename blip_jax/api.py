"""The public Python API: load any BLIP checkpoint, preprocess, and run each role.

    model = blip_jax.load(path)           # official .pth | HF dir | our checkpoint dir
    pixels = model.preprocess(images)     # paths / uint8 HWC arrays -> float32 [B, H, W, 3]
    ids, mask = model.tokenize(texts)     # needs a tokenizer (in the checkpoint, or vocab=...)
    model.image_feat(pixels); model.text_feat(ids, mask); model.itm_logits(pixels, ids, mask)
    model.lm_logits(pixels, ids, mask); model.lm_loss(pixels, ids, mask, label_smoothing=0.1)
    model.generate(pixels)                            # captions (caption / pretraining models)
    model.answer(images, questions, candidates=None)  # VQA: rank a candidate list, or generate
    model.nlvr_logits(pixels0, pixels1, ids, mask)    # NLVR2: does the sentence hold for the pair

Every method is one jitted function per (config, method, input shapes), shared by all models of
the same config, so loading twice does not compile twice.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from blip_jax import fs, losses
from blip_jax import preprocess as _pre
from blip_jax.checkpoints import convert, hub, native
from blip_jax.checkpoints.torch_io import CheckpointError
from blip_jax.models import answer as ans
from blip_jax.models import generate as gen
from blip_jax.models.blip import Blip
from blip_jax.models.config import BlipConfig
from blip_jax.tokenizers import BertTokenizer, check_compatible, load_tokenizer_dir, pre_question


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(cfg: BlipConfig, method: str, params, *args):
  return Blip(cfg).apply({"params": params}, *args, method=getattr(Blip, method))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("label_smoothing", "prompt_length", "reduction"))
def _lm_loss(cfg, params, pixels, ids, mask, label_smoothing=0.1, prompt_length=0, reduction="mean"):
  def f(m):
    return m.lm_logits(m.encode_image(pixels), ids, mask)
  logits = Blip(cfg).apply({"params": params}, method=f)
  return losses.lm_loss(logits, ids, mask, label_smoothing=label_smoothing,
                        prompt_length=prompt_length, reduction=reduction)


@functools.partial(jax.jit, static_argnums=(0,))
def _vqa_answer_logits(cfg, params, pixels, q_ids, q_mask, a_ids, a_mask):
  def f(m):
    q = m.vqa_question(m.encode_image(pixels), q_ids, q_mask)
    return m.vqa_answer_logits(q, q_mask, a_ids, a_mask)
  return Blip(cfg).apply({"params": params}, method=f)


@functools.partial(jax.jit, static_argnums=(0,))
def _nlvr_logits(cfg, params, pixels0, pixels1, ids, mask):
  def f(m):  # two ViT calls (the official stacks the pair into one batch: the same per image)
    return m.nlvr_logits(m.encode_image(pixels0), m.encode_image(pixels1), ids, mask)
  return Blip(cfg).apply({"params": params}, method=f)


class BlipModel:
  """A config, its params (and training extras), and a tokenizer, with the roles as methods."""

  def __init__(self, config: BlipConfig, params, extras: Optional[dict] = None, tokenizer=None):
    self.config = config
    self.params = jax.tree.map(jnp.asarray, params)
    self.extras = extras or {}
    self.tokenizer = tokenizer
    if tokenizer is not None:
      check_compatible(tokenizer, config.text)

  def _require(self, what: str, ok: bool):
    if not ok:
      raise ValueError(f"a {self.config.kind!r} model has no {what}")

  # ---- inputs ----
  def preprocess(self, images, size: Optional[int] = None) -> np.ndarray:
    return _pre.preprocess(images, size or self.config.vision.image_size)

  def tokenize(self, texts, max_length: int = 35, padding: str = "max_length"):
    if self.tokenizer is None:
      raise ValueError("this model has no tokenizer: pass vocab=PATH (or tokenizer=...) to load()")
    return self.tokenizer(texts, max_length=max_length, padding=padding)

  # ---- roles ----
  def encode_image(self, pixels):
    return _apply(self.config, "encode_image", self.params, jnp.asarray(pixels))

  def image_feat(self, pixels):
    self._require("ITC projections", self.config.has_itc)
    f = lambda m, p: m.image_feat(m.encode_image(p))
    return _apply_fn(self.config, f, self.params, jnp.asarray(pixels))

  def text_feat(self, ids, mask):
    self._require("ITC projections", self.config.has_itc)
    return _apply(self.config, "text_feat", self.params, jnp.asarray(ids), jnp.asarray(mask))

  def itm_logits(self, pixels, ids, mask):
    self._require("ITM head", self.config.has_itc)
    f = lambda m, p, i, k: m.itm_logits(m.encode_image(p), i, k)
    return _apply_fn(self.config, f, self.params, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))

  def itm_prob(self, pixels, ids, mask):
    return jax.nn.softmax(self.itm_logits(pixels, ids, mask), axis=-1)[:, 1]

  def lm_logits(self, pixels, ids, mask):
    self._require("decoder", self.config.kind in ("pretrain", "caption"))
    f = lambda m, p, i, k: m.lm_logits(m.encode_image(p), i, k)
    return _apply_fn(self.config, f, self.params, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))

  def lm_loss(self, pixels, ids, mask, label_smoothing: float = 0.1, prompt_length: int = 0,
              reduction: str = "mean"):
    self._require("decoder", self.config.kind in ("pretrain", "caption"))
    return _lm_loss(self.config, self.params, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask),
                    label_smoothing=label_smoothing, prompt_length=prompt_length, reduction=reduction)

  def nlvr_logits(self, pixels0, pixels1, ids, mask):
    """NLVR2 logits [B, 2] (index 1: the sentence is true of the pair): both images through the
    ViT, then the two-image encoder and head. pixels0/pixels1 [B, H, W, 3] (`preprocess`)."""
    self._require("NLVR2 head", self.config.kind == "nlvr")
    return _nlvr_logits(self.config, self.params, *map(jnp.asarray, (pixels0, pixels1, ids, mask)))

  def vqa_answer_logits(self, pixels, q_ids, q_mask, a_ids, a_mask):
    self._require("answer decoder", self.config.kind == "vqa")
    return _vqa_answer_logits(self.config, self.params, *map(jnp.asarray, (pixels, q_ids, q_mask, a_ids, a_mask)))

  def answer(self, images, questions, candidates=None, k: int = 128, num_beams: int = 3, *,
             max_length: int = 10, min_length: int = 1, length_normalization: str = "official",
             batch_size: int = 16):
    """One answer string per question (official blip_vqa). images: as `preprocess` takes them (one
    per question, or one for all), or preprocessed pixels [B, H, W, 3]; the same image given
    several times is encoded once. With `candidates` (a list of answer strings, e.g.
    answer_list.json): the official two-step rank with the top k; without: beam search
    (num_beams, max_length and min_length count [DEC]; num_beams=1 is greedy). Questions go
    through pre_question and are padded to 35 tokens."""
    self._require("answer decoder", self.config.kind == "vqa")
    if self.tokenizer is None:
      raise ValueError("answering needs a tokenizer: pass vocab=PATH to load()")
    questions = [questions] if isinstance(questions, str) else list(questions)
    cleaned = [pre_question(q) if isinstance(q, str) else "" for q in questions]
    empty = [i for i, q in enumerate(cleaned) if not q]
    if empty:
      raise ValueError(f"question {empty[0]} is empty (after pre_question: {questions[empty[0]]!r})")
    cands = (ans.tokenize_candidates(self.tokenizer, candidates, self.config.text.sep_id)
             if candidates is not None else None)
    pixels_given = isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype.kind == "f"
    if pixels_given:
      unique, index = list(range(len(images))), np.arange(len(images))
    else:
      images = [images] if isinstance(images, (str, os.PathLike, bytes)) or (
          isinstance(images, np.ndarray) and images.ndim == 3) else list(images)
      keys = [im if isinstance(im, (str, os.PathLike)) else id(im) for im in images]
      order = list(dict.fromkeys(keys))
      unique = [images[keys.index(key)] for key in order]
      index = np.asarray([order.index(key) for key in keys])
    if len(index) == 1 and len(questions) > 1:
      index = np.zeros(len(questions), int)
    if len(index) != len(questions):
      raise ValueError(f"{len(index)} images for {len(questions)} questions: give one image per question, or one")
    out = []
    for s in range(0, len(questions), batch_size):
      rows = np.arange(s, min(s + batch_size, len(questions)))
      used = sorted(set(index[rows].tolist()))
      pix = images[used] if pixels_given else self.preprocess([unique[u] for u in used])
      embeds = self.encode_image(jnp.asarray(pix))
      states, q_mask = ans.encode_questions(self.config, self.params, self.tokenizer, embeds,
                                            [used.index(i) for i in index[rows]], [cleaned[r] for r in rows])
      out += ans.answers_from_states(self.config, self.params, self.tokenizer, states, q_mask, cands, k=k,
                                     num_beams=num_beams, max_length=max_length, min_length=min_length,
                                     length_normalization=length_normalization)
    return out

  def generate(self, pixels, prompt: str = "a picture of ", max_length: int = 20, min_length: int = 5, *,
               num_beams: int = 1, top_p: Optional[float] = None, top_k: int = 50, temperature: float = 1.0,
               repetition_penalty: float = 1.0, length_penalty: float = 1.0, num_captions: int = 1,
               seed: int = 0, length_normalization: str = "official"):
    """Captions: greedy (default), beam search (num_beams > 1) or nucleus sampling (top_p).

    max/min_length count the prompt's tokens and [DEC], as the official code counts them (the
    official COCO setting: num_beams=3, max_length=20, min_length=5); the prompt is stripped from
    the text. num_captions > 1 (the best beams, or independent samples) returns a list of lists.
    Sampling is deterministic for a seed. length_normalization: beam scores as transformers 4.15,
    which the paper's run used ("official"), or as current transformers ("transformers").
    """
    self._require("decoder", self.config.kind in ("pretrain", "caption"))
    return self.generate_from_embeds(
        self.encode_image(jnp.asarray(pixels)), prompt, max_length, min_length, num_beams=num_beams, top_p=top_p,
        top_k=top_k, temperature=temperature, repetition_penalty=repetition_penalty, length_penalty=length_penalty,
        num_captions=num_captions, seed=seed, length_normalization=length_normalization)

  def generate_from_embeds(self, image_embeds, prompt: str = "a picture of ", max_length: int = 20,
                           min_length: int = 5, *, num_beams: int = 1, top_p: Optional[float] = None, top_k: int = 50,
                           temperature: float = 1.0, repetition_penalty: float = 1.0, length_penalty: float = 1.0,
                           num_captions: int = 1, seed: int = 0, length_normalization: str = "official"):
    """`generate` on image tokens already encoded (encode_image): the decoding half."""
    self._require("decoder", self.config.kind in ("pretrain", "caption"))
    if self.tokenizer is None:
      raise ValueError("generate needs a tokenizer: pass vocab=PATH to load()")
    if num_beams > 1 and top_p is not None:
      raise ValueError("choose beam search (num_beams) or sampling (top_p), not both")
    if num_captions > 1 and num_beams == 1 and top_p is None:
      raise ValueError("several captions per image need beam search (num_beams) or sampling (top_p)")
    memory = image_embeds
    prompt_ids = self.prompt_ids(prompt, memory.shape[0])
    kw = dict(max_length=max_length, min_length=min_length, repetition_penalty=repetition_penalty)
    if num_beams > 1:
      tokens, _ = gen.beam_search(self.config, self.params, memory, prompt_ids, num_beams=num_beams,
                                  length_penalty=length_penalty, num_return_sequences=num_captions,
                                  length_normalization=length_normalization, **kw)
    elif top_p is not None:
      tokens = gen.sample(self.config, self.params, memory, prompt_ids, jax.random.PRNGKey(seed), top_p=top_p,
                          top_k=top_k, temperature=temperature, num_return_sequences=num_captions, **kw)
    else:
      tokens = gen.greedy(self.config, self.params, memory, prompt_ids, **kw)
    texts = self.decode_captions(tokens, prompt)
    if num_captions == 1:
      return texts
    return [texts[i:i + num_captions] for i in range(0, len(texts), num_captions)]

  def prompt_ids(self, prompt: str, batch: int):
    """[DEC] + the prompt's tokens (no [SEP]), repeated for a batch: int32 [batch, P]."""
    ids = [self.config.text.dec_id] + (self.tokenizer.encode(prompt) if prompt else [])
    return jnp.asarray([ids] * batch, jnp.int32)

  def decode_captions(self, tokens, prompt: str = "a picture of "):
    """Token ids -> texts without special tokens, the prompt stripped (as the official code does)."""
    texts = [self.tokenizer.decode(t) for t in np.asarray(tokens)]
    p = prompt.strip()
    return [t[len(p):].strip() if p and t.startswith(p) else t for t in texts]

  # ---- saving ----
  def save(self, path: str, overwrite: bool = False, tag: str | None = None) -> str:
    """Our format (Orbax + config JSON + tokenizer assets), written whole or not at all; an
    existing non-empty folder is replaced only with overwrite=True. Several processes: all call
    it with the same tag."""
    return native.save_native(path, self.config, jax.tree.map(np.asarray, self.params),
                              self.extras, self.tokenizer, overwrite=overwrite, tag=tag)

  def export_hf(self, path: str, overwrite: bool = False) -> str:
    """A transformers save_pretrained-style dir (config.json + model.safetensors)."""
    return convert.export_hf(jax.tree.map(np.asarray, self.params), self.config, path, overwrite=overwrite)


_FN_CACHE: dict = {}


def require(model: BlipModel, use: str, *, kinds: tuple = (), itc: bool = False, hint: str = "",
            name: str = "") -> None:
  """The one check of a model against what a use needs (every command and evaluation calls it): the
  ITC projections and ITM head, one of `kinds`, and a tokenizer. A ValueError names what is missing
  and what would do (`hint`)."""
  kind = model.config.kind
  if itc and not model.config.has_itc:
    raise ValueError(f"a {kind!r} model has no ITC projections and ITM head; {use} needs {hint}")
  if kinds and kind not in kinds:
    raise ValueError(f"{name or 'the checkpoint'} is a {kind} model; {use} needs {hint}")
  if model.tokenizer is None:
    raise ValueError("the checkpoint has no tokenizer: pass --vocab path/to/vocab.txt")


def _apply_fn(cfg, fn, params, *args):
  """jit of an ad-hoc composition of methods, cached by its code object (one compile per shape)."""
  key = (cfg, fn.__code__)
  if key not in _FN_CACHE:
    _FN_CACHE[key] = jax.jit(lambda p, *a: Blip(cfg).apply({"params": p}, *a, method=fn))
  return _FN_CACHE[key](params, *args)


def detect_format(path: str) -> str:
  if native.is_native_dir(path):
    return "native"
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, "config.json")):
      return "hf"
    raise ValueError(f"{path}: a directory with neither {native.CONFIG_FILE} (ours) nor config.json (HF)")
  if os.path.isfile(path):
    return "official"
  raise FileNotFoundError(path)


def load(path: str, *, kind: Optional[str] = None, image_size: Optional[int] = None,
         vision_eps: Optional[float] = None, vocab: Optional[str] = None, tokenizer: Any = None,
         strict: bool = True, dtype: Optional[str] = None, progress=None) -> BlipModel:
  """Loads an official BLIP .pth, a transformers BLIP dir or our checkpoint dir, or by name: an
  official release ("model_base_capfilt_large", see `blip-jax checkpoints`), downloaded once into
  the cache, or a transformers hub id ("Salesforce/blip-image-captioning-base").

  kind:       official files only: load as another model kind (a pretraining checkpoint into a
              caption/retrieval/vqa/nlvr model, as the official finetuning scripts do).
  image_size: interpolate the position embedding to this resolution (bicubic, as official).
  vision_eps: ViT LayerNorm eps (official files default 1e-6; HF dirs take config.json's).
  vocab:      a bert-base-uncased vocab.txt for the tokenizer, when the checkpoint has none.
  strict:     False allows missing / mis-shaped keys (those params are then absent).
  """
  if fs.is_url(path):
    name = None
    if not native.is_native_dir(path):  # ours reads URLs itself (Orbax)
      path = fs.local_copy(path)
  else:  # an official release name (cached download, with BERT's vocab), a hub id, or a path
    path, named_vocab, name = hub.resolve(path)
    vocab = vocab or named_vocab
  fmt = detect_format(path)
  extras = {}
  if fmt == "native":
    cfg, params, extras, tok = native.load_native(path)
  elif fmt == "hf":
    cfg, params = convert.load_hf(path, vision_eps=vision_eps, image_size=image_size, strict=strict,
                                  progress=progress)
    tok = load_tokenizer_dir(path)
  else:
    official = functools.partial(convert.load_official, kind=kind, image_size=image_size, strict=strict,
                                 progress=progress, vision_eps=1e-6 if vision_eps is None else vision_eps)
    try:
      cfg, params, extras = official(path)
    except CheckpointError:
      if name is None:
        raise
      cfg, params, extras = official(hub.refetch_official(name))  # damaged in the cache: never loaded
    tok = None
  if dtype:
    cfg = cfg.replace(dtype=dtype)
  if tokenizer is None and vocab:
    tokenizer = BertTokenizer(vocab)
  return BlipModel(cfg, params, extras, tokenizer or tok)
