"""The fused attention path (jax.nn.dot_product_attention) against the written-out einsum path it
replaced, for every mask kind the models use, values and gradients; every model kind end to end;
and the choice 'auto' makes (cuDNN only where its constraints hold, said once where they do not)."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blip_jax
from blip_jax.models import Blip, layers
from blip_jax.models.decoding import decode_step, init_cache
from blip_jax.models.init import init_params
from blip_jax.models.layers import MASK_VALUE, causal_bias, dot_product_attention, einsum_attention, padding_bias

B, H, D = 3, 2, 16


def _qkv(lq, lk, b=B, seed=0):
  r = np.random.RandomState(seed)
  q, k, v = (jnp.asarray(3 * r.randn(b, n, H, D).astype(np.float32)) for n in (lq, lk, lk))
  return q, k, v


def _padding(lk, seed=1):
  lengths = np.random.RandomState(seed).randint(2, lk + 1, size=B)
  lengths[0] = lk  # one row without padding, the others padded at the end as the tokenizer pads
  return jnp.asarray((np.arange(lk)[None] < lengths[:, None]).astype(np.int32))


def _block_causal(lq):
  """The VQA packed rows' bias (models/answer.py packed_losses): each piece sees its own earlier
  tokens and the shared first token."""
  segments = np.random.RandomState(2).randint(0, 3, size=(B, lq))
  i, j = segments[:, :, None], segments[:, None, :]
  idx = np.arange(lq)
  sees = ((i == j) & (idx[None, None, :] <= idx[None, :, None])) | (idx == 0)[None, None, :]
  return jnp.asarray(np.where(sees, 0.0, MASK_VALUE)[:, None].astype(np.float32))


def _cases():
  pos = jnp.arange(12)
  return {
      "none (ViT)": (12, 12, None),
      "padding (text encoder)": (12, 12, padding_bias(_padding(12))),
      "causal + padding (decoder)": (12, 12, causal_bias(pos, pos) + padding_bias(_padding(12))),
      "cross-attention, memory padding": (12, 7, padding_bias(_padding(7))),
      "VQA packed block-causal": (12, 12, _block_causal(12)),
  }


@pytest.mark.parametrize("kind", list(_cases()))
def test_fused_equals_einsum_values_and_gradients(kind):
  lq, lk, bias = _cases()[kind]
  q, k, v = _qkv(lq, lk)
  fused = lambda q, k, v: dot_product_attention(q, k, v, bias, implementation="xla")
  written = lambda q, k, v: einsum_attention(q, k, v, bias)
  np.testing.assert_allclose(fused(q, k, v), written(q, k, v), atol=1e-6, rtol=0)
  cot = jnp.asarray(np.random.RandomState(3).randn(*q.shape).astype(np.float32))
  grads = [jax.grad(lambda *a: (f(*a) * cot).sum(), argnums=(0, 1, 2))(q, k, v) for f in (fused, written)]
  for name, a, b in zip("qkv", *grads):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"d/d{name}")  # sums over 12 keys of ~1e-6
  assert np.abs(np.asarray(written(q, k, v))).max() > 0.5  # attention is not near-uniform noise here


def test_grouped_memory_and_cached_heads_first_layouts():
  """ITM re-ranking's grouped memory (G texts per image as one row of queries) and the KV cache's
  heads-first keys/values with its causal + padding bias at a decode position."""
  q, k, v = _qkv(4 * 6, 7)  # 4 texts of 6 tokens over each image's 7 memory tokens
  bias = padding_bias(_padding(7))
  np.testing.assert_allclose(dot_product_attention(q, k, v, bias, implementation="xla"),
                             einsum_attention(q, k, v, bias), atol=1e-6, rtol=0)
  q, k, v = _qkv(1, 10)
  kf, vf = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  bias = causal_bias(6 + jnp.arange(1), jnp.arange(10)) + padding_bias(_padding(10))
  np.testing.assert_allclose(dot_product_attention(q, kf, vf, bias, heads_first=True, implementation="xla"),
                             einsum_attention(q, kf, vf, bias, heads_first=True), atol=1e-6, rtol=0)


def test_attention_dropout_keeps_the_einsum_path():
  """jax.nn.dot_product_attention has no dropout: with a dropout rng the probabilities are dropped
  exactly as the einsum path drops them (the text transformer's 0.1 in training)."""
  q, k, v = _qkv(12, 12)
  rng = jax.random.PRNGKey(0)
  got = dot_product_attention(q, k, v, dropout_rate=0.1, dropout_rng=rng, implementation="xla")
  want = einsum_attention(q, k, v, dropout_rate=0.1, dropout_rng=rng)
  np.testing.assert_array_equal(got, want)
  assert np.abs(np.asarray(got - einsum_attention(q, k, v))).max() > 1e-3  # dropout did act


def _sharp(params, scale=3.0):
  return jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, params)


def _outputs(kind, attention):
  """Every output of a tiny model of `kind` (sharp random weights, padded texts) for one attention."""
  cfg = blip_jax.tiny_config(kind, vision={"attention": attention}, text={"attention": attention})
  params = _sharp(init_params(cfg, jax.random.PRNGKey(0)))
  r = np.random.RandomState(0)
  pixels = jnp.asarray(r.randn(2, 32, 32, 3).astype(np.float32))
  ids = jnp.asarray(r.randint(1000, 2000, size=(2, 9)).astype(np.int32)).at[:, 0].set(cfg.text.cls_id)
  mask = jnp.asarray(np.array([[1] * 9, [1] * 5 + [0] * 4], np.int32))
  m = Blip(cfg)
  run = lambda method, *a: np.asarray(m.apply({"params": params}, *a, method=method))
  img = m.apply({"params": params}, pixels, method=Blip.encode_image)
  out = {"image": np.asarray(img)}
  if kind in ("pretrain", "retrieval"):
    out["text_feat"] = run(Blip.text_feat, ids, mask)
    out["itm"] = run(Blip.itm_logits, img, ids, mask)
  if kind in ("pretrain", "caption"):
    out["lm"] = run(Blip.lm_logits, img, ids, mask)
  if kind == "vqa":
    states = m.apply({"params": params}, img, ids, mask, method=Blip.vqa_question)
    out["answer"] = run(Blip.vqa_answer_logits, states, mask, ids[:, :5], mask[:, :5])
  if kind == "nlvr":
    img1 = m.apply({"params": params}, pixels[::-1], method=Blip.encode_image)
    out["nlvr"] = run(Blip.nlvr_logits, img, img1, ids, mask)
  if kind in ("caption", "vqa"):  # KV-cached decoding: a prefill, then one token at a time
    memory, memory_mask = (img, None) if kind == "caption" else (states, mask)
    cache = init_cache(cfg, 2, 8, memory.shape[1])
    logits, cache = decode_step(cfg, params, cache, ids[:, :3], memory, memory_mask)
    steps = [logits]
    for t in range(3, 6):
      logits, cache = decode_step(cfg, params, cache, ids[:, t:t + 1], position_offset=t)
      steps.append(logits)
    out["decode"] = np.concatenate([np.asarray(s) for s in steps], axis=1)
  return out


@pytest.mark.parametrize("kind", ["pretrain", "retrieval", "caption", "vqa", "nlvr"])
def test_every_model_kind_equals_the_einsum_path(kind):
  fused, written = _outputs(kind, "xla"), _outputs(kind, "einsum")
  assert fused.keys() == written.keys()
  for name in written:
    scale = max(1.0, float(np.abs(written[name]).max()))
    np.testing.assert_allclose(fused[name], written[name], atol=1e-6 * scale, rtol=0, err_msg=name)


def test_auto_takes_cudnn_only_where_it_fits_and_says_so_once(monkeypatch, caplog):
  bf16 = lambda d: jnp.zeros((1, 4, 2, d), jnp.bfloat16)
  f32 = jnp.zeros((1, 4, 2, 64), jnp.float32)
  assert layers.attention_implementation("auto", f32) == "einsum"  # this CPU: the faster layout here
  assert layers.attention_implementation("auto", bf16(64)) == "einsum"
  assert layers.attention_implementation("xla", f32) == "xla"
  with pytest.raises(ValueError, match="cudnn.*bfloat16 or float16"):
    layers.attention_implementation("cudnn", f32)
  with pytest.raises(ValueError, match="one of"):
    layers.attention_implementation("flash", f32)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert layers.attention_implementation("auto", bf16(64)) == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(layers, "_said", set())
  assert layers.attention_implementation("auto", bf16(64)) == "cudnn"
  assert layers.attention_implementation("cudnn", bf16(128)) == "cudnn"
  with caplog.at_level(logging.WARNING, logger=layers.__name__):
    assert layers.attention_implementation("auto", bf16(12)) == "xla"  # head size 12
    assert layers.attention_implementation("auto", bf16(12)) == "xla"
    assert layers.attention_implementation("auto", f32) == "xla"
  said = [r.getMessage() for r in caplog.records]
  assert len(said) == 2 and "multiple of 8" in said[0] and "float32" in said[1], said


def test_cudnn_gets_its_bias_over_whole_score_matrices(monkeypatch):
  """No cuDNN here: the call jax.nn receives is checked instead. A padding bias [B, 1, 1, Lk]
  reaches cuDNN as [B, 1, Lq, Lk] in the compute dtype, keys and values sequence-major."""
  seen = {}
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda q, k, v, bias=None, implementation=None: seen.update(q=q, k=k, bias=bias,
                                                                                 impl=implementation) or q)
  q, k, v = (t.astype(jnp.bfloat16) for t in _qkv(12, 8))
  dot_product_attention(q, k, v, padding_bias(_padding(8)), dtype=jnp.bfloat16, implementation="cudnn")
  assert seen["impl"] == "cudnn" and seen["bias"].shape == (B, 1, 12, 8) and seen["bias"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(seen["bias"][:, :, 5], padding_bias(_padding(8))[:, :, 0].astype(jnp.bfloat16))
  k, v = k[:, :6], v[:, :6]  # even lengths: odd ones take the padded call (the next test)
  dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), None, dtype=jnp.bfloat16,
                        heads_first=True, implementation="cudnn")
  assert seen["k"].shape == (B, 6, H, D) and seen["bias"] is None


def test_cudnn_odd_lengths_are_padded_and_masked(monkeypatch):
  """jax's cuDNN backward wants even sequence lengths; the ViT has 197 or 577 tokens, retrieval's and
  VQA's texts 35. No cuDNN here: jax.nn's XLA kernel stands in for it with the same arguments (query
  and key/value lengths, or the padded bias), so the padding, its masking and the dropped row are
  what is checked: values and gradients equal the einsum path's, and cuDNN is called with even
  lengths only."""
  real, calls = jax.nn.dot_product_attention, []

  def stand_in(q, k, v, bias=None, implementation=None, **kw):
    calls.append((q.shape[1], k.shape[1], implementation))
    return real(q, k, v, bias=bias, implementation="xla", **kw)
  monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
  monkeypatch.setattr(layers, "cudnn_unfit", lambda q: None)  # float32 here: the kernel's dtype rule aside
  q, k, v = _qkv(7, 5)
  for bias in (None, padding_bias(_padding(5))):  # the ViT's case; a text's padding mask
    out = {}
    for impl in ("cudnn", "einsum"):
      f = lambda q, k, v, impl=impl: dot_product_attention(q, k, v, bias, implementation=impl, dtype=jnp.float32)
      out[impl] = f(q, k, v), jax.grad(lambda *a: (f(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(out["cudnn"][0], out["einsum"][0], atol=1e-5, rtol=0)
    for a, b in zip(out["cudnn"][1], out["einsum"][1]):
      np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
  assert calls and all(c == (8, 6, "cudnn") for c in calls), calls
