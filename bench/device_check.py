"""One prepared command for a lent GPU (issue 26, item 5): what matters, measured in minutes, printed
as one JSON.

  # a bare GPU machine, from the repository root (the install line is part of the budget):
  python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -c constraints.txt \\
      "jax[cuda12]==0.10.2" && .venv/bin/pip install -q --no-deps -e .
  .venv/bin/python bench/device_check.py --out device_check.json [--compare-torch]

  .venv/bin/python bench/device_check.py --smoke     # the same code, tiny sizes, on this CPU (tests)

It measures, on random weights (the speeds do not depend on them):
- the ViT-B/16 pretraining step (configs/pretrain.py:vit_b, 224 px) in bfloat16 compute at the
  largest per-device batch of --batches that fits: step time, examples/s, and MFU = the step's
  FLOPs (XLA's cost analysis of the step lowered for one CPU device: GPU lowerings report none) /
  step time / the chip's dense bf16 peak (printed with the peak it used; --peak-tflops overrides it);
- captions/s: ViT-B caption model at 384 px, beam 3, max 20 / min 5 (the official COCO decoding),
  image encoding included; --compare-torch also times transformers' BlipForConditionalGeneration
  `generate` in bfloat16 on the same device and batch (needs torch + transformers);
- retrieval ITM re-rank pairs/s (tasks/retrieval.itm_positive, 384 px tokens, 35-token texts,
  16 texts per image sharing its keys/values, as `eval retrieval` groups them);
- VQA rank questions/s (models/answer.rank, k = 128 of 3,128 candidates, 480 px).
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # the card's memory, not JAX's default 75%

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# dense bf16 peak FLOP/s per device, by device_kind (NVIDIA datasheets, Cloud TPU docs)
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
         "TPU v5e": 197e12, "TPU v5p": 459e12}


def peak_flops(device) -> tuple:
  for name, peak in PEAKS.items():
    if name.lower() in device.device_kind.lower():
      return peak, name
  return None, device.device_kind


def timed(fn, repeats: int) -> float:
  """Median seconds of fn() (which blocks), after one warm call."""
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def shrink(c):
  """--smoke: the recipe's code paths at tiny sizes."""
  c.model.update(vit="", image_size=32)
  c.model.vision.update(width=32, depth=1, heads=2, mlp_dim=64, patch=16)
  c.model.text.update(width=32, depth=1, heads=2, mlp_dim=64)


def pretrain_step(a, peak):
  """The largest batch of a.batches (per device) whose step runs; its timing and MFU."""
  from blip_jax.data import batch_shapes
  from blip_jax.train.aot import memory_figures, step_flops
  from blip_jax.train.setup import build, make_mesh, model_config
  from configs.pretrain import get_config
  tried = {}
  for per_device in a.batches:
    c = get_config("vit_b")
    c.unlock()
    c.model.dtype = "bfloat16"
    c.batch_size = per_device * jax.device_count()
    # the recipe's 57,600-feature ITC queue (its similarities are part of the step), rounded to a
    # multiple of the batch where the batch does not divide it
    c.loss.queue_size = max(1, round(c.loss.queue_size / c.batch_size)) * c.batch_size
    if a.smoke:
      shrink(c)
      c.loss.queue_size = 4 * c.batch_size
    c.lock()
    try:
      mesh = make_mesh(c)
      mcfg = model_config(c)
      step_fn, init_fn, shardings, batch_sharding, _ = build(c, mcfg, mesh, 1000, 1000)
      shapes = batch_shapes("caption", dict(c.data.pipeline.to_dict(), image_size=mcfg.vision.image_size), c.batch_size)
      r = np.random.RandomState(0)
      batch = {k: (r.randint(0, 255, shape) if k == "image" else r.randint(1000, 2000, shape)).astype(dtype)
               for k, (shape, dtype) in shapes.items() if k not in ("index", "image_id")}
      batch["text_mask"][:] = 1
      batch["image_id"] = np.stack([np.zeros(c.batch_size), np.arange(c.batch_size)], 1).astype(np.int32)
      batch = jax.device_put(batch, batch_sharding)
      with jax.set_mesh(mesh):
        state = jax.jit(init_fn, out_shardings=shardings)(jax.random.PRNGKey(0))
        step = step_fn.lower(state, batch).compile()
        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")  # None on CPUs
        need = memory_figures(step, limit or 0)["total"]
        if limit and need > limit:  # known before running: no out-of-memory run to wait for
          tried[per_device] = f"needs {need / 2 ** 30:.1f} GiB of {limit / 2 ** 30:.1f}"
          continue
        holder = [state]

        def run():
          holder[0], m = step(holder[0], batch)
          jax.block_until_ready(m["loss"])
        seconds = timed(run, a.repeats)
    except Exception as e:  # noqa: BLE001  (out of memory: try a smaller batch)
      if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
        raise
      tried[per_device] = "out of memory"
      continue
    flops = step_flops(c)  # of the whole step (every device's share)
    out = {"per_device_batch": per_device, "global_batch": c.batch_size, "step_s": seconds,
           "examples_per_s": c.batch_size / seconds, "flops_per_step": flops, "tried": tried}
    if peak and flops:
      out["mfu"] = flops / seconds / (peak * jax.device_count())
    return out
  return {"error": "no batch of --batches fits", "tried": tried}


def random_model(kind, image_size, smoke):
  from blip_jax.models.config import BlipConfig, VisionConfig, tiny_config
  from blip_jax.models.init import init_params
  cfg = (tiny_config(kind, image_size=image_size, dtype="bfloat16") if smoke
         else BlipConfig(kind=kind, vision=VisionConfig(image_size=image_size), dtype="bfloat16"))
  return cfg, init_params(cfg)


def captions_per_s(a, rng):
  from blip_jax.models import generate as gen
  from blip_jax.models.blip import Blip
  from blip_jax.objectives import normalize_images
  size = 32 if a.smoke else 384
  cfg, params = random_model("caption", size, a.smoke)
  n = a.caption_batch
  pixels = jnp.asarray(rng.randint(0, 255, (n, size, size, 3)).astype(np.uint8))
  prompt = jnp.asarray([[cfg.text.dec_id, 1037, 3861, 1997]] * n, jnp.int32)  # [DEC] a picture of (BERT ids)

  encode = jax.jit(lambda p, x: Blip(cfg).apply({"params": p}, normalize_images(x), method=Blip.encode_image))

  def run():
    memory = encode(params, pixels)
    tokens, _ = gen.beam_search(cfg, params, memory, prompt, num_beams=3, max_length=20, min_length=5)
    jax.block_until_ready(tokens)
  seconds = timed(run, a.repeats)
  out = {"images": n, "image_size": size, "seconds": seconds, "captions_per_s": n / seconds}
  if a.compare_torch:
    out["torch"] = torch_captions_per_s(a, rng, size)
    out["speedup_vs_torch"] = out["captions_per_s"] / out["torch"]["captions_per_s"]
  return out


def torch_captions_per_s(a, rng, size):
  import torch
  from transformers import BlipConfig as HFConfig
  from transformers import BlipForConditionalGeneration
  device = "cuda" if torch.cuda.is_available() else "cpu"
  hf = HFConfig()
  hf.vision_config.image_size = size
  if a.smoke:
    hf.vision_config.update(dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 patch_size=16))
    hf.text_config.update(dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               vocab_size=128, encoder_hidden_size=32, bos_token_id=4, pad_token_id=0,
                               sep_token_id=3, eos_token_id=3))
  model = BlipForConditionalGeneration(hf).to(device, torch.bfloat16).eval()
  n = a.caption_batch
  pixels = torch.tensor(rng.randn(n, 3, size, size), dtype=torch.bfloat16, device=device)
  ids = torch.tensor([[hf.text_config.bos_token_id] + ([1037, 3861, 1997] if not a.smoke else [7, 8, 9])] * n,
                     device=device)

  def run():
    with torch.no_grad():
      model.generate(pixel_values=pixels, input_ids=ids, num_beams=3, max_length=20, min_length=5)
    if device == "cuda":
      torch.cuda.synchronize()
  seconds = timed(run, a.repeats)
  return {"device": device, "seconds": seconds, "captions_per_s": n / seconds}


def itm_pairs_per_s(a, rng):
  from blip_jax.tasks.retrieval import itm_positive
  size = 32 if a.smoke else 384
  cfg, params = random_model("retrieval", size, a.smoke)
  rows, per_row, length = a.itm_rows, 16, 35
  memory = (size // cfg.vision.patch) ** 2 + 1
  tokens = jnp.asarray(rng.randn(rows, memory, cfg.vision.width), jnp.bfloat16)
  ids = jnp.asarray(rng.randint(1000, 2000, (rows * per_row, length)), jnp.int32)
  mask = jnp.ones_like(ids)
  seconds = timed(lambda: jax.block_until_ready(itm_positive(cfg, params, tokens, ids, mask)), a.repeats)
  return {"pairs": rows * per_row, "seconds": seconds, "pairs_per_s": rows * per_row / seconds}


def vqa_questions_per_s(a, rng):
  from blip_jax.models import answer
  from blip_jax.models.blip import Blip
  from blip_jax.objectives import normalize_images
  size = 32 if a.smoke else 480
  cfg, params = random_model("vqa", size, a.smoke)
  n, vocab = a.vqa_batch, cfg.text.vocab_size
  candidates = 64 if a.smoke else 3128
  pieces = tuple(rng.randint(10, vocab, rng.randint(1, 4)).astype(np.int32) for _ in range(candidates))
  cands = answer.Candidates(tuple(map(str, range(candidates))), pieces, np.asarray([p[0] for p in pieces], np.int32))
  pixels = jnp.asarray(rng.randint(0, 255, (n, size, size, 3)).astype(np.uint8))
  q_ids = jnp.asarray(rng.randint(10, vocab, (n, 8)), jnp.int32)
  q_mask = jnp.ones_like(q_ids)
  encode = jax.jit(lambda p, x: Blip(cfg).apply({"params": p}, normalize_images(x), method=Blip.encode_image))

  def run():
    states = answer.question_states(cfg, params, encode(params, pixels), jnp.arange(n), q_ids, q_mask)
    answer.rank(cfg, params, states, q_mask, cands, k=min(128, candidates))
  seconds = timed(run, a.repeats)
  return {"questions": n, "candidates": candidates, "seconds": seconds, "questions_per_s": n / seconds}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny sizes on any device (the test suite runs this)")
  p.add_argument("--batches", type=int, nargs="+", default=[192, 160, 128, 96, 64],
                 help="per-device pretraining batches to try, largest first")
  p.add_argument("--caption-batch", type=int, default=64)
  p.add_argument("--itm-rows", type=int, default=64, help="images per ITM call (16 texts each)")
  p.add_argument("--vqa-batch", type=int, default=64)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak per device, if not known")
  p.add_argument("--compare-torch", action="store_true")
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  if a.smoke:
    a.batches, a.caption_batch, a.itm_rows, a.vqa_batch, a.repeats = [4], 2, 2, 2, 1
  device = jax.devices()[0]
  peak, peak_name = (a.peak_tflops * 1e12, "--peak-tflops") if a.peak_tflops else peak_flops(device)
  rng = np.random.RandomState(0)
  t0 = time.time()
  report = {"device": device.device_kind, "devices": jax.device_count(), "backend": jax.default_backend(),
            "peak_bf16_flops_per_device": peak, "peak_from": peak_name, "smoke": a.smoke}
  for name, part in (("pretrain_step", lambda: pretrain_step(a, peak)), ("caption", lambda: captions_per_s(a, rng)),
                     ("itm_rerank", lambda: itm_pairs_per_s(a, rng)), ("vqa_rank", lambda: vqa_questions_per_s(a, rng))):
    report[name] = part()
    print(f"[{time.time() - t0:.0f} s] {name}: {report[name]}", file=sys.stderr, flush=True)
  report["seconds"] = time.time() - t0
  text = json.dumps(report, indent=1)
  print(text)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text)
  return report


if __name__ == "__main__":
  main()
