"""The paper's Table 1 in miniature: `blip-jax bootstrap` with every variant (no CapFilt, +F, +C,
+C +F; stages 0-2 shared per seed) over several seeds, and the mean and spread of every held-out
metric.

  .venv/bin/python bench/bootstrap_table.py --out /tmp/table1 [--config configs/bootstrap.py:demo] \
      [--seeds 0 1 2] [--set key=value ...]

Each seed is one bootstrap workdir (OUT/seed<N>), run as a user runs it (the CLI, a subprocess),
so a killed table resumes seed by seed and stage by stage. Writes OUT/table1.json (per variant and
metric: mean, std, the values; per variant: its difference from no CapFilt, seed by seed, and
whether |mean| > 2 std), OUT/table1.md (the table README shows) and OUT/table1.png (matplotlib).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from blip_jax import bootstrap_report as report  # noqa: E402

# The synthetic data's captions are one template (data/sources.py synthetic_example): count, colour,
# shape, place, background. A caption is judged slot by slot instead of by n-gram overlap: a slot
# is right when the true value is the only value of that slot the caption names.
SLOTS = {"count": ("one", "two", "three"), "colour": ("red", "green", "blue", "yellow", "white", "purple"),
         "shape": ("circle", "square", "triangle"),
         "place": ("on the left", "on the right", "at the top", "at the bottom"),
         "background": ("black", "gray", "brown", "cyan")}


def _named(text: str, values) -> set:
  t = " " + " ".join(str(text).lower().split()) + " "
  return {v for v in values if re.search(rf"\b{v}s?\b", t)}


def caption_quality(pairs) -> dict:
  """pairs: [(generated, true caption)] -> the share exact, the share right slot by slot, and the
  distinct captions (a collapsed captioner writes few)."""
  n = len(pairs)
  out = {"n": n, "distinct": len({g for g, _ in pairs}), "exact": sum(g.strip() == t for g, t in pairs) / n}
  for slot, values in SLOTS.items():
    out[slot] = sum(_named(g, values) == _named(t, values) for g, t in pairs) / n
  out["all_slots"] = sum(all(_named(g, v) == _named(t, v) for v in SLOTS.values()) for g, t in pairs) / n
  return out


def analyse_captions(work: str) -> dict:
  """Item 2 of issue 29, on one seed's workdir: the held-out captions of every model and the
  synthetic captions CapFilt drew (the captioner-only variant keeps them all), against the truth."""
  held = [e["caption"][0] for e in json.load(open(os.path.join(work, "0_data", "heldout.json")))]
  out = {"heldout": {}}
  for name in sorted(os.listdir(os.path.join(work, "5_eval"))):
    path = os.path.join(work, "5_eval", name, "caption", "captions.json")
    if os.path.exists(path):
      caps = json.load(open(path))
      out["heldout"][name] = caption_quality([(c["caption"], held[c["image_id"]]) for c in caps])
  labels = os.path.join(work, "0_data", "noise_labels.json")
  drawn = os.path.join(work, "3_capfilt_captioner", "bootstrapped.json")
  if os.path.exists(labels) and os.path.exists(drawn):
    truth = {r["image"]: r["true_caption"] for r in json.load(open(labels))}
    syn = [(r["caption"], truth[r["image"]]) for r in json.load(open(drawn)) if r["kind"] == "synthetic"]
    out["synthetic"] = caption_quality(syn)
    # what C+F kept of them: the filter's choice among the captioner's texts
    kept = [(r["caption"], truth[r["image"]]) for r in json.load(open(os.path.join(work, "3_capfilt",
                                                                                 "bootstrapped.json")))
            if r["kind"] == "synthetic"]
    out["synthetic_kept"] = caption_quality(kept) if kept else None
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--config", default=os.path.join(ROOT, "configs", "bootstrap.py:demo"))
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--set", nargs="*", default=[], help="more --config.KEY=VALUE overrides, as KEY=VALUE")
  a = ap.parse_args()
  os.makedirs(a.out, exist_ok=True)
  cli = os.path.join(os.path.dirname(sys.executable), "blip-jax")
  summaries, seconds = {}, {}
  for seed in a.seeds:
    work = os.path.join(a.out, f"seed{seed}")
    cmd = [cli, "bootstrap", f"--config={a.config}", f"--workdir={work}", f"--config.seed={seed}",
           "--config.variants=('capfilt','filter','captioner')", "--config.progress=False"]
    cmd += [f"--config.{kv}" for kv in a.set]
    print(f"seed {seed}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(os.path.join(a.out, f"seed{seed}.log"), "a") as log:
      subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    with open(os.path.join(work, "summary.json")) as f:
      summaries[seed] = json.load(f)
    with open(os.path.join(work, "timing.json")) as f:  # the stages' own times (a resumed seed: all of them)
      seconds[seed] = round(sum(json.load(f).values()), 1)
    print(f"seed {seed}: done in {time.time() - t0:.0f} s (its stages: {seconds[seed]:.0f} s)", flush=True)
  table = report.table1(summaries)
  table["config"], table["seconds"] = a.config, seconds
  table["capfilt"] = {seed: {v: s["variants"][v]["capfilt"] for v in s["variants"]} for seed, s in summaries.items()}
  table["noise_filter"] = {seed: s.get("noise_filter") for seed, s in summaries.items()}
  table["captions"] = {seed: analyse_captions(os.path.join(a.out, f"seed{seed}")) for seed in summaries}
  with open(os.path.join(a.out, "table1.json"), "w") as f:
    json.dump(table, f, indent=2)
  md = report.format_table1(table)
  with open(os.path.join(a.out, "table1.md"), "w") as f:
    f.write(md + "\n")
  drawn = report.table1_plot(summaries, os.path.join(a.out, "table1.png"))
  print(md)
  print(f"wrote {a.out}/table1.json, table1.md" + (", table1.png" if drawn else " (no matplotlib: no plot)"))


if __name__ == "__main__":
  main()
