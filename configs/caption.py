"""Image captioning fine-tuning (the paper §5.2; official configs/caption_coco.yaml):
`--config=configs/caption.py:VARIANT`.

coco   the official COCO recipe: init from a pretraining checkpoint (the paper:
       --config.init.blip=model_base_capfilt_large.pth; any format, a pretraining or caption model),
       384 px, batch 256, AdamW lr 1e-5 wd 0.05, cosine per epoch, 5 epochs, every caption of an image
       a training pair, "a picture of " + pre_caption(c, 30), LM loss with label smoothing 0.1 (the
       prompt's tokens are not targets); each epoch beam 3 / max 20 / min 5 on val (and test), the best
       checkpoint by val CIDEr + BLEU-4 in WORKDIR/best.
vit_l  add: --config.model.vit=large --config.optim.lr=2e-6 (official ViT-L: lr 2e-6, 16 per GPU).
demo   a tiny captioner trained on COCO-mini's val half (../shared/data/coco_karpathy_mini) and
       scored on its test half, on a CPU.

Data: Karpathy JSON (train: one entry per caption; val/test: {"image", "caption": [..]}):
  --config.data.source.annotations='("/data/coco_karpathy_train.json",)' --config.data.source.image_root=/data/coco
  --config.eval.annotations.val=/data/coco_karpathy_val.json
  --config.eval.annotations.test=/data/coco_karpathy_test.json
  --config.eval.image_root=/data/coco
  [--config.eval.gt.test=/data/coco_karpathy_test_gt.json]  (the official references; default: the JSON's captions)
"""
import ml_collections as mlc

from blip_jax.train.config_base import COCO_MINI, base, tiny_demo


def get_config(variant="coco"):
  c = base()
  c.task = "caption"
  c.model.image_size = 384
  c.model.vision.update(drop_path=0.0, remat=False)
  c.data.source.update(kind="json", annotations=("",), image_root="", each_caption=True)
  c.data.pipeline.update(crop_scale=(0.5, 1.0), flip=True, randaug=True, max_words=30, text_length=40,
                         prompt="a picture of ")
  c.batch_size = 256  # official 32 x 8 GPUs
  c.epochs = 5
  c.optim.update(lr=1e-5, min_lr=0.0, warmup_steps=0, schedule="cosine_epoch", weight_decay=0.05)
  c.loss.update(label_smoothing=0.1)
  c.log_every = 50
  c.checkpoint_every = 1000
  c.eval = mlc.ConfigDict(dict(
      annotations=mlc.ConfigDict(dict(val="", test="")),
      gt=mlc.ConfigDict(dict(val="", test="")),  # COCO-format references; '' = the annotations' captions
      image_root="", batch_size=32, every_epochs=1,
      # official COCO decoding
      num_beams=3, max_length=20, min_length=5, repetition_penalty=1.0, length_normalization="official",
      spice="auto",  # computed when the Stanford CoreNLP jars are present (metrics.caption)
      samples=8,  # images with their captions in TensorBoard
      at_start=False,  # also evaluate before the first step (the starting checkpoint's figures)
  ))
  if variant == "coco":
    pass
  elif variant == "demo":
    tiny_demo(c)
    c.eval.annotations.val = f"{COCO_MINI}/captions_karpathy_test.json"  # scored on the test half
    c.eval.batch_size = 64
    c.model.text.vocab_size = 1024
    c.tokenizer.update(type="sentencepiece", vocab_size=1000)  # trained on the captions: a small LM head
    c.batch_size, c.epochs = 16, 8
    c.eval.every_epochs = 4
    c.optim.update(lr=2e-3, min_lr=1e-4)
  else:
    raise ValueError(f"unknown variant {variant!r}: coco or demo")
  c.lock()
  return c
