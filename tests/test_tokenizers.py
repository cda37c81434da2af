"""Tokenizers: WordPiece ids identical to transformers.BertTokenizer with BLIP's added tokens,
official pre_caption / pre_question, SentencePiece with the same special-token contract."""
import numpy as np
import pytest
from transformers import BertTokenizer as HFBertTokenizer

from blip_jax.tokenizers import BertTokenizer, SentencePieceTokenizer, pre_caption, pre_question, train_sentencepiece

TEXTS = [
    "a picture of a Dog!",
    "Héllo, wörld... naïve CAFÉ résumé",  # accents stripped with lower-casing
    "unaffable xyzzyqq supercalifragilisticexpialidocious",  # word pieces and [UNK]
    "中文 字符 and ‘curly quotes’ — em-dash; (parens) [brackets] {braces}",  # CJK, punctuation
    "tabs\tand\nnewlines   and  spaces",
    "it's a 3.5-inch don't #hashtag @user e-mail@x.com",
    "\x00control\u200bzero-width\ufffdreplacement",
    "x" * 120,  # longer than WordPiece's 100 chars -> [UNK]
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen",  # truncation
    "",
]


@pytest.fixture(scope="module")
def toks(vocab_path):
  hf = HFBertTokenizer(vocab_path)
  hf.add_special_tokens({"bos_token": "[DEC]"})  # as official BLIP init_tokenizer
  hf.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
  return BertTokenizer(vocab_path), hf


def test_special_ids(toks):
  ours, hf = toks
  assert (ours.pad_id, ours.cls_id, ours.sep_id, ours.dec_id, ours.enc_id) == (0, 101, 102, 30522, 30523)
  assert ours.vocab_size == len(hf) == 30524
  ids, _ = ours(["a picture of a Dog!"], max_length=8)
  assert ids.tolist() == [[101, 1037, 3861, 1997, 1037, 3899, 999, 102]]  # parity_notes example


@pytest.mark.parametrize("padding", ["max_length", "longest"])
def test_ids_identical_to_transformers(toks, padding):
  ours, hf = toks
  ref = hf(TEXTS, padding=padding, max_length=12, truncation=True, return_tensors="np")
  ids, mask = ours(TEXTS, max_length=12, padding=padding)
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_decode(toks):
  ours, _ = toks
  ids, _ = ours(["a picture of a dog, running!"], max_length=16)
  assert ours.decode(ids[0]) == "a picture of a dog, running!"


@pytest.mark.parametrize("raw,max_words,want", [
    ("A Dog.  Running!!", 30, "a dog running"),
    ('He said: "hi" (twice) * # ~ ;end', 30, "he said hi twice end"),
    ("Commas, apostrophes' hyphen-ated? slash/kept", 30, "commas, apostrophes' hyphen-ated? slash/kept"),
    ("  leading and trailing  \n", 30, "leading and trailing"),
    ("one two three four five", 3, "one two three"),
])
def test_pre_caption(raw, max_words, want):
  assert pre_caption(raw, max_words) == want


@pytest.mark.parametrize("raw,want", [
    ("What color is the Bus?", "what color is the bus?"),
    ("Is it (really) a dog!", "is it really a dog"),
    ("Two  spaces. kept   ", "two  spaces kept"),  # no collapsing; trailing spaces stripped
])
def test_pre_question(raw, want):
  assert pre_question(raw) == want


def test_pre_question_truncates_to_50_words():
  assert pre_question(" ".join(["w"] * 60)) == " ".join(["w"] * 50)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory, coco):
  d = tmp_path_factory.mktemp("spm")
  corpus = d / "corpus.txt"
  corpus.write_text("\n".join(pre_caption(c) for _, caps in coco for c in caps))
  return train_sentencepiece(str(corpus), str(d / "captions"), vocab_size=500)


def test_sentencepiece_contract(spm_model):
  tok = SentencePieceTokenizer(spm_model)
  assert tok.pad_id == 0 and len({tok.cls_id, tok.sep_id, tok.dec_id, tok.enc_id}) == 4
  ids, mask = tok(["a man riding a horse", "two dogs"], max_length=10)
  assert ids.shape == (2, 10) and ids[0, 0] == tok.cls_id
  n = int(mask[0].sum())
  assert ids[0, n - 1] == tok.sep_id and (ids[0, n:] == tok.pad_id).all()
  assert tok.decode(ids[0]) == "a man riding a horse"
  # special tokens never come out of plain text
  assert not set(tok.encode("[CLS] [DEC] [ENC]")) & {tok.cls_id, tok.dec_id, tok.enc_id}


def test_sentencepiece_rejects_plain_models(tmp_path, coco):
  import sentencepiece as spm
  (tmp_path / "c.txt").write_text("\n".join(c for _, caps in coco[:50] for c in caps))
  spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "plain"),
                                 vocab_size=200, hard_vocab_limit=False, minloglevel=2)
  with pytest.raises(ValueError, match="train it with `blip-jax train-tokenizer`"):
    SentencePieceTokenizer(str(tmp_path / "plain.model"))
