"""The README's main job as a user runs it: convert a transformers BLIP dir, then score an image."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hf_ref import make_hf

BIN = os.path.join(os.path.dirname(sys.executable), "blip-jax")


def run(*args):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the CLI runs as a user's would: one CPU device
  out = subprocess.run([BIN, *args], capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory, vocab_path):
  d = tmp_path_factory.mktemp("cli")
  hf = make_hf("retrieval", 1e-5, seed=21)
  hf.save_pretrained(d / "hf")
  out = run("convert", str(d / "hf"), str(d / "ours"), "--vocab", vocab_path)
  assert "retrieval model" in out.stdout and "tokenizer: bert" in out.stdout
  return hf, d


def test_convert_and_score_match_transformers(converted, coco, vocab_path):
  hf, d = converted
  image, caps = coco[5]
  texts = [caps[0], "a plate of food on a wooden table"]
  out = run("score", "--model", str(d / "ours"), "--image", image, "--text", texts[0], "--text", texts[1])
  rows = [line.split("\t") for line in out.stdout.strip().splitlines()]
  assert len(rows) == 2
  got_itm = np.array([float(r[2].split("=")[1]) for r in rows])
  got_cos = np.array([float(r[3].split("=")[1]) for r in rows])
  # the reference: transformers on the same image and texts (HF processor pipeline by hand)
  from PIL import Image
  from transformers import BertTokenizer, BlipImageProcessor

  from blip_jax import pre_caption
  tok = BertTokenizer(vocab_path)
  enc = tok([pre_caption(t, 30) for t in texts], padding="max_length", max_length=35, return_tensors="pt")
  pv = BlipImageProcessor(size={"height": 224, "width": 224})(Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    ids = enc["input_ids"].clone()
    ids[:, 0] = 30523
    itm = hf(input_ids=ids, pixel_values=pv.repeat(2, 1, 1, 1), attention_mask=enc["attention_mask"]).itm_score
    ref_itm = torch.softmax(itm, -1)[:, 1].numpy()
    ref_cos = hf(input_ids=enc["input_ids"], pixel_values=pv, attention_mask=enc["attention_mask"],
                 use_itm_head=False).itm_score[0].numpy()
  np.testing.assert_allclose(got_itm, ref_itm, atol=2e-4)  # printed with 4 decimals
  np.testing.assert_allclose(got_cos, ref_cos, atol=2e-4)


def test_convert_back_to_hf(converted):
  hf, d = converted
  run("convert", str(d / "ours"), str(d / "hf_again"), "--to", "hf")
  from transformers import BlipForImageTextRetrieval
  back, info = BlipForImageTextRetrieval.from_pretrained(str(d / "hf_again"), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert os.path.exists(d / "hf_again" / "vocab.txt")


def test_errors_are_one_line(tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([BIN, "convert", str(tmp_path / "missing.pth"), str(tmp_path / "x")],
                       capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 2 and "error:" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("argv,message", [
    (["caption", "--model", "m", "--beams", "3", "--top-p", "0.9", "x.jpg"], "not both"),    # our check
    (["caption", "x.jpg"], "the following arguments are required: --model"),                # argparse's
    (["score", "--model", "/nonexistent/model", "--image", "x.jpg", "--text", "t"], "/nonexistent/model"),
    (["train", "--config=configs/pretrain.py:tiny", "--workdir=/tmp/never", "--config.no_such_key=1"], "no_such_key"),
    (["train", "--config=configs/pretrain.py:tiny"], "usage: blip-jax train"),
    (["eval", "retrieval", "--model", "m", "--annotations", "a.json", "--out", "o", "--image-root", "r",
      "--videos", "v"], "not both"),
])
def test_user_errors_exit_2(argv, message, capsys):
  from blip_jax.cli import main
  with pytest.raises(SystemExit) as e:
    main(argv)
  err = capsys.readouterr().err
  assert e.value.code == 2 and message in err and "Traceback" not in err


def _subcommands(parser, prefix=()):
  import argparse
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for name, sp in action.choices.items():
        nested = list(_subcommands(sp, prefix + (name,)))
        yield from nested or [(prefix + (name,), sp)]


def test_every_subcommand_help_shows_an_example(capsys):
  from blip_jax.cli import build_parser, main
  commands = [cmd for cmd, _ in _subcommands(build_parser())]
  assert ("eval", "nlvr") in commands and ("demo",) in commands and ("checkpoints",) in commands
  for cmd in [c for c in commands if c[0] not in ("train", "compile", "bootstrap")]:
    with pytest.raises(SystemExit) as e:
      main([*cmd, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0, cmd
    assert f"example:\n  blip-jax {' '.join(cmd)} " in out, (cmd, out[-300:])
  for cmd in ("train", "compile", "bootstrap"):  # absl-flag commands: the same shape of help
    main([cmd, "--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: blip-jax {cmd} ") and f"example:\n  blip-jax {cmd} " in out


def test_no_library_banners_unless_verbose(tmp_path, coco):
  """make-shards imports TensorFlow (its oneDNN banner goes through absl's C++ log, which
  TF_CPP_MIN_LOG_LEVEL does not reach): quiet by default; --verbose shows it, so the check is real."""
  import json
  ann = [{"image": os.path.relpath(p, os.path.dirname(coco[0][0])), "caption": c[0]} for p, c in coco[:2]]
  (tmp_path / "a.json").write_text(json.dumps(ann))
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL")}
  outs = {}
  for flag in ([], ["--verbose"]):
    cmd = [BIN, *flag, "make-shards", "--annotations", str(tmp_path / "a.json"), "--image-root",
           os.path.dirname(coco[0][0]), "--out", str(tmp_path / f"s{len(flag)}"), "--per-shard", "2", "--workers", "1"]
    outs[bool(flag)] = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert outs[bool(flag)].returncode == 0, outs[bool(flag)].stderr[-2000:]
    assert "wrote 2 examples in 1 shards" in outs[bool(flag)].stdout
  import re
  lines = [ln for ln in re.split(r"[\r\n]+", outs[False].stderr) if ln.strip()]
  assert all(ln.startswith("shards:") for ln in lines), outs[False].stderr  # our progress bar only
  assert "oneDNN" in outs[True].stderr


def test_train_tokenizer(tmp_path, coco):
  (tmp_path / "c.txt").write_text("\n".join(c for _, caps in coco for c in caps))
  out = run("train-tokenizer", "--input", str(tmp_path / "c.txt"), "--out", str(tmp_path / "spm"),
            "--vocab-size", "400")
  assert "[DEC]=" in out.stdout and os.path.exists(tmp_path / "spm.model")
