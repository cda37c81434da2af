"""What `blip-jax bootstrap` prints and draws: the per-run summary table, and Table 1 in miniature
(bench/bootstrap_table.py): the held-out metrics of each variant over seeds, mean and spread.

The variants are the paper's Table 1 rows: stage 4 pretrained on the noisy data as is ("none", which
is the stage-1 model itself: same data, config and seed), with the filter alone ("filter": web texts
filtered, no synthetic captions), the captioner alone ("captioner": synthetic captions added,
nothing filtered) and both ("capfilt")."""
from __future__ import annotations

import io

import numpy as np

from blip_jax import fs

VARIANTS = ("none", "filter", "captioner", "capfilt")
LABELS = {"none": "no CapFilt", "filter": "+F (filter)", "captioner": "+C (captioner)", "capfilt": "+C +F"}
ROWS = (("retrieval", "txt_r1", "image->text R@1"), ("retrieval", "txt_r5", "image->text R@5"),
        ("retrieval", "img_r1", "text->image R@1"), ("retrieval", "img_r5", "text->image R@5"),
        ("retrieval", "r_mean", "retrieval r_mean"), ("caption", "CIDEr", "CIDEr"), ("caption", "Bleu_4", "BLEU-4"))


def format_summary(s: dict) -> str:
  lines = ["", "stage                 data                                   result"]
  d = s["data"]
  if d.get("noisy_injected") is not None:
    lines.append(f"0 data                noisy {d.get('noisy')} ({d.get('noisy_injected')} injected noise), "
                 f"clean {d.get('clean_train')} + val {d.get('clean_val')}, held-out {d.get('heldout')}")
  c1 = s["counts"]["1_pretrain"]
  lines.append(f"1 pretrain            {s['stage1']['pairs']} pairs (noisy + clean)      {s['stage1']['steps']} steps, "
               f"{c1['skipped']} bad examples skipped")
  for name in ("captioner", "filter"):
    b = s[name] or {}
    lines.append(f"2 {name:19s} clean train, selected on clean val     {b.get('metric', '-')} {b.get('value', 0):.3f}")
  cf = s["counts"]["3_capfilt"]
  w, syn = s["capfilt"]["web"], s["capfilt"]["synthetic"]
  lines.append(f"3 capfilt             {s['capfilt']['images']} noisy images read, "
               f"{cf['images_undecodable']} undecodable, {cf['texts_empty_skipped']} blank texts; "
               f"web kept {w['kept']} / dropped {w['dropped']}; "
               f"synthetic kept {syn['kept']} / dropped {syn['dropped']}")
  nf = s.get("noise_filter")
  if nf and nf.get("precision") is not None:
    lines.append(f"  filter vs injected noise: precision {nf['precision']:.3f}, recall {nf['recall']:.3f} "
                 f"({nf['dropped_noisy']} of {nf['noisy']} noisy texts dropped; {nf['kept_clean']} of {nf['clean']} "
                 f"clean texts kept)")
  lines.append(f"4 pretrain            {s['stage4']['pairs']} pairs (clean + bootstrapped) "
               f"{s['stage4']['steps']} steps")
  names = [v for v in VARIANTS if v in s["table"]]
  lines.append("5 eval (held-out)     metric            " + "".join(f"{LABELS[v]:>16s}" for v in names))
  for group, key, label in ROWS:
    vals = [s["table"][v].get(group, {}).get(key) for v in names]
    if all(v is not None for v in vals):
      lines.append(f"                      {label:17s} " + "".join(f"{v:16.3f}" for v in vals))
  return "\n".join(lines)


def _figure():
  import matplotlib  # noqa: PLC0415  (imported where a figure is drawn: it is slow to import)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def summary_plot(s: dict, path: str) -> bool:
  """One run's held-out metrics per variant, as grouped bars."""
  plt = _figure()
  table = {v: s["table"][v] for v in VARIANTS if v in s["table"]}
  return _bars(plt, {v: {(g, k): [m.get(g, {}).get(k)] for g, k, _ in ROWS} for v, m in table.items()}, path,
               "held-out evaluation of the stage-4 models (one seed)")


def _bars(plt, per_variant: dict, path: str, title: str) -> bool:
  """per_variant: {variant: {(group, key): [values over seeds]}} -> two panels (retrieval R@K and
  r_mean in points; caption BLEU-4 and CIDEr), bars at the mean, error bars one std."""
  panels = (("retrieval", [r for r in ROWS if r[0] == "retrieval"]),
            ("captioning", [r for r in ROWS if r[0] == "caption"]))
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [5, 2]})
  names = list(per_variant)
  width = 0.8 / max(len(names), 1)
  for ax, (title_p, rows) in zip(axes, panels):
    for i, v in enumerate(names):
      vals = [np.asarray([x for x in per_variant[v][(g, k)] if x is not None], float) for g, k, _ in rows]
      means = [a.mean() if a.size else np.nan for a in vals]
      stds = [a.std(ddof=1) if a.size > 1 else 0.0 for a in vals]
      ax.bar(np.arange(len(rows)) + (i - (len(names) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
             label=LABELS[v])
    ax.set_xticks(np.arange(len(rows)))
    ax.set_xticklabels([label for _, _, label in rows], rotation=20, ha="right", fontsize=8)
    ax.set_title(title_p, fontsize=10)
  axes[0].legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  fs.write_bytes(path, buf.getvalue())
  return True


# ---- Table 1 in miniature: variants x seeds ------------------------------------------------------
def table1(summaries: dict) -> dict:
  """{seed: summary.json} -> {"seeds", "variants": {v: {metric: {"mean", "std", "values"}}},
  "differences": {v: {metric: {"mean", "std", "beyond_spread"}}}}. A variant's difference from
  "none" is taken per seed (the variants of a seed share its stages 0-2); it is beyond the seed
  spread when |mean| > 2 x its std over seeds (about a 95% interval for 3+ seeds, by a normal
  approximation; with 3 seeds that is a loose screen, not a test)."""
  seeds = sorted(summaries)
  names = [v for v in VARIANTS if all(v in summaries[s]["table"] for s in seeds)]
  out = {"seeds": seeds, "variants": {}, "differences": {}}
  for v in names:
    out["variants"][v], diffs = {}, {}
    for g, k, label in ROWS:
      vals = [summaries[s]["table"][v].get(g, {}).get(k) for s in seeds]
      if any(x is None for x in vals):
        continue
      a = np.asarray(vals, float)
      out["variants"][v][k] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                               "values": [float(x) for x in a]}
      if v != "none":
        d = a - np.asarray([summaries[s]["table"]["none"][g][k] for s in seeds], float)
        std = float(d.std(ddof=1)) if len(d) > 1 else 0.0
        diffs[k] = {"mean": float(d.mean()), "std": std, "values": [float(x) for x in d],
                    "beyond_spread": bool(len(d) > 1 and abs(d.mean()) > 2 * std)}
    if v != "none":
      out["differences"][v] = diffs
  return out


def format_table1(t: dict) -> str:
  keys = [k for _, k, _ in ROWS if all(k in t["variants"][v] for v in t["variants"])]
  head = f"| variant ({len(t['seeds'])} seeds) | " + " | ".join(k for k in keys) + " |"
  lines = [head, "|" + "---|" * (len(keys) + 1)]
  for v, m in t["variants"].items():
    lines.append(f"| {LABELS[v]} | " + " | ".join(f"{m[k]['mean']:.2f} ± {m[k]['std']:.2f}" for k in keys) + " |")
  for v, m in t["differences"].items():
    lines.append(f"| {LABELS[v]} − none | " + " | ".join(
        f"{m[k]['mean']:+.2f} ± {m[k]['std']:.2f}{' *' if m[k]['beyond_spread'] else ''}" for k in keys) + " |")
  return "\n".join(lines)


def table1_plot(summaries: dict, path: str) -> bool:
  plt = _figure()
  seeds = sorted(summaries)
  names = [v for v in VARIANTS if all(v in summaries[s]["table"] for s in seeds)]
  per = {v: {(g, k): [summaries[s]["table"][v].get(g, {}).get(k) for s in seeds] for g, k, _ in ROWS} for v in names}
  return _bars(plt, per, path, f"Table 1 in miniature: held-out metrics, mean ± std over seeds {seeds}")
