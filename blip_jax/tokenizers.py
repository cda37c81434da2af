"""Tokenizers with BLIP's special-token contract, and the official text cleaning.

Contract (both kinds): `pad_id`, `cls_id`, `sep_id`, `dec_id` ([DEC], decoder bos), `enc_id` ([ENC]),
`vocab_size`; `__call__(texts, max_length, padding='max_length'|'longest')` -> (ids, mask) int32
numpy arrays with [CLS] first and [SEP] last (the model rewrites [CLS] per role); `decode(ids)`.

- BertTokenizer: WordPiece from a bert-base-uncased `vocab.txt` with [DEC]=30522 and [ENC]=30523
  appended, ids identical to transformers.BertTokenizer (pure Python; no tensorflow-text).
- SentencePieceTokenizer: a `.model` file; `train_sentencepiece` makes one with the special tokens
  as control symbols.
"""
from __future__ import annotations

import os
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from blip_jax import fs

# ---- official text cleaning (official data/utils.py) ---------------------------------------------------
_PUNCT = re.compile(r"([.!\"()*#:;~])")


def pre_caption(caption: str, max_words: int = 50) -> str:
  caption = _PUNCT.sub(" ", caption.lower())
  caption = re.sub(r"\s{2,}", " ", caption)
  caption = caption.rstrip("\n").strip(" ")
  words = caption.split(" ")
  if len(words) > max_words:
    caption = " ".join(words[:max_words])
  return caption


def pre_question(question: str, max_words: int = 50) -> str:
  question = _PUNCT.sub("", question.lower()).rstrip(" ")
  words = question.split(" ")
  if len(words) > max_words:
    question = " ".join(words[:max_words])
  return question


# ---- WordPiece ----------------------------------------------------------------------------------
def _is_whitespace(ch):
  return ch in (" ", "\t", "\n", "\r") or unicodedata.category(ch) == "Zs"


def _is_control(ch):
  if ch in ("\t", "\n", "\r"):
    return False
  return unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch):
  cp = ord(ch)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def _is_cjk(cp):
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
          or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
          or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class _Base:
  pad_id: int
  cls_id: int
  sep_id: int
  dec_id: int
  enc_id: int
  vocab_size: int

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def __call__(self, texts: str | Sequence[str], max_length: int = 35, padding: str = "max_length",
               truncation: bool = True):
    if isinstance(texts, str):
      texts = [texts]
    rows = []
    for t in texts:
      body = self.encode(t)
      if truncation:
        body = body[:max_length - 2]
      rows.append([self.cls_id] + body + [self.sep_id])
    if padding == "longest":
      length = max(len(r) for r in rows)
    elif padding == "max_length":
      length = max_length
    else:
      raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
    length = max(length, max(len(r) for r in rows))
    ids = np.full((len(rows), length), self.pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
      ids[i, :len(r)] = r
      mask[i, :len(r)] = 1
    return ids, mask

  @property
  def special_ids(self):
    return {self.pad_id, self.cls_id, self.sep_id, self.dec_id, self.enc_id}


class BertTokenizer(_Base):
  """bert-base-uncased WordPiece + BLIP's [DEC] and [ENC] (ids len(vocab), len(vocab)+1)."""
  kind = "bert"

  def __init__(self, vocab_file: str, do_lower_case: bool = True):
    self.vocab_file = vocab_file
    tokens = fs.path(vocab_file).read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
      tokens.pop()
    self.vocab = {t: i for i, t in enumerate(tokens)}
    for extra in ("[DEC]", "[ENC]"):
      if extra not in self.vocab:
        self.vocab[extra] = len(self.vocab)
    self.inv = {i: t for t, i in self.vocab.items()}
    self.do_lower_case = do_lower_case
    self.pad_id, self.cls_id, self.sep_id = self.vocab["[PAD]"], self.vocab["[CLS]"], self.vocab["[SEP]"]
    self.unk_id = self.vocab["[UNK]"]
    self.dec_id, self.enc_id = self.vocab["[DEC]"], self.vocab["[ENC]"]
    self.vocab_size = len(self.vocab)

  @property
  def special_ids(self):
    return super().special_ids | {self.unk_id}  # transformers skips [UNK] with the specials too

  # BasicTokenizer
  def _basic(self, text: str) -> list[str]:
    out = []
    for ch in text:
      cp = ord(ch)
      if cp == 0 or cp == 0xFFFD or _is_control(ch):
        continue
      if _is_whitespace(ch):
        out.append(" ")
      elif _is_cjk(cp):
        out.append(f" {ch} ")
      else:
        out.append(ch)
    words = []
    for tok in "".join(out).split():
      if self.do_lower_case:
        tok = "".join(c for c in unicodedata.normalize("NFD", tok.lower()) if unicodedata.category(c) != "Mn")
      cur = []
      for ch in tok:
        if _is_punctuation(ch):
          if cur:
            words.append("".join(cur))
            cur = []
          words.append(ch)
        else:
          cur.append(ch)
      if cur:
        words.append("".join(cur))
    return words

  def _wordpiece(self, word: str) -> list[int]:
    if len(word) > 100:
      return [self.unk_id]
    ids, start = [], 0
    while start < len(word):
      end, found = len(word), None
      while start < end:
        piece = word[start:end] if start == 0 else "##" + word[start:end]
        if piece in self.vocab:
          found = self.vocab[piece]
          break
        end -= 1
      if found is None:
        return [self.unk_id]
      ids.append(found)
      start = end
    return ids

  def encode(self, text: str) -> list[int]:
    return [i for w in self._basic(text) for i in self._wordpiece(w)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    # ids past the vocabulary (a model's padding rows, which an untrained model can emit) are dropped
    toks = [self.inv[int(i)] for i in ids
            if int(i) in self.inv and not (skip_special_tokens and int(i) in self.special_ids)]
    text = " ".join(toks).replace(" ##", "").strip()
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
      text = text.replace(a, b)
    return text

  def save(self, directory: str) -> dict:
    fs.makedirs(directory)
    fs.path(fs.join(directory, "vocab.txt")).write_bytes(fs.path(self.vocab_file).read_bytes())
    return {"type": "bert", "vocab": "vocab.txt", "do_lower_case": self.do_lower_case}


SP_SPECIALS = ("[CLS]", "[SEP]", "[DEC]", "[ENC]", "[MASK]")


class SentencePieceTokenizer(_Base):
  """A SentencePiece model trained with `train_sentencepiece` (pad 0, unk 1, then SP_SPECIALS)."""
  kind = "sentencepiece"

  def __init__(self, model_file: str):

    self.model_file = model_file
    self.sp = spm.SentencePieceProcessor(model_proto=fs.path(model_file).read_bytes())
    ids = {p: self.sp.piece_to_id(p) for p in SP_SPECIALS}
    if any(self.sp.id_to_piece(i) != p for p, i in ids.items()) or self.sp.pad_id() < 0:
      raise ValueError(f"{model_file}: a BLIP SentencePiece model needs a pad id and the control "
                       f"symbols {SP_SPECIALS}; train it with `blip-jax train-tokenizer`")
    self.pad_id = self.sp.pad_id()
    self.cls_id, self.sep_id, self.dec_id, self.enc_id = (ids[p] for p in SP_SPECIALS[:4])
    self.vocab_size = self.sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    keep = [int(i) for i in ids  # ids past the vocabulary (a model's padding rows) are dropped
            if 0 <= int(i) < self.vocab_size and not (skip_special_tokens and int(i) in self.special_ids)]
    return self.sp.decode(keep)

  def save(self, directory: str) -> dict:
    fs.makedirs(directory)
    fs.path(fs.join(directory, "spm.model")).write_bytes(fs.path(self.model_file).read_bytes())
    return {"type": "sentencepiece", "model": "spm.model"}


def train_sentencepiece(text_file: str, model_prefix: str, vocab_size: int = 8000,
                        model_type: str = "unigram", lowercase: bool = True) -> str:
  """Trains a SentencePiece model with BLIP's special tokens. Returns the .model path."""
  spm.SentencePieceTrainer.train(
      input=text_file, model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
      pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, control_symbols=list(SP_SPECIALS),
      hard_vocab_limit=False, normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
      minloglevel=2)
  return model_prefix + ".model"


def tokenizer_from_config(cfg: dict, root: str = "") -> _Base:
  """{'type': 'bert', 'vocab': path} | {'type': 'sentencepiece', 'model': path}."""
  kind = cfg.get("type")
  if kind == "bert":
    return BertTokenizer(os.path.join(root, cfg["vocab"]), cfg.get("do_lower_case", True))
  if kind == "sentencepiece":
    return SentencePieceTokenizer(os.path.join(root, cfg["model"]))
  raise ValueError(f"unknown tokenizer type {kind!r} (expected 'bert' or 'sentencepiece')")


def save_tokenizer(tok: _Base, directory: str):
  fs.write_json(fs.join(directory, "tokenizer.json"), tok.save(directory), indent=None)


def load_tokenizer_dir(directory: str) -> _Base | None:
  """tokenizer.json (ours) or a bare vocab.txt (HF dirs saved with a processor)."""
  meta = fs.join(directory, "tokenizer.json")
  if fs.exists(meta):
    cfg = fs.read_json(meta)
    if "type" in cfg:
      return tokenizer_from_config(cfg, directory)
  if fs.exists(fs.join(directory, "vocab.txt")):
    return BertTokenizer(fs.join(directory, "vocab.txt"))
  return None


def check_compatible(tok: _Base, text_cfg) -> None:
  """The model's special ids and vocab must be the tokenizer's."""
  problems = [f"{n}: tokenizer {getattr(tok, n)} vs model {getattr(text_cfg, n)}"
              for n in ("pad_id", "cls_id", "sep_id", "dec_id", "enc_id")
              if getattr(tok, n) != getattr(text_cfg, n)]
  if tok.vocab_size > text_cfg.vocab_size:
    problems.append(f"vocab_size: tokenizer {tok.vocab_size} > model {text_cfg.vocab_size}")
  if problems:
    raise ValueError("tokenizer does not fit the model: " + "; ".join(problems))
