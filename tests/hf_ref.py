"""Reference models from transformers' PyTorch BLIP, built from small random configs.

Init as parity_notes.md says (std 0.05, LayerNorm weight 1 + N(0, 0.1)): with the default 0.02
attention is nearly uniform and cross-attention bugs hide. Sizes match ../shared/reference/keys/
(vision 192/4/3, text 192/4/3, 224 px, vocab 30524).
"""
from __future__ import annotations

import torch
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering

CLASSES = {"caption": BlipForConditionalGeneration, "retrieval": BlipForImageTextRetrieval,
           "vqa": BlipForQuestionAnswering}
SIZE = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3)


def hf_config(vision_eps: float, image_size: int = 224, label_smoothing: float = 0.0):
  return BlipConfig(
      vision_config=dict(**SIZE, image_size=image_size, patch_size=16, layer_norm_eps=vision_eps),
      text_config=dict(**SIZE, vocab_size=30524, encoder_hidden_size=192, label_smoothing=label_smoothing),
      image_text_hidden_size=256, label_smoothing=label_smoothing)


@torch.no_grad()
def parity_reinit(model, seed: int):
  g = torch.Generator().manual_seed(seed)
  for name, p in sorted(model.named_parameters()):
    if "norm" in name.lower() and name.endswith("weight"):
      p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    else:
      p.copy_(0.05 * torch.randn(p.shape, generator=g))
  return model


def make_hf(kind: str, vision_eps: float, seed: int = 0, image_size: int = 224):
  torch.manual_seed(seed)
  cfg = hf_config(vision_eps, image_size, label_smoothing=0.1)
  model = CLASSES[kind](cfg).eval()
  model.tie_weights()
  return parity_reinit(model, seed)
