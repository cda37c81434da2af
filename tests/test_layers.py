"""The package's rooms stay layered: no module imports (at its top or inside a function) a module
of a layer above its own, and no module grows past ~400 lines. The layers, lowest first:

  0 foundations: fs, quiet, distributed (host collectives), preprocess, tokenizers, losses,
    models/, metrics/, data/ (the reading layer and the input pipelines)
  1 checkpoints/, objectives (the paper's losses as forward passes), parallel (data-parallel
    inference, the sharded-inference runner)
  2 api (BlipModel, load), image_files
  3 tasks/ (the plug-ins), train/step (the pure step), train/config_base
  4 train/setup, train/checkpointing
  5 train/trainer, train/aot, capfilt
  6 bootstrap (and its bootstrap_data, bootstrap_report), demo
  7 cli/
"""
import ast
import os

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PKG = os.path.join(ROOT, "blip_jax")

LAYERS = [  # module-name prefixes, lowest layer first; the longest matching prefix decides
    ("blip_jax.fs", "blip_jax.quiet", "blip_jax.distributed", "blip_jax.preprocess", "blip_jax.tokenizers",
     "blip_jax.losses", "blip_jax.models", "blip_jax.metrics", "blip_jax.data"),
    ("blip_jax.checkpoints", "blip_jax.objectives", "blip_jax.parallel"),
    ("blip_jax.api", "blip_jax.image_files", "blip_jax"),  # blip_jax/__init__: the public API
    ("blip_jax.tasks", "blip_jax.train.step", "blip_jax.train.config_base", "blip_jax.train"),
    ("blip_jax.train.setup", "blip_jax.train.checkpointing"),
    ("blip_jax.train.trainer", "blip_jax.train.aot", "blip_jax.capfilt"),
    ("blip_jax.bootstrap", "blip_jax.bootstrap_data", "blip_jax.bootstrap_report", "blip_jax.demo"),
    ("blip_jax.cli",),
]


def layer_of(module: str) -> int:
  best, layer = -1, None
  for i, prefixes in enumerate(LAYERS):
    for p in prefixes:
      if (module == p or module.startswith(p + ".")) and len(p) > best:
        best, layer = len(p), i
  assert layer is not None, f"{module} is in no layer: add it to tests/test_layers.py"
  return layer


def modules():
  for d, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(d, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        yield (rel[:-len(".__init__")] if rel.endswith(".__init__") else rel), path


def imported(path: str, module: str):
  """(line, imported blip_jax module) of every import in the file, wherever it is."""
  package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("blip_jax"):
          yield node.lineno, a.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
      if base.startswith("blip_jax"):
        for a in node.names:  # `from blip_jax import fs` imports the module blip_jax.fs
          sub = f"{base}.{a.name}"
          yield node.lineno, sub if os.path.exists(os.path.join(ROOT, *sub.split(".")) + ".py") or \
              os.path.isdir(os.path.join(ROOT, *sub.split("."))) else base


ALL = sorted(modules())


@pytest.mark.parametrize("module,path", ALL, ids=[m for m, _ in ALL])
def test_no_import_from_a_layer_above(module, path):
  mine = layer_of(module)
  above = [f"line {n}: {m} (layer {layer_of(m)})" for n, m in imported(path, module) if layer_of(m) > mine]
  assert not above, f"{module} (layer {mine}) imports from above: {above}"


def test_no_module_over_400_lines():
  long = {m: n for m, p in ALL if (n := sum(1 for _ in open(p))) > 400}
  assert not long, long


def test_the_check_sees_a_violation(tmp_path):
  """The parser finds an upward import, in a function too (so the test above can fail)."""
  p = tmp_path / "x.py"
  p.write_text("def f():\n  from blip_jax.train.trainer import train\n")
  assert [m for _, m in imported(str(p), "blip_jax.losses")] == ["blip_jax.train.trainer"]
  assert layer_of("blip_jax.train.trainer") > layer_of("blip_jax.losses")
