"""The trainer's checkpoints: the Orbax manager (train state + the input position of every host),
restore of the newest checkpoint that reads (falling back past damaged ones), the run config a
workdir belongs to (config.json) and the best model's record."""
from __future__ import annotations

import json
import sys
import time

import jax
import orbax.checkpoint as ocp

from blip_jax import fs
from blip_jax.distributed import allgather_values, sync_hosts
from blip_jax.train.setup import ConfigError


def checkpoint_manager(workdir, keep):
  """Orbax: the train state (StandardSave) and a JSON meta item (step, each host's input position)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=True)
  return ocp.CheckpointManager(fs.join(workdir, "checkpoints"), options=options,
                               item_handlers={"state": ocp.StandardCheckpointHandler(),
                                              "meta": ocp.JsonCheckpointHandler()})


def restore_latest(mngr, workdir, abstract, keep):
  """(manager, (state, meta) or None): the newest checkpoint that restores. One that does not (data
  files truncated by a disk fault or a partial copy) is named, moved to checkpoints_unreadable/
  (never deleted) and the next older one is tried."""
  while True:
    latest = mngr.latest_step()
    if latest is None:
      return mngr, None
    try:
      r = mngr.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                       meta=ocp.args.JsonRestore()))
      meta = dict(r["meta"])
      meta.setdefault("step", latest)
      return mngr, (r["state"], meta)
    except Exception as e:  # noqa: BLE001 (Orbax/TensorStore raise many kinds)
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
      aside = fs.join(workdir, "checkpoints_unreadable", f"{latest}-{int(time.time())}")
      print(f"warning: checkpoint step {latest} does not restore ({type(e).__name__}: {first}); moved to "
            f"{aside}; trying the next older one", file=sys.stderr, flush=True)
      sync_hosts(f"restore failed {latest}")
      if jax.process_index() == 0:
        fs.makedirs(fs.join(workdir, "checkpoints_unreadable"))
        fs.path(fs.join(workdir, "checkpoints", str(latest))).rename(fs.path(aside))
      sync_hosts(f"set aside {latest}")
      mngr.close()
      mngr = checkpoint_manager(workdir, keep)


# Keys that may differ on a restart without saying so (how often to log and save, the evaluation),
# and keys that can never differ within one workdir (the model, its data and its batch: a run that
# changed them would not be the run its checkpoints belong to). Everything else (lr, steps, the
# mesh, ...) may change when listed in allow_changes.
_FREE_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints", "allow_changes", "eval.", "init.",
              "data.pipeline.prefetch", "data.pipeline.threads",
              "model.attention")  # attention: the same function, another kernel (a GPU run resumed on CPU)
_FIXED_KEYS = ("task", "model.", "tokenizer.", "data.source.", "batch_size", "loss.queue_size", "seed")


def check_run_config(c, workdir):
  """A workdir with checkpoints belongs to the config stored at its first start (config.json): a
  restart stops at once naming every differing key, unless it is free or listed in
  config.allow_changes. Call store_run_config once the data is known to be good."""
  path = fs.join(workdir, "config.json")
  ckpts = fs.join(workdir, "checkpoints")
  has_run = fs.exists(ckpts) and any(p.name.isdigit() for p in fs.path(ckpts).iterdir())
  stored = fs.read_json(path) if has_run and fs.exists(path) else None
  if stored is None:
    if has_run:
      print(f"warning: {workdir} has checkpoints but no config.json (an older run): storing this config",
            file=sys.stderr, flush=True)
    return
  now = flat(json.loads(c.to_json_best_effort()))
  stored = flat(stored)
  allowed = {k.strip() for k in str(c.get("allow_changes", "")).split(",") if k.strip()}
  differ = sorted(k for k in set(now) | set(stored) if now.get(k, "<absent>") != stored.get(k, "<absent>")
                  and not k.startswith(_FREE_KEYS))
  fixed = [k for k in differ if k.startswith(_FIXED_KEYS)]
  unlisted = [k for k in differ if k not in fixed and not any(k == a or k.startswith(a + ".") for a in allowed)]
  show = lambda ks: "; ".join(f"{k}: {stored.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}" for k in ks)
  if fixed:
    raise ConfigError(f"{workdir} belongs to a run with other settings that a restart cannot change: {show(fixed)}. "
                      "Use a new workdir (init.blip can start from this run's checkpoint)")
  if unlisted:
    raise ConfigError(f"{workdir} was started with other settings: {show(unlisted)}. If the change is meant, "
                      f"pass --config.allow_changes={','.join(unlisted)}")
  if differ:
    print(f"changed on restart (allowed): {show(differ)}", flush=True)


def store_run_config(c, workdir):
  """config.json: the resolved config this workdir's run uses (process 0 writes it)."""
  sync_hosts("config checked")  # every host has compared before process 0 writes
  if jax.process_index() == 0:
    fs.write_json(fs.join(workdir, "config.json"), json.loads(c.to_json_best_effort()), indent=2)
  sync_hosts("config stored")


def save(mngr, step, state, data_state, wait=False):
  """A checkpoint of `state` at `step`, with this input position and every host's (JSON items are
  written by process 0 alone, so each host's own position is gathered into them)."""
  meta = {"data": data_state, "step": step, "host_data": allgather_values(data_state)}
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True)
  if wait:
    mngr.wait_until_finished()


def read_best(workdir):
  """The best model's record (best/best.json), or None."""
  path = fs.join(workdir, "best", "best.json")
  return fs.read_json(path) if fs.exists(path) else None


def flat(d, prefix=""):
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
