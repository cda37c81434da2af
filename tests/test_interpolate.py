"""Position-embedding interpolation equals torch's bicubic (align_corners=False), and a model
loaded at another resolution equals transformers' interpolate_pos_encoding forward."""
import numpy as np
import pytest
import torch
from hf_ref import make_hf

import blip_jax
from blip_jax.checkpoints.interpolate import interpolate_pos_embed


@pytest.mark.parametrize("g0,g1", [(14, 24), (14, 30), (24, 14), (4, 7), (3, 3)])
def test_matches_torch_bicubic(g0, g1, rng):
  d = 8
  pos = rng.randn(1, 1 + g0 * g0, d).astype(np.float32)
  got = interpolate_pos_embed(pos, g1 * g1)
  grid = torch.tensor(pos[:, 1:]).reshape(1, g0, g0, d).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=(g1, g1), mode="bicubic", align_corners=False)
  ref = torch.cat([torch.tensor(pos[:, :1]), ref.permute(0, 2, 3, 1).reshape(1, g1 * g1, d)], dim=1)
  assert got.shape == (1, 1 + g1 * g1, d)
  assert np.abs(got - ref.numpy()).max() <= 1e-5


def test_load_at_other_resolution(tmp_path):
  hf = make_hf("caption", 1e-6, seed=7)
  hf.save_pretrained(tmp_path)
  model = blip_jax.load(str(tmp_path), image_size=288)  # 14x14 -> 18x18 patches
  assert model.params["visual_encoder"]["pos_embed"].shape == (1, 1 + 18 * 18, 192)
  pixels = np.random.RandomState(1).randn(1, 288, 288, 3).astype(np.float32)
  with torch.no_grad():
    ref = hf.vision_model(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                          interpolate_pos_encoding=True).last_hidden_state.numpy()
  assert np.abs(np.asarray(model.encode_image(pixels)) - ref).max() <= 1e-4
