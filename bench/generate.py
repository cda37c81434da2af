"""Captioning speed: our jit'd greedy and beam-3 decoding (KV cache, static shapes) against
transformers' `generate` on the same random-weight BLIP caption model and batch, in one run.
Each call goes from pixels to tokens (image encoder + 20 new tokens after the 4-token prompt: min
and max length both 24, so both sides decode exactly 20 tokens). Ours is timed after compilation
(the compile time is printed apart). Token ids of both sides are compared too.

  .venv/bin/python bench/generate.py [--sizes tiny,base] [--repeats 3] [--threads 2]
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("--sizes", default="tiny,base")
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses the machine's cores)")
A = ap.parse_args()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import torch  # noqa: E402
from transformers import BlipConfig, BlipForConditionalGeneration  # noqa: E402

import blip_jax  # noqa: E402
from blip_jax.models.generate import beam_search, greedy  # noqa: E402

torch.set_num_threads(A.threads)
SIZES = {
    "tiny": dict(width=192, depth=4, heads=3, mlp=768, image=224, batch=8),
    "base": dict(width=768, depth=12, heads=12, mlp=3072, image=384, batch=2),  # ViT-B/16 + BERT-base
}
PROMPT = [1037, 3861, 1997]  # "a picture of"
NEW_TOKENS = 20


def hf_model(s):
  size = dict(hidden_size=s["width"], intermediate_size=s["mlp"], num_hidden_layers=s["depth"],
              num_attention_heads=s["heads"])
  cfg = BlipConfig(vision_config=dict(**size, image_size=s["image"], patch_size=16, layer_norm_eps=1e-6),
                   text_config=dict(**size, vocab_size=30524, encoder_hidden_size=s["width"]))
  torch.manual_seed(0)
  model = BlipForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # larger weights than the default init, so the tokens are not all alike
    for p in model.parameters():
      if p.dim() > 1:
        p.mul_(2.0)
  return model


def timed(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), out


def main():
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); torch {torch.__version__}, "
        f"{A.threads} threads; median of {A.repeats}")
  print(f"{'size':6s} {'batch':>5s} {'mode':7s} {'transformers':>13s} {'ours':>9s} {'speed-up':>9s} "
        f"{'compile':>8s}  same tokens")
  notes = []
  for name in A.sizes.split(","):
    s = SIZES[name]
    hf = hf_model(s)
    with tempfile.TemporaryDirectory() as d:
      hf.save_pretrained(d)
      ours = blip_jax.load(d)
    b = s["batch"]
    pixels = np.random.RandomState(0).randn(b, s["image"], s["image"], 3).astype(np.float32)
    pv = torch.tensor(pixels).permute(0, 3, 1, 2).contiguous()
    length = 1 + len(PROMPT) + NEW_TOKENS
    hf_ids = torch.tensor([[101] + PROMPT + [102]] * b)  # transformers drops the last token
    prompt = np.asarray([[ours.config.text.dec_id] + PROMPT] * b, np.int32)
    for mode, beams in (("greedy", 1), ("beam-3", 3)):
      kw = dict(max_length=length, min_length=length)

      def run_hf():
        with torch.no_grad():
          return hf.generate(pixel_values=pv, input_ids=hf_ids, num_beams=beams, **kw).numpy()

      def run_ours():
        memory = ours.encode_image(pixels)
        if beams == 1:
          return np.asarray(greedy(ours.config, ours.params, memory, prompt, **kw))
        return np.asarray(beam_search(ours.config, ours.params, memory, prompt, num_beams=beams, **kw)[0])

      t0 = time.perf_counter()
      run_ours()
      compile_s = time.perf_counter() - t0
      t_ours, got = timed(run_ours, A.repeats)
      t_hf, ref = timed(run_hf, A.repeats)
      same = got.shape == ref.shape and (got == ref).all()
      print(f"{name:6s} {b:5d} {mode:7s} {t_hf:12.3f}s {t_ours:8.3f}s {t_hf / t_ours:8.2f}x {compile_s:7.1f}s  "
            f"{'yes' if same else 'NO'}", flush=True)
    # The image encoder alone: the part of each call that decoding cannot speed up.
    t_enc_ours, _ = timed(lambda: ours.encode_image(pixels).block_until_ready(), A.repeats)
    with torch.no_grad():
      t_enc_hf, _ = timed(lambda: hf.vision_model(pixel_values=pv), A.repeats)
    notes.append(f"{name}: image encoder alone: transformers {t_enc_hf:.3f}s, ours {t_enc_ours:.3f}s")
  print("\n".join(notes))


if __name__ == "__main__":
  main()
