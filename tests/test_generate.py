"""Greedy captions: token ids identical to transformers' generate, with and without the prompt."""
import numpy as np
import pytest
import torch

import blip_jax
from blip_jax.models.generate import greedy
from hf_ref import make_hf


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  hf = make_hf("caption", 1e-6, seed=31)
  d = tmp_path_factory.mktemp("gen")
  hf.save_pretrained(d)
  return hf, blip_jax.load(str(d))


@pytest.mark.parametrize("prompt", [[], [1037, 3861, 1997]], ids=["no-prompt", "a-picture-of"])
def test_greedy_equals_transformers(models, prompt):
  hf, ours = models
  pixels = np.random.RandomState(0).randn(3, 224, 224, 3).astype(np.float32)
  ids = [30522] + prompt
  with torch.no_grad():
    kw = dict(max_length=12, min_length=5)
    if prompt:  # HF drops the last input token (it expects a trailing [SEP])
      ref = hf.generate(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                        input_ids=torch.tensor([[101] + prompt + [102]] * 3), **kw).numpy()
    else:
      ref = hf.generate(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2), **kw).numpy()
  memory = ours.encode_image(pixels)
  got = np.asarray(greedy(ours.config, ours.params, memory, np.array([ids] * 3, np.int32), max_length=12, min_length=5))
  np.testing.assert_array_equal(got[:, :ref.shape[1]], ref)
  assert (got[:, ref.shape[1]:] == 0).all()
  assert ref.shape[1] > len(ids) + 3  # generated several tokens


def test_api_generate_strips_the_prompt(models, vocab_path):
  hf, ours = models
  ours.tokenizer = blip_jax.BertTokenizer(vocab_path)
  pixels = np.random.RandomState(0).randn(2, 224, 224, 3).astype(np.float32)
  texts = ours.generate(pixels, prompt="a picture of ", max_length=12, min_length=5)
  with torch.no_grad():
    ref = hf.generate(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                      input_ids=torch.tensor([[101, 1037, 3861, 1997, 102]] * 2), max_length=12, min_length=5)
  want = [ours.tokenizer.decode(r)[len("a picture of "):].strip() for r in ref.numpy()]
  assert texts == want and all(texts)
