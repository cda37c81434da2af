"""The README's main job as a user runs it: convert a transformers BLIP dir, then score an image."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hf_ref import make_hf

BIN = os.path.join(os.path.dirname(sys.executable), "blip-jax")


def run(*args):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the CLI runs as a user's would: one CPU device
  out = subprocess.run([BIN, *args], capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory, vocab_path):
  d = tmp_path_factory.mktemp("cli")
  hf = make_hf("retrieval", 1e-5, seed=21)
  hf.save_pretrained(d / "hf")
  out = run("convert", str(d / "hf"), str(d / "ours"), "--vocab", vocab_path)
  assert "retrieval model" in out.stdout and "tokenizer: bert" in out.stdout
  return hf, d


def test_convert_and_score_match_transformers(converted, coco, vocab_path):
  hf, d = converted
  image, caps = coco[5]
  texts = [caps[0], "a plate of food on a wooden table"]
  out = run("score", "--model", str(d / "ours"), "--image", image, "--text", texts[0], "--text", texts[1])
  rows = [line.split("\t") for line in out.stdout.strip().splitlines()]
  assert len(rows) == 2
  got_itm = np.array([float(r[2].split("=")[1]) for r in rows])
  got_cos = np.array([float(r[3].split("=")[1]) for r in rows])
  # the reference: transformers on the same image and texts (HF processor pipeline by hand)
  from transformers import BertTokenizer, BlipImageProcessor
  from PIL import Image
  from blip_jax import pre_caption
  tok = BertTokenizer(vocab_path)
  enc = tok([pre_caption(t, 30) for t in texts], padding="max_length", max_length=35, return_tensors="pt")
  pv = BlipImageProcessor(size={"height": 224, "width": 224})(Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    ids = enc["input_ids"].clone()
    ids[:, 0] = 30523
    itm = hf(input_ids=ids, pixel_values=pv.repeat(2, 1, 1, 1), attention_mask=enc["attention_mask"]).itm_score
    ref_itm = torch.softmax(itm, -1)[:, 1].numpy()
    ref_cos = hf(input_ids=enc["input_ids"], pixel_values=pv, attention_mask=enc["attention_mask"],
                 use_itm_head=False).itm_score[0].numpy()
  np.testing.assert_allclose(got_itm, ref_itm, atol=2e-4)  # printed with 4 decimals
  np.testing.assert_allclose(got_cos, ref_cos, atol=2e-4)


def test_convert_back_to_hf(converted):
  hf, d = converted
  run("convert", str(d / "ours"), str(d / "hf_again"), "--to", "hf")
  from transformers import BlipForImageTextRetrieval
  back, info = BlipForImageTextRetrieval.from_pretrained(str(d / "hf_again"), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert os.path.exists(d / "hf_again" / "vocab.txt")


def test_errors_are_one_line(tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([BIN, "convert", str(tmp_path / "missing.pth"), str(tmp_path / "x")],
                       capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode != 0 and "error:" in out.stderr and "Traceback" not in out.stderr


def test_train_tokenizer(tmp_path, coco):
  (tmp_path / "c.txt").write_text("\n".join(c for _, caps in coco for c in caps))
  out = run("train-tokenizer", "--input", str(tmp_path / "c.txt"), "--out", str(tmp_path / "spm"),
            "--vocab-size", "400")
  assert "[DEC]=" in out.stdout and os.path.exists(tmp_path / "spm.model")
