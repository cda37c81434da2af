"""Our checkpoint format: a directory with

  blip_config.json   the BlipConfig (JSON)
  state/             Orbax checkpoint of {'params': ..., 'extras': {'momentum', 'buffers'}}
  tokenizer/         tokenizer assets + tokenizer.json (optional)
"""
from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp

from blip_jax import fs
from blip_jax.distributed import sync_hosts
from blip_jax.models.config import BlipConfig
from blip_jax.tokenizers import load_tokenizer_dir, save_tokenizer

CONFIG_FILE = "blip_config.json"


def is_native_dir(path: str) -> bool:
  return fs.path(path).is_dir() and fs.exists(fs.join(path, CONFIG_FILE))


def save_native(path: str, cfg: BlipConfig, params, extras=None, tokenizer=None, overwrite: bool = False,
                tag: str | None = None) -> str:
  """Writes the model to a temporary folder next to `path` and renames it when complete: an
  interrupted save leaves no half-written model. An existing non-empty `path` is replaced only
  with overwrite=True. `path` may be a URL (gs://...). With several processes every process calls
  this with the same `tag` (Orbax's save is collective); process 0 writes the rest and renames."""

  if jax.process_count() > 1 and not tag:
    raise ValueError("a save by several processes needs a tag shared by all of them")
  final = str(fs.path(path))
  lead = jax.process_index() == 0
  tmp = fs.temp_sibling(final, tag)
  if lead:
    fs.check_output(path, overwrite, "model folder")
    fs.makedirs(tmp)
  sync_hosts("native save start")
  state = {"params": params, "extras": extras or {}}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(fs.join(tmp, "state"), state, force=True)
  ckptr.wait_until_finished()
  if lead:
    if tokenizer is not None:
      save_tokenizer(tokenizer, fs.join(tmp, "tokenizer"))
    fs.write_text(fs.join(tmp, CONFIG_FILE), cfg.to_json())  # last: its presence marks a complete model
    fs.publish(tmp, final)
  sync_hosts("native save done")
  return final


def load_native(path: str):
  """-> (config, params, extras, tokenizer or None); arrays come back as numpy."""

  path = str(fs.path(path))
  cfg = BlipConfig.from_dict(fs.read_json(fs.join(path, CONFIG_FILE)))
  state = ocp.StandardCheckpointer().restore(fs.join(path, "state"))
  state = jax.tree.map(np.asarray, state)
  tok_dir = fs.join(path, "tokenizer")
  tok = load_tokenizer_dir(tok_dir) if fs.path(tok_dir).is_dir() else None
  return cfg, state["params"], state.get("extras") or {}, tok
