"""Input pipelines: every source on local data, exact coverage over hosts, identical resume,
transforms against PIL, bad data skipped and counted."""
import json
import os

import numpy as np
import pytest
from conftest import COCO, ODD
from PIL import Image, ImageOps

import blip_jax.data as D
from blip_jax.data import transforms as T
from blip_jax.preprocess import CLIP_MEAN, CLIP_STD
from blip_jax.tokenizers import BertTokenizer, pre_caption, pre_question

ANN = os.path.join(COCO, "captions_karpathy_test.json")


@pytest.fixture(scope="module")
def tok(vocab_path):
  return BertTokenizer(vocab_path)


def collect(pipe, n_batches=None):
  out = []
  try:
    while n_batches is None or len(out) < n_batches:
      out.append(next(pipe))
  except StopIteration:
    pass
  return out


@pytest.fixture(scope="module")
def small_json(tmp_path_factory):
  """40 COCO-mini images, one entry per caption (Karpathy-train style)."""
  with open(ANN) as f:
    ann = json.load(f)[:40]
  d = tmp_path_factory.mktemp("json")
  entries = [{"image": a["image"], "caption": c, "image_id": str(a["image_id"])} for a in ann for c in a["caption"][:2]]
  (d / "train.json").write_text(json.dumps(entries))
  return str(d / "train.json")


def test_json_source_batches(small_json, tok):
  src = D.JsonSource(small_json, COCO)
  assert src.task == "caption" and len(src) == 80
  p = D.InputPipeline(src, tok, dict(batch_size=8, image_size=32, text_length=30))
  b = next(p)
  assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8
  assert b["text_ids"].shape == (8, 30) and (b["text_ids"][:, 0] == 101).all()
  assert p.steps_per_epoch == 10 and p.state()["position"] == 8
  assert all(tok.decode(r) for r in b["text_ids"])
  assert_shapes_match(b, "caption", dict(image_size=32, text_length=30), 8)


def assert_shapes_match(batch, task, cfg, n):
  """D.batch_shapes (what ahead-of-time compiles build their abstract batch from) names every
  array of a real training batch, with its shape and dtype."""
  want = {k: (tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in D.batch_shapes(task, cfg, n).items()}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == want


def test_two_hosts_cover_every_example_once(tok):
  src = D.SyntheticSource(50, 16)
  seen = []
  for h in range(2):
    p = D.InputPipeline(src, tok, dict(batch_size=5, image_size=16, randaug=False),
                        process_index=h, process_count=2)
    for b in collect(p, p.steps_per_epoch):
      seen += list(b["image_id"])
    assert p.epoch == 0
  assert sorted(seen) == sorted(src.group_ids.tolist())  # every example exactly once (ids: caption groups)
  assert len(set(src.group_ids.tolist())) > 25
  # the next epoch is another permutation
  p = D.InputPipeline(src, tok, dict(batch_size=5, image_size=16, randaug=False), process_index=0, process_count=2)
  e0 = [list(b["image_id"]) for b in collect(p, 5)]
  e1 = [list(b["image_id"]) for b in collect(p, 5)]
  assert p.epoch == 1 and e0 != e1 and len(set(sum(e1, []))) == 25  # a new permutation, split anew
  # a global batch on two hosts (host 0's rows, then host 1's) is one host's batch, row for row: a
  # run on two hosts trains on what one host would (3 epochs of 5 batches of 10, 50 examples)
  one = D.InputPipeline(src, tok, dict(batch_size=10, image_size=16, randaug=False))
  two = [D.InputPipeline(src, tok, dict(batch_size=5, image_size=16, randaug=False), process_index=h,
                         process_count=2) for h in range(2)]
  for _ in range(15):
    want = next(one)
    got = [next(p) for p in two]
    np.testing.assert_array_equal(np.concatenate([g["index"] for g in got]), want["index"])
    np.testing.assert_array_equal(np.concatenate([g["image"] for g in got]), want["image"])


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def assert_resumes(src, tok, cfg, before, after):
  """A pipeline restored from another's state after `before` batches gives the next `after`
  batches of an uninterrupted one, every array equal."""
  straight = collect(D.InputPipeline(src, tok, cfg), before + after)
  p = D.InputPipeline(src, tok, cfg)
  collect(p, before)
  r = D.InputPipeline(src, tok, cfg)
  r.restore(p.state())
  for a, b in zip(straight[before:], collect(r, after), strict=True):
    _same(a, b)


def test_resume_mid_epoch_is_identical(small_json, tok):
  cfg = dict(batch_size=8, image_size=32)
  src = D.JsonSource(small_json, COCO)
  straight = collect(D.InputPipeline(src, tok, cfg), 14)  # crosses the epoch boundary at 10
  p = D.InputPipeline(src, tok, cfg)
  collect(p, 6)
  state = p.state()
  resumed = D.InputPipeline(src, tok, cfg)
  resumed.restore(json.loads(json.dumps(state)))  # the state survives JSON (checkpoint metadata)
  for a, b in zip(straight[6:], collect(resumed, 8)):
    _same(a, b)
  assert resumed.epoch == 1


def test_two_hosts_resume_each_at_its_own_position(tmp_path, tok):
  """Each host's input state is its own: hosts skip different numbers of bad examples, so their
  positions differ, and a host restored from its state yields exactly its uninterrupted batches
  (a pipeline that resumed every host at one shared or global position would not). 2 hosts, 24
  examples of which 4 have empty captions, batches of 3; states saved after 2 batches."""
  imgs = sorted(os.listdir(os.path.join(COCO, "images")))[:24]
  entries = [{"image": f"images/{f}", "caption": f"a photo number {i}"} for i, f in enumerate(imgs)]
  for i in (1, 3, 5, 9):
    entries[i]["caption"] = " ... "  # empty after pre_caption: skipped
  (tmp_path / "a.json").write_text(json.dumps(entries))
  src = D.JsonSource(str(tmp_path / "a.json"), COCO)
  pipe = lambda h: D.InputPipeline(src, tok, dict(batch_size=3, image_size=16, randaug=False),
                                   process_index=h, process_count=2)
  states, seen = [], []
  for h in range(2):
    straight = collect(pipe(h), 4)
    p = pipe(h)
    collect(p, 2)
    state = json.loads(json.dumps(p.state()))  # as it travels in checkpoint metadata
    resumed = pipe(h)
    resumed.restore(state)
    for a, b in zip(straight[2:], collect(resumed, 2)):
      _same(a, b)
    states.append(state)
    seen.append({int(i) for b in straight[:2] for i in b["index"]})
  assert states[0]["position"] != states[1]["position"], states  # the hosts skipped different numbers
  assert not seen[0] & seen[1]  # and read different examples


def test_tfrecord_shards_from_make_shards(small_json, tok, tmp_path):
  from blip_jax.data.shards import make_shards
  stats = make_shards([small_json], COCO, str(tmp_path / "shards"), per_shard=25, workers=2, progress=False)
  assert stats == {"shards": 4, "written": 80, "missing_images": 0, "already_done": 0}
  again = make_shards([small_json], COCO, str(tmp_path / "shards"), per_shard=25, workers=2, progress=False)
  assert again["already_done"] == 4  # resumable per shard
  with pytest.raises(ValueError, match="other settings.*per_shard.*25, 10"):  # would cut the entries differently
    make_shards([small_json], COCO, str(tmp_path / "shards"), per_shard=10, workers=2, progress=False)
  assert not [f for f in os.listdir(tmp_path / "shards") if ".tmp" in f]  # nothing half-written left
  src = D.TFRecordSource(str(tmp_path / "shards" / "*.tfrecord"), shuffle_buffer=16)
  cfg = dict(batch_size=8, image_size=32)
  for hosts in (1, 2):
    ids = []
    for h in range(hosts):
      p = D.InputPipeline(src, tok, dict(cfg, batch_size=1), process_index=h, process_count=hosts)
      while True:
        b = next(p)
        if p.epoch > 0:  # that batch already belongs to epoch 1
          break
        ids += [tuple(r) for r in b["text_ids"]]
    assert len(ids) == 80
  assert_resumes(src, tok, cfg, before=3, after=4)


def test_tfds_builder_from_manual_dir(tmp_path, tok):
  import tensorflow_datasets as tfds

  from blip_jax.data.tfds_builders import BlipCocoKarpathy
  manual = tmp_path / "manual"
  manual.mkdir()
  with open(ANN) as f:
    ann = json.load(f)[:12]
  (manual / "coco_karpathy_test.json").write_text(json.dumps(ann))
  os.symlink(os.path.join(COCO, "images"), manual / "images")
  b = BlipCocoKarpathy(data_dir=str(tmp_path / "tfds"))
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  assert b.info.splits["test"].num_examples == 12
  src = D.TFDSSource("blip_coco_karpathy", split="test", data_dir=str(tmp_path / "tfds"), shuffle_buffer=4)
  p = D.InputPipeline(src, tok, dict(batch_size=4, image_size=32))
  batches = collect(p, 3)
  assert p.epoch == 0 and sorted(np.concatenate([x["image_id"] for x in batches]).tolist()) == list(range(12))


def test_synthetic_source_is_deterministic_and_varied(tok):
  a, b = D.SyntheticSource(30, 32), D.SyntheticSource(30, 32)
  assert a.captions == b.captions and a.images == b.images
  assert len(set(a.captions)) > 20
  val = D.SyntheticSource(30, 32, split="val")
  assert val.images != a.images


def _pil_eval(path, size):
  img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
  return np.asarray(img.resize((size, size), Image.BICUBIC)).astype(np.float32)


def test_eval_transform_against_pil_and_odd_jpegs(tmp_path, tok):
  with open(os.path.join(ODD, "manifest.json")) as f:
    manifest = json.load(f)
  entries = [{"image": m["file"], "caption": [f"picture {i}"]} for i, m in enumerate(manifest)]
  (tmp_path / "odd.json").write_text(json.dumps(entries))
  src = D.JsonSource(str(tmp_path / "odd.json"), ODD)
  p = D.InputPipeline(src, tok, dict(batch_size=32, image_size=48, train=False))
  batches = collect(p)  # eval: one pass, then StopIteration
  assert len(batches) == 1
  b = batches[0]
  n_ok = sum(m["decodes_with_pillow"] for m in manifest)
  assert int(b["valid"].sum()) == n_ok == len(manifest) - 1
  assert p.skipped == 1  # the truncated JPEG
  for img, idx in zip(b["image"][:n_ok], b["index"][:n_ok]):
    m = manifest[idx]
    ref = _pil_eval(os.path.join(ODD, m["file"]), 48)
    # bicubic resize, TF (antialiased Keys a=-0.5) vs PIL: stated tolerance mean |diff| < 3 of 255
    assert np.abs(img.astype(np.float32) - ref).mean() < 3.0, m["file"]
  assert "truncated_jpeg.jpg" not in [manifest[i]["file"] for i in b["index"][:n_ok]]


def test_train_transform_properties():
  data = open(os.path.join(COCO, "images", sorted(os.listdir(os.path.join(COCO, "images")))[0]), "rb").read()
  import tensorflow as tf
  seed = tf.constant([1, 2], tf.int64)
  a = T.decode_train(tf.constant(data), seed, 64).numpy()
  b = T.decode_train(tf.constant(data), seed, 64).numpy()
  c = T.decode_train(tf.constant(data), seed + 5, 64).numpy()
  np.testing.assert_array_equal(a, b)  # same seed, same pixels
  assert np.abs(a.astype(int) - c).mean() > 5  # another seed, another crop
  # the crop sampler follows torchvision: area within scale, aspect within (3/4, 4/3)
  for s in range(50):
    y, x, ch, cw = (int(v) for v in T.sample_crop(tf.constant([s, 0], tf.int64), 480, 640, (0.2, 1.0)))
    assert 0 <= y and y + ch <= 480 and 0 <= x and x + cw <= 640
    assert 0.19 <= ch * cw / (480 * 640) <= 1.0


def test_randaugment_ops():
  rng = np.random.RandomState(0)
  img = Image.fromarray(rng.randint(40, 200, (32, 32, 3)).astype(np.uint8))
  # u = (op, apply, sign) per draw; op index = int(u * 10)
  def aug(op1, op2=0, sign=0.9):
    return np.asarray(T.pil_rand_augment(img, [op1 / 10 + 0.01, 0.1, sign, op2 / 10 + 0.01, 0.1, sign]))
  np.testing.assert_array_equal(aug(4), np.asarray(ImageOps.equalize(img)))
  np.testing.assert_array_equal(aug(1), np.asarray(ImageOps.autocontrast(img)))
  shifted = aug(7)  # TranslateX +5 px, fill 128
  np.testing.assert_array_equal(shifted[:, 5:], np.asarray(img)[:, :-5])
  assert (shifted[:, :5] == 128).all()
  np.testing.assert_array_equal(aug(7, 7)[:, 10:], np.asarray(img)[:, :-10])  # two warps composed into one
  np.testing.assert_array_equal(aug(0), np.asarray(img))  # Identity
  skipped = np.asarray(T.pil_rand_augment(img, [0.71, 0.9, 0.9, 0.51, 0.7, 0.9]))  # p=0.5 not drawn
  np.testing.assert_array_equal(skipped, np.asarray(img))
  rot = aug(9)  # Rotate +15 deg about the centre: the centre pixel stays
  assert np.abs(rot[14:18, 14:18].astype(int) - np.asarray(img)[14:18, 14:18]).mean() < 40
  assert (rot[0, 0] == 128).all()


def test_normalisation_is_exact():
  from blip_jax.preprocess import normalize
  x = np.random.RandomState(0).randint(0, 256, (2, 4, 4, 3)).astype(np.uint8)
  ref = (x.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
  np.testing.assert_array_equal(normalize(x), ref)


@pytest.mark.parametrize("raw", [
    "A Dog.  Running!!", 'He said: "hi" (twice) * # ~ ;end', "Commas, apostrophes' hyphen-ated? slash/kept",
    "  leading and trailing  \n", "MiXeD Case ÉLAN", "one two three four five six"])
def test_tf_text_cleaning_equals_python(raw):
  import tensorflow as tf
  assert T.tf_pre_caption(tf.constant(raw), 5).numpy().decode() == pre_caption(raw, 5)
  assert T.tf_pre_question(tf.constant(raw)).numpy().decode() == pre_question(raw)


def test_bad_examples_are_skipped_and_counted(tmp_path, tok):
  imgs = sorted(os.listdir(os.path.join(COCO, "images")))[:12]
  entries = [{"image": f"images/{f}", "caption": f"a photo number {i}"} for i, f in enumerate(imgs)]
  entries[2]["image"] = "images/does_not_exist.jpg"  # missing file
  entries[5]["caption"] = " ... "  # empty after pre_caption
  entries[7]["image"] = os.path.join(ODD, "truncated_jpeg.jpg")  # undecodable
  (tmp_path / "bad.json").write_text(json.dumps(entries))
  src = D.JsonSource(str(tmp_path / "bad.json"), COCO)
  p = D.InputPipeline(src, tok, dict(batch_size=3, image_size=32, train=False))
  got = collect(p)  # one pass
  assert p.skipped == 3
  assert sum(int(b["valid"].sum()) for b in got) == 9
  p = D.InputPipeline(src, tok, dict(batch_size=3, image_size=32))  # training: counted as it goes
  got = collect(p, 4)
  assert p.epoch == 1 and 3 <= p.skipped <= 6  # epoch 0's three, plus any bad ones early in epoch 1
  # non-UTF-8 text from a shard
  import tensorflow as tf
  assert not bool(T.is_valid_utf8(tf.constant(b"caf\xe9")))


def test_all_bad_source_fails_clearly(tmp_path, tok):
  (tmp_path / "bad.json").write_text(json.dumps([{"image": f"nope{i}.jpg", "caption": "x"} for i in range(6)]))
  p = D.InputPipeline(D.JsonSource(str(tmp_path / "bad.json"), str(tmp_path)), tok, dict(batch_size=2, image_size=16))
  with pytest.raises(ValueError, match="every example of epoch 0 was bad"):
    next(p)


def test_vqa_and_nlvr_sources(tmp_path, tok):
  with open(os.path.join(COCO, "vqa_v2_subset.json")) as f:
    vqa = json.load(f)[:8]
  (tmp_path / "vqa.json").write_text(json.dumps(vqa))
  src = D.JsonSource(str(tmp_path / "vqa.json"), COCO)
  assert src.task == "vqa"
  b = next(D.InputPipeline(src, tok, dict(batch_size=4, image_size=32, text_length=35)))
  assert b["question_ids"].shape == (4, 35) and b["answer_ids"].shape[:2] == (4, 10)
  np.testing.assert_allclose(b["answer_weights"].sum(1), 1.0, atol=1e-5)  # VQA: count / 10
  assert_shapes_match(b, "vqa", dict(image_size=32, text_length=35), 4)
  imgs = sorted(os.listdir(os.path.join(COCO, "images")))
  nlvr = [{"images": [f"images/{imgs[i]}", f"images/{imgs[i + 1]}"], "sentence": "The left image has a dog.",
           "label": "True" if i % 2 else "False"} for i in range(4)]
  (tmp_path / "nlvr.json").write_text(json.dumps(nlvr))
  b = next(D.InputPipeline(D.JsonSource(str(tmp_path / "nlvr.json"), COCO), tok, dict(batch_size=4, image_size=32)))
  assert b["image2"].shape == (4, 32, 32, 3) and sorted(b["label"].tolist()) == [0, 0, 1, 1]
  assert_shapes_match(b, "nlvr", dict(image_size=32), 4)


@pytest.mark.parametrize("k", [3, 6, 8])
def test_train_transform_applies_exif_orientation(k):
  """Bug: EXIF orientation ignored on the training path (only the eval path was checked). The
  whole-image crop (scale 1, a square photo), no flip, no RandAugment: a rotated file gives the
  upright photo's pixels, and far from what an unrotated reading would give."""
  import tensorflow as tf
  seed = tf.constant([3, 4], tf.int64)
  read = lambda f: T.decode_train(tf.constant(open(os.path.join(ODD, f), "rb").read()), seed, 64, (1.0, 1.0),
                                  False, False).numpy().astype(np.float32)
  ref, got = read("hopper.jpg"), read(f"hopper_orientation_{k}.jpg")
  assert np.abs(got - ref).mean() < 8  # JPEG noise only
  raw = np.asarray(Image.open(os.path.join(ODD, f"hopper_orientation_{k}.jpg")).convert("RGB").resize((64, 64), Image.BICUBIC))
  assert np.abs(raw.astype(np.float32) - ref).mean() > 20  # the stored pixels, unrotated, are far off


def test_dropped_remainder_is_not_counted_as_skipped(tmp_path, tok):
  """Bug: an epoch's partial last batch counted as bad data. 10 good examples, batches of 4: two
  batches an epoch, the remaining 2 dropped (as the official drop_last), and nothing skipped over
  three epochs; one bad example among them: exactly one skipped per epoch."""
  imgs = sorted(os.listdir(os.path.join(COCO, "images")))[:10]
  entries = [{"image": f"images/{f}", "caption": f"a photo number {i}"} for i, f in enumerate(imgs)]
  (tmp_path / "good.json").write_text(json.dumps(entries))
  p = D.InputPipeline(D.JsonSource(str(tmp_path / "good.json"), COCO), tok, dict(batch_size=4, image_size=32))
  got = collect(p, 7)  # epochs 0-2 and the first batch of epoch 3
  assert p.epoch == 3 and p.skipped == 0, (p.epoch, p.skipped)
  assert all(len(set(b["index"])) == 4 for b in got)
  entries[4]["caption"] = " ... "  # empty after pre_caption
  (tmp_path / "one_bad.json").write_text(json.dumps(entries))
  p = D.InputPipeline(D.JsonSource(str(tmp_path / "one_bad.json"), COCO), tok, dict(batch_size=4, image_size=32))
  collect(p, 7)
  assert p.epoch == 3 and 3 <= p.skipped <= 4, p.skipped  # one per finished epoch (+1 if epoch 3's batch passed it)


def img2dataset_tar(path, samples):
  """A shard in img2dataset's webdataset layout, written with tarfile here (not our writer):
  NNNNNNNNN.jpg + .txt + .json per sample; a sample given without "txt" has no text member."""
  import io
  import tarfile
  with tarfile.open(path, "w") as tar:
    for s in samples:
      for ext in ("jpg", "txt", "json"):
        if ext not in s:
          continue
        data = s[ext] if isinstance(s[ext], bytes) else s[ext].encode()
        info = tarfile.TarInfo(f"{s['key']}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_webdataset_tar_shards_read_in_place(tmp_path, tok):
  """img2dataset `.tar` shards: every good sample once per epoch over 1 and 2 hosts (by its text),
  a corrupt image member, a sample with no text and a shard cut off mid-member skipped and counted,
  and a resumed pipeline continues with the same batches."""
  with open(ANN) as f:
    ann = json.load(f)[:30]
  samples = []
  for i, a in enumerate(ann):
    key = f"{i:09d}"
    with open(os.path.join(COCO, a["image"]), "rb") as f:
      jpg = f.read()
    samples.append({"key": key, "jpg": jpg, "txt": f"sample {i} {a['caption'][0]}",
                    "json": json.dumps({"key": key, "caption": a["caption"][0], "status": "success"})})
  samples[3]["jpg"] = b"\xff\xd8 not really a jpeg"  # a corrupt member
  del samples[7]["txt"]  # a sample without its text
  d = tmp_path / "wds"
  d.mkdir()
  img2dataset_tar(str(d / "00000.tar"), samples[:12])
  img2dataset_tar(str(d / "00001.tar"), samples[12:24])
  img2dataset_tar(str(tmp_path / "whole.tar"), samples[24:])
  whole = (tmp_path / "whole.tar").read_bytes()
  (d / "00002.tar").write_bytes(whole[:len(whole) - len(whole) // 3])  # cut off inside a member
  from blip_jax.data import webdataset
  read = list(webdataset.iter_samples(str(d / "00002.tar")))
  assert "error" in read[-1] and all("error" not in s for s in read[:-1]) and 0 < len(read) - 1 < 6
  in_cut = len(read) - 1
  good = {pre_caption(s["txt"], 30) for k, s in enumerate(samples[:24] + samples[24:24 + in_cut])
          if k not in (3, 7)}
  src = D.make_source({"kind": "webdataset", "files": str(d / "*.tar"), "shuffle_buffer": 8})
  assert isinstance(src, D.WebDatasetSource) and len(src.files) == 3
  for hosts in (1, 2):
    texts, skipped = [], 0
    for h in range(hosts):
      p = D.InputPipeline(src, tok, dict(batch_size=1, image_size=32), process_index=h, process_count=hosts)
      while True:
        b = next(p)
        if p.epoch > 0:
          break
        texts += [tok.decode(r) for r in b["text_ids"]]
      skipped += p.skipped
    assert sorted(texts) == sorted(good), hosts
    assert skipped == 3  # the corrupt image, the missing text, the cut-off shard's end
  assert_resumes(src, tok, dict(batch_size=4, image_size=32), before=2, after=4)
