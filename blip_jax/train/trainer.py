"""The training loop of every task: config -> (setup.py) mesh, model, data, jitted step -> steps,
with Orbax checkpoints that resume exactly (checkpointing.py: state, rng, each host's data
position), TensorBoard metrics, clean stops on a signal or a non-finite loss, the task's evaluation
at each epoch's end and the best checkpoint by its selection metric. The loop names no task: what
differs comes from the task's plug-in (blip_jax/tasks).

Side effects live here; the step (step.py) is pure. Everything the loop reports goes through
`say` (stdout, or stderr for warnings), flushed at once so a pod's log follows the run.
"""
from __future__ import annotations

import signal
import sys
import time

import jax
import numpy as np

import blip_jax.data as D
from blip_jax import fs, tasks
from blip_jax.api import BlipModel
from blip_jax.data.device import prefetch_to_device
from blip_jax.data.tf_setup import metric_writers
from blip_jax.distributed import allgather_sum
from blip_jax.train import checkpointing as ckpt
from blip_jax.train.setup import (
  ConfigError,
  build,
  check_batch,
  host_params,
  initialise_from,
  make_mesh,
  make_tokenizer,
  model_config,
  prompt_length,
)
from blip_jax.train.step import split_ids


def say(message: str, warning: bool = False) -> None:
  print(message, file=sys.stderr if warning else sys.stdout, flush=True)


class _Stop:
  """Remembers a SIGTERM / SIGINT; the loop saves and exits after the step in flight."""

  def __init__(self):
    self.signal = None
    for s in (signal.SIGTERM, signal.SIGINT):
      signal.signal(s, self._handle)

  def _handle(self, signum, frame):  # the signal module's handler signature
    self.signal = signum


def _prepare(c, workdir):
  """Everything that can refuse the config, before any compute: (task, mesh, tokenizer, model
  config, input pipeline)."""
  try:
    task = tasks.get(c.task)
    task.check_config(c)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from None
  mesh = make_mesh(c)
  check_batch(c, mesh)
  ckpt.check_run_config(c, workdir)  # a restart with other settings stops here
  try:  # data that cannot train stops here, named
    source = D.make_source(c.data.source.to_dict())
    tok = make_tokenizer(c, workdir, source)
    mcfg = model_config(c, tok)
    pipe_cfg = dict(c.data.pipeline.to_dict(), batch_size=c.batch_size // jax.process_count(),
                    image_size=mcfg.vision.image_size)
    pipe = D.InputPipeline(source, tok, pipe_cfg)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"data.source ({c.data.source.kind}): {e}") from None
  ckpt.store_run_config(c, workdir)
  return task, mesh, tok, mcfg, pipe


def train(c, workdir: str, final_model: str | None = None):
  """Runs (or resumes) a task's training. Returns the final metrics dict. final_model: also save
  the last step's model there in our format (what a pipeline's next stage loads; the bootstrap)."""
  workdir = str(fs.path(workdir))  # a URL stays a URL (gs://...); a local path is made absolute
  task, mesh, tok, mcfg, pipe = _prepare(c, workdir)
  host_batch = c.batch_size // jax.process_count()
  steps_per_epoch = pipe.steps_per_epoch or c.steps_per_epoch
  if not steps_per_epoch:
    raise ConfigError("a streaming source needs steps_per_epoch in the config")
  total_steps = c.total_steps if c.total_steps > 0 else c.epochs * steps_per_epoch
  step_fn, init_fn, shardings, batch_sharding, _ = build(c, mcfg, mesh, steps_per_epoch, total_steps,
                                                         prompt_length(c, tok))

  mngr = ckpt.checkpoint_manager(workdir, c.keep_checkpoints)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(init_fn, jax.random.PRNGKey(0)), shardings)
  mngr, restored = ckpt.restore_latest(mngr, workdir, abstract, c.keep_checkpoints)
  if restored is not None:
    state, meta = restored
    # each host's own input position (hosts skip different numbers of bad examples)
    host_data = meta.get("host_data") or []
    pipe.restore(host_data[jax.process_index()] if len(host_data) == jax.process_count() else meta["data"])
    say(f"resumed from step {int(meta['step'])} (epoch {meta['data']['epoch']}, position {meta['data']['position']})")
  else:
    with jax.set_mesh(mesh):
      state = init_fn(jax.random.PRNGKey(c.seed))
    state = initialise_from(c, mcfg, state, shardings)

  writer = metric_writers.create_default_writer(fs.join(workdir, "tb"), just_logging=jax.process_index() > 0)
  writer.write_hparams({k: str(v) for k, v in ckpt.flat(c.to_dict()).items()})
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

  def read_control(m) -> bool:
    """A step's (stop, nonfinite_step), the same on every host: stops the run on a non-finite loss
    (the step has kept the state at the last good step since); True when any host asked to stop."""
    stop, bad = (int(x) for x in jax.device_get((m["stop"], m["nonfinite_step"])))
    if bad >= 0:
      mngr.wait_until_finished()
      raise FloatingPointError(f"non-finite loss at step {bad + 1}; stopped. The last good checkpoint "
                               f"(step {mngr.latest_step()}) is kept in {workdir}/checkpoints")
    return bool(stop)

  best = ckpt.read_best(workdir)
  eval_metrics = {}

  def evaluate_epoch(step):
    """The task's evaluation at an epoch's end (every process takes part); keeps the best model."""
    nonlocal best, eval_metrics
    t0 = time.time()
    model = BlipModel(mcfg, host_params(state["params"], mesh), tokenizer=tok)
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
      say(f"epoch {epoch} eval ({eval_metrics['eval_s']:.0f} s): {shown}"
          f"{'  (best so far: saved to ' + best_dir + ')' if improved else ''}")

  step = int(state["step"])
  if step == 0 and task.evaluate is not None and c.eval.get("at_start", False):
    evaluate_epoch(0)  # the starting point (e.g. the pretrained checkpoint before fine-tuning)
  t_last, n_last, metrics = time.time(), step, {}
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
      writer.write_scalars(step, metrics)
      if jax.process_index() == 0:
        metrics_log.append({"step": step, **metrics})
        say(f"step {step}/{total_steps} ep {metrics['epoch']:.2f} {tasks.log_line(task, metrics)} "
            f"lr {metrics['lr']:.2e} gnorm {metrics['grad_norm']:.3f} {metrics['examples_per_s']:.1f} ex/s "
            f"{metrics['step_time_s'] * 1000:.0f} ms/step eta {eta / 60:.1f} min skipped {data_state['skipped']}")
      t_last, n_last = time.time(), step
    if stop_now:
      read_control(m)  # this step's loss is finite: its state may be saved
      ckpt.save(mngr, step, state, data_state, wait=True)
      who = f"signal {stopper.signal}" if stopper.signal else "another host's signal"
      say(f"{who}: saved checkpoint at step {step}; exiting")
      writer.close()
      sys.exit(0)
    epoch_end = task.evaluate is not None and (step % (steps_per_epoch * c.eval.every_epochs) == 0
                                               or step == total_steps)
    if step % c.checkpoint_every == 0 or step == total_steps or epoch_end:
      read_control(m)  # only good steps are saved (a save waits for the step anyway)
      ckpt.save(mngr, step, state, data_state)
    if epoch_end:
      evaluate_epoch(step)
  mngr.wait_until_finished()
  writer.flush()
  if final_model:
    BlipModel(mcfg, host_params(state["params"], mesh), tokenizer=tok).save(final_model, overwrite=True,
                                                                            tag=f"final{step}")
  # bad examples skipped (undecodable, empty text) over the whole run, every host's summed
  result = {"final": metrics, "step": step, "skipped_examples": int(allgather_sum(data_state["skipped"]))}
  if task.evaluate is not None:
    result["eval"], result["best"] = eval_metrics, best
  elif task.final_evaluate is not None and jax.process_index() == 0:
    found = task.final_evaluate(c, mcfg, state["params"], tok)
    if found is not None:
      result["eval"] = found
  return result
