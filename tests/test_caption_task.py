"""Caption fine-tuning and evaluation (issue 10): the metric wiring equals pycocoevalcap's own
COCOEvalCap; references from a Karpathy JSON equal a COCO-format GT file; a tiny captioner
fine-tuned on COCO-mini raises held-out CIDEr far above its start, logs metrics and captioned
images to TensorBoard, keeps the best checkpoint, and `eval caption` reproduces its figures."""
import json
import os
import random
import sys

import numpy as np
import pytest
from conftest import COCO, ODD, small_copies

TEST_JSON = os.path.join(COCO, "captions_karpathy_test.json")


def coco_gt_file(path, entries):
  """A COCO-format reference file as the official coco_karpathy_*_gt.json, written here by plain
  code: image ids from the file names' numbers (the official rule), one annotation per caption."""
  images, anns = [], []
  for e in entries:
    iid = int(os.path.basename(e["image"]).split("_")[-1].split(".")[0])
    images.append({"id": iid})
    for c in e["caption"]:
      anns.append({"image_id": iid, "caption": c, "id": len(anns)})
  with open(path, "w") as f:
    json.dump({"images": images, "annotations": anns, "type": "captions", "info": {}, "licenses": []}, f)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
  """The first 60 images of COCO-mini's test half, their COCO-format GT, and candidates: a
  reference of each image (perfect), of another image (shuffled), and a random mix of the two."""
  entries = json.load(open(TEST_JSON))[:60]
  d = tmp_path_factory.mktemp("capsplit")
  coco_gt_file(str(d / "gt.json"), entries)
  with open(d / "ann.json", "w") as f:
    json.dump(entries, f)
  ids = [e["image_id"] for e in entries]
  perfect = {i: e["caption"][0] for i, e in zip(ids, entries)}
  order = ids[1:] + ids[:1]
  shuffled = {i: perfect[j] for i, j in zip(ids, order)}
  rnd = random.Random(0)
  mixed = {i: (perfect[i] if rnd.random() < 0.5 else shuffled[i]) for i in ids}
  return d, entries, perfect, shuffled, mixed


def direct_cocoevalcap(gt_file, candidates, monkeypatch):
  """pycocoevalcap's own flow (COCO + loadRes + COCOEvalCap.evaluate) without SPICE, whose jars
  are not here (SPICE is replaced by a scorer that reports nothing)."""
  import pycocoevalcap.eval as E
  from pycocotools.coco import COCO as CocoApi

  from blip_jax.metrics.caption import use_packaged_java

  class NoSpice:
    def compute_score(self, gts, res):
      return 0.0, [0.0] * len(gts)

    def method(self):
      return "SPICE"
  monkeypatch.setattr(E, "Spice", NoSpice)
  use_packaged_java()
  coco = CocoApi(gt_file)
  res = coco.loadRes([{"image_id": i, "caption": c} for i, c in candidates.items()])
  ev = E.COCOEvalCap(coco, res)
  ev.params["image_id"] = res.getImgIds()
  ev.evaluate()
  return ev


def test_metrics_equal_cocoevalcap_and_gt_files_agree(split, monkeypatch):
  from blip_jax.metrics.caption import score_captions
  from blip_jax.tasks.caption import read_caption_set
  d, entries, perfect, shuffled, mixed = split
  # references from the Karpathy JSON equal those of the COCO-format file, image by image; the
  # file-name rule gives the same ids as the annotations' image_id field
  from_json = read_caption_set(str(d / "ann.json"), COCO)
  from_gt = read_caption_set(str(d / "ann.json"), COCO, gt=str(d / "gt.json"))
  assert from_json.references == from_gt.references and len(from_json.references) == 60
  names = read_caption_set(str(d / "ann.json"))  # ids from the file names
  no_field = [{k: v for k, v in e.items() if k != "image_id"} for e in entries]
  (d / "nofield.json").write_text(json.dumps(no_field))
  assert read_caption_set(str(d / "nofield.json")).image_ids == names.image_ids == [e["image_id"] for e in entries]

  from blip_jax.metrics.caption import spice_jars
  assert not all(os.path.exists(j) for j in spice_jars()), "this test checks a machine without the CoreNLP jars"
  # candidates in an order of descending ids: per-image scores must follow the ids, not a sorted
  # order (pycocoevalcap returns them in the order of the dict it is given)
  mixed = dict(sorted(mixed.items(), reverse=True))
  assert list(mixed) != sorted(mixed)
  ours = score_captions(from_json.references, mixed, spice="auto")
  ref = direct_cocoevalcap(str(d / "gt.json"), mixed, monkeypatch)
  for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
    # the mean: COCOEvalCap sums in its file's order, ours in the candidates' (the last bit may differ)
    assert ours["metrics"][name] == pytest.approx(ref.eval[name], rel=1e-12, abs=0), name
    for i in mixed:  # every image's score, not only the mean: exactly
      assert ours["per_image"][name][i] == ref.imgToEval[i][name], (name, i)
  # SPICE without its jars: reported as skipped, naming them, the other metrics computed
  assert "SPICE" not in ours["metrics"] and "stanford-corenlp-3.6.0" in ours["skipped"]["SPICE"]

  # the images given one of their own references score higher than those given another image's,
  # on every metric (one scoring of the mixed set: each Java start costs seconds)
  own = [i for i in mixed if mixed[i] == perfect[i]]
  other = [i for i in mixed if mixed[i] != perfect[i]]
  assert len(own) > 20 and len(other) > 20
  for name, per in ours["per_image"].items():
    good, bad = np.mean([per[i] for i in own]), np.mean([per[i] for i in other])
    assert good > bad + 0.1, (name, good, bad)


# ---- fine-tuning a tiny captioner on COCO-mini ---------------------------------------------------
@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  """configs/caption.py:demo (COCO-mini val half, 1000 pairs; scored on the test half), shortened
  to 6 epochs at a higher learning rate (suite time), evaluated before the first step and after."""
  from blip_jax.train.trainer import train
  from configs.caption import get_config
  c = get_config("demo")
  c.epochs, c.optim.lr = 6, 3e-3
  # 128 px copies of the photos for the 64 px model: decoding 640 px JPEGs would set the pace
  names = [e["image"] for f in ("captions_karpathy_val.json", "captions_karpathy_test.json")
           for e in json.load(open(os.path.join(COCO, f)))]
  small = str(small_copies(names, tmp_path_factory.mktemp("capft_images")))
  c.data.source.image_root = c.eval.image_root = small
  c.eval.at_start, c.eval.every_epochs, c.log_every = True, 6, 50
  work = str(tmp_path_factory.mktemp("capft") / "w")
  result = train(c, work)
  return work, result, small


def test_finetuning_raises_cider_and_logs_to_tensorboard(finetuned):
  work, result, _ = finetuned
  rows = [json.loads(x) for x in open(os.path.join(work, "metrics.jsonl"))]
  evals = [r for r in rows if "eval/val/CIDEr" in r]
  assert [r["epoch"] for r in evals] == [0, 6]
  start, end = evals[0], evals[-1]
  # measured here: CIDEr 0.007 -> 0.074, BLEU-4 0.000 -> 0.030 (the random model repeats one word)
  assert start["eval/val/CIDEr"] < 0.02 and end["eval/val/CIDEr"] > max(0.05, 5 * start["eval/val/CIDEr"]), (start, end)
  assert end["eval/val/Bleu_4"] > start["eval/val/Bleu_4"] + 0.015
  train_rows = [r for r in rows if "loss_lm" in r]
  assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 1.0 and "loss_itc" not in train_rows[0]
  best = json.load(open(os.path.join(work, "best", "best.json")))
  assert best["epoch"] == 6 and best["metric"] == "val/CIDEr+Bleu_4"
  assert best["value"] == pytest.approx(end["eval/val/CIDEr"] + end["eval/val/Bleu_4"])

  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(os.path.join(work, "tb"), size_guidance={"images": 0, "tensors": 0})
  acc.Reload()
  tags = acc.Tags()
  scalars = set(tags["scalars"]) | set(tags["tensors"])
  for name in ("eval/val/CIDEr", "eval/val/Bleu_4", "eval/val/METEOR", "eval/val/CIDEr+Bleu_4", "loss"):
    assert name in scalars, (name, sorted(scalars))
  images = tags["images"] or [t for t in tags["tensors"] if t.endswith("captions")]
  assert any(t.startswith("eval/val/captions") for t in images), tags
  steps = {e.step for e in acc.Images("eval/val/captions")} if tags["images"] else {
      e.step for t in tags["tensors"] if t == "eval/val/captions" for e in acc.Tensors(t)}
  assert steps == {0, 6 * 62}


def test_eval_caption_cli_reproduces_the_training_figures(finetuned, tmp_path, monkeypatch, capsys):
  """`blip-jax eval caption` on the best checkpoint (8 local devices) gives the trainer's figures;
  writes the COCO results file, metrics.json and the HTML page worst-CIDEr first; an undecodable
  image is reported and counted; NoCaps-style annotations give the server file alone."""
  from blip_jax import cli
  work, result, small = finetuned
  entries = json.load(open(TEST_JSON))
  bad = dict(entries[0], image=os.path.join(ODD, "truncated_jpeg.jpg"), image_id=1)
  (tmp_path / "ann.json").write_text(json.dumps(entries + [bad]))
  out = tmp_path / "out"
  monkeypatch.setattr(sys, "argv", ["blip-jax"])
  cli.main(["eval", "caption", "--model", os.path.join(work, "best"), "--annotations", str(tmp_path / "ann.json"),
            "--image-root", small, "--out", str(out), "--html", "--quiet", "--batch-size", "64"])
  metrics = json.loads((out / "metrics.json").read_text())
  best = json.load(open(os.path.join(work, "best", "best.json")))
  for name in ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L"):
    assert metrics[name] == pytest.approx(best["metrics"][f"val/{name}"], abs=1e-9), name
  assert metrics["captioned"] == len(entries) and metrics["images"] == len(entries) + 1
  assert [s["path"] for s in metrics["skipped_images"]] == [bad["image"]]
  assert "SPICE" in metrics["skipped_metrics"]
  assert metrics["stats"]["decoding"] == {"num_beams": 3, "max_length": 20, "min_length": 5,
                                          "repetition_penalty": 1.0, "length_penalty": 1.0,
                                          "length_normalization": "official", "prompt": "a picture of "}
  results = json.loads((out / "captions.json").read_text())
  assert [r["image_id"] for r in results] == [e["image_id"] for e in entries]
  assert all(set(r) == {"image_id", "caption"} and r["caption"] for r in results)
  page = (out / "captions.html").read_text()
  import re
  rows = re.findall(r"<tr><td><img src=\"data:image/jpeg;base64,[^\"]+\" alt=\"[^\"]*\"></td><td>(\d+)</td><td>([\d.]+)</td>",
                    page)
  assert sorted(int(i) for i, _ in rows) == sorted(e["image_id"] for e in entries)  # every image, with its picture
  scores = [float(v) for _, v in rows]
  assert scores == sorted(scores) and len(set(scores)) > 5  # worst CIDEr first
  assert np.mean(scores) == pytest.approx(100 * metrics["CIDEr"], abs=0.1)

  with pytest.raises(SystemExit):  # an existing --out is refused without --overwrite
    cli.main(["eval", "caption", "--model", os.path.join(work, "best"), "--annotations", str(tmp_path / "ann.json"),
              "--image-root", small, "--out", str(out)])
  nocaps = [{"image": e["image"], "img_id": 1000 + n} for n, e in enumerate(entries[:6])]
  (tmp_path / "nocaps.json").write_text(json.dumps(nocaps))
  cli.main(["eval", "caption", "--model", os.path.join(work, "best"), "--annotations", str(tmp_path / "nocaps.json"),
            "--image-root", small, "--out", str(tmp_path / "nc"), "--nocaps", "--quiet"])
  nc = json.loads((tmp_path / "nc" / "metrics.json").read_text())
  assert [r["image_id"] for r in json.loads((tmp_path / "nc" / "captions.json").read_text())] == list(range(1000, 1006))
  assert nc["stats"]["decoding"]["repetition_penalty"] == 1.1 and "no references" in nc["skipped_metrics"]["all"]


def test_caption_step_loss_and_start_from_a_pretraining_model(vocab_path):
  """The caption step's loss equals a plain NumPy label-smoothed cross-entropy over the decoder's
  logits with [DEC] first and the prompt's 4 tokens ([DEC] a picture of) and padding not targets;
  a pretraining model becomes the caption model with the decoder's self-attention (its LM logits
  unchanged)."""
  import jax
  import jax.numpy as jnp

  from blip_jax.api import BlipModel
  from blip_jax.checkpoints.retarget import retarget
  from blip_jax.models.config import BlipConfig, TextConfig, VisionConfig
  from blip_jax.models.init import init_params
  from blip_jax.objectives import caption_lm as _caption_forward
  from blip_jax.tokenizers import BertTokenizer
  from blip_jax.train.step import LossConfig
  tok = BertTokenizer(vocab_path)
  v = VisionConfig(width=32, depth=1, heads=2, mlp_dim=64, patch=16, image_size=32)
  t = TextConfig(width=32, depth=2, heads=2, mlp_dim=64, max_positions=40, dropout=0.0)
  pre = BlipConfig(kind="pretrain", vision=v, text=t, embed_dim=16)
  cap = BlipConfig(kind="caption", vision=v, text=t)
  params = init_params(pre, jax.random.PRNGKey(1))
  cap_params, _ = retarget(params, {}, "pretrain", "caption")
  rng = np.random.RandomState(0)
  pixels = rng.randn(3, 32, 32, 3).astype(np.float32)
  ids, mask = tok(["a picture of " + c for c in ("a dog on a couch", "two men", "a red bus in the street at night")],
                  max_length=12)
  ids, mask = np.asarray(ids), np.asarray(mask)
  want = np.asarray(BlipModel(pre, params).lm_logits(pixels, ids, mask))
  got = np.asarray(BlipModel(cap, cap_params).lm_logits(pixels, ids, mask))
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(want).max() > 0.1

  loss, (metrics, _, _) = _caption_forward(cap, LossConfig(label_smoothing=0.1, prompt_length=4), cap_params,
                                           {"image": jnp.asarray(pixels), "text_ids": jnp.asarray(ids),
                                            "text_mask": jnp.asarray(mask)}, jax.random.PRNGKey(0))
  logp = want[:, :-1] - want[:, :-1].max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  total, count = 0.0, 0
  for b in range(3):
    for j in range(4, 12):  # ids[j] is predicted at j - 1; the first 4 tokens are the prompt
      if mask[b, j]:
        total += 0.9 * -logp[b, j - 1, ids[b, j]] + 0.1 * -logp[b, j - 1].mean()
        count += 1
  assert count == sum(int(mask[b].sum()) - 4 for b in range(3))
  np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)
  assert metrics["loss_lm"] == loss
