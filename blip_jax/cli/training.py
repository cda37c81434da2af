"""The config-file commands: `train`, `bootstrap` and `compile` take --config=FILE:VARIANT with
--config.key=value overrides (ml_collections, absl flags). A mistyped key stops before anything
runs, named in full with the nearest valid keys."""
from __future__ import annotations

import difflib
import importlib.util
import os
import sys

from absl import flags
from ml_collections import config_flags

from blip_jax import fs
from blip_jax.cli.common import fail, start_hosts
from blip_jax.train.checkpointing import flat
from blip_jax.train.setup import ConfigError

EXAMPLES = {
    "train": "blip-jax train --config=configs/retrieval.py:coco --workdir=/tmp/ret --config.batch_size=32",
    "bootstrap": "blip-jax bootstrap --config=configs/bootstrap.py:demo --workdir=/tmp/bootstrap",
    "compile": "blip-jax compile --config=configs/pretrain.py:vit_b --topology=v5e-256 --libtpu ~/libtpu",
}
HELP = {  # (what it does, usage, its own flags)
    "train": ("train a task from a config file",
              "--config=configs/<task>.py:VARIANT --workdir=DIR [--config.key=value ...]",
              "--workdir: checkpoints, TensorBoard logs and metrics.jsonl (local or gs://); rerun to resume"),
    "bootstrap": ("the paper's loop: pretrain on noisy data, fine-tune a captioner and a filter, CapFilt the noisy "
                  "part, pretrain again on clean + bootstrapped data, evaluate both; resumable stage by stage",
                  "--config=configs/bootstrap.py:VARIANT --workdir=DIR [--config.key=value ...]",
                  "--workdir: each stage's outputs, summary.json and summary.png; rerun to resume"),
    "compile": ("per-device memory and FLOPs of a config's train step, or of CapFilt's captioner and "
                "filter for a bootstrap config, on a TPU or GPU topology, compiled on this machine",
                "--config=configs/<task>.py:VARIANT --topology=v5e-256|h100-8|... [--libtpu DIR] [--json FILE]",
                "--topology: a TPU slice (v4-64, v5e-256, ...; --libtpu: folder of `pip install --target DIR libtpu`) "
                "or NVIDIA GPUs (h100-1, h100-8, a100-1, a100-8; run from the CUDA plugin's venv)\n"
                "  --images_per_device: CapFilt's batch per device (default 64)"),
}
# the parser's one-line summaries (blip-jax --help)
SUMMARY = {
    "train": "train a task: --config=configs/<task>.py:VARIANT --workdir=DIR [--config.k=v]",
    "bootstrap": "the paper's pipeline (pretrain, captioner + filter, CapFilt, pretrain again, evaluate both): "
                 "--config=configs/bootstrap.py:VARIANT --workdir=DIR",
    "compile": "memory/FLOPs of a config's train step (or CapFilt) on a TPU or GPU topology, compiled here: "
               "--config=configs/<task>.py:VARIANT --topology=v5e-256|h100-8 [--libtpu DIR]",
}


def print_help(cmd: str) -> None:
  what, usage, own = HELP[cmd]
  print(f"usage: blip-jax {cmd} {usage}\n\n{what}.\n\n  --config=FILE:VARIANT  an ml_collections config "
        f"file and its variant; --config.key=value overrides any field (a wrong key stops before any compute)\n"
        f"  {own}\n\nexample:\n  {EXAMPLES[cmd]}")


def _overridden_keys(argv) -> list:
  """The keys of --config.KEY=value / --config.KEY value arguments, in order."""
  return [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def _likeness(key: str, candidate: str) -> float:
  """How near a mistyped key is to a valid one: its leaf spelled alike, or abbreviated by the
  initials of its words (lerning_rate -> lr), counting more within the same section."""
  section, _, leaf = key.rpartition(".")
  c_section, _, c_leaf = candidate.rpartition(".")
  spelled = difflib.SequenceMatcher(None, leaf, c_leaf).ratio()
  initials = "".join(w[0] for w in leaf.split("_") if w)
  abbreviated = 1.0 if len(initials) > 1 and c_leaf == initials else 0.0
  whole = difflib.SequenceMatcher(None, key, candidate).ratio()
  return max(spelled, abbreviated, whole) + (0.25 if section == c_section else 0.0)


def unknown_key_message(key: str, valid) -> str:
  """'--config.optim.lerning_rate: the config has no key ...; nearest valid keys: optim.lr, ...'."""
  ranked = sorted(valid, key=lambda k: (-_likeness(key, k), k))
  near = [k for k in ranked[:3] if _likeness(key, k) >= 0.6]
  hint = (f"; nearest valid keys: {', '.join(near)}" if near
          else f"; the config's sections: {', '.join(sorted({v.split('.')[0] for v in valid}))}")
  return f"--config.{key}: the config has no key {key!r}{hint}"


def config_flags_of(command: str, argv, strings: dict, required: tuple):
  """--config=FILE:VARIANT with --config.key=value overrides, plus string flags {name: help}; a bad
  flag, a key the config does not have or a missing required flag exits 2 naming it."""
  def parse(args):
    fl = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file:variant", flag_values=fl, lock_config=True)
    for name, help_ in strings.items():
      flags.DEFINE_string(name, None if name in required else "", help_, flag_values=fl)
    argv0, sys.argv = sys.argv, [f"blip-jax {command}"] + args  # config_flags also reads sys.argv's overrides
    try:
      fl(sys.argv)
    finally:
      sys.argv = argv0
    return fl
  try:  # the config alone first: every override's key is checked against it, by name
    base = parse([a for a in argv if not a.startswith("--config.")])
  except (flags.Error, KeyError, AttributeError, ValueError) as e:
    fail(e)
  if base.config is None:
    fail(f"usage: blip-jax {command} {HELP[command][1]}")
  valid = set(flat(base.config.to_dict()))
  sections = {k.rsplit(".", i)[0] for k in valid for i in range(1, k.count(".") + 1)}
  for key in _overridden_keys(argv):
    if key not in valid and key not in sections:
      fail(unknown_key_message(key, valid))
  try:
    fl = parse(argv)
  except (flags.Error, KeyError, AttributeError, ValueError) as e:
    fail(e)
  if not all(getattr(fl, r) for r in required):
    fail(f"usage: blip-jax {command} {HELP[command][1]}")
  return fl


def train_main(argv):
  """`blip-jax train --config=configs/pretrain.py:VARIANT --workdir=DIR [--config.key=value ...]`."""
  fl = config_flags_of("train", argv, {"workdir": "checkpoints, TensorBoard and metrics go here (local or gs://)"},
                       ("workdir",))
  start_hosts()
  from blip_jax.train.trainer import train  # noqa: PLC0415  (TensorFlow: heavy; training only)
  try:
    train(fl.config, fl.workdir)
  except (ConfigError, FloatingPointError) as e:
    fail(e)


def bootstrap_main(argv):
  """`blip-jax bootstrap --config=configs/bootstrap.py:VARIANT --workdir=DIR [--config.key=value ...]`."""
  fl = config_flags_of("bootstrap", argv, {"workdir": "every stage's outputs; rerun the same command to resume"},
                       ("workdir",))
  start_hosts()
  from blip_jax import bootstrap  # noqa: PLC0415  (TensorFlow: heavy; training only)
  try:
    bootstrap.run(fl.config, fl.workdir)
  except (ConfigError, bootstrap.BootstrapError, FloatingPointError, ValueError, FileNotFoundError) as e:
    fail(e)


def compile_main(argv):
  """`blip-jax compile --config=configs/<task>.py:VARIANT --topology=v5e-256|h100-8 [--libtpu DIR]
  [--config.k=v]`: per-device memory and FLOPs of the sharded train step, or of CapFilt's
  programs for a bootstrap config, on a TPU or GPU topology, compiled here."""
  fl = config_flags_of("compile", argv, {"topology": "TPU slice, e.g. v4-64, v5e-256",
                                         "libtpu": "folder of the libtpu package (pip install --target DIR libtpu)",
                                         "json": "also write the figures to this JSON file",
                                         "images_per_device": "CapFilt (a bootstrap config): images per device "
                                                              "(default 64)"}, ("topology",))
  from blip_jax.train import aot  # noqa: PLC0415  (TensorFlow, via the input pipeline's batch shapes: heavy)
  if fl.topology not in aot.TOPOLOGIES:
    fail(f"unknown topology {fl.topology!r}; known: {', '.join(aot.TOPOLOGIES)}")
  if aot.TOPOLOGIES[fl.topology].gpu:
    # the CUDA plugin compiles for the described card; with no GPU or driver here its start-up check
    # would refuse to register it
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    # without a card to autotune on, XLA cannot tile some Triton GEMM fusions ("Couldn't find output
    # tile sizes", e.g. the ViT's attention projection); cuBLAS takes those GEMMs
    os.environ.setdefault("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false")
    if importlib.util.find_spec("jax_plugins") is None or importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
      fail('GPU topologies need the CUDA plugin: a separate venv with pip install "jax[cuda12]==0.10.2" '
           "(docs/accelerators.md)")
  else:
    os.environ["JAX_PLATFORMS"] = "cpu"  # the TPU compiler only: no TPU backend on this machine
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiles at once: no TPU is held
    if fl.libtpu:
      sys.path.insert(0, fl.libtpu)
    if importlib.util.find_spec("libtpu") is None:
      fail('libtpu is not importable: pip install --target DIR "libtpu==0.0.42.*" and pass --libtpu DIR')
  try:
    if "capfilt" in fl.config:  # a bootstrap config: CapFilt's captioner and filter programs
      report = aot.compile_capfilt(fl.config, fl.topology, per_device=int(fl.images_per_device or 64))
      print(aot.format_capfilt(report))
    else:
      report = aot.compile_step(fl.config, fl.topology)
      print(aot.format_report(report))
  except (ConfigError, ValueError) as e:  # ValueError: a model config that cannot be built
    fail(e)
  if fl.json:
    fs.write_json(fl.json, report, indent=2)


MAINS = {"train": train_main, "bootstrap": bootstrap_main, "compile": compile_main}


def register(sub) -> None:
  """In `blip-jax --help`; absl parses their flags (main() sends them to MAINS before argparse)."""
  for name in MAINS:
    sub.add_parser(name, help=SUMMARY[name])
