"""The bootstrap loop (blip_jax/bootstrap.py): `blip-jax bootstrap --config=configs/bootstrap.py:VARIANT
--workdir=DIR [--config.key=value ...]`.

demo        the loop on a CPU (2 cores) in under 20 minutes: synthetic pairs (data.synthetic) with a
            known share of injected noise (40% of the web captions replaced by other images'),
            a clean annotated part and a held-out clean set; tiny models (pretrain demo sizes).
tiny        the same with a few steps per stage (the tests).
Table 1 in miniature (bench/bootstrap_table.py): --config.variants='("capfilt","filter","captioner")'
and --config.seed=N; the noisy part as shards: --config.data.format=webdataset (or tfrecord).
vit_b_14m   the paper's recipe, ViT-B, 14M images: CC3M + SBU web pairs (noisy) + COCO + VG (clean)
            at 224 px, 20 epochs, batch 2880, lr 3e-4 (warm-up 3000 steps, decay 0.9 per epoch);
            captioner and filter fine-tuned on COCO (configs/caption.py:coco, retrieval.py:coco);
            evaluation on COCO Karpathy test. Give the data as BLIP JSON:
              --config.data.json.noisy='("/data/cc3m.json","/data/sbu.json")'   (or img2dataset
                shards: '("/data/cc3m/*.tar",)' or '("/data/cc3m/*.tfrecord",)', read in place)
              --config.data.json.clean_train='("/data/coco_karpathy_train.json","/data/vg.json")'
              --config.data.json.clean_val='("/data/coco_karpathy_val.json",)'
              --config.data.json.heldout='("/data/coco_karpathy_test.json",)' --config.data.json.image_root=/data
vit_b_129m  as vit_b_14m plus CC12M and LAION-115M web pairs (add them to data.json.noisy).
"""
import importlib.util
import os

import ml_collections as mlc


def _sibling(name):
  """configs/<name>.py, loaded by path (config files are read by path, not as a package)."""
  spec = importlib.util.spec_from_file_location(f"_blip_config_{name}", os.path.join(os.path.dirname(__file__),
                                                                                     f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


caption_cfg, pretrain_cfg, retrieval_cfg = _sibling("caption"), _sibling("pretrain"), _sibling("retrieval")


def _data():
  return mlc.ConfigDict(dict(
      kind="synthetic",  # synthetic | json
      # synthetic data: the format stages 1, 3 and 4 read it in: json | tfrecord | webdataset (.tar
      # shards of per_shard pairs, as img2dataset writes). json data: the noisy files' own format
      format="json",
      per_shard=1000,
      synthetic=mlc.ConfigDict(dict(noisy=4096, noise_fraction=0.4, clean=1024, clean_val=128, heldout=256,
                                    image_size=48)),
      json=mlc.ConfigDict(dict(noisy=("",), clean_train=("",), clean_val=("",), heldout=("",), image_root="",
                               eval_image_root="")),
  ))


def _capfilt(**kw):
  # the official CapFilt decoding (nucleus p 0.9, top-k 50, repetition penalty 1.1, 30/10 tokens) and
  # the ITM head's own decision threshold (0.5)
  s = dict(threshold=0.5, num_captions=1, num_beams=1, top_p=0.9, top_k=50, temperature=1.0, max_length=30,
           min_length=10, repetition_penalty=1.1, prompt="a picture of ", batch_size=16, max_words=30,
           text_length=35)
  s.update(kw)
  return mlc.ConfigDict(dict(settings=mlc.ConfigDict(s), per_shard=1000))


def _demo_sizes(c, steps, ft_epochs):
  """Every stage's model: the pretraining demo's (ViT 96x2 at 48 px, text 96x2, SentencePiece 96)."""
  c.pretrain = pretrain_cfg.get_config("demo")
  c.pretrain.unlock()
  c.pretrain.total_steps = steps
  c.pretrain.eval.enabled = False
  c.pretrain.loss.alpha_ramp_epochs = 0.5
  c.pretrain.checkpoint_every = max(steps // 3, 1)
  c.pretrain.log_every = max(steps // 6, 1)
  for name, get in (("captioner", caption_cfg.get_config), ("filter", retrieval_cfg.get_config)):
    t = get("coco")
    t.unlock()
    t.model.image_size = c.pretrain.model.image_size  # fine-tuned at the pretraining resolution
    t.data.pipeline.update(crop_scale=(1.0, 1.0), flip=False, randaug=False, threads=2, prompt="")
    t.batch_size, t.epochs, t.checkpoint_every = 32, ft_epochs, 10_000
    t.log_every = 25
    t.optim.update(lr=5e-4, min_lr=1e-5, warmup_steps=0)
    t.eval.update(batch_size=64, every_epochs=ft_epochs)
    setattr(c, name, t)
  # caption lengths count tokens of the demo's own SentencePiece (96 pieces): a held-out caption is
  # 20-29 of them with the start and end tokens (mean 24.5) where BERT's WordPiece needs about 12,
  # so the official 20 cut every caption short ("... on a brown backgr") in the captioner's
  # selection, CapFilt and the evaluation (issue 29: what moved the demo's CIDEr)
  c.captioner.eval.update(num_beams=1, max_length=40, min_length=5)
  c.filter.loss.update(queue_size=256, momentum=0.99)
  c.filter.eval.k = 16
  c.capfilt = _capfilt(prompt="", max_length=40, min_length=5, batch_size=64)
  c.capfilt.per_shard = 1024
  c.eval = mlc.ConfigDict(dict(k=16, batch_size=64, caption=True, prompt="", num_beams=1, max_length=40,
                               min_length=5))


def get_config(variant="demo"):
  c = mlc.ConfigDict()
  # every random choice of every stage: the synthetic data, initialisation, data order and
  # augmentation, ITM negatives, dropout, CapFilt's sampling
  c.seed = 0
  # stage-4 models to build beside stage 1 ("none"), the rows of the paper's Table 1: capfilt (+C +F),
  # filter (+F: web texts filtered, no synthetic captions), captioner (+C: captions added, no filter)
  c.variants = ("capfilt",)
  c.data = _data()
  c.progress = True
  if variant == "demo":
    _demo_sizes(c, steps=1000, ft_epochs=8)
    # the filter's ITM head needs more steps than the captioner to be confident: at 4 epochs (128
    # steps) its p(match) stayed under 0.6 and it dropped 89% of clean texts with the noise
    c.filter.epochs = 20
    c.filter.eval.every_epochs = 10
  elif variant == "tiny":
    _demo_sizes(c, steps=6, ft_epochs=1)
    c.data.synthetic.update(noisy=64, clean=64, clean_val=32, heldout=32, image_size=32)
    c.pretrain.model.image_size = 32
    c.captioner.model.image_size = c.filter.model.image_size = 32
    c.pretrain.model.vision.update(width=32, depth=1, heads=2, mlp_dim=64, patch=16)
    c.pretrain.model.text.update(width=32, depth=1, heads=2, mlp_dim=64)
    c.pretrain.update(batch_size=16)
    c.pretrain.loss.queue_size = 32
    for t in (c.captioner, c.filter):
      t.batch_size = 16
    c.filter.loss.queue_size = 32
    c.capfilt.per_shard = 32
    c.data.per_shard = 32
    c.capfilt.settings.update(batch_size=32, max_length=8, min_length=2)
    c.eval.update(k=4, batch_size=32, max_length=8, min_length=2)
    c.captioner.eval.update(max_length=8, min_length=2)
    c.filter.eval.k = 4
    c.progress = False
  elif variant in ("vit_b_14m", "vit_b_129m"):
    c.data.kind = "json"
    c.pretrain = pretrain_cfg.get_config("vit_b")  # 224 px, batch 2880, 20 epochs, lr 3e-4, DeiT + BERT init
    c.captioner = caption_cfg.get_config("coco")
    c.filter = retrieval_cfg.get_config("coco")
    c.capfilt = _capfilt()
    c.eval = mlc.ConfigDict(dict(k=256, batch_size=32, caption=True, prompt="a picture of ", num_beams=3,
                                 max_length=20, min_length=5))
  else:
    raise ValueError(f"unknown variant {variant!r}: demo, tiny, vit_b_14m or vit_b_129m")
  c.lock()
  return c
