"""bfloat16 compute against float32, in training and in inference (issue 26, item 2).

training: configs/pretrain.py:tiny trained twice on the same data and seed, differing only in
  model.dtype (float32 | bfloat16; params and optimizer state stay float32 either way). Writes both
  runs' metrics.jsonl, the final losses (mean of the last 4 logged steps) and one plot of the ITC,
  ITM and LM loss curves (matplotlib).
captions: configs/caption.py:demo (a tiny captioner trained in float32 on COCO-mini's val half) is
  loaded twice, in float32 and in bfloat16 compute, and captions COCO-mini's test half with the
  official COCO decoding (beam 3, max 20, min 5); prints how many captions are identical and
  CIDEr / BLEU-4 of each (pycocoevalcap).

  .venv/bin/python bench/bf16.py --out /tmp/bf16 [--steps 300] [--caption-epochs 30] [--parts training captions]
  (docs/figures/bf16_training.png is this script's plot)
"""
import argparse
import json
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
DTYPES = ("float32", "bfloat16")
TERMS = (("loss_itc", "ITC"), ("loss_itm", "ITM"), ("loss_lm", "LM"))


def train_both(out, steps):
  from blip_jax.train.trainer import train
  from configs.pretrain import get_config
  runs = {}
  for dt in DTYPES:
    c = get_config("tiny")
    c.unlock()
    c.total_steps, c.epochs, c.checkpoint_every, c.model.dtype = steps, 10 ** 6, 10 ** 6, dt
    c.lock()
    work = os.path.join(out, f"pretrain_{dt}")
    if not os.path.exists(os.path.join(work, "metrics.jsonl")):
      train(c, work)
    runs[dt] = [r for r in map(json.loads, open(os.path.join(work, "metrics.jsonl"))) if "loss_itc" in r]
  final = {dt: {k: sum(r[k] for r in rows[-4:]) / 4 for k, _ in TERMS} for dt, rows in runs.items()}
  print(f"| final loss (mean of the last 4 logged steps of {steps}) | float32 | bfloat16 | bf16 vs fp32 |")
  print("|---|---|---|---|")
  for k, name in TERMS:
    a, b = final["float32"][k], final["bfloat16"][k]
    print(f"| {name} | {a:.4f} | {b:.4f} | {100 * (b - a) / a:+.2f}% |")
  plot(runs, os.path.join(out, "bf16_training.png"), steps)
  return final


def plot(runs, path, steps):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
  for ax, (k, name) in zip(axes, TERMS):
    for dt, style in zip(DTYPES, ("-", "--")):
      ax.plot([r["step"] for r in runs[dt]], [r[k] for r in runs[dt]], style, label=dt)
    ax.set_title(f"{name} loss")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(f"configs/pretrain.py:tiny, {steps} steps: float32 vs bfloat16 compute (same data and seed)")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  print("plot:", path)


def captions(out, epochs):
  import blip_jax
  from blip_jax.tasks import caption as C
  from blip_jax.train.trainer import train
  from configs.caption import get_config
  c = get_config("demo")
  c.unlock()
  c.epochs, c.eval.every_epochs = epochs, epochs
  c.lock()
  work, model_dir = os.path.join(out, "captioner"), os.path.join(out, "captioner_model")
  if not os.path.exists(model_dir):
    train(c, work, final_model=model_dir)
  cset = C.read_caption_set(c.eval.annotations.val, c.eval.image_root)
  results = {}
  for dt in DTYPES:
    model = blip_jax.load(model_dir, dtype=dt)
    r = C.evaluate_captions(model, cset, batch_size=64, progress=False, num_beams=c.eval.num_beams,
                            max_length=c.eval.max_length, min_length=c.eval.min_length, spice="off")
    results[dt] = r
  a, b = (results[dt].captions for dt in DTYPES)
  same = sum(a[i] == b[i] for i in a)
  print(f"captions of {len(a)} COCO-mini test images: {same} identical in float32 and bfloat16")
  for dt in DTYPES:
    m = results[dt].metrics
    print(f"  {dt}: CIDEr {m['CIDEr']:.4f}  BLEU-4 {m['Bleu_4']:.4f}")
  differ = [(i, a[i], b[i]) for i in a if a[i] != b[i]][:5]
  for i, x, y in differ:
    print(f"  image {i}: fp32 {x!r} | bf16 {y!r}")
  return {"images": len(a), "identical": same, **{dt: results[dt].metrics for dt in DTYPES}}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--caption-epochs", type=int, default=30)
  p.add_argument("--parts", nargs="+", default=["training", "captions"], choices=["training", "captions"])
  a = p.parse_args()
  os.makedirs(a.out, exist_ok=True)
  report = {}
  if "training" in a.parts:
    report["training"] = train_both(a.out, a.steps)
  if "captions" in a.parts:
    report["captions"] = captions(a.out, a.caption_epochs)
  with open(os.path.join(a.out, "bf16.json"), "w") as f:
    json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
