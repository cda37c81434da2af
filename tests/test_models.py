"""Model structure: logical axes, weight sharing, KV-cache decoding, dtype, remat."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blip_jax
from blip_jax.models import Blip
from blip_jax.models.decoding import decode_step, init_cache
from blip_jax.models.init import init_params, logical_axes, param_shapes


def _sharp(params, scale=3.0):
  """Larger weights than init's 0.02, so attention is far from uniform and bugs show."""
  return jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, params)


@pytest.fixture(scope="module")
def models():
  return {k: _sharp(init_params(blip_jax.tiny_config(k), jax.random.PRNGKey(i)))
          for i, k in enumerate(("pretrain", "caption", "vqa"))}


def test_every_param_has_logical_axes():
  for kind in ("pretrain", "retrieval", "caption", "vqa"):
    cfg = blip_jax.tiny_config(kind)
    axes = jax.tree.leaves(logical_axes(cfg), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    shapes = param_shapes(cfg)
    assert len(axes) == len(shapes)
    ranks = sorted(len(s) for s in shapes.values())
    assert sorted(len(a) for a in axes) == ranks  # one name (or None) per dimension


def test_pretrain_shares_all_but_self_attention():
  shapes = param_shapes(blip_jax.tiny_config("pretrain"))
  layer0 = {p[2] for p in shapes if p[:2] == ("text_encoder", "layer_0")}
  assert layer0 == {"self_attn", "self_attn_dec", "cross_attn", "fc1", "fc2", "ffn_norm"}
  # one embedding table, one cross-attention and FFN per layer: shared by construction
  assert not any("text_decoder" in p for p in shapes)


def _full_vs_cached(kind, params, memory, memory_mask=None):
  cfg = blip_jax.tiny_config(kind)
  rng = np.random.RandomState(0)
  ids = jnp.asarray(rng.randint(1000, 2000, size=(2, 8)).astype(np.int32))
  ids = ids.at[:, 0].set(cfg.text.dec_id)
  mask = jnp.ones_like(ids)
  if kind == "vqa":
    full = Blip(cfg).apply({"params": params}, memory, memory_mask, ids, mask, method=Blip.vqa_answer_logits)
  else:
    full = Blip(cfg).apply({"params": params}, memory, ids, mask, method=Blip.lm_logits)
  cache = init_cache(cfg, 2, 8, memory.shape[1])
  logits, cache = decode_step(cfg, params, cache, ids[:, :3], memory, memory_mask)  # prefill
  steps = [logits]
  for t in range(3, 8):  # then one token at a time, cross-attention K/V from the cache
    logits, cache = decode_step(cfg, params, cache, ids[:, t:t + 1], position_offset=t)
    steps.append(logits)
  cached = jnp.concatenate(steps, axis=1)
  assert np.abs(np.asarray(cached) - np.asarray(full)).max() < 1e-4
  assert np.abs(np.asarray(full)).std() > 0.1


@pytest.mark.parametrize("kind", ["pretrain", "caption"])
def test_kv_cache_decoding_equals_full_forward(models, kind):
  cfg = blip_jax.tiny_config(kind)
  pixels = jnp.asarray(np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32))
  image = Blip(cfg).apply({"params": models[kind]}, pixels, method=Blip.encode_image)
  _full_vs_cached(kind, models[kind], image)


def test_kv_cache_vqa_masks_question_padding(models):
  states = jnp.asarray(np.random.RandomState(2).randn(2, 6, 64).astype(np.float32))
  q_mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
  _full_vs_cached("vqa", models["vqa"], states, q_mask)


def test_bf16_compute_keeps_fp32_params(models):
  cfg = blip_jax.tiny_config("caption")
  bf = cfg.replace(dtype="bfloat16")
  params = models["caption"]
  pixels = jnp.asarray(np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32))
  ids = jnp.array([[101, 1037, 3899, 102]] * 2)
  f = lambda m: m.lm_logits(m.encode_image(pixels), ids, jnp.ones_like(ids))
  a = Blip(cfg).apply({"params": params}, method=f)
  b = Blip(bf).apply({"params": params}, method=f)
  assert Blip(bf).apply({"params": params}, pixels, method=Blip.encode_image).dtype == jnp.bfloat16
  assert b.dtype == jnp.float32  # logits in fp32
  rel = np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(a)).max()
  assert 0 < rel < 0.05
  shapes = jax.eval_shape(lambda: Blip(bf).init(jax.random.PRNGKey(0), pixels, ids, jnp.ones_like(ids)))
  assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(shapes))} == {jnp.dtype("float32")}


def test_remat_and_drop_path():
  base = blip_jax.tiny_config("retrieval")
  remat = base.replace(vision=blip_jax.VisionConfig(**{**base.vision.__dict__, "remat": True, "drop_path": 0.5}))
  params = init_params(base)
  pixels = jnp.asarray(np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32))
  a = Blip(base).apply({"params": params}, pixels, method=Blip.encode_image)
  b = Blip(remat).apply({"params": params}, pixels, method=Blip.encode_image)  # eval: no drop path
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  c = Blip(remat).apply({"params": params}, pixels, True, method=Blip.encode_image,
                        rngs={"dropout": jax.random.PRNGKey(3)})
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3  # drop path acts in training
  g = jax.grad(lambda p: Blip(remat).apply({"params": p}, pixels, method=Blip.encode_image).sum())(params)
  assert np.isfinite(np.asarray(g["visual_encoder"]["blocks_0"]["fc1"]["kernel"])).all()
