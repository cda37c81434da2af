"""Our checkpoint format: a directory with

  blip_config.json   the BlipConfig (JSON)
  state/             Orbax checkpoint of {'params': ..., 'extras': {'momentum', 'buffers'}}
  tokenizer/         tokenizer assets + tokenizer.json (optional)
"""
from __future__ import annotations

import json
import os

import numpy as np

from blip_jax.models.config import BlipConfig

CONFIG_FILE = "blip_config.json"


def is_native_dir(path: str) -> bool:
  return os.path.isdir(path) and os.path.exists(os.path.join(path, CONFIG_FILE))


def save_native(path: str, cfg: BlipConfig, params, extras=None, tokenizer=None) -> str:
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)  # orbax wants absolute paths
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    f.write(cfg.to_json())
  state = {"params": params, "extras": extras or {}}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, "state"), state, force=True)
  ckptr.wait_until_finished()
  if tokenizer is not None:
    from blip_jax.tokenizers import save_tokenizer
    save_tokenizer(tokenizer, os.path.join(path, "tokenizer"))
  return path


def load_native(path: str):
  """-> (config, params, extras, tokenizer or None); arrays come back as numpy."""
  import orbax.checkpoint as ocp
  from blip_jax.tokenizers import load_tokenizer_dir
  path = os.path.abspath(path)
  with open(os.path.join(path, CONFIG_FILE)) as f:
    cfg = BlipConfig.from_dict(json.load(f))
  state = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))
  import jax
  state = jax.tree.map(np.asarray, state)
  tok_dir = os.path.join(path, "tokenizer")
  tok = load_tokenizer_dir(tok_dir) if os.path.isdir(tok_dir) else None
  return cfg, state["params"], state.get("extras") or {}, tok
