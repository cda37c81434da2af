"""HF dir -> ours -> our Orbax dir -> HF dir -> transformers: nothing lost, no key missing or extra."""
import os

import numpy as np
import pytest
import torch
from hf_ref import CLASSES, make_hf

import blip_jax


@pytest.mark.parametrize("kind", ["caption", "retrieval", "vqa"])
def test_roundtrip(kind, tmp_path, vocab_path):
  hf = make_hf(kind, 1e-6, seed=5)
  hf.save_pretrained(tmp_path / "hf")
  model = blip_jax.load(str(tmp_path / "hf"), vocab=vocab_path)
  model.save(str(tmp_path / "ours"))
  again = blip_jax.load(str(tmp_path / "ours"))
  assert again.config == model.config and again.tokenizer is not None
  again.export_hf(str(tmp_path / "back"))
  back, info = CLASSES[kind].from_pretrained(str(tmp_path / "back"), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  assert back.config.vision_config.layer_norm_eps == 1e-6
  want, got = hf.state_dict(), back.state_dict()
  assert set(want) == set(got)
  for k in want:
    torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)  # bit-identical weights
  # and the same outputs
  pv = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
  ids = torch.tensor([[101, 1037, 3899, 102]])
  with torch.no_grad():
    if kind == "retrieval":
      a, b = hf(input_ids=ids, pixel_values=pv).itm_score, back.eval()(input_ids=ids, pixel_values=pv).itm_score
    elif kind == "caption":
      a, b = hf(pixel_values=pv, input_ids=ids).logits, back.eval()(pixel_values=pv, input_ids=ids).logits
    else:
      a = hf.generate(input_ids=ids, pixel_values=pv, max_new_tokens=3)
      b = back.eval().generate(input_ids=ids, pixel_values=pv, max_new_tokens=3)
  torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pretrain_model_is_not_exported_as_hf(tmp_path):
  model = blip_jax.BlipModel(blip_jax.tiny_config("pretrain"), _tiny_params("pretrain"))
  with pytest.raises(ValueError, match="no BLIP pretraining class"):
    model.export_hf(str(tmp_path))


def _tiny_params(kind):
  import jax

  from blip_jax.models.init import _shapes
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _shapes(blip_jax.tiny_config(kind)))


def test_saves_are_whole_or_absent_and_never_overwrite_silently(tmp_path):
  """Our format and the HF export: written under a temporary name and renamed; an existing
  non-empty destination is refused unless overwrite=True, and then replaced whole."""
  model = blip_jax.BlipModel(blip_jax.tiny_config("retrieval"), _tiny_params("retrieval"))
  out = model.save(str(tmp_path / "m"))
  assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary folder left
  (tmp_path / "m" / "stale.txt").write_text("from an older save")
  with pytest.raises(FileExistsError, match="pass --overwrite"):
    model.save(out)
  model.save(out, overwrite=True)
  assert "stale.txt" not in os.listdir(out) and blip_jax.load(out).config == model.config
  model.export_hf(str(tmp_path / "hf"))
  with pytest.raises(FileExistsError, match="pass --overwrite"):
    model.export_hf(str(tmp_path / "hf"))
  assert sorted(os.listdir(tmp_path)) == ["hf", "m"]


def test_models_load_from_a_bucket_url(tmp_path):
  """gs:// model paths (init.blip, --model): an HF dir and an official-style .pth are fetched through
  the fs layer, our format is read in place; against tests/fake_bucket.py's local stand-in."""
  import fake_bucket
  import jax
  uninstall = fake_bucket.install(str(tmp_path / "bucket"))
  try:
    (tmp_path / "bucket" / "b").mkdir(parents=True)
    make_hf("retrieval", 1e-6, seed=5).save_pretrained(tmp_path / "bucket" / "b" / "hf")
    want = blip_jax.load(str(tmp_path / "bucket" / "b" / "hf"))
    got = blip_jax.load("gs://b/hf")
    jax.tree.map(np.testing.assert_array_equal, got.params, want.params)
    got.save("gs://b/ours")
    again = blip_jax.load("gs://b/ours")
    assert (tmp_path / "bucket" / "b" / "ours" / "blip_config.json").exists()
    jax.tree.map(np.testing.assert_array_equal, again.params, want.params)
  finally:
    uninstall()
