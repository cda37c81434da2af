"""The settings every training config shares (the loop, the mesh, the optimizer, the data); a task's
config file (configs/<task>.py) starts from `base()` and sets its recipe."""
import ml_collections as mlc


def base():
  c = mlc.ConfigDict()
  c.task = "pretrain"  # pretrain | retrieval | caption | vqa | nlvr: the task's model kind, step and evaluation
  c.seed = 0
  c.model = mlc.ConfigDict(dict(
      vit="base",  # tiny | base | large ('' = only `vision` below)
      image_size=224,
      vision=mlc.ConfigDict(dict(drop_path=0.0, remat=False, layer_norm_eps=1e-6)),
      text=mlc.ConfigDict(dict(width=768, depth=12, heads=12, mlp_dim=3072, vocab_size=30524, max_positions=512,
                               dropout=0.1)),
      embed_dim=256,
      dtype="float32",  # compute dtype (bfloat16 on accelerators); params stay float32
      # auto: cuDNN's fused attention on NVIDIA GPUs where it fits, XLA's elsewhere | xla | cudnn | einsum
      attention="auto",
  ))
  c.tokenizer = mlc.ConfigDict(dict(type="bert", vocab="", model="", vocab_size=8000))
  c.data = mlc.ConfigDict(dict(
      source=mlc.ConfigDict(dict(kind="json", annotations=("",), image_root="", files="", name="", split="train",
                                 data_dir="", num_examples=0, image_size=0, seed=0, task="caption",
                                 shuffle_buffer=10000, each_caption=False)),
      pipeline=mlc.ConfigDict(dict(crop_scale=(0.2, 1.0), flip=True, randaug=True, max_words=30, text_length=30,
                                   threads=4, prefetch=2, seed=0, prompt="")),
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
  # a restart may change these keys (comma-separated, e.g. "optim.lr,total_steps"); any other
  # difference from the workdir's config.json stops it (train/checkpointing.py check_run_config)
  c.allow_changes = ""
  c.eval = mlc.ConfigDict(dict(enabled=False, num_captions=5,
                               source=mlc.ConfigDict(dict(kind="synthetic", num_examples=256, image_size=48,
                                                          seed=0, split="val"))))
  return c


COCO_MINI = "../shared/data/coco_karpathy_mini"  # the demos' data, relative to the repository root


def tiny_demo(c):
  """The fine-tuning demos: COCO-mini's val half to train on (eval images under the same root),
  a model of ViT 64 wide, 2 layers, 64 px and text 64 wide, 2 layers; light augmentation (a CPU
  trains it in a minute or two)."""
  c.data.source.update(annotations=(f"{COCO_MINI}/captions_karpathy_val.json",), image_root=COCO_MINI)
  c.eval.image_root = COCO_MINI
  c.model.update(vit="", image_size=64)
  c.model.vision.update(width=64, depth=2, heads=2, mlp_dim=256, patch=16)
  c.model.text.update(width=64, depth=2, heads=2, mlp_dim=256, max_positions=64, dropout=0.0)
  c.data.pipeline.update(crop_scale=(0.8, 1.0), randaug=False, threads=2)
  c.log_every, c.checkpoint_every = 10, 1000
