"""`blip-jax caption`: folders, globs and files; undecodable files reported in place; captions
equal the API's (whose ids equal transformers', tests/test_generate.py)."""
import json
import os
import shutil

import pytest
from conftest import COCO, ODD
from hf_ref import make_hf

import blip_jax
from blip_jax.cli import main
from blip_jax.image_files import expand_images


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("caption")
  make_hf("caption", 1e-6, seed=31).save_pretrained(d / "model")
  (d / "photos" / "sub").mkdir(parents=True)
  names = sorted(os.listdir(os.path.join(COCO, "images")))[:3]
  shutil.copy(os.path.join(COCO, "images", names[0]), d / "photos" / "a.jpg")
  shutil.copy(os.path.join(COCO, "images", names[1]), d / "photos" / "sub" / "b.jpg")
  shutil.copy(os.path.join(ODD, "truncated_jpeg.jpg"), d / "photos" / "c_broken.jpg")
  (d / "photos" / "notes.txt").write_text("not an image")
  shutil.copy(os.path.join(COCO, "images", names[2]), d / "other.jpg")
  return d


def test_expand_images(setup):
  d = setup
  got = expand_images([str(d / "photos"), str(d / "*.jpg"), str(d / "photos" / "a.jpg")])
  assert got == [str(d / "photos" / "a.jpg"), str(d / "photos" / "c_broken.jpg"),
                 str(d / "photos" / "sub" / "b.jpg"), str(d / "other.jpg")]
  with pytest.raises(FileNotFoundError, match="no such file"):
    expand_images([str(d / "nope")])
  with pytest.raises(FileNotFoundError, match="matches no image"):
    expand_images([str(d / "*.png")])


def test_caption_command(setup, vocab_path, capsys):
  d = setup
  out = d / "captions.jsonl"
  main(["caption", "--model", str(d / "model"), "--vocab", vocab_path, "--beams", "3", "--max-length", "14",
        "--batch-size", "2", "--format", "jsonl", "--output", str(out), "--quiet", str(d / "photos"),
        str(d / "*.jpg")])
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [os.path.basename(r["image"]) for r in rows] == ["a.jpg", "c_broken.jpg", "b.jpg", "other.jpg"]
  assert "cannot decode" in rows[1]["error"]
  err = capsys.readouterr().err
  assert "captioned 3 images, skipped 1" in err
  model = blip_jax.load(str(d / "model"), vocab=vocab_path)
  good = [r for r in rows if "caption" in r]
  want = model.generate(model.preprocess([r["image"] for r in good]), num_beams=3, max_length=14)
  assert [r["caption"] for r in good] == want and all(want)
  assert not [f for f in os.listdir(d) if ".tmp" in f]  # written through a temporary name, renamed
  # an existing output is refused before the model is read, unless --overwrite
  with pytest.raises(SystemExit) as e:
    main(["caption", "--model", str(d / "nope"), "--output", str(out), str(d / "other.jpg")])
  assert e.value.code == 2 and "exists and is not empty; pass --overwrite" in capsys.readouterr().err
  assert [json.loads(line) for line in out.read_text().splitlines()] == rows  # untouched
  # text format, several sampled captions per image, to stdout
  main(["caption", "--model", str(d / "model"), "--vocab", vocab_path, "--top-p", "0.9", "--num-captions", "2",
        "--max-length", "12", "--quiet", str(d / "other.jpg")])
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2 and all(line.startswith(str(d / "other.jpg") + "\t") for line in lines)
  with pytest.raises(SystemExit) as e:  # a usage error: exit 2, one line on stderr
    main(["caption", "--model", str(d / "model"), "--beams", "3", "--top-p", "0.9", str(d / "other.jpg")])
  assert e.value.code == 2 and "not both" in capsys.readouterr().err
