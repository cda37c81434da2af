"""CapFilt end to end on COCO-mini with small random models: counts add up, the output loads
through the tf.data sources, a killed run resumes to the same output, thresholds 0 and > 1."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
from conftest import COCO, ODD, process_env
from hf_ref import make_hf
from official_ref import official_state_dict, shared_pair

import blip_jax
from blip_jax import capfilt
from blip_jax.data.shards import make_shards
from blip_jax.data.sources import JsonSource, TFRecordSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.path.dirname(sys.executable), "blip-jax")
SETTINGS = dict(num_captions=2, images_per_shard=4, batch_size=4, max_length=14, min_length=6)


def settings(**over):
  """The CapFilt settings of SETTINGS (images per shard belongs to the JSON input)."""
  return capfilt.CapFiltSettings(**{k: v for k, v in {**SETTINGS, **over}.items() if k != "images_per_shard"})
N_IMAGES, N_BAD = 12, 2
# Same devices as this process (conftest's 8), so the same batch layout; the compile cache shared.
ENV = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, vocab_path):
  """A captioner as a transformers dir and as an official .pth, a filter as our checkpoint (converted from transformers),
  and a BLIP JSON of 12 COCO images (5 captions each; one blank) plus a missing and a truncated image."""
  d = tmp_path_factory.mktemp("capfilt")
  make_hf("caption", 1e-6, seed=31).save_pretrained(d / "captioner")
  make_hf("retrieval", 1e-6, seed=5).save_pretrained(d / "hf_filter")
  blip_jax.load(str(d / "hf_filter"), vocab=vocab_path).save(str(d / "filter"))
  torch.save({"model": official_state_dict("keys_official_decoder.txt", *shared_pair())}, d / "official_decoder.pth")
  with open(os.path.join(COCO, "captions_karpathy_val.json")) as f:
    ann = json.load(f)[:N_IMAGES]
  ann[1]["caption"][0] = "  "
  ann.insert(3, {"image": "images/missing.jpg", "caption": ["a missing image"]})
  ann.insert(7, {"image": os.path.join(ODD, "truncated_jpeg.jpg"), "caption": ["a broken file"]})
  with open(d / "ann.json", "w") as f:
    json.dump(ann, f)
  return d, ann


@pytest.fixture(scope="module")
def models(setup, vocab_path):
  """Each checkpoint loaded once: (transformers-dir captioner, official .pth captioner, filter)."""
  d, _ = setup
  return (blip_jax.load(str(d / "captioner"), vocab=vocab_path),
          blip_jax.load(str(d / "official_decoder.pth"), vocab=vocab_path), blip_jax.load(str(d / "filter")))


def cli_args(d, out, vocab_path, **over):
  s = {**SETTINGS, **over}
  return ["capfilt", "--captioner", str(d / "captioner"), "--vocab", vocab_path, "--filter", str(d / "filter"),
          "--annotations", str(d / "ann.json"), "--image-root", COCO, "--out", str(out), "--quiet",
          "--num-captions", str(s["num_captions"]), "--images-per-shard", str(s["images_per_shard"]),
          "--batch-size", str(s["batch_size"]), "--max-length", str(s["max_length"]),
          "--min-length", str(s["min_length"])]


@pytest.fixture(scope="module")
def reference(setup, models):
  d, _ = setup
  cap, _, filt = models
  report = capfilt.run(cap, filt, capfilt.JsonInput([str(d / "ann.json")], COCO, 4), str(d / "ref"),
                       settings(), progress=False)
  return report, d / "ref"


def test_counts_add_up_and_output_loads(setup, reference):
  d, ann = setup
  report, out = reference
  assert report["images"] == N_IMAGES + N_BAD and report["images_undecodable"] == N_BAD
  assert any("missing.jpg" in e for e in report["undecodable_examples"])
  assert any("truncated_jpeg.jpg" in e for e in report["undecodable_examples"])
  web_captions = sum(len(a["caption"]) for a in ann if "missing" not in a["image"] and "truncated" not in a["image"])
  assert report["texts_empty_skipped"] == 1
  assert report["web"]["texts"] == web_captions - 1
  assert report["synthetic"]["texts"] == 2 * N_IMAGES
  for kind in ("web", "synthetic"):
    r = report[kind]
    assert r["kept"] + r["dropped"] == r["texts"] == sum(r["histogram"])
  with open(out / "bootstrapped.json") as f:
    rows = json.load(f)
  assert len(rows) == report["pairs_written"] == report["web"]["kept"] + report["synthetic"]["kept"]
  assert 0 < report["web"]["kept"] < report["web"]["texts"]  # random filter: a real split at 0.5
  assert all(r["itm"] >= 0.5 for r in rows)
  assert {r["kind"] for r in rows} <= {"web", "synthetic"}
  web = {(a["image"], c) for a in ann for c in a["caption"]}
  assert all((r["image"], r["caption"]) in web for r in rows if r["kind"] == "web")
  assert os.path.getsize(out / "report.png") > 1000
  # Loads as a tf.data source: every pair, with its image
  src = JsonSource([str(out / "bootstrapped.json")], report["output"]["image_root"])
  assert len(src) == len(rows)
  ex = src.lookup(0)
  assert ex["image"].numpy()[:2] == b"\xff\xd8" and ex["texts"].numpy()[0].decode() == rows[0]["caption"]


def test_itm_scores_equal_the_filter_model(reference, models):
  """The stored scores are the filter's own ITM probabilities for those pairs."""
  _, out = reference
  with open(out / "bootstrapped.json") as f:
    rows = json.load(f)[:6]
  filt = models[2]
  pixels = filt.preprocess([os.path.join(COCO, r["image"]) for r in rows])
  ids, mask = filt.tokenize([blip_jax.pre_caption(r["caption"], 30) for r in rows])
  np.testing.assert_allclose(np.asarray(filt.itm_prob(pixels, ids, mask)), [r["itm"] for r in rows], atol=2e-5)


def two_process_env(i, port):
  return process_env(ENV, i, 2, port)


def test_killed_run_resumed_by_two_processes(setup, reference, vocab_path):
  """A run killed after its first shard, resumed by 2 processes (jax.distributed on localhost)
  that share the remaining shards: the same dataset as an uninterrupted single-process run."""
  d, _ = setup
  _, ref = reference
  out = d / "killed"
  p = subprocess.Popen([BIN, *cli_args(d, out, vocab_path)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  first = out / "shards" / "00000.stats.json"
  deadline = time.time() + 300
  while not first.exists() and p.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  p.send_signal(signal.SIGKILL)
  log = p.communicate()[0]
  assert first.exists(), log
  done = sorted(f for f in os.listdir(out / "shards") if f.endswith(".stats.json"))
  assert len(done) < 4 and not (out / "report.json").exists()  # killed half-way

  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  procs = [subprocess.Popen([BIN, *cli_args(d, out, vocab_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=two_process_env(i, port)) for i in range(2)]
  for q in procs:
    log = q.communicate(timeout=600)[0]
    assert q.returncode == 0, log[-3000:]
  owners = [json.load(open(out / "shards" / f"{i:05d}.stats.json"))["process"] for i in range(4)]
  assert owners[0] == 0 and owners[1] == owners[3] == 1  # shards are dealt round robin; done ones kept
  for name in ["bootstrapped.json"] + [f"shards/{i:05d}.json" for i in range(4)]:
    with open(out / name) as f, open(ref / name) as g:
      a, b = json.load(f), json.load(g)
    assert [(r["image"], r["caption"], r["kind"]) for r in a] == [(r["image"], r["caption"], r["kind"]) for r in b]
    np.testing.assert_allclose([r["itm"] for r in a], [r["itm"] for r in b], atol=1e-5)
  with open(out / "report.json") as f, open(ref / "report.json") as g:
    a, b = json.load(f), json.load(g)
  for k in ("web", "synthetic"):
    assert [a[k][n] for n in ("texts", "kept", "dropped", "histogram")] == \
        [b[k][n] for n in ("texts", "kept", "dropped", "histogram")]
  # Resuming with other settings is refused before any work
  other = subprocess.run([BIN, *cli_args(d, out, vocab_path, num_captions=3)], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=600)
  assert other.returncode != 0 and "other settings" in other.stderr and "num_captions" in other.stderr


@pytest.mark.parametrize("threshold", [0.0, 1.01])
def test_thresholds_on_tfrecord_shards(setup, models, threshold):
  """TFRecord in, TFRecord out: threshold 0 keeps every text, above 1 drops every text. The
  captioner here is an official-layout .pth."""
  d, ann = setup
  shards = d / "tfrecords"
  if not shards.exists():
    make_shards([str(d / "ann.json")], COCO, str(shards), per_shard=6, workers=1, progress=False)
  _, cap, filt = models
  out = d / f"tf_{threshold}"
  report = capfilt.run(cap, filt, capfilt.TFRecordInput([str(shards / "*.tfrecord")]), str(out),
                       settings(threshold=threshold),
                       progress=False)
  texts = report["web"]["texts"] + report["synthetic"]["texts"]
  assert report["images"] == N_IMAGES + 1  # make-shards already skipped the missing file
  assert report["images_undecodable"] == 1 and report["synthetic"]["texts"] == 2 * N_IMAGES
  records = list(TFRecordSource(report["output"]["files"], shuffle_buffer=1).epoch_dataset(0, 0, 0, 1))
  if threshold == 0:
    assert report["pairs_written"] == texts == len(records)
    keys = {r["image_id"].numpy() for r in records}
    assert len(keys) == N_IMAGES  # the pairs of an image share its id
  else:
    assert report["pairs_written"] == 0 == len(records)
    assert report["web"]["dropped"] + report["synthetic"]["dropped"] == texts


def test_webdataset_tar_in_tar_out(setup, models, tmp_path):
  """img2dataset .tar shards in (written here: NNNNN.jpg + .txt + .json, the truncated JPEG among
  them), .tar shards out at threshold 0: every text of every good image kept, each pair a sample
  whose .json names its image's key, read back by the training source with the image ids shared."""
  from test_data import img2dataset_tar

  from blip_jax.data import webdataset
  from blip_jax.data.sources import WebDatasetSource
  d, ann = setup
  samples = []
  for k, a in enumerate(e for e in ann if "missing" not in e["image"]):
    path = a["image"] if os.path.isabs(a["image"]) else os.path.join(COCO, a["image"])
    key = f"{k:09d}"
    samples.append({"key": key, "jpg": open(path, "rb").read(), "txt": a["caption"][-1],
                     "json": json.dumps({"key": key, "status": "success"})})
  img2dataset_tar(str(tmp_path / "00000.tar"), samples[:7])
  img2dataset_tar(str(tmp_path / "00001.tar"), samples[7:])
  _, cap, filt = models
  report = capfilt.run(cap, filt, capfilt.make_input([str(tmp_path / "*.tar")]), str(tmp_path / "out"),
                       settings(threshold=0.0), progress=False)
  assert report["images"] == N_IMAGES + 1 and report["images_undecodable"] == 1
  assert "sample '000000006'" in report["undecodable_examples"][0]  # the truncated JPEG, by its key
  assert report["output"]["kind"] == "webdataset"
  out = sorted((tmp_path / "out" / "shards").glob("*.tar"))
  assert [f.name for f in out] == ["00000.tar", "00001.tar"]
  rows = [s for f in out for s in webdataset.iter_samples(str(f))]
  assert report["synthetic"]["texts"] + report["texts_empty_skipped"] == 2 * N_IMAGES  # 2 captions an image
  assert len(rows) == report["pairs_written"] == N_IMAGES + report["synthetic"]["texts"]
  web = {s["meta"]["key"]: s["texts"][0] for s in rows if s["meta"]["kind"] == "web"}
  assert web == {x["key"]: x["txt"] for x in samples if x["key"] != "000000006"}
  src = WebDatasetSource(str(tmp_path / "out" / "shards" / "*.tar"), shuffle_buffer=1)
  ids = [int(r["image_id"]) for r in src.epoch_dataset(0, 0, 0, 1)]
  assert len(ids) == len(rows) and len(set(ids)) == N_IMAGES  # the pairs of an image share its id


def test_tfrecord_input_counts_a_record_without_jpg_and_a_truncated_file_and_goes_on(tmp_path):
  import tensorflow as tf
  feat = lambda v: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
  rec = lambda **f: tf.train.Example(features=tf.train.Features(feature={k: feat(v) for k, v in f.items()})).SerializeToString()
  first = sorted(os.path.join(r, f) for r, _, names in os.walk(COCO) for f in names if f.endswith(".jpg"))[0]
  jpg = open(first, "rb").read()
  with tf.io.TFRecordWriter(str(tmp_path / "a.tfrecord")) as w:
    w.write(rec(jpg=jpg, txt=b"a dog", key=b"k0"))
    w.write(rec(url=b"http://x/y.jpg", txt=b"web data not downloaded", key=b"k1"))  # no jpg
    w.write(rec(jpg=jpg, txt=b"a cat", key=b"k2"))
  with tf.io.TFRecordWriter(str(tmp_path / "b.tfrecord")) as w:
    for i in range(3):
      w.write(rec(jpg=jpg, txt=b"a bird", key=f"b{i}".encode()))
  size = os.path.getsize(tmp_path / "b.tfrecord")
  with open(tmp_path / "b.tfrecord", "r+b") as f:
    f.truncate(size - len(jpg) // 2)  # the third record cut in half (a partial copy)
  src = capfilt.TFRecordInput([str(tmp_path / "*.tfrecord")])
  a, b = src.read(0), src.read(1)
  assert [isinstance(d, bytes) for _, d in a] == [True, False, True]
  assert "record 1: not an image record" in a[1][1]
  assert [it["key"] for it, d in a if isinstance(d, bytes)] == [b"k0", b"k2"]
  assert [isinstance(d, bytes) for _, d in b] == [True, True, False]
  assert "unreadable after record 2" in b[2][1]
