"""Reading PyTorch-side weights: official `.pth` files and HF `save_pretrained` dirs.

`.pth` and `pytorch_model.bin` files are torch.save pickles; they are read by checkpoints.pth, our
own restricted unpickler (no torch needed), which refuses any pickle that would import or call code
(a crafted file raises CheckpointError, never runs).
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile

import numpy as np
from safetensors.numpy import load_file

from blip_jax.checkpoints import pth


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the model (message lists every problem)."""


def _to_numpy(sd) -> dict[str, np.ndarray]:
  """Tensors (NumPy arrays from pth.load) and numeric scalars of a state dict; the rest is dropped."""
  return {k: (v if isinstance(v, np.ndarray) else np.asarray(v)) for k, v in sd.items()
          if isinstance(v, (np.ndarray, int, float)) and not isinstance(v, bool)}


def read_pth(path: str) -> dict[str, np.ndarray]:
  """Official BLIP checkpoint (torch.save dict with 'model') or a bare state dict, weights only.
  Read by checkpoints.pth (no torch needed): a pickle naming anything but tensors is refused."""
  try:
    obj = pth.load(path)
  except pth.UnsafePickleError as e:
    raise CheckpointError(
        f"{path}: refused to unpickle: the file needs more than tensors to load (it could run "
        f"code), so it is not read. Details: {e}") from None
  except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, struct.error, KeyError, ValueError,
          TypeError, IndexError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
                          f"{type(e).__name__}: {e}") from None
  if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
    obj = obj["model"]
  elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
  return _to_numpy(obj)


def read_state_dict_file(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".safetensors"):
    return load_file(path)
  return read_pth(path)


def read_hf_dir(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, state dict) of a transformers save_pretrained directory."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise CheckpointError(f"{path}: no config.json (not a transformers save_pretrained dir)")
  with open(cfg_path) as f:
    config = json.load(f)
  sd: dict[str, np.ndarray] = {}
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(os.path.join(path, "model.safetensors")):
    sd = read_state_dict_file(os.path.join(path, "model.safetensors"))
  elif os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    for name in files:
      sd.update(read_state_dict_file(os.path.join(path, name)))
  elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
    sd = read_pth(os.path.join(path, "pytorch_model.bin"))
  else:
    raise CheckpointError(f"{path}: no model.safetensors, sharded index or pytorch_model.bin")
  return config, sd
