"""`blip-jax` command line: convert, score, caption, vqa, capfilt, eval (retrieval, caption, vqa, nlvr),
train-tokenizer, make-shards, train, compile, checkpoints, demo. User errors exit 2 with one line
on stderr; library start-up logs are muted unless --verbose."""
from __future__ import annotations

import argparse
import os
import sys


def _progress(total: int, desc: str):
  from tqdm import tqdm
  bar = tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=None)
  return bar, bar.update


def cmd_convert(a):
  import blip_jax
  from blip_jax.checkpoints import mapping
  from blip_jax.checkpoints.convert import infer_hf_config, infer_official_config, load_hf, load_official
  from blip_jax.checkpoints.torch_io import read_hf_dir, read_pth
  from blip_jax.api import BlipModel, detect_format
  from blip_jax.tokenizers import BertTokenizer, SentencePieceTokenizer, load_tokenizer_dir

  from blip_jax.checkpoints import hub
  a.src, named_vocab, _ = hub.resolve(a.src)  # a name: the cached download, with bert-base-uncased's vocab
  a.vocab = a.vocab or (None if a.spm else named_vocab)
  fmt = detect_format(a.src)
  if fmt == "native":
    model = blip_jax.load(a.src)
  elif fmt == "official":
    sd = read_pth(a.src)
    cfg = infer_official_config(sd, a.kind, vision_eps=a.vision_eps if a.vision_eps is not None else 1e-6,
                                image_size=a.image_size)
    bar, tick = _progress(len(mapping.official_table(cfg)) + (len(mapping.momentum_table(cfg))
                          if any(k.endswith("_m.cls_token") for k in sd) and cfg.has_itc else 0), "converting")
    cfg, params, extras = load_official(a.src, a.kind, image_size=a.image_size, sd=sd, progress=tick,
                                        vision_eps=a.vision_eps if a.vision_eps is not None else 1e-6)
    bar.close()
    model = BlipModel(cfg, params, extras)
  else:
    cfg = infer_hf_config(read_hf_dir(a.src)[0], vision_eps=a.vision_eps)
    bar, tick = _progress(len(mapping.hf_table(cfg, keep_temp=True)), "converting")
    cfg, params = load_hf(a.src, vision_eps=a.vision_eps, image_size=a.image_size, progress=tick)
    bar.close()
    model = BlipModel(cfg, params, tokenizer=load_tokenizer_dir(a.src))
  if a.vocab:
    model.tokenizer = BertTokenizer(a.vocab)
  elif a.spm:
    model.tokenizer = SentencePieceTokenizer(a.spm)
  if a.to == "hf":
    out = model.export_hf(a.dst, overwrite=a.overwrite)
    if model.tokenizer is not None and model.tokenizer.kind == "bert":
      model.tokenizer.save(out)  # vocab.txt, as transformers' processor dirs hold it
  else:
    out = model.save(a.dst, overwrite=a.overwrite)
  c = model.config
  print(f"wrote {out}: {c.kind} model, ViT {c.vision.width}x{c.vision.depth} @ {c.vision.image_size}px, "
        f"text {c.text.width}x{c.text.depth}, tokenizer: {model.tokenizer.kind if model.tokenizer else 'none'}")


def cmd_score(a):
  import numpy as np
  import blip_jax
  model = blip_jax.load(a.model, vocab=a.vocab, image_size=a.image_size)
  if model.tokenizer is None:
    _fail("the checkpoint has no tokenizer; pass --vocab path/to/vocab.txt")
  if not model.config.has_itc:
    _fail(f"a {model.config.kind} model has no ITM/ITC heads; use a retrieval or pretraining checkpoint")
  texts = [blip_jax.pre_caption(t, 30) for t in a.text]
  ids, mask = model.tokenize(texts, max_length=35)
  for image in a.image:
    pixels = model.preprocess([image])
    pix = np.repeat(pixels, len(texts), axis=0)
    itm = np.asarray(model.itm_prob(pix, ids, mask))
    cos = np.asarray(model.text_feat(ids, mask)) @ np.asarray(model.image_feat(pixels))[0]
    for t, p, c in zip(a.text, itm, cos):
      print(f"{image}\t{t}\titm_prob={p:.4f}\titc_cosine={c:.4f}")


def generation_kwargs(a) -> dict:
  """The decoding flags shared by `caption` and `capfilt`."""
  if a.beams > 1 and a.top_p is not None:
    _fail("choose --beams N or --top-p P, not both")
  if a.num_captions > 1 and a.beams == 1 and a.top_p is None:
    _fail("--num-captions > 1 needs --beams or --top-p")
  return dict(max_length=a.max_length, min_length=a.min_length, num_beams=a.beams, top_p=a.top_p,
              top_k=a.top_k, temperature=a.temperature, repetition_penalty=a.repetition_penalty,
              length_penalty=a.length_penalty, num_captions=a.num_captions,
              length_normalization=a.length_normalization)


def add_generation_flags(p, *, max_length=20, min_length=5, top_p=None, repetition_penalty=1.0, beams=1):
  g = p.add_argument_group("decoding (max/min length count the prompt's 4 tokens, as the official code does)")
  g.add_argument("--beams", type=int, default=beams, help="beam search with N beams (official COCO eval: 3)")
  g.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling with this top-p (e.g. 0.9)")
  g.add_argument("--top-k", type=int, default=50, help="sampling: also keep only the k most likely tokens (default "
                 "50, transformers 4.15's default, which the official nucleus sampling inherits; 0 = off)")
  g.add_argument("--temperature", type=float, default=1.0)
  g.add_argument("--max-length", type=int, default=max_length)
  g.add_argument("--min-length", type=int, default=min_length)
  g.add_argument("--repetition-penalty", type=float, default=repetition_penalty)
  g.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score / length ** this")
  g.add_argument("--length-normalization", choices=("official", "transformers"), default="official",
                 help="beam scores as transformers 4.15, which the paper's run used (sum log p / (prompt + new "
                      "tokens)), or as current transformers (/ new tokens)")
  g.add_argument("--prompt", default="a picture of ")
  g.add_argument("--seed", type=int, default=0, help="sampling seed")


def cmd_caption(a):
  import json
  import blip_jax
  from blip_jax.caption import caption_files, expand_images
  kw = generation_kwargs(a)
  paths = expand_images(a.images)
  if a.output:  # refused before the model is read
    from blip_jax import fs
    fs.check_output(a.output, a.overwrite, "--output")
  model = blip_jax.load(a.model, vocab=a.vocab, image_size=a.image_size)
  if model.tokenizer is None:
    _fail("the checkpoint has no tokenizer; pass --vocab path/to/vocab.txt")
  if model.config.kind not in ("caption", "pretrain"):
    _fail(f"a {model.config.kind} model has no caption decoder; use a caption or pretraining checkpoint")
  if a.output:
    tmp_output = fs.temp_sibling(a.output)
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
    _fail("no image could be decoded")


def cmd_capfilt(a):
  import blip_jax
  from blip_jax import capfilt
  if bool(a.annotations) == bool(a.tfrecords):
    _fail("give the source as --annotations FILE... (BLIP JSON) or --tfrecords GLOB... (shards)")
  if a.threshold < 0:
    _fail("--threshold must be >= 0")
  if a.beams > 1:
    a.top_p = None  # beam search replaces the default nucleus sampling
  generation_kwargs(a)  # flag conflicts
  settings = capfilt.CapFiltSettings(
      threshold=a.threshold, num_captions=a.num_captions, num_beams=a.beams, top_p=a.top_p, top_k=a.top_k, temperature=a.temperature,
      max_length=a.max_length, min_length=a.min_length, repetition_penalty=a.repetition_penalty, prompt=a.prompt,
      seed=a.seed, batch_size=a.batch_size)
  source = (capfilt.JsonInput(a.annotations, a.image_root, a.images_per_shard) if a.annotations
            else capfilt.TFRecordInput(a.tfrecords))
  from blip_jax.train import launch
  launch.maybe_initialize_distributed()
  capfilt.check_settings(a.out, source, settings)
  captioner = blip_jax.load(a.captioner, vocab=a.captioner_vocab or a.vocab)
  filt = blip_jax.load(a.filter, vocab=a.vocab)
  report = capfilt.run(captioner, filt, source, a.out, settings, progress=not a.quiet)
  if report:
    w, syn = report["web"], report["synthetic"]
    print(f"{report['images']} images ({report['images_undecodable']} undecodable, skipped); "
          f"web texts kept {w['kept']}/{w['texts']}, synthetic kept {syn['kept']}/{syn['texts']}; "
          f"{report['pairs_written']} pairs -> {report['output']}; report: {os.path.join(a.out, 'report.json')}")


def cmd_eval_retrieval(a):
  from blip_jax.tasks import retrieval as R
  if bool(a.videos) and a.image_root:
    _fail("give --image-root (images) or --videos (videos), not both")
  from blip_jax import fs
  fs.check_output(a.out, a.overwrite, "--out")
  gallery = R.read_gallery(a.annotations, a.videos or a.image_root, video=bool(a.videos))
  R.check_gallery(gallery, a.k)
  from blip_jax.train import launch
  launch.maybe_initialize_distributed()
  import blip_jax
  model = blip_jax.load(a.model, vocab=a.vocab, image_size=a.image_size)
  R.check_model(model)
  result = R.evaluate(model, gallery, k=a.k, batch_size=a.batch_size, texts_per_row=a.texts_per_row,
                      frames=a.frames, max_words=a.max_words, reuse_kv=not a.no_kv_reuse, progress=not a.quiet)
  import jax
  if jax.process_index() == 0:
    R.write_outputs(result, a.out)
    sk = result.skipped
    print(f"{len(result.gallery.items)} {'videos' if gallery.video else 'images'}, {len(result.gallery.texts)} texts, "
          f"k={result.stats['k']}; skipped {len(sk['items'])} undecodable (with their {sk['texts_of_skipped_items']} "
          f"texts) and {sk['blank_texts']} blank texts", file=sys.stderr)
    print(R.format_metrics(result.metrics))
    print(f"wrote {a.out}/metrics.json, scores.npz, rankings.jsonl", file=sys.stderr)


def cmd_eval_caption(a):
  from blip_jax.tasks import caption as C
  from blip_jax import fs
  if a.top_p is not None:
    a.beams = 1  # nucleus sampling replaces the default beam search
  fs.check_output(a.out, a.overwrite, "--out")
  cset = C.read_caption_set(a.annotations, a.image_root, a.gt or "")
  from blip_jax.train import launch
  launch.maybe_initialize_distributed()
  import blip_jax
  model = blip_jax.load(a.model, vocab=a.vocab, image_size=a.image_size)
  if model.tokenizer is None:
    _fail("the checkpoint has no tokenizer; pass --vocab path/to/vocab.txt")
  if model.config.kind not in ("caption", "pretrain"):
    _fail(f"a {model.config.kind} model has no caption decoder; use a caption or pretraining checkpoint")
  decoding = dict(num_beams=a.beams, max_length=a.max_length, min_length=a.min_length,
                  repetition_penalty=a.repetition_penalty, length_penalty=a.length_penalty,
                  length_normalization=a.length_normalization)
  if a.top_p is not None:
    decoding.update(top_p=a.top_p, top_k=a.top_k, temperature=a.temperature, seed=a.seed)
  result = C.evaluate_captions(model, cset, batch_size=a.batch_size, prompt=a.prompt, spice=a.spice,
                               progress=not a.quiet, **decoding)
  import jax
  if jax.process_index() == 0:
    C.write_outputs(result, a.out, html_page=a.html)
    print(f"{len(result.results)} of {len(cset.paths)} images captioned; skipped {len(result.skipped_images)} "
          f"undecodable", file=sys.stderr)
    print(C.format_metrics(result))
    print(f"wrote {a.out}/captions.json, metrics.json{', captions.html' if a.html else ''}", file=sys.stderr)


def load_vqa(a):
  """A VQA model from --model: a VQA checkpoint in any format, or an official pretraining .pth (its
  towers as the official VQA fine-tuning starts them). Another kind stops with one line."""
  import blip_jax
  from blip_jax.api import detect_format
  from blip_jax import fs
  official = not fs.is_url(a.model) and detect_format(a.model) == "official"
  model = blip_jax.load(a.model, vocab=a.vocab, image_size=a.image_size, kind="vqa" if official else None)
  if model.config.kind != "vqa":
    _fail(f"{a.model} is a {model.config.kind} model; VQA needs a VQA checkpoint (or an official "
             "pretraining .pth)")
  if model.tokenizer is None:
    _fail("the checkpoint has no tokenizer; pass --vocab path/to/vocab.txt")
  return model


def cmd_vqa(a):
  from blip_jax.tasks import vqa as V
  from blip_jax.tokenizers import pre_question
  model = load_vqa(a)
  candidates = V.read_answer_list(a.answers) if a.answers else None
  images = a.image * len(a.question) if len(a.image) == 1 else a.image
  if len(images) != len(a.question):
    _fail(f"{len(a.image)} --image for {len(a.question)} --question: give one image, or one per question")
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


def cmd_eval_vqa(a):
  from blip_jax.tasks import vqa as V
  from blip_jax import fs
  fs.check_output(a.out, a.overwrite, "--out")
  questions, skipped = V.read_questions(a.annotations, a.image_root)
  candidates = V.read_answer_list(a.answers) if a.answers else None
  from blip_jax.train import launch
  launch.maybe_initialize_distributed()
  model = load_vqa(a)
  generate = dict(num_beams=a.beams, max_length=a.max_length, min_length=a.min_length)
  result = V.evaluate_vqa(model, questions, candidates, skipped=skipped, batch_size=a.batch_size, k=a.k,
                          progress=not a.quiet, **({} if candidates is not None else generate))
  import jax
  if jax.process_index() == 0:
    V.write_outputs(result, a.out)
    print(f"{len(result.results)} of {len(questions) + len(skipped)} questions answered; skipped "
          f"{len(result.skipped)}", file=sys.stderr)
    print(V.format_metrics(result))
    print(f"wrote {a.out}/answers.json, metrics.json", file=sys.stderr)


def add_vqa_flags(p):
  p.add_argument("--model", required=True, help="VQA checkpoint (official .pth, HF dir or ours), or an official "
                 "pretraining .pth")
  p.add_argument("--answers", help="answer_list.json: rank these candidates (the official mode); without it the "
                 "answer is generated")
  p.add_argument("--k", type=int, default=128, help="rank: candidates kept after step 1 (official 128)")
  p.add_argument("--beams", type=int, default=3, help="generate: beams (official 3; 1 = greedy)")
  p.add_argument("--max-length", type=int, default=10, help="generate: tokens counting [DEC] (official 10)")
  p.add_argument("--min-length", type=int, default=1, help="generate: official 1")
  p.add_argument("--vocab", help="bert-base-uncased vocab.txt, when the checkpoint has no tokenizer")
  p.add_argument("--image-size", type=int, help="resize images to this (interpolates positions; official 480)")


def cmd_train_tokenizer(a):
  from blip_jax.tokenizers import SentencePieceTokenizer, train_sentencepiece
  path = train_sentencepiece(a.input, a.out, vocab_size=a.vocab_size, model_type=a.model_type,
                             lowercase=not a.cased)
  tok = SentencePieceTokenizer(path)
  print(f"wrote {path}: {tok.vocab_size} pieces; pad={tok.pad_id} [CLS]={tok.cls_id} [SEP]={tok.sep_id} "
        f"[DEC]={tok.dec_id} [ENC]={tok.enc_id}")


def cmd_make_shards(a):
  from blip_jax.data.shards import make_shards
  stats = make_shards(a.annotations, a.image_root, a.out, per_shard=a.per_shard, workers=a.workers)
  print(f"wrote {stats['written']} examples in {stats['shards']} shards to {a.out} "
        f"({stats['already_done']} shards already done, {stats['missing_images']} missing images skipped)")


def cmd_eval_nlvr(a):
  from blip_jax.tasks import nlvr as N
  from blip_jax import fs
  fs.check_output(a.out, a.overwrite, "--out")
  pairs, skipped = N.read_pairs(a.annotations, a.image_root)
  from blip_jax.train import launch
  launch.maybe_initialize_distributed()
  import blip_jax
  model = blip_jax.load(a.model, vocab=a.vocab, image_size=a.image_size)
  if model.config.kind != "nlvr":
    _fail(f"{a.model} is a {model.config.kind} model; NLVR2 needs an NLVR2 checkpoint "
             "(model_base_nlvr.pth, or fine-tune one: configs/nlvr.py)")
  if model.tokenizer is None:
    _fail("the checkpoint has no tokenizer; pass --vocab path/to/vocab.txt")
  result = N.evaluate_nlvr(model, pairs, skipped=skipped, batch_size=a.batch_size, progress=not a.quiet)
  import jax
  if jax.process_index() == 0:
    N.write_outputs(result, a.out)
    print(f"{len(result.predictions)} of {len(pairs) + len(skipped)} pairs predicted; skipped {len(result.skipped)}",
          file=sys.stderr)
    print(N.format_metrics(result))
    print(f"wrote {a.out}/predictions.json, metrics.json", file=sys.stderr)


# One example per subcommand, shown at the end of its --help.
EXAMPLES = {
    "train": "blip-jax train --config=configs/retrieval.py:coco --workdir=/tmp/ret --config.batch_size=32",
    "bootstrap": "blip-jax bootstrap --config=configs/bootstrap.py:demo --workdir=/tmp/bootstrap",
    "compile": "blip-jax compile --config=configs/pretrain.py:vit_b --topology=v5e-256 --libtpu ~/libtpu",
    "convert": "blip-jax convert model_base_retrieval_coco ckpt/retrieval_coco",
    "score": 'blip-jax score --model model_base_retrieval_coco --image dog.jpg --text "a dog on the grass"',
    "caption": "blip-jax caption --model model_base_caption_capfilt_large --beams 3 photos/",
    "vqa": 'blip-jax vqa --model model_base_vqa_capfilt_large --image dog.jpg --question "what is the dog doing?"',
    "capfilt": "blip-jax capfilt --captioner model_base_caption_capfilt_large --filter model_base_retrieval_coco "
               "--annotations web.json --image-root images/ --out bootstrapped/",
    "checkpoints": "blip-jax checkpoints --task caption",
    "demo": "blip-jax demo --caption model_base_caption_capfilt_large --retrieval model_base_retrieval_coco "
            "--images photos/",
    "eval retrieval": "blip-jax eval retrieval --model model_base_retrieval_coco --annotations coco_karpathy_test.json "
                      "--image-root coco/ --out /tmp/ret_eval",
    "eval caption": "blip-jax eval caption --model model_base_caption_capfilt_large --annotations "
                    "coco_karpathy_test.json --image-root coco/ --out /tmp/cap_eval",
    "eval vqa": "blip-jax eval vqa --model model_base_vqa_capfilt_large --annotations vqa_test.json "
                "--image-root coco/ --out /tmp/vqa_eval",
    "eval nlvr": "blip-jax eval nlvr --model model_base_nlvr --annotations nlvr_dev.json --image-root nlvr2/ "
                 "--out /tmp/nlvr_eval",
    "train-tokenizer": "blip-jax train-tokenizer --input captions.txt --out spm --vocab-size 8000",
    "make-shards": "blip-jax make-shards --annotations coco_karpathy_train.json --image-root coco/ --out shards/",
}
MODEL_HELP = ("an official release name (blip-jax checkpoints), a Salesforce/blip-... hub id, an official .pth, "
              "a transformers dir or our checkpoint dir")


def _add_examples(parser, prefix=""):
  """Each subcommand's --help ends with its example (EXAMPLES)."""
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for name, sp in action.choices.items():
        key = f"{prefix}{name}"
        if key in EXAMPLES:
          sp.epilog = f"example:\n  {EXAMPLES[key]}"
          sp.formatter_class = argparse.RawDescriptionHelpFormatter
        _add_examples(sp, prefix=f"{key} ")


def cmd_checkpoints(a):
  import json
  from blip_jax.checkpoints import hub
  if a.fetch:
    if not (hub.is_name(a.fetch) or hub.is_hf_id(a.fetch)):
      raise ValueError(f"unknown checkpoint name {a.fetch!r}; `blip-jax checkpoints` lists them")
    print(hub.resolve(a.fetch)[0])
    return
  rows = [r for r in hub.listing() if not a.task or r["task"] == a.task]
  if a.json:
    for r in rows:
      print(json.dumps(r))
    return
  print(f"{'name':40s} {'task':9s} {'ViT':5s} {'image':>5s} {'params':>7s}  {'cached':6s} about")
  for r in rows:
    params = f"{r['params_m']}M" if r["params_m"] else "-"
    print(f"{r['name']:40s} {r['task']:9s} {r['vit']:5s} {r['image_size']:5d} {params:>7s}  "
          f"{'yes' if r['cached'] else 'no':6s} {r['about']}")
  print(f"\nofficial files are cached in {hub.cache_dir()} ($BLIP_JAX_CACHE); hub ids in huggingface_hub's cache. "
        f"Use a name wherever a command takes --model.")


def cmd_demo(a):
  from blip_jax import demo
  demo.serve(caption=a.caption, retrieval=a.retrieval, vqa=a.vqa, images=a.images, host=a.host, port=a.port,
             vocab=a.vocab)


def build_parser():
  from blip_jax.models.config import KINDS
  p = argparse.ArgumentParser(prog="blip-jax", description="BLIP in JAX/Flax. Add --verbose to any command for "
                              "TensorFlow's and JAX's own start-up messages.",
                              epilog="example:\n  " + EXAMPLES["caption"], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--verbose", action="store_true", help="show library start-up logs (TensorFlow, absl)")
  sub = p.add_subparsers(dest="cmd", required=True)
  sub.add_parser("train", help="train a task: --config=configs/<task>.py:VARIANT --workdir=DIR [--config.k=v]")
  sub.add_parser("bootstrap", help="the paper's pipeline (pretrain, captioner + filter, CapFilt, pretrain again, "
                 "evaluate both): --config=configs/bootstrap.py:VARIANT --workdir=DIR")
  sub.add_parser("compile", help="memory/FLOPs of a config's train step on a TPU topology, compiled here: "
                 "--config=configs/pretrain.py:VARIANT --topology=v5e-256 [--libtpu DIR]")

  c = sub.add_parser("convert", help="official .pth | HF dir | ours | a name -> ours (Orbax) or an HF dir")
  c.add_argument("src", help=MODEL_HELP)
  c.add_argument("dst")
  c.add_argument("--to", choices=("native", "hf"), default="native")
  c.add_argument("--kind", choices=KINDS,
                 help="official files: load as this model kind (default: the file's own; a pretraining file "
                      "starts any task model)")
  c.add_argument("--image-size", type=int, help="interpolate the position embedding to this size")
  c.add_argument("--vision-eps", type=float, help="ViT LayerNorm eps (official 1e-6; HF config's)")
  c.add_argument("--vocab", help="bert-base-uncased vocab.txt to store as the tokenizer")
  c.add_argument("--spm", help="SentencePiece .model to store as the tokenizer")
  c.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST")
  c.set_defaults(fn=cmd_convert)

  s = sub.add_parser("score", help="ITM probability and ITC cosine of image-text pairs")
  s.add_argument("--model", required=True)
  s.add_argument("--image", required=True, action="append")
  s.add_argument("--text", required=True, action="append")
  s.add_argument("--vocab")
  s.add_argument("--image-size", type=int)
  s.set_defaults(fn=cmd_score)

  cp = sub.add_parser("caption", help="caption image files, folders or globs (batched, on all local devices)")
  cp.add_argument("images", nargs="+", help="image files, folders (recursive) or globs")
  cp.add_argument("--model", required=True, help="official .pth | HF dir | our checkpoint dir")
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
  cp.set_defaults(fn=cmd_caption)

  vq = sub.add_parser("vqa", help="answer questions about images (rank a candidate list, or generate)")
  add_vqa_flags(vq)
  vq.add_argument("--image", required=True, action="append", help="an image (one for all questions, or one each)")
  vq.add_argument("--question", required=True, action="append")
  vq.set_defaults(fn=cmd_vqa)

  cf = sub.add_parser("capfilt", help="bootstrap a dataset: caption (nucleus sampling) + ITM filter, sharded, resumable")
  cf.add_argument("--captioner", required=True, help="caption (or pretraining) checkpoint: .pth | HF dir | ours")
  cf.add_argument("--filter", required=True, help="retrieval (or pretraining) checkpoint with an ITM head")
  cf.add_argument("--annotations", nargs="+", help="BLIP caption JSON file(s)")
  cf.add_argument("--image-root", default="", help="root of the JSON's relative image paths")
  cf.add_argument("--tfrecords", nargs="+", help="img2dataset TFRecord files or globs")
  cf.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
  cf.add_argument("--threshold", type=float, default=0.5, help="drop texts whose ITM p(match) is below this")
  cf.add_argument("--num-captions", type=int, default=1, help="synthetic captions per image (paper: 1)")
  cf.add_argument("--batch-size", type=int, default=16, help="images per batch (per host)")
  cf.add_argument("--images-per-shard", type=int, default=1000, help="JSON input: images per output shard")
  cf.add_argument("--vocab", help="vocab.txt for checkpoints without a tokenizer")
  cf.add_argument("--captioner-vocab", help="the captioner's vocab.txt, if it differs from --vocab")
  cf.add_argument("--quiet", action="store_true")
  add_generation_flags(cf, max_length=30, min_length=10, top_p=0.9, repetition_penalty=1.1)
  cf.set_defaults(fn=cmd_capfilt)

  ev = sub.add_parser("eval", help="evaluate a checkpoint on a downstream task").add_subparsers(dest="task", required=True)
  er = ev.add_parser("retrieval", help="image-text (or zero-shot video-text) retrieval R@K: the official k-candidate "
                     "ITM re-rank")
  er.add_argument("--model", required=True, help="retrieval or pretraining checkpoint: official .pth | HF dir | ours")
  er.add_argument("--annotations", required=True,
                  help="Karpathy-style eval JSON [{image, caption: [...]}], or with --videos MSRVTT JSON lines "
                       "{clip_name, caption}")
  er.add_argument("--image-root", default="", help="root of the annotations' image paths")
  er.add_argument("--videos", help="video folder: ROOT/clip_name.mp4 (zero-shot video retrieval)")
  er.add_argument("--frames", type=int, default=8, help="frames sampled uniformly per video (official 8)")
  er.add_argument("--k", type=int, default=256, help="candidates re-ranked per query (official: COCO 256, Flickr 128, "
                  "MSRVTT 128)")
  er.add_argument("--image-size", type=int, help="resize images to this (interpolates positions; official 384)")
  er.add_argument("--vocab", help="bert-base-uncased vocab.txt, when the checkpoint has no tokenizer")
  er.add_argument("--out", required=True, help="writes metrics.json, scores.npz, rankings.jsonl here")
  er.add_argument("--overwrite", action="store_true", help="replace the files of an existing non-empty --out")
  er.add_argument("--batch-size", type=int, default=32, help="images per encoder call; ITM rows per call")
  er.add_argument("--texts-per-row", type=int, default=0, help="candidate texts sharing one image's keys/values "
                  "(default min(k, 64))")
  er.add_argument("--max-words", type=int, default=30, help="pre_caption word limit (official 30; MSRVTT 40)")
  er.add_argument("--no-kv-reuse", action="store_true", help="repeat image tokens per text, as the official loop")
  er.add_argument("--quiet", action="store_true", help="no progress bars")
  er.set_defaults(fn=cmd_eval_retrieval)

  ec = ev.add_parser("caption", help="caption every image of a split and score it with the COCO caption metrics "
                     "(official decoding: beam 3, max 20, min 5, prompt 'a picture of ')")
  ec.add_argument("--model", required=True, help="caption (or pretraining) checkpoint: official .pth | HF dir | ours")
  ec.add_argument("--annotations", required=True, help="Karpathy-style JSON [{image, caption: [...]}] (references "
                  "from its captions), or [{image, img_id}] (NoCaps: captions only, for the evaluation server)")
  ec.add_argument("--image-root", default="", help="root of the annotations' image paths")
  ec.add_argument("--gt", help="COCO-format references (e.g. the official coco_karpathy_test_gt.json)")
  ec.add_argument("--vocab", help="bert-base-uncased vocab.txt, when the checkpoint has no tokenizer")
  ec.add_argument("--image-size", type=int, help="resize images to this (interpolates positions; official 384)")
  ec.add_argument("--out", required=True, help="writes captions.json (COCO results format) and metrics.json here")
  ec.add_argument("--overwrite", action="store_true", help="replace the files of an existing non-empty --out")
  ec.add_argument("--batch-size", type=int, default=32, help="images per generate call (split over local devices)")
  ec.add_argument("--spice", choices=("auto", "download", "off"), default="auto",
                  help="SPICE: computed when the Stanford CoreNLP jars are present (auto), fetched first (download)")
  ec.add_argument("--html", action="store_true", help="also write captions.html: thumbnails, generated and "
                  "reference captions, per-image CIDEr, worst first")
  ec.add_argument("--nocaps", action="store_true", help="the official NoCaps decoding (repetition penalty 1.1)")
  ec.add_argument("--quiet", action="store_true", help="no progress bar")
  add_generation_flags(ec, beams=3)
  ec.set_defaults(fn=cmd_eval_caption)

  ev_vqa = ev.add_parser("vqa", help="answer every question of a VQA annotation file: answers.json (the "
                         "evaluation server's format) and, with human answers, the VQA accuracy")
  add_vqa_flags(ev_vqa)
  ev_vqa.add_argument("--annotations", required=True, help="[{question_id, question, image, [answer: [...]]}] "
                      "(vqa_val.json, vqa_test.json)")
  ev_vqa.add_argument("--image-root", default="", help="root of the annotations' image paths")
  ev_vqa.add_argument("--out", required=True, help="writes answers.json and metrics.json here")
  ev_vqa.add_argument("--overwrite", action="store_true", help="replace the files of an existing non-empty --out")
  ev_vqa.add_argument("--batch-size", type=int, default=16, help="questions per step (split over local devices)")
  ev_vqa.add_argument("--quiet", action="store_true", help="no progress bar")
  ev_vqa.set_defaults(fn=cmd_eval_vqa)

  en = ev.add_parser("nlvr", help="NLVR2: does each sentence hold for its pair of images; predictions.json and, "
                     "with labels, the accuracy (the paper reports dev and test-P)")
  en.add_argument("--model", required=True, help="NLVR2 checkpoint: official model_base_nlvr.pth or ours")
  en.add_argument("--annotations", required=True, help="BLIP's nlvr_dev.json / nlvr_test.json: "
                  "[{images: [left, right], sentence, label}]")
  en.add_argument("--image-root", default="", help="root of the annotations' image paths")
  en.add_argument("--out", required=True, help="writes predictions.json and metrics.json here")
  en.add_argument("--overwrite", action="store_true", help="replace the files of an existing non-empty --out")
  en.add_argument("--batch-size", type=int, default=64, help="pairs per step (split over local devices)")
  en.add_argument("--vocab", help="bert-base-uncased vocab.txt, when the checkpoint has no tokenizer")
  en.add_argument("--image-size", type=int, help="resize images to this (interpolates positions; official 384)")
  en.add_argument("--quiet", action="store_true", help="no progress bar")
  en.set_defaults(fn=cmd_eval_nlvr)

  t = sub.add_parser("train-tokenizer", help="train a SentencePiece model with BLIP's special tokens")
  t.add_argument("--input", required=True, help="text file, one sentence per line")
  t.add_argument("--out", required=True, help="output prefix (writes PREFIX.model, PREFIX.vocab)")
  t.add_argument("--vocab-size", type=int, default=8000)
  t.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
  t.add_argument("--cased", action="store_true")
  t.set_defaults(fn=cmd_train_tokenizer)

  m = sub.add_parser("make-shards", help="BLIP JSON + images -> img2dataset-style TFRecord shards")
  m.add_argument("--annotations", required=True, action="append", help="BLIP JSON file (repeatable)")
  m.add_argument("--image-root", default="")
  m.add_argument("--out", required=True)
  m.add_argument("--per-shard", type=int, default=1000)
  m.add_argument("--workers", type=int, default=os.cpu_count() or 2)
  m.set_defaults(fn=cmd_make_shards)

  ck = sub.add_parser("checkpoints", help="the official checkpoints by name: task, size, image size, cached or not")
  ck.add_argument("--task", choices=("pretrain", "retrieval", "caption", "vqa", "nlvr"), help="only this task's")
  ck.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
  ck.add_argument("--fetch", metavar="NAME", help="download NAME into the cache now (resumable) and print its path")
  ck.set_defaults(fn=cmd_checkpoints)

  dm = sub.add_parser("demo", help="a local web page: drop a photo, get captions, ITM/ITC scores, answers, search")
  dm.add_argument("--caption", required=True, metavar="MODEL", help="caption (or pretraining) model: " + MODEL_HELP)
  dm.add_argument("--retrieval", metavar="MODEL", help="ITM/ITC model for scores and search (default: --caption's "
                  "when it is a pretraining model)")
  dm.add_argument("--vqa", metavar="MODEL", help="VQA model for answers")
  dm.add_argument("--images", help="a folder to search by text (features computed once, cached under "
                  "$BLIP_JAX_CACHE/demo_index)")
  dm.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
  dm.add_argument("--port", type=int, default=7860)
  dm.add_argument("--vocab", help="bert-base-uncased vocab.txt, when a checkpoint has no tokenizer")
  dm.set_defaults(fn=cmd_demo)
  for sp in (s, cp, vq, cf, er, ec, ev_vqa, en):  # every --model-like flag takes names too
    for action in sp._actions:
      if action.dest in ("model", "captioner", "filter") and action.help and "name" not in action.help:
        action.help = action.help + " (or an official release name / Salesforce/... hub id)"
  _add_examples(p)
  return p


def _fail(e):
  """One line naming the problem, exit status 2 (as argparse's usage errors), no traceback."""
  print(f"error: {e}", file=sys.stderr, flush=True)
  sys.exit(2)


def _config_flags(command: str, argv, strings: dict, required: tuple, usage: str):
  """--config=FILE:VARIANT with --config.key=value overrides (ml_collections), plus string flags
  {name: help}; a bad flag or a missing required one exits 2 naming it."""
  from absl import flags
  from ml_collections import config_flags
  fl = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file:variant", flag_values=fl, lock_config=True)
  for name, help_ in strings.items():
    flags.DEFINE_string(name, None if name in required else "", help_, flag_values=fl)
  try:
    fl([f"blip-jax {command}"] + argv)
  except (flags.Error, KeyError, AttributeError, ValueError) as e:
    _fail(e)
  if fl.config is None or not all(getattr(fl, r) for r in required):
    _fail(f"usage: {usage}")
  return fl


def train_main(argv):
  """`blip-jax train --config=configs/pretrain.py:VARIANT --workdir=DIR [--config.key=value ...]`."""
  fl = _config_flags("train", argv, {"workdir": "checkpoints, TensorBoard and metrics go here (local or gs://)"},
                     ("workdir",), "blip-jax train --config=configs/<task>.py:VARIANT --workdir=DIR [--config.key=value ...]")
  from blip_jax.train import launch
  launch.maybe_initialize_distributed()
  from blip_jax.train.trainer import ConfigError, train
  try:
    train(fl.config, fl.workdir)
  except (ConfigError, FloatingPointError) as e:
    _fail(e)


def bootstrap_main(argv):
  """`blip-jax bootstrap --config=configs/bootstrap.py:VARIANT --workdir=DIR [--config.key=value ...]`."""
  fl = _config_flags("bootstrap", argv, {"workdir": "every stage's outputs; rerun the same command to resume"},
                     ("workdir",), "blip-jax bootstrap --config=configs/bootstrap.py:VARIANT --workdir=DIR "
                     "[--config.key=value ...]")
  from blip_jax.train import launch
  launch.maybe_initialize_distributed()
  from blip_jax import bootstrap
  from blip_jax.train.trainer import ConfigError
  try:
    bootstrap.run(fl.config, fl.workdir)
  except (ConfigError, bootstrap.BootstrapError, FloatingPointError, ValueError, FileNotFoundError) as e:
    _fail(e)


def compile_main(argv):
  """`blip-jax compile --config=configs/pretrain.py:VARIANT --topology=v5e-256 [--libtpu DIR] [--config.k=v]`:
  per-device memory and FLOPs of the sharded train step on a TPU topology, compiled here."""
  fl = _config_flags("compile", argv, {"topology": "TPU slice, e.g. v4-64, v5e-256",
                                       "libtpu": "folder holding the libtpu package (pip install --target DIR libtpu)",
                                       "json": "also write the figures to this JSON file"},
                     ("topology",), "blip-jax compile --config=configs/pretrain.py:VARIANT --topology=v5e-256 "
                     "[--libtpu DIR]")
  os.environ["JAX_PLATFORMS"] = "cpu"  # the TPU compiler only: no TPU backend on this machine
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiles at once: no TPU is held
  if fl.libtpu:
    sys.path.insert(0, fl.libtpu)
  import importlib.util
  if importlib.util.find_spec("libtpu") is None:
    _fail('libtpu is not importable: pip install --target DIR "libtpu==0.0.42.*" and pass --libtpu DIR')
  from blip_jax.train import aot
  from blip_jax.train.trainer import ConfigError
  if fl.topology not in aot.TOPOLOGIES:
    _fail(f"unknown topology {fl.topology!r}; known: {', '.join(aot.TOPOLOGIES)}")
  try:
    report = aot.compile_step(fl.config, fl.topology)
  except ConfigError as e:
    _fail(e)
  print(aot.format_report(report))
  if fl.json:
    from blip_jax import fs
    fs.write_json(fl.json, report, indent=2)


_CONFIG_USAGE = {
    "train": ("train a task from a config file", "--config=configs/<task>.py:VARIANT --workdir=DIR [--config.key=value ...]",
              "--workdir: checkpoints, TensorBoard logs and metrics.jsonl (local or gs://); rerun to resume"),
    "bootstrap": ("the paper's loop: pretrain on noisy data, fine-tune a captioner and a filter, CapFilt the noisy "
                  "part, pretrain again on clean + bootstrapped data, evaluate both; resumable stage by stage",
                  "--config=configs/bootstrap.py:VARIANT --workdir=DIR [--config.key=value ...]",
                  "--workdir: each stage's outputs, summary.json and summary.png; rerun to resume"),
    "compile": ("per-device memory and FLOPs of a config's train step on a TPU topology, compiled on this machine",
                "--config=configs/pretrain.py:VARIANT --topology=v5e-256 [--libtpu DIR] [--json FILE]",
                "--topology: a TPU slice (v4-64, v5e-256, ...); --libtpu: folder of `pip install --target DIR libtpu`"),
}


def _config_help(cmd: str) -> None:
  what, usage, flags = _CONFIG_USAGE[cmd]
  print(f"usage: blip-jax {cmd} {usage}\n\n{what}.\n\n  --config=FILE:VARIANT  an ml_collections config "
        f"file and its variant; --config.key=value overrides any field (a wrong key stops before any compute)\n"
        f"  {flags}\n\nexample:\n  {EXAMPLES[cmd]}")


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--verbose" in argv:
    argv.remove("--verbose")
    os.environ["BLIP_JAX_VERBOSE"] = "1"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
  else:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
  if argv and argv[0] in _CONFIG_USAGE:
    if any(x in ("-h", "--help", "--helpfull") for x in argv[1:]):
      _config_help(argv[0])
      return
    return {"train": train_main, "compile": compile_main, "bootstrap": bootstrap_main}[argv[0]](argv[1:])
  args = build_parser().parse_args(argv)
  if getattr(args, "nocaps", False) and args.repetition_penalty == 1.0:
    args.repetition_penalty = 1.1  # official eval_nocaps
  from blip_jax.checkpoints.hub import DownloadError
  try:
    args.fn(args)
  except DownloadError as e:  # the network, not the user: exit 1, the message without a traceback
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  except (ValueError, FileNotFoundError, FileExistsError) as e:  # CheckpointError, ImageDecodeError, bad configs
    _fail(e)
  except KeyboardInterrupt:
    sys.exit(130)


if __name__ == "__main__":
  main()
