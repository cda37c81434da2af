"""Image-text retrieval fine-tuning (the paper §5.1; official configs/retrieval_coco.yaml):
`--config=configs/retrieval.py:VARIANT`.

coco   the official COCO recipe: init from a pretraining checkpoint (--config.init.blip=model_base.pth),
       384 px, batch 256, AdamW lr 1e-5 wd 0.05, cosine per epoch, 6 epochs, ITC with image-id
       positives (queue 57600, momentum 0.995, alpha 0.4 ramped over epoch 1), ITM hard negatives over
       the whole global batch (negative_all_rank), no LM; eval k=256 on val and test each epoch, the best
       checkpoint by val r_mean in WORKDIR/best.
flickr the same with ITM negatives per data shard and k=128.
vit_l  add to either: --config.model.vit=large --config.optim.lr=5e-6 (official ViT-L: lr 5e-6).
demo   a tiny model fine-tuned on COCO-mini (../shared/data/coco_karpathy_mini) on a CPU.

Data: Karpathy JSON (train: one entry per caption with "image_id"; val/test: {"image", "caption": [..]}):
  --config.data.source.annotations='("/data/coco_karpathy_train.json",)' --config.data.source.image_root=/data/coco
  --config.eval.annotations.val=/data/coco_karpathy_val.json
  --config.eval.annotations.test=/data/coco_karpathy_test.json
  --config.eval.image_root=/data/coco
"""
import ml_collections as mlc

from blip_jax.train.config_base import COCO_MINI, base, tiny_demo


def get_config(variant="coco"):
  c = base()
  c.task = "retrieval"
  c.model.image_size = 384
  c.model.vision.update(drop_path=0.0, remat=False)
  c.data.source.update(kind="json", annotations=("",), image_root="")
  c.data.pipeline.update(crop_scale=(0.5, 1.0), flip=True, randaug=True, max_words=30, text_length=35)
  c.batch_size = 256  # official 32 x 8 GPUs
  c.epochs = 6
  c.optim.update(lr=1e-5, min_lr=0.0, warmup_steps=0, schedule="cosine_epoch", weight_decay=0.05)
  c.loss.update(momentum=0.995, queue_size=57600, alpha=0.4, alpha_ramp_epochs=1.0, itm_scope="global",
                use_image_ids=True)
  c.log_every = 50
  c.checkpoint_every = 1000
  c.eval = mlc.ConfigDict(dict(annotations=mlc.ConfigDict(dict(val="", test="")), image_root="", k=256,
                               batch_size=32, every_epochs=1))
  if variant == "coco":
    pass
  elif variant == "flickr":
    c.loss.itm_scope = "local"  # official Flickr: negative_all_rank False
    c.eval.k = 128
  elif variant == "demo":
    tiny_demo(c)
    c.eval.annotations.test = f"{COCO_MINI}/captions_karpathy_test.json"
    c.eval.k = 16
    c.batch_size, c.loss.queue_size, c.epochs = 32, 256, 3
    c.optim.update(lr=5e-4, min_lr=1e-5)
  else:
    raise ValueError(f"unknown variant {variant!r}: coco, flickr or demo")
  c.lock()
  return c
