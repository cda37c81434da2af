"""The paper's whole loop (BLIP §3.3, Table 1) as one resumable command, `blip-jax bootstrap`:

  stage 0  data: the noisy web part, the clean human-annotated part (train + val), a held-out set
  stage 1  pretrain on noisy + clean
  stage 2  fine-tune a captioner (LM) and a filter (ITC + ITM) from stage 1 on the clean part
  stage 3  CapFilt the noisy part: a synthetic caption per image, the filter drops texts (web and
           synthetic) whose ITM match probability is below the threshold
  stage 4  pretrain a new model, as stage 1, on clean + bootstrapped
  stage 5  evaluate the stage-1 and stage-4 models the same way on the held-out set (retrieval R@K,
           caption metrics)

`variants` adds the other rows of the paper's Table 1, sharing stages 0-2: stages 3 and 4 again
with the filter alone (`3_capfilt_filter`, `4_pretrain_filter`) and with the captioner alone
(`..._captioner`); "no CapFilt" is the stage-1 model (same data, config and seed).

The noisy part is BLIP JSON, TFRecord or webdataset `.tar` shards (img2dataset's outputs, read in
place); with shards, stage 0 writes the clean training part as shards of the same format, so
stages 1 and 4 read one kind of source, and CapFilt's output shards feed stage 4 as they are.
One `seed` reaches every random choice: the synthetic data, every stage's initialisation, data
order, augmentation, ITM negatives and dropout, and CapFilt's sampling.

Every stage writes under WORKDIR/<stage>/ and marks itself complete with DONE.json, written last;
a complete stage is skipped, an incomplete one resumes (training from its latest checkpoint,
CapFilt from its finished shards). So a rerun after a crash goes on where it stopped, and a kill
between stages loses nothing. The `:demo` data is synthetic with a known share of injected noise
(captions of other images), so stage 3 also reports the filter's precision and recall on it.
At the end WORKDIR/summary.json and summary.png (matplotlib) hold the table that is printed,
with what each stage read, skipped and kept; wall-clock seconds go to timing.json, so two runs with
one seed write the same summary.json.
"""
from __future__ import annotations

import copy
import json
import time

import jax

import blip_jax
from blip_jax import capfilt, fs
from blip_jax.bootstrap_data import FORMATS, BootstrapError, clean_train, noisy_format, stage0
from blip_jax.bootstrap_report import format_summary, summary_plot
from blip_jax.distributed import sync_hosts
from blip_jax.tasks import caption as C
from blip_jax.tasks import retrieval as R
from blip_jax.train.trainer import train

DONE = "DONE.json"
STAGES = ("0_data", "1_pretrain", "2_captioner", "2_filter", "3_capfilt", "4_pretrain", "5_eval")
# Table 1's rows beyond "none" (the stage-1 model): CapFilt settings each, and their stage suffix
VARIANTS = {"capfilt": ({}, ""), "filter": ({"num_captions": 0}, "_filter"),
            "captioner": ({"threshold": 0.0}, "_captioner")}


def _stage(workdir: str, name: str, fn, log, main_only: bool = False) -> dict:
  """fn(stage_dir) -> result dict, unless the stage is complete (its DONE.json is read instead).
  main_only: process 0 alone runs fn (writing shared files); the others read its DONE.json."""
  d = fs.join(workdir, name)
  done = fs.join(d, DONE)
  sync_hosts(f"bootstrap {name} start")  # every process looks for DONE.json before any writes it
  if fs.exists(done):
    log(f"[{name}] complete: skipped")
    return fs.read_json(done)
  fs.makedirs(d)
  log(f"[{name}] running")
  t0 = time.time()
  result = fn(d) if jax.process_index() == 0 or not main_only else None
  if jax.process_index() == 0:
    fs.write_json(done, result, indent=2)  # through a temporary name: the stage is done only now
  sync_hosts(f"bootstrap {name} done")
  if result is None:
    result = fs.read_json(done)
  seconds = round(time.time() - t0, 1)
  if jax.process_index() == 0:  # wall-clock times apart from the results (timing.json)
    timing = fs.join(workdir, "timing.json")
    fs.write_json(timing, {**(fs.read_json(timing) if fs.exists(timing) else {}), name: seconds}, indent=2)
  log(f"[{name}] done in {seconds:.0f} s")
  return result


def _as_list(x):
  return list(x) if isinstance(x, (list, tuple)) else [x]


# ---- stages 1, 2 and 4: training through the one trainer ------------------------------------------
def _train_config(base_cfg, source: dict, updates: dict, seed: int):
  """base_cfg reading `source` (a data.source dict), with `seed` for its initialisation, ITM
  negatives, dropout (seed) and data order and augmentation (data.pipeline.seed)."""
  c = copy.deepcopy(base_cfg)
  c.unlock()
  for k in set(source) & {"files", "annotations"}:  # a list of shards where configs hold one pattern
    del c.data.source[k]
  c.data.source.update(source)
  c.update_from_flattened_dict({"seed": seed, "data.pipeline.seed": seed, **updates})
  c.lock()
  return c


def _train(c, d: str) -> dict:
  final = fs.join(d, "final")
  result = train(c, fs.join(d, "run"), final_model=final)
  out = {"final_model": final, "steps": result["step"],
         "final_loss": result["final"].get("loss") if result.get("final") else None,
         "counts": {"examples_trained": result["step"] * c.batch_size, "skipped": result["skipped_examples"]}}
  if result.get("best"):
    out["best_model"] = fs.join(d, "run", "best")
    out["best"] = {k: v for k, v in result["best"].items() if k != "metrics"}
  return out


def _source(fmt: str, files: list, image_root: str) -> dict:
  if fmt == "json":
    return {"kind": "json", "annotations": tuple(files), "image_root": image_root}
  return {"kind": fmt, "files": tuple(files)}


def pretrain_stage(c, data: dict, files: list, pairs: int, d: str) -> dict:
  """Pretraining on `files` (the data's format) holding `pairs` pairs: stage 1 on noisy + clean,
  stage 4 on clean + bootstrapped. Shards stream, so their steps per epoch come from `pairs`."""
  fmt = data["format"]
  updates = {"eval.enabled": False}
  if fmt != "json":
    updates["steps_per_epoch"] = max(pairs // c.pretrain.batch_size, 1)
  out = _train(_train_config(c.pretrain, _source(fmt, files, data["image_root"]), updates, c.seed), d)
  out.update(files=files, pairs=pairs)
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
  tc = _train_config(base_cfg, _source("json", _as_list(data["files"]["clean_train"]), data["image_root"]), updates,
                     c.seed)
  out = _train(tc, d)
  out["model"] = out.get("best_model", out["final_model"])
  return out


# ---- stage 3: CapFilt, and the filter against the injected noise -----------------------------------
def capfilt_stage(c, data: dict, captioner: dict, filt: dict, d: str, variant: str = "capfilt") -> dict | None:
  """CapFilt of the noisy part in its own format; a variant's settings (VARIANTS) leave out the
  captioner or the filter. Returns None on processes other than 0 (process 0 writes the result)."""
  settings = capfilt.CapFiltSettings(**{**c.capfilt.settings.to_dict(), "seed": c.seed, **VARIANTS[variant][0]})
  source = capfilt.make_input(_as_list(data["files"]["noisy"]), data["image_root"], c.capfilt.per_shard)
  report = capfilt.run(blip_jax.load(captioner["model"]), blip_jax.load(filt["model"]), source, d, settings,
                       progress=c.progress)
  if not report:
    return None
  output = report["output"]
  out = {"output": output, "files": output.get("annotations") or sorted(
             fs.join(d, "shards", f"{i:05d}{source.ext}") for i in range(source.num_shards)),
         "images": report["images"], "pairs_written": report["pairs_written"],
         "web": {k: report["web"][k] for k in ("texts", "kept", "dropped")},
         "synthetic": {k: report["synthetic"][k] for k in ("texts", "kept", "dropped")},
         "counts": {"images_read": report["images"], "images_undecodable": report["images_undecodable"],
                    "texts_empty_skipped": report["texts_empty_skipped"], "pairs_kept": report["pairs_written"],
                    "undecodable_examples": report["undecodable_examples"][:5]}}
  labels = data["files"].get("noise_labels")
  if labels and data["format"] == "json":  # pairs are matched by image path, which JSON output keeps
    out["noise_filter"] = noise_filter_scores(fs.read_json(labels), fs.read_json(out["files"][0]))
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
def check_config(c) -> None:
  """What would fail late, named before any stage runs."""
  unknown = set(c.variants) - set(VARIANTS)
  if unknown or not c.variants:
    raise BootstrapError(f"variants {tuple(c.variants)}: choose among {tuple(VARIANTS)} (none is the stage-1 model)")
  if c.data.kind == "synthetic" and c.data.format not in FORMATS:
    raise BootstrapError(f"data.format {c.data.format!r}: one of {tuple(FORMATS)}")
  if c.data.kind == "json":
    noisy_format(c.data.json.noisy)


def run(c, workdir: str, log=print) -> dict:
  """Runs (or resumes) the whole loop; returns the summary (also WORKDIR/summary.json)."""
  check_config(c)
  workdir = str(fs.path(workdir))
  fs.makedirs(workdir)
  fs.resume_settings(fs.join(workdir, "bootstrap_config.json"), json.loads(c.to_json_best_effort()),
                     "a bootstrap run", write=jax.process_index() == 0)
  data = _stage(workdir, "0_data", lambda d: stage0(c, d), log, main_only=True)
  files = data["files"]
  stage1 = _stage(workdir, "1_pretrain",
                  lambda d: pretrain_stage(c, data, _as_list(files["noisy"]) + clean_train(data),
                                           data["pairs"]["noisy"] + data["pairs"]["clean_train"], d), log)
  captioner = _stage(workdir, "2_captioner", lambda d: finetune_stage(c, "captioner", data, stage1, d), log)
  filt = _stage(workdir, "2_filter", lambda d: finetune_stage(c, "filter", data, stage1, d), log)
  capf, stage4, models = {}, {}, {"stage1": stage1["final_model"]}
  for v in ("capfilt",) + tuple(x for x in VARIANTS if x in c.variants and x != "capfilt"):
    suffix = VARIANTS[v][1]
    capf[v] = _stage(workdir, "3_capfilt" + suffix,
                     lambda d, v=v: capfilt_stage(c, data, captioner, filt, d, v), log)
    stage4[v] = _stage(workdir, "4_pretrain" + suffix,
                       lambda d, v=v: pretrain_stage(c, data, clean_train(data) + capf[v]["files"],
                                                     data["pairs"]["clean_train"] + capf[v]["pairs_written"], d), log)
    models["stage4" + suffix] = stage4[v]["final_model"]
  evals = _stage(workdir, "5_eval", lambda d: eval_stage(c, data, models, d, log), log)
  table = {"none": evals["stage1"]}
  table.update({v: evals["stage4" + VARIANTS[v][1]] for v in capf})
  summary = {"seed": c.seed, "data": data["sizes"],
             "stage1": {"pairs": stage1["pairs"], "steps": stage1["steps"]},
             "captioner": captioner.get("best"), "filter": filt.get("best"),
             "capfilt": {k: capf["capfilt"][k] for k in ("images", "web", "synthetic")},
             "noise_filter": capf["capfilt"].get("noise_filter"),
             "stage4": {"pairs": stage4["capfilt"]["pairs"], "steps": stage4["capfilt"]["steps"]},
             "before": evals["stage1"], "after": evals["stage4"],
             # per stage: what was read, skipped (bad examples) and kept
             "counts": {"0_data": data.get("counts", {}), "1_pretrain": {"pairs": stage1["pairs"], **stage1["counts"]},
                        "2_captioner": captioner["counts"], "2_filter": filt["counts"],
                        "3_capfilt": capf["capfilt"]["counts"],
                        "4_pretrain": {"pairs": stage4["capfilt"]["pairs"], **stage4["capfilt"]["counts"]}},
             "table": table,
             "variants": {v: {"capfilt": {k: capf[v][k] for k in ("web", "synthetic", "pairs_written")},
                              "noise_filter": capf[v].get("noise_filter"),
                              "stage4": {"pairs": stage4[v]["pairs"], "steps": stage4[v]["steps"]}} for v in capf}}
  if jax.process_index() == 0:
    fs.write_json(fs.join(workdir, "summary.json"), summary, indent=2)
    summary_plot(summary, fs.join(workdir, "summary.png"))
    log(format_summary(summary))
  return summary
