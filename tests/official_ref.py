"""Official-layout state dicts (keys and shapes exactly as ../shared/reference/keys/) filled from
HF reference models, so an official .pth can be tested against transformers."""
from __future__ import annotations

import os
import re

import torch
from conftest import SHARED
from hf_ref import make_hf

from blip_jax.checkpoints.mapping import to_hf_key

KEYS = os.path.join(SHARED, "reference", "keys")


def read_keys(name):
  """{key: (shape, dtype)} from a keys file."""
  out = {}
  with open(os.path.join(KEYS, name)) as f:
    for line in f:
      if line.startswith("#") or not line.strip():
        continue
      key, shape, dtype = line.rstrip("\n").split("\t")[:3]
      out[key] = (() if shape == "scalar" else tuple(int(s) for s in shape.split("x")), dtype)
  return out


def shared_pair(eps=1e-6):
  """HF caption + retrieval models whose shared weights are equal, as in one pretraining model:
  one ViT, and a text encoder that shares all but self-attention with the decoder."""
  cap, ret = make_hf("caption", eps, seed=2), make_hf("retrieval", eps, seed=1)
  with torch.no_grad():
    ret.vision_model.load_state_dict(cap.vision_model.state_dict())
    dec = cap.text_decoder.bert.state_dict()
    for k, v in ret.text_encoder.state_dict().items():
      if not re.search(r"(^|\.)attention\.", k) and k in dec:  # crossattention is shared
        v.copy_(dec[k])
  return cap, ret


def official_state_dict(keys_file, cap, ret, seed=0):
  """Every key of `keys_file` with its shape, from the HF models; momentum copies are perturbed
  (so a test can tell them apart) and queues random."""
  g = torch.Generator().manual_seed(seed)
  cap_sd, ret_sd = cap.state_dict(), ret.state_dict()
  sd = {}
  for key, (shape, dtype) in read_keys(keys_file).items():
    base = key.replace("_m.", ".", 1) if re.match(r"^\w+_m\.", key) else key
    if key.endswith("position_ids"):
      v = torch.arange(shape[-1]).reshape(shape)
    elif key in ("queue_ptr", "ptr_queue"):
      v = torch.zeros(shape, dtype=torch.long)
    elif key == "idx_queue":
      v = torch.full(shape, -100, dtype=torch.long)
    elif key in ("image_queue", "text_queue"):
      v = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=0)
    elif key == "temp":
      v = torch.tensor(0.05)
    else:
      hk = to_hf_key(base)
      src = cap_sd if base.startswith("text_decoder.") else (ret_sd if hk in ret_sd else cap_sd)
      v = src[hk].clone()
      if base != key:
        v = v + 0.01 * torch.randn(v.shape, generator=g)
    assert tuple(v.shape) == shape, (key, v.shape, shape)
    sd[key] = v
  return sd
