"""VQA fine-tuning (the paper §5.3; official configs/vqa.yaml): `--config=configs/vqa.py:VARIANT`.

vqav2  the official recipe: init from a pretraining checkpoint (the paper:
       --config.init.blip=model_base_capfilt_large.pth; its image-grounded decoder becomes the answer
       decoder), 480 px, ViT drop path 0.1, batch 256 (16 x 16 GPUs), AdamW lr 2e-5 wd 0.05, cosine
       per epoch, 10 epochs; VQA v2 train + val and VG-QA; unique answers weighted by count / number
       of answers (VG: 0.2), loss = sum of weight x summed token loss (label smoothing 0.1) / batch.
       The official keeps the last epoch and scores test-dev on the evaluation server:
       blip-jax eval vqa --model WORKDIR/... --annotations vqa_test.json --answers answer_list.json.
demo   a tiny model trained on COCO-mini's 207 VQA questions (../shared/data/coco_karpathy_mini) and
       scored on the same questions (generation: no answer list ships with the data), on a CPU.

Data (the official JSON files):
  --config.data.source.annotations='("/data/vqa_train.json","/data/vqa_val.json","/data/vg_qa.json")'
  --config.data.source.image_root=/data/images  (coco/ and visual-genome/ under one root, as official)
  [--config.eval.annotations.val=/data/held_out.json --config.eval.answer_list=/data/answer_list.json]
"""
import ml_collections as mlc

from blip_jax.train.config_base import COCO_MINI, base, tiny_demo


def get_config(variant="vqav2"):
  c = base()
  c.task = "vqa"
  c.model.image_size = 480
  c.model.vision.update(drop_path=0.1, remat=False)
  c.data.source.update(kind="json", annotations=("",), image_root="", task="vqa")
  # questions: pre_question, 35 tokens; answers: [DEC] + answer + [SEP], up to 10 unique per question
  c.data.pipeline.update(crop_scale=(0.5, 1.0), flip=True, randaug=True, text_length=35)
  c.batch_size = 256  # official 16 x 16 GPUs
  c.epochs = 10
  c.optim.update(lr=2e-5, min_lr=0.0, warmup_steps=0, schedule="cosine_epoch", weight_decay=0.05)
  c.loss.update(label_smoothing=0.1)
  c.log_every = 50
  c.checkpoint_every = 1000
  c.eval = mlc.ConfigDict(dict(
      annotations=mlc.ConfigDict(dict(val="")),  # held-out questions with answers ('' = none, as official)
      image_root="", batch_size=16, every_epochs=1,
      answer_list="",  # rank these candidates (official k 128); '' = generate (beam 3, max 10, min 1)
      k=128,
      at_start=False,  # also evaluate before the first step
  ))
  if variant == "vqav2":
    pass
  elif variant == "demo":
    tiny_demo(c)
    c.data.source.annotations = (f"{COCO_MINI}/vqa_v2_subset.json",)
    c.eval.annotations.val = f"{COCO_MINI}/vqa_v2_subset.json"  # its training questions
    c.model.vision.drop_path = 0.0
    c.model.text.vocab_size = 512
    c.tokenizer.update(type="sentencepiece", vocab_size=400)  # trained on the questions and answers
    c.batch_size, c.epochs = 16, 60
    c.eval.every_epochs = 60
    c.eval.batch_size = 32
    c.optim.update(lr=2e-3, min_lr=1e-4)
  else:
    raise ValueError(f"unknown variant {variant!r}: vqav2 or demo")
  c.lock()
  return c
