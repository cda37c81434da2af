"""Retrieval evaluation: the k-candidate re-rank equals the official loop (an independent plain
implementation on transformers' PyTorch BLIP, tests/retrieval_ref.py) on COCO-mini val; K/V reuse,
8 devices and 2 processes equal the plain single-device path; video; bad input; the CLI."""
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from conftest import COCO, ODD, process_env
from hf_ref import parity_reinit
from retrieval_ref import itm_eval, official_retrieval_eval
from retrieval_ref import pixels as ref_pixels
from retrieval_ref import pre_caption as ref_pre_caption
from transformers import BertTokenizer as HFBertTokenizer
from transformers import BlipConfig as HFBlipConfig
from transformers import BlipForImageTextRetrieval

import blip_jax
from blip_jax.metrics.retrieval import KEYS
from blip_jax.tasks import retrieval as R

SIZE, K = 64, 16  # a small model so the plain PyTorch loop over all 199 images and 995 texts is quick
BIN = os.path.join(os.path.dirname(sys.executable), "blip-jax")


def small_hf(seed=0):
  layers = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
  cfg = HFBlipConfig(vision_config=dict(**layers, image_size=SIZE, patch_size=16, layer_norm_eps=1e-6),
                     text_config=dict(**layers, vocab_size=30524, encoder_hidden_size=64),
                     image_text_hidden_size=256)
  torch.manual_seed(seed)
  return parity_reinit(BlipForImageTextRetrieval(cfg).eval(), seed)


@pytest.fixture(scope="module")
def hf_model():
  return small_hf()


@pytest.fixture(scope="module")
def model_dir(hf_model, vocab_path, tmp_path_factory):
  d = tmp_path_factory.mktemp("hf_retrieval")
  hf_model.save_pretrained(d)
  shutil.copy(vocab_path, d / "vocab.txt")
  return str(d)


@pytest.fixture(scope="module")
def model(model_dir):
  return blip_jax.load(model_dir)


@pytest.fixture(scope="module")
def val():
  return R.read_gallery(os.path.join(COCO, "captions_karpathy_val.json"), COCO)


@pytest.fixture(scope="module")
def ours(model, val):
  return R.evaluate(model, val, k=K, progress=False)


@pytest.fixture(scope="module")
def reference(hf_model, val, vocab_path):
  return official_retrieval_eval(hf_model, HFBertTokenizer(vocab_path), val.items, val.texts, SIZE, K)


def test_gallery_is_coco_mini_val(val):
  assert (len(val.items), len(val.texts)) == (199, 995)
  assert all(len(v) == 5 for v in val.img2txt)


def test_rerank_equals_official_loop(ours, reference, val):
  ref_i2t, ref_t2i, ref_sims = reference
  assert np.abs(ours.sims - ref_sims).max() <= 1e-4
  # the same candidates were re-ranked in both directions, and every score agrees
  np.testing.assert_array_equal(ours.score_i2t == -100, ref_i2t == -100)
  np.testing.assert_array_equal(ours.score_t2i == -100, ref_t2i == -100)
  assert np.abs(ours.score_i2t - ref_i2t).max() <= 1e-4
  assert np.abs(ours.score_t2i - ref_t2i).max() <= 1e-4
  assert (ours.score_i2t != -100).sum(axis=1).tolist() == [K] * 199
  expected = itm_eval(ref_i2t, ref_t2i, val.txt2img, val.img2txt)
  assert ours.metrics == pytest.approx(expected, abs=1e-9)
  # fewer ITM pairs than the official 2 x k per query, each scored once
  assert ours.stats["pairs"] < ours.stats["official_pairs"] == K * (199 + 995)
  assert ours.stats["itm_flops"] < ours.stats["official_itm_flops"]


def test_itm_rerank_changes_the_itc_order(ours, val):
  """Guard: the re-rank is not the ITC order (else the parity above would prove little)."""
  changed_i2t = np.mean(ours.score_i2t.argmax(1) != ours.sims.argmax(1))
  changed_t2i = np.mean(ours.score_t2i.argmax(1) != ours.sims.T.argmax(1))
  assert changed_i2t > 0.3 and changed_t2i > 0.3
  itc_only = R.recall_at_k(ours.sims, ours.sims.T, val.txt2img, val.img2txt)
  assert itc_only != ours.metrics


@pytest.fixture(scope="module")
def small(val):
  return val.first(24)


@pytest.fixture(scope="module")
def one_device(model, small):
  return R.evaluate(model, small, k=8, progress=False, devices=jax.local_devices()[:1])


def test_kv_reuse_equals_plain_path(model, small, one_device):
  plain = R.evaluate(model, small, k=8, progress=False, reuse_kv=False, devices=jax.local_devices()[:1])
  assert np.abs(plain.score_i2t - one_device.score_i2t).max() <= 1e-5
  assert np.abs(plain.score_t2i - one_device.score_t2i).max() <= 1e-5
  assert plain.metrics == one_device.metrics
  assert one_device.stats["itm_flops"] < plain.stats["itm_flops"]


def test_eight_devices_equal_one(model, small, one_device):
  assert jax.local_device_count() == 8
  eight = R.evaluate(model, small, k=8, progress=False, batch_size=3)  # rows padded to 8 devices
  assert np.abs(eight.score_i2t - one_device.score_i2t).max() <= 1e-5
  assert np.abs(eight.score_t2i - one_device.score_t2i).max() <= 1e-5
  assert eight.metrics == one_device.metrics


def _subset_file(small, tmp_path):
  path = tmp_path / "small.json"
  path.write_text(json.dumps([{"image": os.path.relpath(p, COCO), "caption": [small.texts[t] for t in small.img2txt[i]]}
                              for i, p in enumerate(small.items)]))
  return str(path)


def _env(devices):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def test_cli_and_two_processes_equal_one(model_dir, small, one_device, tmp_path):
  ann = _subset_file(small, tmp_path)
  args = ["eval", "retrieval", "--model", model_dir, "--annotations", ann, "--image-root", COCO, "--k", "8", "--quiet"]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for pid in range(2):
    env = process_env(_env(2), pid, 2, port)
    procs.append(subprocess.Popen([BIN, *args, "--out", str(tmp_path / "two")], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  two = np.load(tmp_path / "two" / "scores.npz")
  assert np.abs(two["score_matrix_i2t"] - one_device.score_i2t).max() <= 1e-5
  assert np.abs(two["score_matrix_t2i"] - one_device.score_t2i).max() <= 1e-5
  metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
  assert {k: metrics[k] for k in KEYS} == one_device.metrics
  assert "text retrieval R@1/5/10" in outs[0][0] and "R@1" not in outs[1][0]  # process 0 reports
  # rankings: one line per query, top 10 each, the scores of the matrices
  lines = [json.loads(x) for x in (tmp_path / "two" / "rankings.jsonl").read_text().splitlines()]
  assert len(lines) == len(small.items) + len(small.texts)
  first = lines[0]
  assert first["direction"] == "i2t" and len(first["top"]) == 10
  assert first["top"][0]["score"] == pytest.approx(float(one_device.score_i2t[0].max()), abs=1e-5)


def test_bad_input_fails_before_compute(model_dir, small, tmp_path):
  ann = _subset_file(small, tmp_path)
  run = lambda *a: subprocess.run([BIN, "eval", "retrieval", "--out", str(tmp_path / "o"), "--quiet", *a],
                                  capture_output=True, text=True, env=_env(1), timeout=120)
  # k larger than the gallery: refused before the (here missing) model is even read
  r = run("--model", "/nonexistent", "--annotations", ann, "--image-root", COCO, "--k", "500")
  assert r.returncode != 0 and "k=500 is larger than the gallery (24 images, 120 texts)" in r.stderr
  # annotations of the wrong shape (VQA questions), naming the entry
  r = run("--model", "/nonexistent", "--annotations", os.path.join(COCO, "vqa_v2_subset.json"), "--image-root", COCO)
  assert r.returncode != 0 and "entry 0 has no 'image' and 'caption'" in r.stderr
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "o").exists()


def test_model_without_itm_is_refused(val, vocab_path):
  from blip_jax.api import BlipModel
  from blip_jax.models.config import tiny_config
  from blip_jax.models.init import init_params
  cfg = tiny_config("caption")
  cap = BlipModel(cfg, init_params(cfg), tokenizer=blip_jax.BertTokenizer(vocab_path))
  with pytest.raises(ValueError, match="'caption' model has no ITC projections and ITM head"):
    R.evaluate(cap, val, k=4)


def test_undecodable_images_and_blank_captions_are_skipped_and_counted(model, small, tmp_path):
  texts = [small.texts[t] for i in range(6) for t in small.img2txt[i]] + ["a cat", "a dog", "  ...  "]
  txt2img = np.asarray([i for i in range(6) for _ in small.img2txt[i]] + [6, 7, 0])
  bad = R.Gallery(small.items[:6] + [os.path.join(ODD, "truncated_jpeg.jpg"), str(tmp_path / "missing.jpg")],
                  texts, txt2img, [np.flatnonzero(txt2img == i).tolist() for i in range(8)])
  r = R.evaluate(model, bad, k=4, progress=False, devices=jax.local_devices()[:1])
  assert [os.path.basename(p) for p, _ in r.skipped["items"]] == ["truncated_jpeg.jpg", "missing.jpg"]
  assert r.skipped["blank_texts"] == 1 and r.skipped["texts_of_skipped_items"] == 2
  assert r.gallery.items == small.items[:6] and len(r.gallery.texts) == 30
  assert r.score_i2t.shape == (6, 30)


def test_odd_jpegs_decode(model):
  names = sorted(f for f in os.listdir(ODD) if f.endswith(".jpg") and "truncated" not in f)
  g = R.Gallery([os.path.join(ODD, f) for f in names], [f"photo {i}" for i in range(len(names))],
                np.arange(len(names)), [[i] for i in range(len(names))])
  r = R.evaluate(model, g, k=2, progress=False, devices=jax.local_devices()[:1])
  assert r.skipped["items"] == [] and len(r.gallery.items) == len(names)


# ---- video ---------------------------------------------------------------------------------------
def write_video(path, frames, fps=10):
  import av
  with av.open(str(path), "w") as c:
    s = c.add_stream("mpeg4", rate=fps)
    s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    s.bit_rate = 20_000_000  # near-lossless: the tests read the pixels back
    for f in frames:
      for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def test_video_frames_are_sampled_as_official(tmp_path):
  levels = np.arange(20) * 12  # frame i is a flat grey of level 12 i
  write_video(tmp_path / "v.mp4", np.repeat(levels[:, None, None, None], 3, -1).repeat(32, 1).repeat(32, 2).astype(np.uint8))
  frames = R.read_video(str(tmp_path / "v.mp4"), 8, 16)
  want = np.arange(0, 20, 20 / 8).astype(int)
  assert want.tolist() == [0, 2, 5, 7, 10, 12, 15, 17]
  np.testing.assert_allclose(frames.reshape(8, -1).mean(1), levels[want], atol=4)


@torch.no_grad()
def test_video_retrieval_equals_official_video_algorithm(model, hf_model, small, vocab_path, tmp_path):
  """Zero-shot video: ITC = normalised mean of the frames' projected [CLS], ITM memory = all
  frames' tokens concatenated (official eval_retrieval_video), against transformers' modules."""
  from PIL import Image
  rng = np.random.RandomState(0)
  clips, lines = [], []
  for v in range(5):  # each video: 6 frames cycling through 3 COCO photos
    imgs = [np.asarray(Image.open(small.items[3 * v + j]).convert("RGB").resize((96, 96))) for j in range(3)]
    write_video(tmp_path / f"video{v}.mp4", np.stack([imgs[j % 3] for j in range(6)]))
    clips.append(f"video{v}")
    lines.append({"clip_name": f"video{v}", "caption": small.texts[small.img2txt[3 * v][0]]})
  (tmp_path / "broken.mp4").write_bytes(rng.bytes(3000))
  lines.append({"clip_name": "broken", "caption": "a broken video"})
  ann = tmp_path / "msrvtt.jsonl"
  ann.write_text("\n".join(json.dumps(x) for x in lines))
  g = R.read_gallery(str(ann), str(tmp_path), video=True)
  r = R.evaluate(model, g, k=3, frames=4, max_words=40, progress=False, devices=jax.local_devices()[:1])
  assert [os.path.basename(p) for p, _ in r.skipped["items"]] == ["broken.mp4"]
  assert r.skipped["texts_of_skipped_items"] == 1 and r.score_i2t.shape == (5, 5)
  # the official algorithm on the same decoded frames, with transformers' modules
  frames = [torch.tensor(np.stack([blip_jax.preprocess.normalize(f) for f in R.read_video(str(tmp_path / f"{c}.mp4"), 4, SIZE)])).permute(0, 3, 1, 2)
            for c in clips]
  tok = HFBertTokenizer(vocab_path)([ref_pre_caption(t, 40) for t in r.gallery.texts], padding="max_length",
                                    max_length=35, return_tensors="pt")
  text = hf_model.text_encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state[:, 0]
  text_feat = torch.nn.functional.normalize(hf_model.text_proj(text), dim=-1)
  tokens = [hf_model.vision_model(pixel_values=f).last_hidden_state for f in frames]
  video_feat = torch.nn.functional.normalize(torch.stack([hf_model.vision_proj(t[:, 0]).mean(0) for t in tokens]), dim=-1)
  sims = (video_feat @ text_feat.T).numpy()
  assert np.abs(r.sims - sims).max() <= 1e-4
  ids = tok.input_ids.clone()
  ids[:, 0] = 30523
  for v, t in zip(*np.nonzero(r.score_i2t != -100)):
    memory = tokens[v].reshape(1, -1, tokens[v].shape[-1])  # 4 frames x 17 tokens
    out = hf_model.text_encoder(input_ids=ids[t:t + 1], attention_mask=tok.attention_mask[t:t + 1],
                                encoder_hidden_states=memory).last_hidden_state
    want = float(hf_model.itm_head(out[:, 0])[0, 1]) + sims[v, t]
    assert abs(r.score_i2t[v, t] - want) <= 1e-4


def test_reference_preprocessing_is_ours(small):
  """The reference reads pixels itself; both must see the same input for the parity above."""
  ours = blip_jax.preprocess.preprocess(small.items[:2], SIZE)
  ref = torch.stack([ref_pixels(p, SIZE) for p in small.items[:2]]).permute(0, 2, 3, 1).numpy()
  assert np.abs(ours - ref).max() <= 1e-6
