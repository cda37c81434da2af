"""Model configuration: plain frozen dataclasses, JSON round-trippable.

The model config is *not* an ml_collections config: it is part of a checkpoint (saved as JSON beside
the weights), hashed into jit caches, and inferred from official checkpoints, which carry none.
Training configs (ml_collections) hold one of these as a dict.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

# The roles of the text transformer and the tower layout of each model kind (official models/blip*.py).
KINDS = ("pretrain", "retrieval", "caption", "vqa", "nlvr")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  patch: int = 16
  image_size: int = 224
  layer_norm_eps: float = 1e-6  # official (timm) 1e-6; HF BlipVisionConfig default 1e-5
  drop_path: float = 0.0
  remat: bool = False  # jax.checkpoint each block (official: fairscale checkpoint_wrapper)
  attention: str = "auto"  # auto | xla | cudnn | einsum (models/layers.py dot_product_attention)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch) ** 2


VIT_SIZES = {
    "tiny": dict(width=192, depth=4, heads=3, mlp_dim=768),
    "base": dict(width=768, depth=12, heads=12, mlp_dim=3072),
    "large": dict(width=1024, depth=24, heads=16, mlp_dim=4096),
}


@dataclasses.dataclass(frozen=True)
class TextConfig:
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  vocab_size: int = 30524
  max_positions: int = 512
  layer_norm_eps: float = 1e-12
  dropout: float = 0.1  # hidden and attention-probability dropout (official MED)
  attention: str = "auto"  # auto | xla | cudnn | einsum; training with dropout > 0 runs einsum
  pad_id: int = 0
  cls_id: int = 101
  sep_id: int = 102
  dec_id: int = 30522  # [DEC], bos of the decoder
  enc_id: int = 30523  # [ENC], first token of the image-grounded encoder


@dataclasses.dataclass(frozen=True)
class BlipConfig:
  """One BLIP model. `kind` decides which towers exist (official models/blip*.py):

  pretrain:  ViT + one text transformer whose encoder and decoder share every weight except
             self-attention (two self-attention sets per layer) + LM head, projections, ITM head, temp.
  retrieval: ViT + text encoder (with cross-attention) + projections + ITM head + temp.
  caption:   ViT + text decoder (with cross-attention) + LM head.
  vqa:       ViT + question encoder (cross-attends to the image) + answer decoder (cross-attends to the
             question states, so its cross-attention key/value width is the text width) + LM head.
  nlvr:      ViT (run on both images) + an image-grounded text encoder with two cross-attentions per
             layer, one per image (merged from layer `fusion_layer` on) + a 2-way MLP head.
  """
  kind: str = "pretrain"
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  embed_dim: int = 256  # ITC projection width
  # nlvr: the first text layer that concatenates the two images' cross-attention outputs and
  # merges them (2D -> D); layers below average them. The official fixes 6 whatever the depth.
  fusion_layer: int = 6
  dtype: str = "float32"  # compute dtype; params stay float32

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown model kind {self.kind!r}; expected one of {KINDS}")
    if isinstance(self.vision, dict):
      object.__setattr__(self, "vision", VisionConfig(**self.vision))
    if isinstance(self.text, dict):
      object.__setattr__(self, "text", TextConfig(**self.text))
    t = self.text
    bad = {n: getattr(t, n) for n in ("pad_id", "cls_id", "sep_id", "dec_id", "enc_id")
           if not 0 <= getattr(t, n) < t.vocab_size}
    if bad:
      raise ValueError(f"special token ids {bad} are outside the text vocabulary ({t.vocab_size}); "
                       "set them to the tokenizer's ids")

  @property
  def has_itc(self) -> bool:
    return self.kind in ("pretrain", "retrieval")

  @property
  def has_encoder(self) -> bool:
    return self.kind in ("pretrain", "retrieval", "vqa", "nlvr")

  @property
  def has_decoder(self) -> bool:
    return self.kind in ("pretrain", "caption", "vqa")

  def replace(self, **kw) -> "BlipConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "BlipConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown BlipConfig keys: {sorted(unknown)}")
    for sub, sub_cls in (("vision", VisionConfig), ("text", TextConfig)):
      if sub in d and isinstance(d[sub], dict):
        sub_known = {f.name for f in dataclasses.fields(sub_cls)}
        bad = set(d[sub]) - sub_known
        if bad:
          raise ValueError(f"unknown {sub} config keys: {sorted(bad)}")
        d[sub] = sub_cls(**d[sub])
    return cls(**d)


def make_config(kind: str = "pretrain", vit: str = "base", image_size: int = 224, **kw) -> BlipConfig:
  """A standard config: `vit` in VIT_SIZES, text always BERT-base (as official, also for ViT-L)."""
  vision = VisionConfig(image_size=image_size, **VIT_SIZES[vit], **kw.pop("vision", {}))
  text = TextConfig(**kw.pop("text", {}))
  return BlipConfig(kind=kind, vision=vision, text=text, **kw)


def tiny_config(kind: str = "pretrain", image_size: int = 32, patch: int = 16, **kw) -> BlipConfig:
  """A CPU-sized model for tests and demos."""
  vision = dict(width=64, depth=2, heads=2, mlp_dim=256, patch=patch, image_size=image_size)
  vision.update(kw.pop("vision", {}))
  text = dict(width=64, depth=2, heads=2, mlp_dim=256, vocab_size=30524, max_positions=64)
  text.update(kw.pop("text", {}))
  return BlipConfig(kind=kind, vision=VisionConfig(**vision), text=TextConfig(**text), **kw)
