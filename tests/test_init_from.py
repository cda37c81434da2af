"""Pretraining initialisation: ViT from a DeiT/timm state dict, text from a bert-base-style dir."""
import numpy as np
import pytest
import torch
from hf_ref import make_hf, parity_reinit
from transformers import BertConfig, BertForMaskedLM

import blip_jax
from blip_jax.checkpoints.init_from import load_bert_into, load_vit_into
from blip_jax.checkpoints.torch_io import CheckpointError
from blip_jax.models.config import TextConfig, VisionConfig
from blip_jax.models.init import init_params

CFG = blip_jax.BlipConfig(kind="pretrain", vision=VisionConfig(width=192, depth=4, heads=3, mlp_dim=768),
                          text=TextConfig(width=192, depth=4, heads=3, mlp_dim=768, max_positions=64))


@pytest.fixture(scope="module")
def params():
  return init_params(CFG)


def test_vit_from_deit_state_dict(params, tmp_path):
  hf = make_hf("caption", 1e-6, seed=11)
  from blip_jax.checkpoints.mapping import to_hf_key, vit_entries
  hsd = hf.state_dict()
  timm = {e.key[len("visual_encoder."):]: hsd[to_hf_key(e.key)] for e in vit_entries(CFG, ("v",), "visual_encoder.")}
  timm["head.weight"], timm["head.bias"] = torch.zeros(1000, 192), torch.zeros(1000)
  torch.save(timm, tmp_path / "deit.pth")
  new = load_vit_into(params, CFG, str(tmp_path / "deit.pth"))
  model = blip_jax.BlipModel(CFG, new)
  pixels = np.random.RandomState(0).randn(1, 224, 224, 3).astype(np.float32)
  with torch.no_grad():
    ref = hf.vision_model(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)).last_hidden_state.numpy()
  assert np.abs(np.asarray(model.encode_image(pixels)) - ref).max() <= 1e-4
  # text untouched
  np.testing.assert_array_equal(new["text_encoder"]["layer_0"]["fc1"]["kernel"],
                                params["text_encoder"]["layer_0"]["fc1"]["kernel"])
  timm["dist_token"] = torch.zeros(1, 1, 192)
  with pytest.raises(CheckpointError, match="distilled"):
    load_vit_into(params, CFG, {k: v.numpy() for k, v in timm.items()})


def test_text_from_bert_dir(params, tmp_path):
  bert = BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=192, num_hidden_layers=4,
                                    num_attention_heads=3, intermediate_size=768, max_position_embeddings=64))
  parity_reinit(bert, 3)
  with torch.no_grad():
    bert.bert.embeddings.token_type_embeddings.weight.zero_()  # BLIP has no token types
  bert.eval().save_pretrained(tmp_path)
  new = load_bert_into(params, CFG, str(tmp_path))
  model = blip_jax.BlipModel(CFG, new)
  ids = np.array([[101, 1037, 3899, 2003, 102, 0]])
  mask = (ids != 0).astype(np.int32)
  from blip_jax.api import _apply
  got = np.asarray(_apply(CFG, "text_embeds", model.params, ids, mask))
  with torch.no_grad():
    ref = bert.bert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  assert np.abs(got - ref).max() <= 1e-4
  t = new["text_encoder"]
  emb = t["word_embeddings"]["embedding"]
  assert emb.shape == (30524, 192)
  np.testing.assert_array_equal(emb[30522:], params["text_encoder"]["word_embeddings"]["embedding"][30522:])
  np.testing.assert_array_equal(t["layer_1"]["self_attn_dec"]["query"]["kernel"], t["layer_1"]["self_attn"]["query"]["kernel"])
  np.testing.assert_array_equal(t["layer_1"]["cross_attn"]["query"]["kernel"],
                                params["text_encoder"]["layer_1"]["cross_attn"]["query"]["kernel"])
  np.testing.assert_allclose(t["lm_dense"]["kernel"], bert.cls.predictions.transform.dense.weight.detach().numpy().T)
