"""What the benches that compare against transformers' BLIP share: the repository paths, the model
sizes and a random-weight transformers model of a size (the speed does not depend on the weights)."""
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
COCO = os.path.join(ROOT, "..", "shared", "data", "coco_karpathy_mini")
SIZES = {"tiny": dict(width=192, depth=4, heads=3, mlp=768), "base": dict(width=768, depth=12, heads=12, mlp=3072)}


def hf_blip(cls, size: str, image_size: int, seed: int = 0):
  """transformers `cls` (e.g. BlipForQuestionAnswering) of SIZES[size] for both towers, vision
  LayerNorm eps 1e-6 (official), vocabulary 30524, in eval mode."""
  import torch
  from transformers import BlipConfig
  s = SIZES[size]
  layers = dict(hidden_size=s["width"], intermediate_size=s["mlp"], num_hidden_layers=s["depth"],
                num_attention_heads=s["heads"])
  cfg = BlipConfig(vision_config=dict(**layers, image_size=image_size, patch_size=16, layer_norm_eps=1e-6),
                   text_config=dict(**layers, vocab_size=30524, encoder_hidden_size=s["width"]))
  torch.manual_seed(seed)
  return cls(cfg).eval()
