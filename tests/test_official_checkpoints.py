"""Official BLIP .pth files (key layout from ../shared/reference/keys/, tied aliases, momentum
copies and queues included) load and give transformers' outputs."""
import os

import numpy as np
import pytest
import torch
from official_ref import official_state_dict, read_keys, shared_pair

import blip_jax
from blip_jax.checkpoints.torch_io import CheckpointError, read_pth

TOL = 1e-4


@pytest.fixture(scope="module")
def pair():
  return shared_pair()


@pytest.fixture(scope="module")
def batch(pair, coco, vocab_path):
  tok = blip_jax.BertTokenizer(vocab_path)
  ids, mask = tok([coco[0][1][0], coco[3][1][2]], max_length=16)
  pixels = blip_jax.preprocess.preprocess([coco[0][0], coco[3][0]], 224)
  return pixels, ids, mask


def t(x):
  x = np.asarray(x)
  return torch.tensor(x.astype(np.int64) if x.dtype.kind in "iu" else x)


def hf_outputs(cap, ret, pixels, ids, mask):
  pv = t(pixels).permute(0, 3, 1, 2)
  enc, dec = ids.copy(), ids.copy()
  enc[:, 0], dec[:, 0] = 30523, 30522
  with torch.no_grad():
    return dict(
        itm=ret(input_ids=t(enc), pixel_values=pv, attention_mask=t(mask)).itm_score.numpy(),
        cos=ret(input_ids=t(ids), pixel_values=pv, attention_mask=t(mask), use_itm_head=False).itm_score.numpy(),
        lm=cap(pixel_values=pv, input_ids=t(dec), attention_mask=t(mask)).logits.numpy())


@pytest.fixture(scope="module")
def pretrain_pth(pair, tmp_path_factory):
  sd = official_state_dict("keys_official_pretrain.txt", *pair)
  path = tmp_path_factory.mktemp("official") / "model_pretrain.pth"
  torch.save({"model": sd, "epoch": 3}, path)
  return str(path), sd


def test_state_dict_matches_key_file(pretrain_pth):
  _, sd = pretrain_pth
  keys = read_keys("keys_official_pretrain.txt")
  assert set(sd) == set(keys) and len(keys) == 456
  assert all(tuple(sd[k].shape) == keys[k][0] for k in keys)


def test_pretrain_checkpoint(pretrain_pth, pair, batch):
  path, sd = pretrain_pth
  model = blip_jax.load(path)
  c = model.config
  assert (c.kind, c.vision.width, c.vision.depth, c.vision.heads, c.vision.image_size) == ("pretrain", 192, 4, 3, 224)
  assert (c.text.width, c.text.depth, c.text.heads, c.vision.layer_norm_eps) == (192, 4, 3, 1e-6)
  ref = hf_outputs(*pair, *batch)
  pixels, ids, mask = batch
  assert np.abs(np.asarray(model.itm_logits(*batch)) - ref["itm"]).max() <= TOL
  cos = np.asarray(model.image_feat(pixels)) @ np.asarray(model.text_feat(ids, mask)).T
  assert np.abs(cos - ref["cos"]).max() <= TOL
  assert np.abs(np.asarray(model.lm_logits(*batch)) - ref["lm"]).max() <= TOL
  # temp, momentum copies and queues are kept (pretraining resumes from them)
  assert float(model.params["temp"]) == pytest.approx(0.05)
  mom = model.extras["momentum"]
  np.testing.assert_array_equal(mom["visual_encoder"]["blocks_1"]["fc1"]["kernel"],
                                sd["visual_encoder_m.blocks.1.mlp.fc1.weight"].numpy().T)
  np.testing.assert_array_equal(mom["text_encoder"]["layer_2"]["cross_attn"]["key"]["kernel"],
                                sd["text_encoder_m.encoder.layer.2.crossattention.self.key.weight"].numpy().T)
  np.testing.assert_array_equal(model.extras["buffers"]["image_queue"], sd["image_queue"].numpy())


@pytest.mark.parametrize("kind", ["caption", "retrieval"])
def test_pretrain_checkpoint_into_task_model(pretrain_pth, pair, batch, kind):
  """Finetuning starts from a pretraining checkpoint: its decoder (caption) or encoder (retrieval)."""
  model = blip_jax.load(pretrain_pth[0], kind=kind)
  ref = hf_outputs(*pair, *batch)
  if kind == "caption":
    assert np.abs(np.asarray(model.lm_logits(*batch)) - ref["lm"]).max() <= TOL
  else:
    assert np.abs(np.asarray(model.itm_logits(*batch)) - ref["itm"]).max() <= TOL


def test_pretrain_checkpoint_into_vqa_model_answers(pretrain_pth, batch, vocab_path):
  """The official VQA fine-tuning starts from a pretraining .pth: its text encoder becomes the
  question encoder and its image-grounded decoder the answer decoder. Loaded so (kind='vqa'), and
  through the trainer's retarget of our pretraining model, the two agree leaf by leaf; it answers."""
  import jax

  from blip_jax.checkpoints.retarget import retarget
  vqa = blip_jax.load(pretrain_pth[0], kind="vqa", vocab=vocab_path)
  assert vqa.config.kind == "vqa"
  pre = blip_jax.load(pretrain_pth[0])
  cap = blip_jax.load(pretrain_pth[0], kind="caption")
  ret = blip_jax.load(pretrain_pth[0], kind="retrieval")
  retargeted, _ = retarget(jax.tree.map(np.asarray, pre.params), {}, "pretrain", "vqa")
  same = lambda a, b: jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))
  assert jax.tree.structure(retargeted) == jax.tree.structure(vqa.params)
  assert same(retargeted, vqa.params)
  assert same(vqa.params["text_encoder"], ret.params["text_encoder"])
  assert same(vqa.params["text_decoder"], cap.params["text_decoder"])
  cands = ["a dog", "two", "red"]
  got = vqa.answer(batch[0], ["What is this?", "How many?"], cands, k=2)
  assert len(got) == 2 and all(a in cands for a in got)
  assert all(isinstance(a, str) for a in vqa.answer(batch[0], ["What is this?", "How many?"]))


@pytest.mark.parametrize("keys_file,kind", [("keys_official_retrieval.txt", "retrieval"),
                                            ("keys_official_decoder.txt", "caption")])
def test_task_checkpoints(pair, batch, tmp_path, keys_file, kind):
  sd = official_state_dict(keys_file, *pair)
  torch.save({"model": sd}, tmp_path / "m.pth")
  model = blip_jax.load(str(tmp_path / "m.pth"))
  assert model.config.kind == kind
  ref = hf_outputs(*pair, *batch)
  if kind == "caption":
    assert np.abs(np.asarray(model.lm_logits(*batch)) - ref["lm"]).max() <= TOL
  else:
    assert np.abs(np.asarray(model.itm_logits(*batch)) - ref["itm"]).max() <= TOL
    assert set(model.extras["buffers"]) == {"image_queue", "text_queue", "idx_queue", "ptr_queue"}


def test_bad_keys_are_listed_together(pair, tmp_path):
  sd = official_state_dict("keys_official_decoder.txt", *pair)
  del sd["text_decoder.bert.encoder.layer.1.output.dense.bias"]
  sd["text_decoder.bert.encoder.layer.2.intermediate.dense.weight"] = torch.zeros(10, 192)
  sd["some_new_head.weight"] = torch.zeros(3)
  torch.save({"model": sd}, tmp_path / "bad.pth")
  with pytest.raises(CheckpointError) as e:
    blip_jax.load(str(tmp_path / "bad.pth"))
  msg = str(e.value)
  assert "1 missing keys" in msg and "text_decoder.bert.encoder.layer.1.output.dense.bias" in msg
  assert "1 mis-shaped keys" in msg and "layer.2.intermediate.dense.weight: checkpoint (10, 192)" in msg
  # unexpected keys are checked once the rest fits
  sd["text_decoder.bert.encoder.layer.1.output.dense.bias"] = torch.zeros(192)
  sd["text_decoder.bert.encoder.layer.2.intermediate.dense.weight"] = torch.zeros(768, 192)
  torch.save({"model": sd}, tmp_path / "bad.pth")
  with pytest.raises(CheckpointError, match=r"1 unexpected keys:\n  some_new_head.weight"):
    blip_jax.load(str(tmp_path / "bad.pth"))


def test_partial_load(pair, tmp_path):
  sd = official_state_dict("keys_official_decoder.txt", *pair)
  del sd["text_decoder.cls.predictions.transform.dense.weight"]
  torch.save({"model": sd}, tmp_path / "partial.pth")
  from blip_jax.checkpoints.convert import load_official
  cfg, params, _ = load_official(str(tmp_path / "partial.pth"), strict=False)
  assert "kernel" not in params["text_decoder"]["lm_dense"]
  assert "bias" in params["text_decoder"]["lm_dense"]


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  torch.save({"model": {"w": torch.zeros(2)}, "payload": _Evil(marker)}, path)
  with pytest.raises(CheckpointError, match="refused to unpickle"):
    read_pth(str(path))
  with pytest.raises(CheckpointError):
    blip_jax.load(str(path))
  assert not marker.exists()
  # the same file through plain pickle would have run the payload: the test is real
  with open(path, "rb") as f:
    assert f.read(2) == b"PK"  # zip container


def test_vqa_checkpoint(tmp_path, batch, vocab_path):
  """Official VQA layout (ViT + question encoder + answer decoder with 768x768 cross-attention)."""
  from hf_ref import make_hf

  from blip_jax.checkpoints.convert import infer_hf_config
  from blip_jax.checkpoints.mapping import official_table, to_hf_key
  hf = make_hf("vqa", 1e-6, seed=4)
  hsd = hf.state_dict()
  cfg = infer_hf_config(hf.config.to_dict() | {"architectures": ["BlipForQuestionAnswering"]})
  sd = {}
  for e in official_table(cfg):
    for k in (e.key,) + e.aliases:
      sd[k] = hsd[to_hf_key(k)]
  sd["text_encoder.embeddings.position_ids"] = torch.arange(512)[None]
  torch.save({"model": sd}, tmp_path / "model_vqa.pth")
  model = blip_jax.load(str(tmp_path / "model_vqa.pth"))
  assert model.config.kind == "vqa"
  pixels = batch[0][:1]
  q_ids, q_mask = np.array([[101, 2054, 3609, 2003, 1996, 3902, 102]]), np.ones((1, 7), np.int32)
  a_ids, a_mask = np.array([[101, 2417, 102]]), np.ones((1, 3), np.int32)
  with torch.no_grad():
    q = q_ids.copy(); q[:, 0] = 30523
    a = a_ids.copy(); a[:, 0] = 30522
    img = hf.vision_model(pixel_values=t(pixels).permute(0, 3, 1, 2)).last_hidden_state
    qs = hf.text_encoder(input_ids=t(q), encoder_hidden_states=img).last_hidden_state
    ref = hf.text_decoder(input_ids=t(a), encoder_hidden_states=qs).logits.numpy()
  got = np.asarray(model.vqa_answer_logits(pixels, q_ids, q_mask, a_ids, a_mask))
  assert np.abs(got - ref).max() <= TOL
  # and it answers (rank; generation: the pretraining .pth test below), with a tokenizer given at load
  model = blip_jax.load(str(tmp_path / "model_vqa.pth"), vocab=vocab_path)
  assert model.answer(pixels, ["what color is the bus?"], ["red", "blue", "a red bus"], k=2)[0] in ("red", "blue", "a red bus")
