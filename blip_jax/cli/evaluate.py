"""`blip-jax eval retrieval | caption | vqa | nlvr`: one skeleton for the four evaluations. The
output folder and the annotations are checked before any model is read; then the hosts join, the
model is loaded and checked, the task's evaluation runs (every host takes part) and process 0
writes the files and prints the figures."""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import jax

from blip_jax import fs
from blip_jax.api import detect_format
from blip_jax.cli.common import add_generation_flags, check_out, command, fail, load_checked, model_flags, start_hosts
from blip_jax.tasks import caption as C
from blip_jax.tasks import nlvr as N
from blip_jax.tasks import retrieval as R
from blip_jax.tasks import vqa as V


@dataclasses.dataclass(frozen=True)
class Evaluation:
  read: Callable  # (args) -> the evaluation set (refused before any compute)
  load: Callable  # (args) -> the checked model
  run: Callable  # (args, model, data) -> result
  write: Callable  # (result, out_dir)
  summary: Callable  # (result, data) -> the stderr line of what was done and skipped
  figures: Callable  # (result) -> the stdout figures
  files: str  # what lands in --out


def run_evaluation(ev: Evaluation, a) -> None:
  check_out(a)
  data = ev.read(a)
  start_hosts()
  model = ev.load(a)
  result = ev.run(a, model, data)
  if jax.process_index() == 0:
    ev.write(result, a.out)
    print(ev.summary(result, data), file=sys.stderr)
    print(ev.figures(result))
    print(f"wrote {a.out}/{ev.files}", file=sys.stderr)


# ---- retrieval ----------------------------------------------------------------------------------
def _read_gallery(a):
  if bool(a.videos) and a.image_root:
    fail("give --image-root (images) or --videos (videos), not both")
  gallery = R.read_gallery(a.annotations, a.videos or a.image_root, video=bool(a.videos))
  R.check_gallery(gallery, a.k)
  return gallery


def _retrieval_summary(result, gallery):
  sk = result.skipped
  return (f"{len(result.gallery.items)} {'videos' if gallery.video else 'images'}, {len(result.gallery.texts)} "
          f"texts, k={result.stats['k']}; skipped {len(sk['items'])} undecodable (with their "
          f"{sk['texts_of_skipped_items']} texts) and {sk['blank_texts']} blank texts")


RETRIEVAL = Evaluation(
    read=_read_gallery,
    load=lambda a: load_checked(a, "retrieval", itc=True, hint="a retrieval or pretraining checkpoint"),
    run=lambda a, model, gallery: R.evaluate(model, gallery, k=a.k, batch_size=a.batch_size,
                                             texts_per_row=a.texts_per_row, frames=a.frames, max_words=a.max_words,
                                             reuse_kv=not a.no_kv_reuse, progress=not a.quiet),
    write=R.write_outputs, summary=_retrieval_summary, figures=lambda r: R.format_metrics(r.metrics),
    files="metrics.json, scores.npz, rankings.jsonl")


# ---- captioning ---------------------------------------------------------------------------------
def _caption_run(a, model, cset):
  decoding = dict(num_beams=a.beams, max_length=a.max_length, min_length=a.min_length,
                  repetition_penalty=a.repetition_penalty, length_penalty=a.length_penalty,
                  length_normalization=a.length_normalization)
  if a.nocaps and a.repetition_penalty == C.DECODING["coco"]["repetition_penalty"]:
    decoding["repetition_penalty"] = C.DECODING["nocaps"]["repetition_penalty"]  # official eval_nocaps
  if a.top_p is not None:  # nucleus sampling replaces the default beam search
    decoding.update(num_beams=1, top_p=a.top_p, top_k=a.top_k, temperature=a.temperature, seed=a.seed)
  return C.evaluate_captions(model, cset, batch_size=a.batch_size, prompt=a.prompt, spice=a.spice,
                             progress=not a.quiet, **decoding)


CAPTION = Evaluation(
    read=lambda a: C.read_caption_set(a.annotations, a.image_root, a.gt or ""),
    load=lambda a: load_checked(a, "captioning", kinds=("caption", "pretrain"),
                                hint="a caption decoder: a caption or pretraining checkpoint"),
    run=_caption_run,
    write=C.write_outputs,
    summary=lambda r, cset: (f"{len(r.results)} of {len(cset.paths)} images captioned; skipped "
                             f"{len(r.skipped_images)} undecodable"),
    figures=C.format_metrics, files="captions.json, metrics.json")


# ---- VQA ----------------------------------------------------------------------------------------
def load_vqa(a):
  """A VQA model from --model: a VQA checkpoint in any format, or an official pretraining .pth (its
  towers as the official VQA fine-tuning starts them). Another kind stops with one line."""
  official = not fs.is_url(a.model) and detect_format(a.model) == "official"
  return load_checked(a, "VQA", kinds=("vqa",), hint="a VQA checkpoint (or an official pretraining .pth)",
                      kind="vqa" if official else None)


def _vqa_read(a):
  questions, skipped = V.read_questions(a.annotations, a.image_root)
  return questions, skipped, V.read_answer_list(a.answers) if a.answers else None


def _vqa_run(a, model, data):
  questions, skipped, candidates = data
  generate = {} if candidates is not None else dict(num_beams=a.beams, max_length=a.max_length,
                                                    min_length=a.min_length)
  return V.evaluate_vqa(model, questions, candidates, skipped=skipped, batch_size=a.batch_size, k=a.k,
                        progress=not a.quiet, **generate)


VQA = Evaluation(
    read=_vqa_read, load=load_vqa, run=_vqa_run, write=V.write_outputs,
    summary=lambda r, data: (f"{len(r.results)} of {len(data[0]) + len(data[1])} questions answered; skipped "
                             f"{len(r.skipped)}"),
    figures=V.format_metrics, files="answers.json, metrics.json")


def add_vqa_flags(p):
  model_flags(p, "VQA checkpoint (official .pth, HF dir or ours), or an official pretraining .pth", 480)
  p.add_argument("--answers", help="answer_list.json: rank these candidates (the official mode); without it the "
                 "answer is generated")
  p.add_argument("--k", type=int, default=128, help="rank: candidates kept after step 1 (official 128)")
  p.add_argument("--beams", type=int, default=3, help="generate: beams (official 3; 1 = greedy)")
  p.add_argument("--max-length", type=int, default=10, help="generate: tokens counting [DEC] (official 10)")
  p.add_argument("--min-length", type=int, default=1, help="generate: official 1")


# ---- NLVR2 --------------------------------------------------------------------------------------
NLVR = Evaluation(
    read=lambda a: N.read_pairs(a.annotations, a.image_root),
    load=lambda a: load_checked(a, "NLVR2", kinds=("nlvr",),
                                hint="an NLVR2 checkpoint (model_base_nlvr.pth, or fine-tune one: configs/nlvr.py)"),
    run=lambda a, model, data: N.evaluate_nlvr(model, data[0], skipped=data[1], batch_size=a.batch_size,
                                               progress=not a.quiet),
    write=N.write_outputs,
    summary=lambda r, data: (f"{len(r.predictions)} of {len(data[0]) + len(data[1])} pairs predicted; skipped "
                             f"{len(r.skipped)}"),
    figures=N.format_metrics, files="predictions.json, metrics.json")


# ---- the parsers --------------------------------------------------------------------------------
def _common(p, out_help: str, batch: int, batch_help: str):
  p.add_argument("--image-root", default="", help="root of the annotations' image paths")
  p.add_argument("--out", required=True, help=out_help)
  p.add_argument("--overwrite", action="store_true", help="replace the files of an existing non-empty --out")
  p.add_argument("--batch-size", type=int, default=batch, help=batch_help)
  p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub) -> None:
  ev = sub.add_parser("eval", help="evaluate a checkpoint on a downstream task")
  ev = ev.add_subparsers(dest="task", required=True)
  er = command(ev, "retrieval", lambda a: run_evaluation(RETRIEVAL, a),
               "blip-jax eval retrieval --model model_base_retrieval_coco --annotations coco_karpathy_test.json "
               "--image-root coco/ --out /tmp/ret_eval",
               help="image-text (or zero-shot video-text) retrieval R@K: the official k-candidate ITM re-rank")
  model_flags(er, "retrieval or pretraining checkpoint: official .pth | HF dir | ours", 384)
  er.add_argument("--annotations", required=True,
                  help="Karpathy-style eval JSON [{image, caption: [...]}], or with --videos MSRVTT JSON lines "
                       "{clip_name, caption}")
  _common(er, "writes metrics.json, scores.npz, rankings.jsonl here", 32, "images per encoder call; ITM rows per call")
  er.add_argument("--videos", help="video folder: ROOT/clip_name.mp4 (zero-shot video retrieval)")
  er.add_argument("--frames", type=int, default=8, help="frames sampled uniformly per video (official 8)")
  er.add_argument("--k", type=int, default=256, help="candidates re-ranked per query (official: COCO 256, Flickr 128, "
                  "MSRVTT 128)")
  er.add_argument("--texts-per-row", type=int, default=0, help="candidate texts sharing one image's keys/values "
                  "(default min(k, 64))")
  er.add_argument("--max-words", type=int, default=30, help="pre_caption word limit (official 30; MSRVTT 40)")
  er.add_argument("--no-kv-reuse", action="store_true", help="repeat image tokens per text, as the official loop")

  ec = command(ev, "caption", _eval_caption,
               "blip-jax eval caption --model model_base_caption_capfilt_large --annotations "
               "coco_karpathy_test.json --image-root coco/ --out /tmp/cap_eval",
               help="caption every image of a split and score it with the COCO caption metrics (official "
                    "decoding: beam 3, max 20, min 5, prompt 'a picture of ')")
  model_flags(ec, "caption (or pretraining) checkpoint: official .pth | HF dir | ours", 384)
  ec.add_argument("--annotations", required=True, help="Karpathy-style JSON [{image, caption: [...]}] (references "
                  "from its captions), or [{image, img_id}] (NoCaps: captions only, for the evaluation server)")
  _common(ec, "writes captions.json (COCO results format) and metrics.json here", 32,
          "images per generate call (split over local devices)")
  ec.add_argument("--gt", help="COCO-format references (e.g. the official coco_karpathy_test_gt.json)")
  ec.add_argument("--spice", choices=("auto", "download", "off"), default="auto",
                  help="SPICE: computed when the Stanford CoreNLP jars are present (auto), fetched first (download)")
  ec.add_argument("--html", action="store_true", help="also write captions.html: thumbnails, generated and "
                  "reference captions, per-image CIDEr, worst first")
  ec.add_argument("--nocaps", action="store_true", help="the official NoCaps decoding (repetition penalty 1.1)")
  add_generation_flags(ec, beams=3)

  ev_vqa = command(ev, "vqa", lambda a: run_evaluation(VQA, a),
                   "blip-jax eval vqa --model model_base_vqa_capfilt_large --annotations vqa_test.json "
                   "--image-root coco/ --out /tmp/vqa_eval",
                   help="answer every question of a VQA annotation file: answers.json (the evaluation server's "
                        "format) and, with human answers, the VQA accuracy")
  add_vqa_flags(ev_vqa)
  ev_vqa.add_argument("--annotations", required=True, help="[{question_id, question, image, [answer: [...]]}] "
                      "(vqa_val.json, vqa_test.json)")
  _common(ev_vqa, "writes answers.json and metrics.json here", 16, "questions per step (split over local devices)")

  en = command(ev, "nlvr", lambda a: run_evaluation(NLVR, a),
               "blip-jax eval nlvr --model model_base_nlvr --annotations nlvr_dev.json --image-root nlvr2/ "
               "--out /tmp/nlvr_eval",
               help="NLVR2: does each sentence hold for its pair of images; predictions.json and, with labels, "
                    "the accuracy (the paper reports dev and test-P)")
  model_flags(en, "NLVR2 checkpoint: official model_base_nlvr.pth or ours", 384)
  en.add_argument("--annotations", required=True, help="BLIP's nlvr_dev.json / nlvr_test.json: "
                  "[{images: [left, right], sentence, label}]")
  _common(en, "writes predictions.json and metrics.json here", 64, "pairs per step (split over local devices)")


def _eval_caption(a):
  run_evaluation(dataclasses.replace(CAPTION, write=lambda r, out: C.write_outputs(r, out, html_page=a.html),
                                     files="captions.json, metrics.json" + (", captions.html" if a.html else "")), a)
