"""Inference commands: `score` (ITM / ITC of image-text pairs), `caption` (image files), `vqa`
(questions about images), `capfilt` (caption + filter a dataset) and `demo` (a local web page)."""
from __future__ import annotations

import json
import os
import sys

import numpy as np

import blip_jax
from blip_jax import capfilt, demo, fs
from blip_jax.cli.common import (
  MODEL_HELP,
  add_generation_flags,
  command,
  fail,
  generation_kwargs,
  load_checked,
  model_flag,
  start_hosts,
)
from blip_jax.cli.evaluate import add_vqa_flags, load_vqa
from blip_jax.image_files import caption_files, expand_images
from blip_jax.tasks import vqa as V
from blip_jax.tokenizers import pre_question


def cmd_score(a):
  model = load_checked(a, "scoring", itc=True, hint="a retrieval or pretraining checkpoint")
  texts = [blip_jax.pre_caption(t, 30) for t in a.text]
  ids, mask = model.tokenize(texts, max_length=35)
  for image in a.image:
    pixels = model.preprocess([image])
    pix = np.repeat(pixels, len(texts), axis=0)
    itm = np.asarray(model.itm_prob(pix, ids, mask))
    cos = np.asarray(model.text_feat(ids, mask)) @ np.asarray(model.image_feat(pixels))[0]
    for t, p, c in zip(a.text, itm, cos):
      print(f"{image}\t{t}\titm_prob={p:.4f}\titc_cosine={c:.4f}")


def cmd_caption(a):
  kw = generation_kwargs(a)
  paths = expand_images(a.images)
  if a.output:  # refused before the model is read
    fs.check_output(a.output, a.overwrite, "--output")
  model = load_checked(a, "captioning", kinds=("caption", "pretrain"),
                       hint="a caption decoder: a caption or pretraining checkpoint")
  tmp_output = fs.temp_sibling(a.output) if a.output else None
  out = fs.path(tmp_output).open("w") if a.output else sys.stdout
  done = failed = 0
  try:
    for status, path, value in caption_files(model, paths, batch_size=a.batch_size, prompt=a.prompt,
                                             progress=not a.quiet, seed=a.seed, **kw):
      if status == "error":
        failed += 1
        print(f"warning: skipped {value}", file=sys.stderr)
        if a.format == "jsonl":
          out.write(json.dumps({"image": path, "error": value}) + "\n")
        continue
      done += 1
      if a.format == "jsonl":
        out.write(json.dumps({"image": path, "captions": value} if a.num_captions > 1
                             else {"image": path, "caption": value[0]}) + "\n")
      else:
        out.writelines(f"{path}\t{c}\n" for c in value)
      out.flush()
  finally:
    if a.output:
      out.close()
  if a.output:  # complete: the output appears under its name only now
    fs.publish(tmp_output, a.output)
  print(f"captioned {done} images, skipped {failed} that could not be decoded", file=sys.stderr)
  if not done:
    fail("no image could be decoded")


def cmd_vqa(a):
  model = load_vqa(a)
  candidates = V.read_answer_list(a.answers) if a.answers else None
  images = a.image * len(a.question) if len(a.image) == 1 else a.image
  if len(images) != len(a.question):
    fail(f"{len(a.image)} --image for {len(a.question)} --question: give one image, or one per question")
  questions = [V.Question(i, pre_question(q), image, None) for i, (image, q) in enumerate(zip(images, a.question))]
  asked = [q for q in questions if q.question.strip()]
  generate = {} if candidates is not None else dict(num_beams=a.beams, max_length=a.max_length,
                                                    min_length=a.min_length)
  answers, errors, _ = V.answer_questions(model, asked, candidates, k=a.k, progress=False, **generate)
  by_id = {asked[i].question_id: ans for i, ans in answers.items()}
  for q, text in zip(questions, a.question):
    if q.question_id in by_id:
      print(f"{q.path}\t{text}\t{by_id[q.question_id]}")
    else:
      why = "empty question" if not q.question.strip() else f"image not decodable: {errors.get(q.path, '?')}"
      print(f"{q.path}\t{text}\t<skipped: {why}>")
  if len(by_id) < len(questions):
    sys.exit(1)


def cmd_capfilt(a):
  if sum(map(bool, (a.annotations, a.tfrecords, a.tars))) != 1:
    fail("give the source as --annotations FILE... (BLIP JSON), --tfrecords GLOB... or --tars GLOB... (shards)")
  if a.threshold < 0:
    fail("--threshold must be >= 0")
  if a.beams > 1:
    a.top_p = None  # beam search replaces the default nucleus sampling
  generation_kwargs(a)  # flag conflicts
  settings = capfilt.CapFiltSettings(
      threshold=a.threshold, num_captions=a.num_captions, num_beams=a.beams, top_p=a.top_p, top_k=a.top_k,
      temperature=a.temperature, max_length=a.max_length, min_length=a.min_length,
      repetition_penalty=a.repetition_penalty, prompt=a.prompt, seed=a.seed, batch_size=a.batch_size)
  source = (capfilt.JsonInput(a.annotations, a.image_root, a.images_per_shard) if a.annotations
            else capfilt.TFRecordInput(a.tfrecords) if a.tfrecords else capfilt.TarInput(a.tars))
  start_hosts()
  capfilt.check_settings(a.out, source, settings)
  captioner = blip_jax.load(a.captioner, vocab=a.captioner_vocab or a.vocab)
  filt = blip_jax.load(a.filter, vocab=a.vocab)
  report = capfilt.run(captioner, filt, source, a.out, settings, progress=not a.quiet)
  if report:
    w, syn = report["web"], report["synthetic"]
    print(f"{report['images']} images ({report['images_undecodable']} undecodable, skipped); "
          f"web texts kept {w['kept']}/{w['texts']}, synthetic kept {syn['kept']}/{syn['texts']}; "
          f"{report['pairs_written']} pairs -> {report['output']}; report: {os.path.join(a.out, 'report.json')}")


def cmd_demo(a):
  demo.serve(caption=a.caption, retrieval=a.retrieval, vqa=a.vqa, images=a.images, host=a.host, port=a.port,
             vocab=a.vocab)


def register(sub) -> None:
  s = command(sub, "score", cmd_score, 'blip-jax score --model model_base_retrieval_coco --image dog.jpg --text '
              '"a dog on the grass"', help="ITM probability and ITC cosine of image-text pairs")
  model_flag(s, "retrieval or pretraining checkpoint")
  s.add_argument("--image", required=True, action="append")
  s.add_argument("--text", required=True, action="append")
  s.add_argument("--vocab")
  s.add_argument("--image-size", type=int)

  cp = command(sub, "caption", cmd_caption, "blip-jax caption --model model_base_caption_capfilt_large --beams 3 "
               "photos/", help="caption image files, folders or globs (batched, on all local devices)")
  cp.add_argument("images", nargs="+", help="image files, folders (recursive) or globs")
  model_flag(cp, "official .pth | HF dir | our checkpoint dir")
  cp.add_argument("--vocab", help="bert-base-uncased vocab.txt, when the checkpoint has no tokenizer")
  cp.add_argument("--image-size", type=int, help="image size (default: the checkpoint's)")
  cp.add_argument("--batch-size", type=int, default=16)
  cp.add_argument("--num-captions", type=int, default=1, help="captions per image (best beams or samples)")
  cp.add_argument("--format", choices=("text", "jsonl"), default="text",
                  help="text: PATH<TAB>CAPTION lines; jsonl: {image, caption(s)} lines")
  cp.add_argument("--output", help="write here instead of stdout (through a temporary name)")
  cp.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output")
  cp.add_argument("--quiet", action="store_true", help="no progress bar")
  add_generation_flags(cp)

  vq = command(sub, "vqa", cmd_vqa, 'blip-jax vqa --model model_base_vqa_capfilt_large --image dog.jpg --question '
               '"what is the dog doing?"', help="answer questions about images (rank a candidate list, or generate)")
  add_vqa_flags(vq)
  vq.add_argument("--image", required=True, action="append", help="an image (one for all questions, or one each)")
  vq.add_argument("--question", required=True, action="append")

  cf = command(sub, "capfilt", cmd_capfilt, "blip-jax capfilt --captioner model_base_caption_capfilt_large --filter "
               "model_base_retrieval_coco --annotations web.json --image-root images/ --out bootstrapped/",
               help="bootstrap a dataset: caption (nucleus sampling) + ITM filter, sharded, resumable")
  model_flag(cf, "caption (or pretraining) checkpoint: .pth | HF dir | ours", "--captioner")
  model_flag(cf, "retrieval (or pretraining) checkpoint with an ITM head", "--filter")
  cf.add_argument("--annotations", nargs="+", help="BLIP caption JSON file(s)")
  cf.add_argument("--image-root", default="", help="root of the JSON's relative image paths")
  cf.add_argument("--tfrecords", nargs="+", help="img2dataset TFRecord files or globs")
  cf.add_argument("--tars", nargs="+", help="img2dataset webdataset .tar files or globs (read in place)")
  cf.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
  cf.add_argument("--threshold", type=float, default=0.5, help="drop texts whose ITM p(match) is below this")
  cf.add_argument("--num-captions", type=int, default=1, help="synthetic captions per image (paper: 1)")
  cf.add_argument("--batch-size", type=int, default=16, help="images per batch (per host)")
  cf.add_argument("--images-per-shard", type=int, default=1000, help="JSON input: images per output shard")
  cf.add_argument("--vocab", help="vocab.txt for checkpoints without a tokenizer")
  cf.add_argument("--captioner-vocab", help="the captioner's vocab.txt, if it differs from --vocab")
  cf.add_argument("--quiet", action="store_true")
  add_generation_flags(cf, max_length=30, min_length=10, top_p=0.9, repetition_penalty=1.1)

  dm = command(sub, "demo", cmd_demo, "blip-jax demo --caption model_base_caption_capfilt_large --retrieval "
               "model_base_retrieval_coco --images photos/",
               help="a local web page: drop a photo, get captions, ITM/ITC scores, answers, search")
  dm.add_argument("--caption", required=True, metavar="MODEL", help="caption (or pretraining) model: " + MODEL_HELP)
  dm.add_argument("--retrieval", metavar="MODEL", help="ITM/ITC model for scores and search (default: --caption's "
                  "when it is a pretraining model)")
  dm.add_argument("--vqa", metavar="MODEL", help="VQA model for answers")
  dm.add_argument("--images", help="a folder to search by text (features computed once, cached under "
                  "$BLIP_JAX_CACHE/demo_index)")
  dm.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
  dm.add_argument("--port", type=int, default=7860)
  dm.add_argument("--vocab", help="bert-base-uncased vocab.txt, when a checkpoint has no tokenizer")
