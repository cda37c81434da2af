"""BLIP pretraining configs: `--config=configs/pretrain.py:VARIANT` with VARIANT in
vit_b | vit_l (the paper's recipe, 224 px) | tiny (CPU smoke run) | demo (the README's main job:
a tiny BLIP on the synthetic source, then retrieval R@1 and captions on held-out pairs).

Override anything from the command line, e.g. --config.batch_size=600 --config.mesh.fsdp=4
--config.data.source.annotations='("/data/cc3m.json",)' --config.data.source.image_root=/data.
A mistyped key fails at parse time, naming it.
"""
import ml_collections as mlc


def base():
  c = mlc.ConfigDict()
  c.seed = 0
  c.model = mlc.ConfigDict(dict(
      vit="base",  # tiny | base | large ('' = only `vision` below)
      image_size=224,
      vision=mlc.ConfigDict(dict(drop_path=0.0, remat=False, layer_norm_eps=1e-6)),
      text=mlc.ConfigDict(dict(width=768, depth=12, heads=12, mlp_dim=3072, vocab_size=30524, max_positions=512,
                               dropout=0.1)),
      embed_dim=256,
      dtype="float32",  # compute dtype (bfloat16 on accelerators); params stay float32
  ))
  c.tokenizer = mlc.ConfigDict(dict(type="bert", vocab="", model="", vocab_size=8000))
  c.data = mlc.ConfigDict(dict(
      source=mlc.ConfigDict(dict(kind="json", annotations=("",), image_root="", files="", name="", split="train",
                                 data_dir="", num_examples=0, image_size=0, seed=0, task="caption",
                                 shuffle_buffer=10000)),
      pipeline=mlc.ConfigDict(dict(crop_scale=(0.2, 1.0), flip=True, randaug=True, max_words=30, text_length=30,
                                   threads=4, prefetch=2, seed=0)),
  ))
  c.steps_per_epoch = 0  # needed only for streaming sources (TFRecord / TFDS)
  c.batch_size = 2880  # global: the paper's ViT-B batch
  c.epochs = 20
  c.total_steps = -1  # -1: epochs x steps_per_epoch
  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # logical axis -> mesh axes (MaxText style); the batch is split over data and fsdp
  c.sharding_rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
                      ("qkv", "tensor"), ("vocab", "tensor"), ("embed_out", None), ("proj", None), ("norm", None))
  c.optim = mlc.ConfigDict(dict(lr=3e-4, warmup_lr=1e-6, warmup_steps=3000, decay_rate=0.9, min_lr=1e-6,
                                schedule="paper", weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
                                clip_grad_norm=0.0, grad_accum=1))
  c.loss = mlc.ConfigDict(dict(momentum=0.995, queue_size=57600, alpha=0.4, alpha_ramp_epochs=2.0,
                               itm_scope="local", label_smoothing=0.1, use_image_ids=False))
  c.init = mlc.ConfigDict(dict(deit="", bert="", blip=""))  # DeiT .pth + bert-base dir, or a BLIP checkpoint
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.eval = mlc.ConfigDict(dict(enabled=False, num_captions=5,
                               source=mlc.ConfigDict(dict(kind="synthetic", num_examples=256, image_size=48,
                                                          seed=0, split="val"))))
  return c


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
