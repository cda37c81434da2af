"""The pod path: preemption agreed by all hosts (2 processes, one signalled), a run that is what it
says (config stored, changes refused), unreadable checkpoints set aside, and the memory each device
holds under fsdp."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import one_device_env, process_env
from pretrain_util import ROOT

BIN = os.path.join(os.path.dirname(sys.executable), "blip-jax")


def _cmd(workdir, steps, *extra):
  return [BIN, "train", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}", f"--config.total_steps={steps}",
          "--config.log_every=1", "--config.checkpoint_every=3", "--config.keep_checkpoints=10", *extra]


def _losses(workdir):
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    r = json.loads(line)
    out[r["step"]] = r["loss"]  # a re-run step overwrites: the last run of it counts
  return out


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_hosts(cmd, signal_at=None, kill=False):
  """Runs `cmd` as 2 processes (1 CPU device each) under jax.distributed on localhost. With
  signal_at=N, once process 0 has printed step N: SIGTERM to process 1 only, or with kill=True
  SIGKILL to both (a machine lost)."""
  port = _free_port()
  procs = []
  for i in range(2):
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=process_env(one_device_env(), i, 2, port),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  lines = []
  if signal_at is not None:
    for line in procs[0].stdout:
      lines.append(line)
      if line.startswith(f"step {signal_at}/"):
        for p in (procs if kill else procs[1:]):
          p.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        break
  outs = []
  for k, p in enumerate(procs):
    out, _ = p.communicate(timeout=400)
    outs.append(("".join(lines) if k == 0 else "") + out)
  return [p.returncode for p in procs], outs


def test_sigterm_on_one_host_stops_all_hosts_at_the_same_step_and_resumes_exactly(tmp_path):
  rcs, outs = _two_hosts(_cmd(tmp_path / "a", 8))
  assert rcs == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  ref = _losses(tmp_path / "a")
  assert sorted(ref) == list(range(1, 9))

  work = tmp_path / "b"
  rcs, outs = _two_hosts(_cmd(work, 8), signal_at=2)
  assert rcs == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  saved = [int(o.split("saved checkpoint at step ")[1].split(";")[0]) for o in outs]
  assert "signal 15: saved" in outs[1] and "another host's signal: saved" in outs[0]
  assert saved[0] == saved[1] and 2 <= saved[0] < 8, saved  # the same step on both hosts
  assert str(saved[0]) in os.listdir(work / "checkpoints")

  rcs, outs = _two_hosts(_cmd(work, 8), signal_at=6, kill=True)  # resumed, then both killed hard
  assert rcs == [-signal.SIGKILL] * 2, outs[0][-3000:]
  assert f"step {saved[0] + 1}/" in outs[0] and f"step {saved[0]}/" not in outs[0]  # resumed after it

  rcs, outs = _two_hosts(_cmd(work, 8))  # from the newest complete checkpoint
  assert rcs == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert _losses(work) == ref  # every step's loss identical to the uninterrupted run


def test_config_is_stored_changes_are_refused_and_an_unreadable_checkpoint_is_set_aside(tmp_path):
  work = tmp_path / "w"
  first = subprocess.run(_cmd(work, 9), cwd=ROOT, env=one_device_env(), capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
  ref = _losses(work)
  stored = json.load(open(work / "config.json"))
  assert stored["total_steps"] == 9 and stored["model"]["vision"]["width"] == 64

  # another model, or an lr not listed in allow_changes: refused at once, naming the keys
  from blip_jax.train.checkpointing import check_run_config
  from blip_jax.train.setup import ConfigError
  from configs.pretrain import get_config
  for key, value, words in (("model.vision.width", 32, ["model.vision.width", "64", "32", "new workdir"]),
                            ("optim.lr", 0.1, ["optim.lr", "allow_changes=optim.lr"])):
    c = get_config("tiny")
    c.unlock()
    c.update_from_flattened_dict({"total_steps": 9, "log_every": 1, "checkpoint_every": 3, "keep_checkpoints": 10,
                                  key: value})
    with pytest.raises(ConfigError) as e:
      check_run_config(c, str(work))
    assert all(w in str(e.value) for w in words), str(e.value)
    c.allow_changes = key
    if key == "optim.lr":
      check_run_config(c, str(work))  # listed: accepted

  # the newest checkpoint's data files truncated (a disk fault, a partial copy): named, moved
  # aside, and the run resumes from the one before it with the same data order
  files = [os.path.join(d, f) for d, _, fs in os.walk(work / "checkpoints" / "9" / "state") for f in fs]
  big = [f for f in files if os.path.getsize(f) > 1000]
  assert big
  for f in big:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 3)
  run = subprocess.run(_cmd(work, 12, "--config.allow_changes=total_steps"), cwd=ROOT, env=one_device_env(),
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
  assert "checkpoint step 9 does not restore" in run.stderr
  aside = os.listdir(work / "checkpoints_unreadable")
  assert len(aside) == 1 and aside[0].startswith("9-")
  assert "step 7/" in run.stdout and "step 6/" not in run.stdout  # from step 6
  got = _losses(work)
  assert got[7] == ref[7]  # step 7 recomputed from checkpoint 6 on the same batch: the same loss
  assert sorted(got) == list(range(1, 13))
  assert json.load(open(work / "config.json"))["total_steps"] == 12


def test_fsdp8_holds_an_eighth_of_params_and_optimizer_state_per_device():
  """Bytes on each device, from the arrays' shards: with fsdp=8 each of the 8 devices holds about
  1/8 of the parameters and of the AdamW moments (what does not divide by 8 is replicated)."""
  from jax.sharding import Mesh
  from pretrain_util import tiny_config

  from blip_jax.train.setup import build, model_config
  c = tiny_config()
  mcfg = model_config(c)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  _, init_fn, _, _, _ = build(c, mcfg, mesh, 10, 20)
  with jax.set_mesh(mesh):
    state = init_fn(jax.random.PRNGKey(0))
  for part in ("params", "opt_state", "momentum"):
    leaves = [x for x in jax.tree.leaves(state[part]) if x.size > 1]
    total = sum(x.nbytes for x in leaves)
    per_device = {d: 0 for d in jax.devices()[:8]}
    for x in leaves:
      shards = x.addressable_shards
      for s in shards:
        per_device[s.device] += s.data.nbytes
      if x.ndim >= 2:  # every matrix (kernels, embeddings) is split 8 ways, none kept whole
        assert {s.data.size for s in shards} == {x.size // 8}, (part, x.shape, shards[0].data.shape)
    # biases and norms (1-D, small) stay replicated: at this tiny width they add ~17%
    for d, b in per_device.items():
      assert total / 8 <= b <= total / 8 * 1.25, (part, d, b, total)
  big = state["params"]["text_encoder"]["word_embeddings"]["embedding"]
  assert {s.data.shape for s in big.addressable_shards} == {(big.shape[0], big.shape[1] // 8)}


def test_each_forward_draws_its_own_dropout_masks(monkeypatch):
  """The unimodal text pass and the ITM passes are separate forwards in the official model: their
  dropout keys must differ (one shared key would give the same masks at equal shapes)."""
  from pretrain_util import fixed_batch, tiny_config

  from blip_jax import objectives
  from blip_jax.models.blip import Blip
  from blip_jax.train import step as S
  from blip_jax.train.setup import model_config
  seen = []
  real = Blip.apply

  def spy(self, variables, *a, rngs=None, **k):
    if rngs is not None:
      seen.append(rngs["dropout"])
    return real(self, variables, *a, rngs=rngs, **k)
  monkeypatch.setattr(Blip, "apply", spy)
  mcfg = model_config(tiny_config())
  tx, _ = S.make_optimizer(tiny_config().optim.to_dict(), 10, 20)
  loss_cfg = S.LossConfig(queue_size=16)
  shapes = jax.eval_shape(lambda r: S.init_state(mcfg, tx, loss_cfg, r), jax.random.PRNGKey(0))
  st = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  queues = {k: st[k] for k in ("image_queue", "text_queue", "idx_queue")}

  def keys(params, momentum, batch, rng):  # only the keys are returned: the model is dead code
    seen.clear()
    objectives.itc_itm_lm(mcfg, loss_cfg, params, batch, rng, {"momentum": momentum, "queues": queues, "alpha": 0.4})
    return list(seen)
  out = jax.jit(keys)(st["params"], st["momentum"], fixed_batch(), jax.random.PRNGKey(3))
  assert len(out) == 2
  a, b = (np.asarray(k) for k in out)
  assert not np.array_equal(a, b)


def test_gs_workdir_goes_to_the_bucket_only_and_resumes_from_it(tmp_path):
  """workdir=gs://... (what launch/tpu_pod.sh passes), against a local stand-in for the bucket
  (tests/fake_bucket.py): config, tokenizer, checkpoints, metrics and TensorBoard land in the
  bucket, nothing next to the working directory, and a restart resumes from the bucket."""
  bucket, cwd = tmp_path / "bucket", tmp_path / "cwd"
  cwd.mkdir()
  helper = os.path.join(os.path.dirname(__file__), "fake_bucket.py")

  def run(steps, *extra):
    cmd = [sys.executable, helper, str(bucket), "train", f"--config={ROOT}/configs/pretrain.py:tiny",
           "--workdir=gs://bkt/run", f"--config.total_steps={steps}", "--config.log_every=1",
           "--config.checkpoint_every=2", *extra]
    r = subprocess.run(cmd, cwd=cwd, env=one_device_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout
  run(4)
  out = run(6, "--config.allow_changes=total_steps")
  assert "step 5/" in out and "step 4/" not in out  # resumed from the bucket's step 4
  w = bucket / "bkt" / "run"
  assert {"config.json", "metrics.jsonl", "checkpoints", "tb", "tokenizer"} <= set(os.listdir(w))
  assert {"2", "4", "6"} <= set(os.listdir(w / "checkpoints"))
  assert sorted(_losses(w)) == list(range(1, 7))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(w / "tb"))
  assert os.listdir(cwd) == []  # no local "gs:" folder: no URL went through os.path


def test_train_data_errors_exit_2_with_one_line_naming_the_problem(tmp_path, capsys, monkeypatch):
  """Each data problem of a train run: exit status 2, one line naming it, no traceback (in-process
  through the CLI's own entry point; the subprocess tests above check the status as a user sees it)."""
  from blip_jax.cli import train_main
  (tmp_path / "web.json").write_text(json.dumps([{"url": "http://x/1.jpg", "caption": "a dog"}]))
  (tmp_path / "three.json").write_text(json.dumps([{"image": "a.jpg", "caption": "a dog"}] * 3))
  (tmp_path / "gone.json").write_text(json.dumps([{"image": f"gone/{i}.jpg", "caption": "a dog"} for i in range(16)]))
  base = ["--config=configs/pretrain.py:tiny", "--config.tokenizer.type=bert", "--config.model.text.vocab_size=30524",
          "--config.total_steps=2", "--config.data.source.kind=json", f"--config.data.source.image_root={tmp_path}"]
  cases = [
      (["--config.data.source.annotations=('',)"], "annotation path is empty"),
      ([f"--config.data.source.annotations=('{tmp_path}/nope.json',)"], "nope.json: no such annotation file"),
      ([f"--config.data.source.annotations=('{tmp_path}/web.json',)"], "download the images first"),
      ([f"--config.data.source.annotations=('{tmp_path}/three.json',)"], "fewer than one batch of 8"),
      (["--config.data.source.kind=tfrecord", f"--config.data.source.files={tmp_path}/none-*.tfrecord",
        "--config.steps_per_epoch=5"], "no TFRecord files match"),
      ([f"--config.data.source.annotations=('{tmp_path}/gone.json',)"], "every example of epoch 0 was bad"),
  ]
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    for i, (extra, words) in enumerate(cases):
      args = base + [f"--workdir={tmp_path / f'w{i}'}"] + extra
      monkeypatch.setattr(sys, "argv", ["blip-jax", "train"] + args)  # config_flags reads overrides from argv
      with pytest.raises(SystemExit) as e:
        train_main(args)
      err = capsys.readouterr().err
      assert e.value.code == 2 and words in err and "Traceback" not in err, (extra, err[-2000:])
      assert len([l for l in err.splitlines() if l.startswith("error:")]) == 1
  finally:
    os.chdir(cwd)


def test_ahead_of_time_compile_reports_the_sharded_memory():
  """blip-jax compile's analysis (aot.analyze) on the 8 CPU devices, as it runs on a TPU topology's
  abstract devices: with fsdp=8 the step's arguments per device (state + batch) are a fraction of
  the unsharded state, and XLA reports the step's FLOPs."""
  from pretrain_util import tiny_config

  from blip_jax.train import aot
  c = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 8})
  r = aot.analyze(c, jax.devices()[:8], hosts=1, hbm_bytes=2 ** 30, peak_flops=1e12)
  assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert 0 < r["arguments"] < 0.3 * r["state_bytes_unsharded"], r
  assert r["temporaries"] > 0 and r["flops_per_device"] > 0 and r["fits"]
  # the whole step's count lowered for one CPU device (GPU rows, the device check's MFU): more than
  # a device's share, below the 8 shares (they repeat replicated work), and the global batch's
  whole = aot.step_flops(c)
  assert 4 * r["flops_per_device"] < whole < 8 * r["flops_per_device"], (whole, r["flops_per_device"])
  assert 1.9 < aot.step_flops(tiny_config(**{"mesh.data": 1, "mesh.fsdp": 8}, batch_size=16)) / whole < 2.1


@pytest.mark.parametrize("task", ["vqa", "nlvr"])
def test_ahead_of_time_compile_of_the_fine_tuning_tasks(task):
  """Every task's step compiles from the abstract batch (data.batch_shapes: VQA's answers, NLVR2's
  second image and label), as `blip-jax compile --config=configs/vqa.py:vqav2` does for a topology."""
  import importlib

  from blip_jax.train import aot
  c = importlib.import_module(f"configs.{task}").get_config("demo")
  c.unlock()
  c.model.update(vit="", image_size=32)
  c.model.vision.update(width=32, depth=1, heads=2, mlp_dim=64, patch=16)
  c.model.text.update(width=32, depth=2, heads=2, mlp_dim=64, vocab_size=128, pad_id=0, cls_id=2, sep_id=3,
                      dec_id=4, enc_id=5)
  c.batch_size = 16
  r = aot.analyze(c, jax.devices()[:8], hosts=1, hbm_bytes=2 ** 30, peak_flops=1e12)
  assert r["task"] == task and r["mesh"]["data"] == 8 and r["batch"] == 16, r
  assert r["temporaries"] > 0 and r["flops_per_device"] > 0 and r["fits"]


def test_ahead_of_time_compile_of_capfilt():
  """`blip-jax compile --config=configs/bootstrap.py:vit_b_14m`: CapFilt's captioner (nucleus
  sampling) and filter (ITM on each image's web text and synthetic caption) compile over the
  devices, images split over them, params replicated (here the recipe's models shrunk)."""
  from blip_jax.train import aot
  from configs.bootstrap import get_config
  c = get_config("vit_b_14m")
  c.unlock()
  for t in (c.captioner, c.filter):
    t.model.update(vit="", image_size=32)
    t.model.vision.update(width=32, depth=1, heads=2, mlp_dim=64, patch=16)
    t.model.text.update(width=32, depth=1, heads=2, mlp_dim=64)
  r = aot.analyze_capfilt(c, jax.devices()[:8], hbm_bytes=2 ** 30, per_device=2)
  assert r["devices"] == 8 and r["images_per_device"] == 2
  for name in ("captioner", "filter"):
    m = r[name]
    assert m["image_size"] == 32 and m["temporaries"] > 0 and m["arguments"] > 0 and m["fits"], (name, m)


def test_compile_errors_exit_2_with_one_line(capsys, monkeypatch):
  """`blip-jax compile` refusals, before any compile: an unknown topology, a GPU topology without the
  CUDA plugin and a TPU topology without libtpu (the default install has neither)."""
  import importlib.util

  from blip_jax.cli.training import compile_main
  if importlib.util.find_spec("jax_plugins") is not None or importlib.util.find_spec("libtpu") is not None:
    pytest.fail("this test assumes the default install, without JAX's CUDA plugin or libtpu")
  cases = [(["--config=configs/caption.py:coco", "--topology=v9-8"], "unknown topology 'v9-8'"),
           (["--config=configs/caption.py:coco", "--topology=h100-1"], "GPU topologies need the CUDA plugin"),
           (["--config=configs/caption.py:coco", "--topology=v5e-16"], "libtpu is not importable")]
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    for args, words in cases:
      monkeypatch.setattr(sys, "argv", ["blip-jax", "compile"] + args)
      with pytest.raises(SystemExit) as e:
        compile_main(args)
      err = capsys.readouterr().err
      assert e.value.code == 2 and words in err and "Traceback" not in err, (args, err[-2000:])
  finally:
    os.chdir(cwd)
