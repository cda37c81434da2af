"""NLVR2 fine-tuning (the paper §5.4; official configs/nlvr.yaml): `--config=configs/nlvr.py:VARIANT`.

nlvr2  the official recipe: init from a pretraining checkpoint (the paper:
       --config.init.blip=model_base.pth; its cross-attention copied into both image branches),
       384 px, ViT drop path 0.1, batch 256 (16 x 16 GPUs), AdamW lr 3e-5 wd 0.05, cosine per epoch,
       15 epochs; cross-entropy on the label; the pair swapped with probability 0.5 (and 'left' /
       'right' in the sentence with it); pre_caption(s, 40). The best epoch by dev accuracy is kept
       (best/); the paper reports its dev and test-P accuracy (82.15 / 82.24 from CapFilt-L,
       82.48 / 83.09 from model_base.pth).
demo   a tiny model on NLVR2-style pairs built from COCO-mini (a caption of one of the two images
       vs a caption of neither), started from the retrieval demo's best model: first
       `blip-jax train --config=configs/retrieval.py:demo --workdir=/tmp/blip_demo/retrieval` and
       `python -m blip_jax.tasks.nlvr --out /tmp/nlvr_demo`.

Data (BLIP's JSON files):
  --config.data.source.annotations='("/data/nlvr_train.json",)' --config.data.source.image_root=/data/NLVR2
  --config.eval.annotations.val=/data/nlvr_dev.json --config.eval.annotations.test=/data/nlvr_test.json
  --config.eval.image_root=/data/NLVR2
"""
import ml_collections as mlc

from blip_jax.train.config_base import COCO_MINI, base, tiny_demo


def get_config(variant="nlvr2"):
  c = base()
  c.task = "nlvr"
  c.model.image_size = 384
  c.model.vision.update(drop_path=0.1, remat=False)
  c.model.fusion_layer = 6  # official: text layers 6.. merge the two images' outputs (0-5 average)
  c.data.source.update(kind="json", annotations=("",), image_root="", task="nlvr")
  # pre_caption(s, 40); the official pads to the longest sentence without truncating: 64 tokens
  c.data.pipeline.update(crop_scale=(0.5, 1.0), flip=True, randaug=True, max_words=40, text_length=64,
                         swap_pair=True)
  c.batch_size = 256  # official 16 x 16 GPUs
  c.epochs = 15
  c.optim.update(lr=3e-5, min_lr=0.0, warmup_steps=0, schedule="cosine_epoch", weight_decay=0.05)
  c.log_every = 50
  c.checkpoint_every = 1000
  c.eval = mlc.ConfigDict(dict(
      annotations=mlc.ConfigDict(dict(val="", test="")),  # dev and test-P ('' = none)
      image_root="", batch_size=64, every_epochs=1,
      at_start=False,  # also evaluate before the first step
  ))
  if variant == "nlvr2":
    pass
  elif variant == "demo":
    tiny_demo(c)
    c.data.source.update(annotations=("/tmp/nlvr_demo/train.json",), image_root=COCO_MINI)
    c.eval.annotations.update(val="/tmp/nlvr_demo/dev.json", test="")
    c.init.blip = "/tmp/blip_demo/retrieval/best"  # from scratch, a tiny model learns too slowly here
    c.model.vision.drop_path = 0.0
    c.model.fusion_layer = 1  # the demo's 2 text layers: one averaging, one merging
    c.data.pipeline.text_length = 40
    c.batch_size, c.epochs = 32, 10
    c.eval.every_epochs = 5
    c.optim.update(lr=1e-3, min_lr=1e-5)
  else:
    raise ValueError(f"unknown variant {variant!r}: nlvr2 or demo")
  c.lock()
  return c
