"""BLIP pretraining configs: `--config=configs/pretrain.py:VARIANT` with VARIANT in
vit_b | vit_l (the paper's recipe, 224 px) | tiny (CPU smoke run) | demo (the README's main job:
a tiny BLIP on the synthetic source, then retrieval R@1 and captions on held-out pairs).

Override anything from the command line, e.g. --config.batch_size=600 --config.mesh.fsdp=4
--config.data.source.annotations='("/data/cc3m.json",)' --config.data.source.image_root=/data.
A mistyped key fails at parse time, naming it.
"""
import ml_collections as mlc

from blip_jax.train.config_base import base


def _synthetic(c, image_size, n_train, n_eval):
  c.data.source.update(kind="synthetic", num_examples=n_train, image_size=image_size, seed=0, split="train")
  # shapes, counts and left/right are the content: no crops, flips or warps
  c.data.pipeline.update(crop_scale=(1.0, 1.0), flip=False, randaug=False, threads=2)
  c.eval.source = mlc.ConfigDict(dict(kind="synthetic", num_examples=n_eval, image_size=image_size, seed=0,
                                      split="val"))
  c.tokenizer.update(type="sentencepiece", vocab_size=96)
  c.model.vit = ""
  c.model.image_size = image_size
  c.model.text.update(vocab_size=128, max_positions=64, dropout=0.0)
  # identical synthetic captions share an image id: positives for ITC, never ITM negatives
  c.loss.update(use_image_ids=True, itm_scope="global")


def get_config(variant="vit_b"):
  c = base()
  if variant == "vit_b":
    pass
  elif variant == "vit_l":
    c.model.vit = "large"
    c.model.vision.update(drop_path=0.1, remat=True)  # official ViT-L: drop path 0.1, grad checkpointing
    c.batch_size = 2400
    c.optim.lr = 2e-4
    c.loss.queue_size = 57600
  elif variant == "tiny":
    _synthetic(c, 32, 512, 64)
    c.model.vision.update(width=64, depth=2, heads=2, mlp_dim=256, patch=8)
    c.model.text.update(width=64, depth=2, heads=2, mlp_dim=256)
    c.batch_size, c.loss.queue_size, c.epochs = 8, 64, 1
    c.optim.update(lr=5e-4, warmup_steps=10, schedule="cosine", min_lr=1e-5)
    c.log_every, c.checkpoint_every = 5, 20
  elif variant == "demo":
    _synthetic(c, 48, 6144, 256)
    c.model.vision.update(width=96, depth=2, heads=3, mlp_dim=384, patch=8)
    c.model.text.update(width=96, depth=2, heads=3, mlp_dim=384)
    c.batch_size, c.loss.queue_size, c.loss.momentum = 32, 256, 0.99
    c.total_steps = 600
    c.loss.alpha_ramp_epochs = 1.0
    c.optim.update(lr=5e-4, warmup_steps=50, schedule="cosine", min_lr=1e-5, weight_decay=0.05)
    c.log_every, c.checkpoint_every = 50, 200
    c.eval.enabled = True
  else:
    raise ValueError(f"unknown variant {variant!r}: vit_b, vit_l, tiny or demo")
  if variant in ("tiny", "demo"):
    c.model.vision.update(layer_norm_eps=1e-6)
  c.lock()
  return c
