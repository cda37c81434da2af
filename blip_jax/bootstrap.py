"""The paper's whole loop (BLIP §3.3, Table 1) as one resumable command, `blip-jax bootstrap`:

  stage 0  data: the noisy web part, the clean human-annotated part (train + val), a held-out set
  stage 1  pretrain on noisy + clean
  stage 2  fine-tune a captioner (LM) and a filter (ITC + ITM) from stage 1 on the clean part
  stage 3  CapFilt the noisy part: a synthetic caption per image, the filter drops texts (web and
           synthetic) whose ITM match probability is below the threshold
  stage 4  pretrain a new model, as stage 1, on clean + bootstrapped
  stage 5  evaluate the stage-1 and stage-4 models the same way on the held-out set (retrieval R@K,
           caption metrics)

Every stage writes under WORKDIR/<stage>/ and marks itself complete with DONE.json, written last;
a complete stage is skipped, an incomplete one resumes (training from its latest checkpoint,
CapFilt from its finished shards). So a rerun after a crash goes on where it stopped, and a kill
between stages loses nothing. The `:demo` data is synthetic with a known share of injected noise
(captions of other images), so stage 3 also reports the filter's precision and recall on it.
At the end WORKDIR/summary.json and summary.png hold the table that is printed.
"""
from __future__ import annotations

import copy
import io
import json
import os
import time

import jax
import numpy as np
from PIL import Image, ImageDraw

import blip_jax
from blip_jax import capfilt, fs
from blip_jax.data.annotations import read_entries
from blip_jax.data.sources import synthetic_example
from blip_jax.distributed import sync_hosts
from blip_jax.tasks import caption as C
from blip_jax.tasks import retrieval as R
from blip_jax.train.trainer import train

DONE = "DONE.json"
STAGES = ("0_data", "1_pretrain", "2_captioner", "2_filter", "3_capfilt", "4_pretrain", "5_eval")


class BootstrapError(ValueError):
  """A configuration or data problem, named before the stage that needs it runs."""


def _stage(workdir: str, name: str, fn, log) -> dict:
  """fn(stage_dir) -> result dict, unless the stage is complete (its DONE.json is read instead)."""
  d = fs.join(workdir, name)
  done = fs.join(d, DONE)
  if fs.exists(done):
    log(f"[{name}] complete: skipped")
    return fs.read_json(done)
  fs.makedirs(d)
  log(f"[{name}] running")
  t0 = time.time()
  result = fn(d)
  result["seconds"] = round(time.time() - t0, 1)
  if jax.process_index() == 0:
    fs.write_json(done, result, indent=2)  # through a temporary name: the stage is done only now
  sync_hosts(f"bootstrap {name} done")
  log(f"[{name}] done in {result['seconds']:.0f} s")
  return result


# ---- stage 0: data ------------------------------------------------------------------------------
def synthetic_data(d: str, cfg) -> dict:
  """Synthetic images (data.sources.synthetic_example) written as JPEG files with BLIP JSON:
  noisy.json (a `noise_fraction` share of captions replaced by another image's, different,
  caption; labels in noise_labels.json), clean_train.json, clean_val.json and heldout.json (the
  last two Karpathy-style, one caption per image, held-out captions all distinct). image_id: one
  per distinct true caption (images that nothing can tell apart are positives for each other)."""
  img_dir = fs.join(d, "images")
  fs.makedirs(img_dir)
  groups: dict = {}
  rng = np.random.RandomState(cfg.seed)

  def make(split, n, seed, unique=False):
    rows, seen, i = [], set(), 0
    while len(rows) < n:
      jpeg, caption = synthetic_example(i, cfg.image_size, seed)
      i += 1
      if unique and caption in seen:
        continue
      seen.add(caption)
      name = f"images/{split}_{len(rows):06d}.jpg"
      with open(os.path.join(d, name), "wb") as f:
        f.write(jpeg)
      rows.append({"image": name, "caption": caption, "image_id": groups.setdefault(caption, len(groups))})
      if unique and i > 100 * n:
        raise BootstrapError(f"data.heldout={n}: more distinct captions than the synthetic source has")
    return rows

  # disjoint generator seeds per part (SyntheticSource uses seed*3 + 1..3)
  base = 1000 + 10 * cfg.seed
  noisy = make("noisy", cfg.noisy, base + 1)
  clean = make("clean", cfg.clean + cfg.clean_val, base + 2)
  held = make("heldout", cfg.heldout, base + 3, unique=True)
  n_noise = int(round(cfg.noise_fraction * len(noisy)))
  noisy_idx = set(rng.permutation(len(noisy))[:n_noise].tolist())
  true_caps = [r["caption"] for r in noisy]
  labels = []
  for i, r in enumerate(noisy):
    if i in noisy_idx:  # a caption of another image, never one equal to this image's own
      while True:
        j = int(rng.randint(len(noisy)))
        if true_caps[j] != r["caption"]:
          break
      r["caption"] = true_caps[j]
    labels.append({"image": r["image"], "caption": r["caption"], "noisy": i in noisy_idx,
                   "true_caption": true_caps[i]})
  karpathy = lambda rows: [{"image": r["image"], "caption": [r["caption"]]} for r in rows]
  files = {"noisy": fs.join(d, "noisy.json"), "clean_train": fs.join(d, "clean_train.json"),
           "clean_val": fs.join(d, "clean_val.json"), "heldout": fs.join(d, "heldout.json"),
           "noise_labels": fs.join(d, "noise_labels.json")}
  fs.write_json(files["noisy"], noisy)
  fs.write_json(files["clean_train"], clean[:cfg.clean])
  fs.write_json(files["clean_val"], karpathy(clean[cfg.clean:]))
  fs.write_json(files["heldout"], karpathy(held))
  fs.write_json(files["noise_labels"], labels)
  return {"kind": "synthetic", "files": files, "image_root": d,
          "sizes": {"noisy": len(noisy), "noisy_injected": n_noise, "clean_train": cfg.clean,
                    "clean_val": cfg.clean_val, "heldout": len(held)}}


def json_data(cfg) -> dict:
  """Your own data as BLIP JSON (the paper recipe: web pairs noisy, COCO + VG clean)."""
  for key in ("noisy", "clean_train", "clean_val", "heldout"):
    for path in getattr(cfg.json, key):
      if not path or not fs.exists(path):
        raise BootstrapError(f"data.json.{key}: {path!r} does not exist")
  files = {k: list(getattr(cfg.json, k)) for k in ("noisy", "clean_train")}
  files.update(clean_val=cfg.json.clean_val[0], heldout=cfg.json.heldout[0])
  return {"kind": "json", "files": files, "image_root": cfg.json.image_root,
          "eval_image_root": cfg.json.eval_image_root or cfg.json.image_root, "sizes": {}}


def _as_list(x):
  return list(x) if isinstance(x, (list, tuple)) else [x]


# ---- stages 1, 2 and 4: training through the one trainer ------------------------------------------
def _train_config(base_cfg, annotations, image_root, updates: dict):
  c = copy.deepcopy(base_cfg)
  c.unlock()
  c.data.source.update(kind="json", annotations=tuple(annotations), image_root=image_root)
  c.update_from_flattened_dict(updates)
  c.lock()
  return c


def _train(c, d: str) -> dict:
  final = fs.join(d, "final")
  result = train(c, fs.join(d, "run"), final_model=final)
  out = {"final_model": final, "steps": result["step"],
         "final_loss": result["final"].get("loss") if result.get("final") else None}
  if result.get("best"):
    out["best_model"] = fs.join(d, "run", "best")
    out["best"] = {k: v for k, v in result["best"].items() if k != "metrics"}
  return out


def pretrain_stage(c, data: dict, annotations: list, d: str) -> dict:
  pc = _train_config(c.pretrain, annotations, data["image_root"], {"eval.enabled": False})
  out = _train(pc, d)
  out["annotations"] = annotations
  out["pairs"] = len(read_entries(annotations))  # JSON or JSON lines, as training reads them
  return out


def _from_stage1(c_task, stage1: dict, pretrain_cfg) -> dict:
  """A fine-tuning config that starts from the stage-1 model: its architecture and tokenizer, at
  the task's own resolution (the paper fine-tunes at 384 px what it pretrained at 224: the position
  embedding is interpolated on load)."""
  model = copy.deepcopy(pretrain_cfg.model)
  model.unlock()
  model.image_size = c_task.model.image_size
  updates = {"init.blip": stage1["final_model"], "model": model,
             "tokenizer": copy.deepcopy(pretrain_cfg.tokenizer)}
  spm = fs.join(stage1["final_model"], "tokenizer")
  if pretrain_cfg.tokenizer.type == "sentencepiece" and not pretrain_cfg.tokenizer.model:
    updates["tokenizer.model"] = fs.join(spm, "spm.model")
  return updates


def finetune_stage(c, which: str, data: dict, stage1: dict, d: str) -> dict:
  base_cfg = c.captioner if which == "captioner" else c.filter
  updates = _from_stage1(base_cfg, stage1, c.pretrain)
  updates.update({"eval.annotations.val": data["files"]["clean_val"], "eval.annotations.test": "",
                  "eval.image_root": data.get("eval_image_root", data["image_root"])})
  tc = _train_config(base_cfg, _as_list(data["files"]["clean_train"]), data["image_root"], updates)
  out = _train(tc, d)
  out["model"] = out.get("best_model", out["final_model"])
  return out


# ---- stage 3: CapFilt, and the filter against the injected noise -----------------------------------
def capfilt_stage(c, data: dict, captioner: dict, filt: dict, d: str) -> dict:
  settings = capfilt.CapFiltSettings(**c.capfilt.settings.to_dict())
  source = capfilt.JsonInput(_as_list(data["files"]["noisy"]), data["image_root"], c.capfilt.per_shard)
  report = capfilt.run(blip_jax.load(captioner["model"]), blip_jax.load(filt["model"]), source, d, settings,
                       progress=c.progress)
  out = {"bootstrapped": fs.join(d, "bootstrapped.json"), "images": report["images"],
         "web": {k: report["web"][k] for k in ("texts", "kept", "dropped")},
         "synthetic": {k: report["synthetic"][k] for k in ("texts", "kept", "dropped")}}
  labels = data["files"].get("noise_labels")
  if labels:
    out["noise_filter"] = noise_filter_scores(fs.read_json(labels), fs.read_json(out["bootstrapped"]))
  return out


def noise_filter_scores(labels: list, bootstrapped: list) -> dict:
  """The filter as a detector of injected noise, over the web texts: a dropped noisy text is a true
  positive. precision = dropped noisy / dropped; recall = dropped noisy / noisy; also the share of
  clean texts kept. A web text is kept when its (image, caption) pair is in the output as 'web'."""
  kept = {(r["image"], r["caption"]) for r in bootstrapped if r.get("kind") == "web"}
  tp = fp = fn = tn = 0
  for r in labels:
    dropped = (r["image"], r["caption"]) not in kept
    if r["noisy"]:
      tp, fn = tp + dropped, fn + (not dropped)
    else:
      fp, tn = fp + dropped, tn + (not dropped)
  return {"noisy": tp + fn, "clean": fp + tn, "dropped_noisy": tp, "kept_noisy": fn, "dropped_clean": fp,
          "kept_clean": tn, "precision": tp / (tp + fp) if tp + fp else None,
          "recall": tp / (tp + fn) if tp + fn else None, "clean_kept_fraction": tn / (tn + fp) if tn + fp else None}


# ---- stage 5: the same evaluation of both pretrained models ---------------------------------------
def eval_stage(c, data: dict, models: dict, d: str, log) -> dict:
  root = data.get("eval_image_root", data["image_root"])
  gallery = R.read_gallery(data["files"]["heldout"], root)
  R.check_gallery(gallery, c.eval.k)
  cset = C.read_caption_set(data["files"]["heldout"], root, "") if c.eval.caption else None
  out = {}
  for name, path in models.items():
    model = blip_jax.load(path)
    res = R.evaluate(model, gallery, k=c.eval.k, batch_size=c.eval.batch_size, progress=c.progress)
    if jax.process_index() == 0:
      R.write_outputs(res, fs.join(d, name, "retrieval"))
    out[name] = {"retrieval": {k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float))}}
    if cset is not None:
      cres = C.evaluate_captions(model, cset, batch_size=c.eval.batch_size, prompt=c.eval.prompt, spice="off",
                                 progress=c.progress, num_beams=c.eval.num_beams, max_length=c.eval.max_length,
                                 min_length=c.eval.min_length)
      if jax.process_index() == 0:
        C.write_outputs(cres, fs.join(d, name, "caption"))
      out[name]["caption"] = {k: float(v) for k, v in cres.metrics.items() if isinstance(v, (int, float))}
    log(f"[5_eval] {name}: " + "  ".join(f"{k} {v:.2f}" for k, v in out[name]["retrieval"].items()
                                         if k in ("txt_r1", "img_r1", "r_mean")))
  return out


# ---- the pipeline -------------------------------------------------------------------------------
def run(c, workdir: str, log=print) -> dict:
  """Runs (or resumes) the whole loop; returns the summary (also WORKDIR/summary.json)."""
  workdir = str(fs.path(workdir))
  fs.makedirs(workdir)
  fs.resume_settings(fs.join(workdir, "bootstrap_config.json"), json.loads(c.to_json_best_effort()),
                     "a bootstrap run", write=jax.process_index() == 0)
  data = _stage(workdir, "0_data", lambda d: (synthetic_data(d, c.data.synthetic) if c.data.kind == "synthetic"
                                              else json_data(c.data)), log)
  files = data["files"]
  stage1 = _stage(workdir, "1_pretrain",
                  lambda d: pretrain_stage(c, data, _as_list(files["noisy"]) + _as_list(files["clean_train"]), d),
                  log)
  captioner = _stage(workdir, "2_captioner", lambda d: finetune_stage(c, "captioner", data, stage1, d), log)
  filt = _stage(workdir, "2_filter", lambda d: finetune_stage(c, "filter", data, stage1, d), log)
  capf = _stage(workdir, "3_capfilt", lambda d: capfilt_stage(c, data, captioner, filt, d), log)
  stage4 = _stage(workdir, "4_pretrain",
                  lambda d: pretrain_stage(c, data, _as_list(files["clean_train"]) + [capf["bootstrapped"]], d),
                  log)
  evals = _stage(workdir, "5_eval", lambda d: eval_stage(
      c, data, {"stage1": stage1["final_model"], "stage4": stage4["final_model"]}, d, log), log)
  summary = {"data": data["sizes"],
             "stage1": {"pairs": stage1["pairs"], "steps": stage1["steps"]},
             "captioner": captioner.get("best"), "filter": filt.get("best"),
             "capfilt": {k: capf[k] for k in ("images", "web", "synthetic")},
             "noise_filter": capf.get("noise_filter"),
             "stage4": {"pairs": stage4["pairs"], "steps": stage4["steps"]},
             "before": evals["stage1"], "after": evals["stage4"],
             "seconds": {s: r["seconds"] for s, r in zip(STAGES, (data, stage1, captioner, filt, capf, stage4, evals))}}
  if jax.process_index() == 0:
    fs.write_json(fs.join(workdir, "summary.json"), summary, indent=2)
    summary_png(summary, fs.join(workdir, "summary.png"))
    log(format_summary(summary))
  return summary


ROWS = (("retrieval", "txt_r1", "image->text R@1"), ("retrieval", "txt_r5", "image->text R@5"),
        ("retrieval", "img_r1", "text->image R@1"), ("retrieval", "img_r5", "text->image R@5"),
        ("retrieval", "r_mean", "retrieval r_mean"), ("caption", "CIDEr", "CIDEr"), ("caption", "Bleu_4", "BLEU-4"))


def format_summary(s: dict) -> str:
  lines = ["", "stage                 data                                   result"]
  d = s["data"]
  if d:
    lines.append(f"0 data                noisy {d.get('noisy')} ({d.get('noisy_injected')} injected noise), "
                 f"clean {d.get('clean_train')} + val {d.get('clean_val')}, held-out {d.get('heldout')}")
  lines.append(f"1 pretrain            {s['stage1']['pairs']} pairs (noisy + clean)      {s['stage1']['steps']} steps")
  for name in ("captioner", "filter"):
    b = s[name] or {}
    lines.append(f"2 {name:19s} clean train, selected on clean val     {b.get('metric', '-')} {b.get('value', 0):.3f}")
  w, syn = s["capfilt"]["web"], s["capfilt"]["synthetic"]
  lines.append(f"3 capfilt             {s['capfilt']['images']} noisy images               web kept {w['kept']} / "
               f"dropped {w['dropped']}; synthetic kept {syn['kept']} / dropped {syn['dropped']}")
  nf = s.get("noise_filter")
  if nf:
    lines.append(f"  filter vs injected noise: precision {nf['precision']:.3f}, recall {nf['recall']:.3f} "
                 f"({nf['dropped_noisy']} of {nf['noisy']} noisy texts dropped; {nf['kept_clean']} of {nf['clean']} "
                 f"clean texts kept)")
  lines.append(f"4 pretrain            {s['stage4']['pairs']} pairs (clean + bootstrapped) "
               f"{s['stage4']['steps']} steps")
  lines.append("5 eval (held-out)     metric              stage 1 (noisy)   stage 4 (bootstrapped)")
  for group, key, label in ROWS:
    a, b = s["before"].get(group, {}).get(key), s["after"].get(group, {}).get(key)
    if a is not None and b is not None:
      lines.append(f"                      {label:19s} {a:15.3f}   {b:15.3f}  ({b - a:+.3f})")
  return "\n".join(lines)


def summary_png(s: dict, path: str, width: int = 760, height: int = 320) -> None:
  """Before/after bars of the held-out metrics (PIL only; no plotting library needed)."""
  rows = [(label, s["before"].get(g, {}).get(k), s["after"].get(g, {}).get(k)) for g, k, label in ROWS]
  rows = [r for r in rows if r[1] is not None and r[2] is not None]
  img = Image.new("RGB", (width, height), "white")
  d = ImageDraw.Draw(img)
  d.text((10, 8), "held-out evaluation: stage 1 (noisy data, grey) vs stage 4 (bootstrapped, blue)", fill="black")
  if rows:
    top = max(max(a, b) for _, a, b in rows) or 1.0
    slot = (width - 40) / len(rows)
    for i, (label, a, b) in enumerate(rows):
      x = 20 + i * slot
      for j, (v, colour) in enumerate(((a, (150, 150, 150)), (b, (40, 90, 200)))):
        h = (height - 80) * v / top
        x0 = x + 8 + j * (slot / 2 - 8)
        d.rectangle((x0, height - 40 - h, x0 + slot / 2 - 14, height - 40), fill=colour)
        d.text((x0, height - 54 - h), f"{v:.1f}" if top > 5 else f"{v:.3f}", fill="black")
      d.text((x + 4, height - 32), label[:18], fill="black")
  out = io.BytesIO()
  img.save(out, "PNG")
  fs.write_bytes(path, out.getvalue())
