"""Position-embedding resizing at load time, bicubic exactly as torch (align_corners=False, A=-0.75).

jax.image.resize uses Keys' cubic with A=-0.5 (and antialiasing), which differs from
torch.nn.functional.interpolate(mode='bicubic'), the function official BLIP uses; so the
interpolation matrix is built here from torch's own definition.
"""
from __future__ import annotations

import math

import numpy as np

_A = -0.75


def _cubic_weights(t: float) -> np.ndarray:
  def near(x):  # |x| <= 1
    return ((_A + 2) * x - (_A + 3)) * x * x + 1
  def far(x):  # 1 < |x| < 2
    return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A
  return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)], np.float64)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] matrix M with resize(x) = M @ x along one axis (torch semantics)."""
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for i in range(n_out):
    src = scale * (i + 0.5) - 0.5  # area_pixel_compute_source_index, not clamped for cubic
    x0 = math.floor(src)
    w = _cubic_weights(src - x0)
    for j, wj in enumerate(w):
      m[i, min(max(x0 - 1 + j, 0), n_in - 1)] += wj  # border indices clamp
  return m


def resize_grid(grid: np.ndarray, size: int) -> np.ndarray:
  """grid [g, g, D] -> [size, size, D]."""
  g = grid.shape[0]
  m = bicubic_matrix(g, size)
  out = np.einsum("ij,jkd->ikd", m, grid.astype(np.float64))
  out = np.einsum("lk,ikd->ild", m, out)
  return out.astype(grid.dtype)


def interpolate_pos_embed(pos_embed: np.ndarray, num_patches: int, num_extra: int = 1) -> np.ndarray:
  """[1, extra + g0^2, D] -> [1, extra + num_patches, D]; extra ([CLS]) tokens kept unchanged."""
  extra, patches = pos_embed[:, :num_extra], pos_embed[0, num_extra:]
  g0, g1 = int(round(math.sqrt(patches.shape[0]))), int(round(math.sqrt(num_patches)))
  if g0 * g0 != patches.shape[0] or g1 * g1 != num_patches:
    raise ValueError(f"position embedding grid is not square: {patches.shape[0]} -> {num_patches}")
  if g0 == g1:
    return pos_embed
  grid = resize_grid(patches.reshape(g0, g0, -1), g1).reshape(1, g1 * g1, -1)
  return np.concatenate([extra, grid], axis=1)
