"""bench/device_check.py --smoke: the prepared GPU command's code, at tiny sizes on this CPU, so it
never rots (issue 26); and GPU targets compiled here when the CUDA plugin's venv is at hand."""
import json
import os
import subprocess
import sys

import pytest
from conftest import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_smoke_runs_every_part_and_prints_one_json(tmp_path):
  out = tmp_path / "check.json"
  run = subprocess.run([sys.executable, "bench/device_check.py", "--smoke", "--compare-torch", f"--out={out}"],
                       cwd=ROOT, env=one_device_env(), capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  r = json.loads(out.read_text())
  assert json.loads(run.stdout) == r  # the one JSON on stdout is the file's
  step = r["pretrain_step"]
  assert step["per_device_batch"] == 4 and step["step_s"] > 0 and step["flops_per_step"] > 0
  assert step["examples_per_s"] == pytest.approx(step["global_batch"] / step["step_s"])
  assert "mfu" not in step and r["peak_bf16_flops_per_device"] is None  # no peak known for a CPU: no MFU
  for part, rate in (("caption", "captions_per_s"), ("itm_rerank", "pairs_per_s"), ("vqa_rank", "questions_per_s")):
    assert r[part][rate] > 0 and r[part]["seconds"] > 0, part
  assert r["caption"]["torch"]["captions_per_s"] > 0
  assert r["caption"]["speedup_vs_torch"] == pytest.approx(r["caption"]["captions_per_s"]
                                                           / r["caption"]["torch"]["captions_per_s"])


CUDA_PYTHON = os.environ.get("BLIP_JAX_CUDA_PYTHON", "")


@pytest.mark.skipif(not CUDA_PYTHON, reason="GPU targets need the CUDA plugin's own venv (5.6 GB, kept out of "
                    "the install; docs/accelerators.md): set BLIP_JAX_CUDA_PYTHON=/opt/cuda_venv/bin/python")
def test_tiny_step_compiles_for_one_h100(tmp_path):
  """`blip-jax compile --topology=h100-1` on this CPU: a tiny pretraining step in bfloat16 with
  cuDNN's fused attention (the ViT's odd token count padded), and XLA's memory figures."""
  out = tmp_path / "h100.json"
  cmd = [CUDA_PYTHON, "-c", "import sys; from blip_jax.cli import main; sys.argv[0] = 'blip-jax'; main()", "compile",
         "--config=configs/pretrain.py:tiny", "--topology=h100-1", f"--json={out}", "--config.model.dtype=bfloat16",
         "--config.model.attention=cudnn", "--config.mesh.data=1",
         # :tiny trains a SentencePiece vocab on its data (ids from it); without data, BERT's ids fit this one
         "--config.model.text.vocab_size=30524"]
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["topology"] == "h100-1" and r["attention"] == "cudnn" and r["fits"] and r["temporaries"] > 0
  assert r["flops_per_device"] > 0  # counted on the CPU (aot.step_flops): GPU compiles report none
