"""Retrieval fine-tuning through the shared trainer: it learns (held-out captions of the training
images), keeps the best checkpoint by val r_mean, and starts from an official pretraining .pth with
its momentum towers and queues (a new idx queue of -100, pointer 0)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from conftest import COCO, one_device_env

import blip_jax
from blip_jax.train.step import split_ids

BIN = os.path.join(os.path.dirname(sys.executable), "blip-jax")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


_env = one_device_env


def test_finetuning_learns_and_keeps_the_best_checkpoint(retrieval_demo_run, tmp_path):
  """32 COCO-mini images: 4 captions each to train on, the 5th held out. A tiny model from scratch,
  200 steps: held-out R@1 and r_mean rise far above chance (R@1 3.1%, r_mean ~16.7 at k=8)."""
  run, work, data = retrieval_demo_run
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
  rows = [json.loads(x) for x in open(work / "metrics.jsonl")]
  evals = [r for r in rows if "eval/val/r_mean" in r]
  assert [r["epoch"] for r in evals] == [5, 10, 15, 20, 25]
  train_rows = [r for r in rows if "loss_itc" in r]
  assert train_rows[-1]["loss_itc"] < train_rows[0]["loss_itc"] - 1.0
  assert all(r["loss_lm"] == 0.0 for r in train_rows)  # retrieval: ITC + ITM only
  r1 = [(r["eval/val/txt_r1"] + r["eval/val/img_r1"]) / 2 for r in evals]
  r_mean = [r["eval/val/r_mean"] for r in evals]
  assert max(r1) >= 2.5 * 100 / 32, r1  # chance: 3.1
  assert max(r_mean) >= 2 * r_mean[0] and max(r_mean) >= 30, r_mean
  # the best checkpoint is the one with the highest val r_mean, and evaluates to the same numbers
  best = json.loads((work / "best" / "best.json").read_text())
  assert best["value"] == max(r_mean) and best["epoch"] == evals[int(np.argmax(r_mean))]["epoch"]
  out = subprocess.run([BIN, "eval", "retrieval", "--model", str(work / "best"), "--annotations",
                        str(data / "held.json"), "--image-root", COCO, "--k", "8", "--out", str(tmp_path / "e"),
                        "--quiet"], env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  again = json.loads((tmp_path / "e" / "metrics.json").read_text())
  assert again["r_mean"] == pytest.approx(best["value"], abs=1e-6)
  assert again["txt_r1"] == pytest.approx(best["metrics"]["val/txt_r1"], abs=1e-6)


def test_starts_from_official_pretraining_pth(tmp_path, vocab_path):
  """The official fine-tuning start: online weights, momentum copies (*_m), temp and the image/text
  queues of a pretraining checkpoint; the idx queue new (-100) and the pointer at 0. The same
  model in our format (kind 'pretrain') gives the same start."""
  from official_ref import official_state_dict, shared_pair

  from blip_jax.train.setup import build, model_config
  from blip_jax.train.setup import initialise_from as _initialise_from
  sd = official_state_dict("keys_official_pretrain.txt", *shared_pair())
  torch.save({"model": sd}, tmp_path / "model_base.pth")
  from configs.retrieval import get_config
  c = get_config("coco")
  c.unlock()
  c.model.update(vit="", image_size=224)
  c.model.vision.update(width=192, depth=4, heads=3, mlp_dim=768, patch=16)
  c.model.text.update(width=192, depth=4, heads=3, mlp_dim=768)
  c.batch_size, c.loss.queue_size, c.init.blip = 8, 256, str(tmp_path / "model_base.pth")
  mcfg = model_config(c, blip_jax.BertTokenizer(vocab_path))
  assert mcfg.kind == "retrieval"
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
  _, init_fn, shardings, _, _ = build(c, mcfg, mesh, 10, 20)
  with jax.set_mesh(mesh):
    state = _initialise_from(c, mcfg, init_fn(jax.random.PRNGKey(0)), shardings)
    # the same pretraining model saved in our format (a 'pretrain' kind dir) starts the same run
    blip_jax.load(c.init.blip).save(str(tmp_path / "ours_pretrain"))
    c.init.blip = str(tmp_path / "ours_pretrain")
    again = _initialise_from(c, mcfg, init_fn(jax.random.PRNGKey(1)), shardings)
  for k in ("params", "momentum", "image_queue", "text_queue", "idx_queue", "queue_ptr"):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(again[k]), jax.device_get(state[k]))
  p, m = jax.tree.map(np.asarray, state["params"]), jax.tree.map(np.asarray, state["momentum"])
  t = lambda k: sd[k].numpy()
  np.testing.assert_array_equal(p["text_encoder"]["layer_1"]["cross_attn"]["key"]["kernel"],
                                t("text_encoder.encoder.layer.1.crossattention.self.key.weight").T)
  np.testing.assert_array_equal(p["itm_head"]["kernel"], t("itm_head.weight").T)
  assert float(p["temp"]) == pytest.approx(0.05)
  np.testing.assert_array_equal(m["text_encoder"]["layer_1"]["cross_attn"]["key"]["kernel"],
                                t("text_encoder_m.encoder.layer.1.crossattention.self.key.weight").T)
  np.testing.assert_array_equal(m["visual_encoder"]["blocks_2"]["fc1"]["kernel"], t("visual_encoder_m.blocks.2.mlp.fc1.weight").T)
  np.testing.assert_array_equal(np.asarray(state["image_queue"]), t("image_queue").T)
  np.testing.assert_array_equal(np.asarray(state["text_queue"]), t("text_queue").T)
  # a pretraining file holds no idx_queue / ptr_queue: the queue's ids start empty, the pointer at 0
  np.testing.assert_array_equal(np.asarray(state["idx_queue"]), split_ids(np.full(256, -100)))
  assert int(state["queue_ptr"]) == 0
  assert "self_attn_dec" not in p["text_encoder"]["layer_0"] and "lm_bias" not in p["text_encoder"]
