"""The bootstrap loop (blip_jax/bootstrap.py) end to end at the `:tiny` sizes (a few steps per stage):
every stage's output exists and loads; a run killed inside CapFilt (stages 0-2 complete, one CapFilt
shard written) and run again redoes nothing finished: every file of the finished stages and the
finished shard is the same file, untouched; a third run skips every stage. The filter's
precision/recall on the injected noise equals a brute-force recount of kept and dropped web pairs."""
import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest

from blip_jax import bootstrap, capfilt

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def tiny_config(**updates):
  spec = importlib.util.spec_from_file_location("bootstrap_cfg", os.path.join(ROOT, "configs", "bootstrap.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("tiny")
  if updates:
    c.unlock()
    c.update_from_flattened_dict(updates)
    c.lock()
  return c


def identities(folder):
  """Every file under folder: (inode, mtime_ns, size, sha1). A rewritten file changes the tuple."""
  out = {}
  for d, _, files in os.walk(folder):
    for f in files:
      p = os.path.join(d, f)
      st = os.stat(p)
      out[os.path.relpath(p, folder)] = (st.st_ino, st.st_mtime_ns, st.st_size,
                                         hashlib.sha1(open(p, "rb").read()).hexdigest())
  return out


class Killed(BaseException):
  pass


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  work = str(tmp_path_factory.mktemp("bootstrap") / "w")
  c = tiny_config()
  first, second, third = [], [], []
  original = capfilt.CapFilt.run_shard
  calls = []

  def killed_on_the_second_shard(self, source, i, **kw):
    calls.append(i)
    if len(calls) == 2:
      raise Killed()
    return original(self, source, i, **kw)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(capfilt.CapFilt, "run_shard", killed_on_the_second_shard)
    with pytest.raises(Killed):
      bootstrap.run(c, work, log=first.append)
  finished = {s: identities(os.path.join(work, s)) for s in bootstrap.STAGES[:4]}
  shard0 = {k: v for k, v in identities(os.path.join(work, "3_capfilt", "shards")).items() if k.startswith("00000")}
  summary = bootstrap.run(c, work, log=second.append)
  again = bootstrap.run(c, work, log=third.append)
  return work, c, summary, again, (first, second, third), finished, shard0


def test_every_stage_writes_its_outputs_and_a_rerun_redoes_nothing(pipeline):
  import blip_jax
  work, c, summary, again, (first, second, third), finished, shard0 = pipeline
  # the first run stopped inside CapFilt, after stages 0-2 completed and one shard was written
  assert "[2_filter] done" in " ".join(first) and "[3_capfilt] done" not in " ".join(first)
  assert set(shard0) == {"00000.json", "00000.stats.json"}
  # the second run skipped the complete stages and redid none of their files
  for s in bootstrap.STAGES[:4]:
    assert f"[{s}] complete: skipped" in second
    assert identities(os.path.join(work, s)) == finished[s], s
  assert "[3_capfilt] running" in second
  now = identities(os.path.join(work, "3_capfilt", "shards"))
  assert {k: now[k] for k in shard0} == shard0  # the finished shard was not redone
  assert {"00001.json", "00001.stats.json"} <= set(now)
  # every stage's output
  for s in bootstrap.STAGES:
    assert os.path.exists(os.path.join(work, s, "DONE.json")), s
  data = json.load(open(os.path.join(work, "0_data", "DONE.json")))
  assert data["sizes"] == {"noisy": 64, "noisy_injected": 26, "clean_train": 64, "clean_val": 32, "heldout": 32}
  for path in ("1_pretrain/final", "2_captioner/run/best", "2_filter/run/best", "4_pretrain/final"):
    m = blip_jax.load(os.path.join(work, path))
    assert m.tokenizer is not None and m.config.vision.image_size == 32
  assert blip_jax.load(os.path.join(work, "2_captioner/run/best")).config.kind == "caption"
  assert blip_jax.load(os.path.join(work, "2_filter/run/best")).config.kind == "retrieval"
  boot = json.load(open(os.path.join(work, "3_capfilt", "bootstrapped.json")))
  stage4 = json.load(open(os.path.join(work, "4_pretrain", "DONE.json")))
  assert stage4["pairs"] == 64 + len(boot)  # clean train + every bootstrapped pair
  for name in ("stage1", "stage4"):
    m = json.load(open(os.path.join(work, "5_eval", name, "retrieval", "metrics.json")))
    assert m["r_mean"] == summary["before" if name == "stage1" else "after"]["retrieval"]["r_mean"]
    assert os.path.exists(os.path.join(work, "5_eval", name, "caption", "captions.json"))
  assert json.load(open(os.path.join(work, "summary.json"))) == summary == again
  assert set(summary["table"]) == {"none", "capfilt"}
  assert summary["table"]["none"] == summary["before"] and summary["table"]["capfilt"] == summary["after"]
  counts = summary["counts"]
  assert counts["1_pretrain"] == {"pairs": 128, "examples_trained": 6 * 16, "skipped": 0}
  assert counts["3_capfilt"]["images_read"] == 64 and counts["3_capfilt"]["images_undecodable"] == 0
  with open(os.path.join(work, "summary.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # a third run: every stage skipped
  assert all(f"[{s}] complete: skipped" in third for s in bootstrap.STAGES)


def test_filter_precision_recall_is_a_recount_of_the_output(pipeline):
  work, _, summary, *_ = pipeline
  noisy = json.load(open(os.path.join(work, "0_data", "noisy.json")))
  labels = json.load(open(os.path.join(work, "0_data", "noise_labels.json")))
  boot = json.load(open(os.path.join(work, "3_capfilt", "bootstrapped.json")))
  # the labels are what was injected: a noisy entry's caption is not its image's own
  assert len(labels) == len(noisy) and sum(r["noisy"] for r in labels) == round(0.4 * len(noisy))
  for entry, lab in zip(noisy, labels):
    assert (entry["image"], entry["caption"]) == (lab["image"], lab["caption"])
    assert lab["noisy"] == (lab["caption"] != lab["true_caption"])
  nf = summary["noise_filter"]
  assert nf == recount(noisy, labels, boot)
  assert summary["capfilt"]["web"]["kept"] == nf["kept_noisy"] + nf["kept_clean"]  # CapFilt's report agrees
  # a tiny filter keeps few texts; so the counting is also checked on outputs that keep a mix:
  # every third web pair dropped, and rows that must not count as kept web pairs (a synthetic row
  # with the web caption, a web row of another image)
  mixed = [{"image": e["image"], "caption": e["caption"], "kind": "web"} for k, e in enumerate(noisy) if k % 3]
  mixed += [{"image": e["image"], "caption": e["caption"], "kind": "synthetic"} for k, e in enumerate(noisy) if not k % 3]
  mixed += [{"image": noisy[0]["image"], "caption": noisy[3]["caption"], "kind": "web"}]
  got = bootstrap.noise_filter_scores(labels, mixed)
  assert got == recount(noisy, labels, mixed)
  assert 0 < got["dropped_noisy"] < got["noisy"] and 0 < got["dropped_clean"] < got["clean"]


def recount(noisy, labels, rows):
  """Brute force: each web pair looked for among the written rows, one by one."""
  c = {"dropped_noisy": 0, "kept_noisy": 0, "dropped_clean": 0, "kept_clean": 0}
  for entry, lab in zip(noisy, labels):
    kept = False
    for row in rows:
      if row["kind"] == "web" and row["image"] == entry["image"] and row["caption"] == entry["caption"]:
        kept = True
    c[("kept_" if kept else "dropped_") + ("noisy" if lab["noisy"] else "clean")] += 1
  dropped = c["dropped_noisy"] + c["dropped_clean"]
  c.update(noisy=c["dropped_noisy"] + c["kept_noisy"], clean=c["dropped_clean"] + c["kept_clean"])
  c["precision"] = c["dropped_noisy"] / dropped if dropped else None
  c["recall"] = c["dropped_noisy"] / c["noisy"] if c["noisy"] else None
  c["clean_kept_fraction"] = c["kept_clean"] / c["clean"] if c["clean"] else None
  return c


def test_a_changed_config_is_refused_before_any_stage(pipeline):
  work, *_ = pipeline
  with pytest.raises(ValueError, match="other settings"):
    bootstrap.run(tiny_config(**{"capfilt.settings.threshold": 0.3}), work, log=lambda m: None)


def _free_port():
  import socket
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _same_results(a, b, work_a, work_b):
  """Two DONE.json (or summary) values equal, paths under each workdir read as the same."""
  norm = lambda x, w: json.loads(json.dumps(x).replace(w, "WORK"))
  return norm(a, work_a) == norm(b, work_b)


def test_two_processes_equal_one_and_a_killed_process_resumes(pipeline, tmp_path):
  """Item 0 and 4 of the bootstrap: the `:tiny` loop under jax.distributed with 2 processes (4
  devices each) writes the same summary.json, byte for byte, as the single-process run (8
  devices) with the same seed, and the same CapFilt shards and stage results, though process 1 was
  killed (SIGKILL) inside stage 1 after its step-4 checkpoint, and both were started again."""
  import signal
  import subprocess
  import sys

  from conftest import one_device_env, process_env
  work1 = pipeline[0]
  work2 = str(tmp_path / "w2")
  worker = os.path.join(ROOT, "tests", "bootstrap_worker.py")
  env = {**one_device_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}

  def launch(kill_at=0):
    port = _free_port()
    return [subprocess.Popen([sys.executable, worker, work2] + ([str(kill_at)] if kill_at and i == 1 else []),
                             cwd=ROOT, env=process_env(env, i, 2, port), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]

  first = launch(kill_at=4)
  log1 = first[1].communicate(timeout=600)[0]
  assert first[1].returncode == -signal.SIGKILL and "killed after the step-4 checkpoint" in log1, log1[-3000:]
  first[0].send_signal(signal.SIGKILL)  # the job goes down with its host, as a pod's would
  first[0].communicate(timeout=60)
  assert "[0_data] done" in log1 and not os.path.exists(os.path.join(work2, "1_pretrain", bootstrap.DONE))
  again = launch()
  logs = [p.communicate(timeout=900)[0] for p in again]
  for p, log in zip(again, logs):
    assert p.returncode == 0, log[-4000:]
  assert "[0_data] complete: skipped" in logs[0] and "resumed from step 4" in logs[0], logs[0][-4000:]
  with open(os.path.join(work1, "summary.json"), "rb") as f, open(os.path.join(work2, "summary.json"), "rb") as g:
    assert f.read() == g.read()
  for stage in bootstrap.STAGES:
    a = json.load(open(os.path.join(work1, stage, bootstrap.DONE)))
    b = json.load(open(os.path.join(work2, stage, bootstrap.DONE)))
    if "final_loss" in a:  # one process's 8 devices and two processes' 4 reduce in other orders
      assert abs(a.pop("final_loss") - b.pop("final_loss")) < 1e-4
    assert _same_results(a, b, work1, work2), stage
  shards = sorted(f for f in os.listdir(os.path.join(work1, "3_capfilt", "shards")) if f.endswith(".json"))
  assert len(shards) == 4  # 2 shards of 32 images: data and stats
  for name in shards:
    a = json.load(open(os.path.join(work1, "3_capfilt", "shards", name)))
    b = json.load(open(os.path.join(work2, "3_capfilt", "shards", name)))
    if name.endswith(".stats.json"):
      assert a.pop("process") == 0 and b.pop("process") == int(name[:5]) % 2  # dealt to both processes
      assert abs(a.pop("web_score_sum") - b.pop("web_score_sum")) < 1e-4
      assert abs(a.pop("synthetic_score_sum") - b.pop("synthetic_score_sum")) < 1e-4
      ea, eb = a.pop("synthetic_examples"), b.pop("synthetic_examples")
      assert [e[:2] for e in ea] == [e[:2] for e in eb] and len(ea) == 8  # the same captions drawn
      np.testing.assert_allclose([e[2] for e in ea], [e[2] for e in eb], atol=2e-4)
      assert a == b, name
    else:
      assert [(r["image"], r["caption"], r["kind"]) for r in a] == [(r["image"], r["caption"], r["kind"]) for r in b]


def _user_data(work, noisy):
  """The config of a run on your own data: the noisy part as given, the clean parts and held-out
  set the first run's JSON."""
  d = os.path.join(work, "0_data")
  return {"data.kind": "json", "data.json.noisy": tuple(noisy), "data.json.image_root": d,
          "data.json.clean_train": (os.path.join(d, "clean_train.json"),),
          "data.json.clean_val": (os.path.join(d, "clean_val.json"),),
          "data.json.heldout": (os.path.join(d, "heldout.json"),)}


def _training_seeds(work, stage):
  cfg = json.load(open(os.path.join(work, stage, "run", "config.json")))
  return cfg["seed"], cfg["data"]["pipeline"]["seed"]


def test_webdataset_tar_noisy_part_and_another_seed(pipeline, tmp_path):
  """The noisy part as img2dataset webdataset shards written here (00000.tar, 00001.tar: NNNNN.jpg +
  .txt + .json), one image member corrupt: stage 1 and CapFilt read them in place and count the bad
  sample, CapFilt writes .tar shards and stage 4 trains on them. With seed 1 every stage's seed is 1,
  and the captioner's draws on the same images differ from seed 0's."""
  from test_data import img2dataset_tar
  work1 = pipeline[0]
  noisy = json.load(open(os.path.join(work1, "0_data", "noisy.json")))
  samples = []
  for k, e in enumerate(noisy):
    key = f"{k:09d}"
    jpg = open(os.path.join(work1, "0_data", e["image"]), "rb").read()
    samples.append({"key": key, "jpg": jpg, "txt": e["caption"],
                    "json": json.dumps({"key": key, "caption": e["caption"], "status": "success"})})
  samples[5]["jpg"] = b"\xff\xd8\xff\xe0 corrupt"
  shards = tmp_path / "wds"
  shards.mkdir()
  img2dataset_tar(str(shards / "00000.tar"), samples[:32])
  img2dataset_tar(str(shards / "00001.tar"), samples[32:])
  work = str(tmp_path / "w")
  c = tiny_config(**_user_data(work1, [str(shards / "*.tar")]), seed=1, variants=("capfilt", "captioner"),
                  **{"pretrain.total_steps": 10})
  summary = bootstrap.run(c, work, log=lambda m: None)
  counts = summary["counts"]
  assert counts["3_capfilt"]["images_read"] == 64 and counts["3_capfilt"]["images_undecodable"] == 1
  assert "000000005" in counts["3_capfilt"]["undecodable_examples"][0]
  # 10 steps of 16 from 127 good pairs: into the second epoch, past the bad sample at least once
  assert counts["1_pretrain"]["pairs"] == 128 and counts["1_pretrain"]["skipped"] >= 1
  stage1 = json.load(open(os.path.join(work, "1_pretrain", bootstrap.DONE)))
  assert [f for f in stage1["files"] if f.endswith(".tar")][:2] == [str(shards / "00000.tar"), str(shards / "00001.tar")]
  for v, stage in (("capfilt", "3_capfilt"), ("captioner", "3_capfilt_captioner")):
    out = json.load(open(os.path.join(work, stage, bootstrap.DONE)))
    assert out["output"]["kind"] == "webdataset" and all(f.endswith(".tar") for f in out["files"])
    s4 = json.load(open(os.path.join(work, "4_pretrain" + bootstrap.VARIANTS[v][1], bootstrap.DONE)))
    assert s4["files"][-2:] == out["files"] and s4["pairs"] == 64 + out["pairs_written"]
  # the seed reached every stage
  for stage in ("1_pretrain", "2_captioner", "2_filter", "4_pretrain", "4_pretrain_captioner"):
    assert _training_seeds(work, stage) == (1, 1), stage
  for stage in ("1_pretrain", "2_captioner", "2_filter", "4_pretrain"):
    assert _training_seeds(work1, stage) == (0, 0), stage
  assert json.load(open(os.path.join(work, "3_capfilt", "capfilt_settings.json")))["seed"] == 1
  # the captioner-only variant (threshold 0) kept every text: each good image's web text and caption
  cap = summary["variants"]["captioner"]["capfilt"]
  assert cap["web"]["kept"] == cap["web"]["texts"] == 63 and cap["synthetic"]["dropped"] == 0
  assert summary["table"].keys() == {"none", "capfilt", "captioner"}
  # seed 1's captions differ from seed 0's on the same images (the report's first ones of each shard)
  drawn0 = {int(e[0].split("_")[-1][:-4]): e[1] for e in
            json.load(open(os.path.join(work1, "3_capfilt", "report.json")))["synthetic_examples"]}
  drawn1 = {int(e[0].split("'")[1]): e[1] for e in
            json.load(open(os.path.join(work, "3_capfilt", "report.json")))["synthetic_examples"]}
  both = set(drawn0) & set(drawn1)
  assert len(both) >= 12 and sum(drawn0[k] != drawn1[k] for k in both) > len(both) // 2, (drawn0, drawn1)


def test_tfrecord_noisy_part_from_make_shards(pipeline, tmp_path):
  """The noisy part as TFRecord shards from `make-shards`: stage 0 writes the clean part as TFRecord
  shards too, stage 1 and CapFilt read them, CapFilt's .tfrecord output feeds stage 4. (Stage 2,
  which reads only the clean JSON, is the first run's: its DONE.json files, copied, mark it done.)"""
  from blip_jax.data.shards import make_shards
  work1 = pipeline[0]
  make_shards([os.path.join(work1, "0_data", "noisy.json")], os.path.join(work1, "0_data"), str(tmp_path / "tfr"),
              per_shard=32, progress=False)
  work = str(tmp_path / "w")
  for stage in ("2_captioner", "2_filter"):
    os.makedirs(os.path.join(work, stage))
    with open(os.path.join(work1, stage, bootstrap.DONE)) as f, open(os.path.join(work, stage, bootstrap.DONE), "w") as g:
      g.write(f.read())
  log = []
  summary = bootstrap.run(tiny_config(**_user_data(work1, [str(tmp_path / "tfr" / "*.tfrecord")]),
                                      variants=("capfilt",), **{"eval.caption": False}), work, log=log.append)
  assert "[2_filter] complete: skipped" in log
  data = json.load(open(os.path.join(work, "0_data", bootstrap.DONE)))
  assert data["format"] == "tfrecord" and data["counts"]["clean_train"] == {"written": 64, "missing_images": 0}
  assert len(data["files"]["clean_train_shards"]) == 2
  stage1 = json.load(open(os.path.join(work, "1_pretrain", bootstrap.DONE)))
  assert stage1["files"] == data["files"]["noisy"] + data["files"]["clean_train_shards"] and stage1["pairs"] == 128
  out = json.load(open(os.path.join(work, "3_capfilt", bootstrap.DONE)))
  assert out["output"]["kind"] == "tfrecord" and summary["counts"]["3_capfilt"]["images_read"] == 64
  s4 = json.load(open(os.path.join(work, "4_pretrain", bootstrap.DONE)))
  assert s4["files"] == data["files"]["clean_train_shards"] + out["files"]
  assert s4["pairs"] == 64 + out["pairs_written"]


def test_table1_means_spreads_and_differences():
  """bootstrap_report.table1 against the statistics module, value by value: each variant's mean
  and sample std over seeds, its difference from no CapFilt taken seed by seed, and 'beyond the
  spread' only where |mean difference| > 2 std of the differences."""
  import statistics

  from blip_jax import bootstrap_report as report
  values = {"none": [10.0, 12.0, 14.0], "filter": [20.0, 23.0, 25.0], "captioner": [11.0, 11.5, 15.0],
            "capfilt": [11.0, 14.0, 17.5]}
  cider = {"none": [3.0, 3.2, 3.4], "filter": [3.1, 3.1, 3.5], "captioner": [3.0, 3.3, 3.3], "capfilt": [3.2, 3.0, 3.6]}
  summaries = {seed: {"table": {v: {"retrieval": {"r_mean": values[v][i]}, "caption": {"CIDEr": cider[v][i]}}
                                for v in values}} for i, seed in enumerate((0, 1, 2))}
  t = report.table1(summaries)
  assert t["seeds"] == [0, 1, 2] and list(t["variants"]) == list(report.VARIANTS)
  for v in values:
    for key, got in (("r_mean", values[v]), ("CIDEr", cider[v])):
      m = t["variants"][v][key]
      assert m["values"] == got
      assert abs(m["mean"] - statistics.mean(got)) < 1e-12 and abs(m["std"] - statistics.stdev(got)) < 1e-12
      if v != "none":
        base = values["none"] if key == "r_mean" else cider["none"]
        d = [a - b for a, b in zip(got, base)]
        diff = t["differences"][v][key]
        assert abs(diff["mean"] - statistics.mean(d)) < 1e-12 and abs(diff["std"] - statistics.stdev(d)) < 1e-12
        assert diff["beyond_spread"] == (abs(statistics.mean(d)) > 2 * statistics.stdev(d))
  # filter: +10.67 +- 0.58 is beyond; captioner +0.5 +- 1.32 is not, nor capfilt +2.17 +- 1.26 (1-2 std)
  assert t["differences"]["filter"]["r_mean"]["beyond_spread"]
  assert not t["differences"]["captioner"]["r_mean"]["beyond_spread"]
  assert not t["differences"]["capfilt"]["r_mean"]["beyond_spread"]
  md = report.format_table1(t)
  assert "| +F (filter) − none | " in md and "+10.67 ± 0.58 *" in md
