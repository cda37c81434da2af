"""Each loss against an independent NumPy implementation of the formulas of the paper §3.2 (official blip_pretrain.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip_jax import losses


def _norm(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _log_softmax(x):
  x = x - x.max(1, keepdims=True)
  return x - np.log(np.exp(x).sum(1, keepdims=True))


def np_itc(fi, ft, fim, ftm, qi, qt, temp, alpha, idx=None, idx_q=None):
  ti, tt = np.concatenate([fim, qi]), np.concatenate([ftm, qt])  # keys: batch momentum + queue
  n, m = fi.shape[0], ti.shape[0]
  if idx is None:
    hard = np.zeros((n, m)); hard[np.arange(n), np.arange(n)] = 1
  else:
    allid = np.concatenate([idx, idx_q]); hard = (idx[:, None] == allid[None]).astype(float)
    hard /= hard.sum(1, keepdims=True)
  soft = lambda s: np.exp(_log_softmax(s))
  tgt_i2t = alpha * soft(fim @ tt.T / temp) + (1 - alpha) * hard
  tgt_t2i = alpha * soft(ftm @ ti.T / temp) + (1 - alpha) * hard
  l_i2t = -(np.sum(_log_softmax(fi @ tt.T / temp) * tgt_i2t, 1)).mean()
  l_t2i = -(np.sum(_log_softmax(ft @ ti.T / temp) * tgt_t2i, 1)).mean()
  return (l_i2t + l_t2i) / 2


@pytest.mark.parametrize("with_ids", [False, True])
def test_itc(with_ids):
  r = np.random.RandomState(0)
  b, q, d = 6, 12, 8
  fi, ft, fim, ftm = (_norm(r.randn(b, d)) for _ in range(4))
  qi, qt = _norm(r.randn(q, d)), _norm(r.randn(q, d))
  idx = np.array([0, 1, 1, 2, 3, 3]) if with_ids else None
  idx_q = r.randint(0, 4, q) if with_ids else None
  want = np_itc(fi, ft, fim, ftm, qi, qt, 0.07, 0.4, idx, idx_q)
  got, (sim_i2t, _) = losses.itc_loss(*(jnp.asarray(x, jnp.float32) for x in (fi, ft, fim, ftm, qi, qt)), 0.07, 0.4,
                                      idx=None if idx is None else jnp.asarray(idx),
                                      idx_queue=None if idx_q is None else jnp.asarray(idx_q))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert sim_i2t.shape == (b, b + q)


def np_weights(sim, groups, floor=1e-4, idx=None):
  g = sim.shape[0]; per = g // groups
  w = np.zeros_like(sim)
  for k in range(groups):
    s = slice(k * per, (k + 1) * per)
    w[s, s] = np.exp(_log_softmax(sim[s, s])) + floor
  np.fill_diagonal(w, 0)
  if idx is not None:
    w[idx[:, None] == idx[None]] = 0
  return w


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_negative_weights_local(groups):
  sim = np.random.RandomState(1).randn(8, 8) * 3
  np.testing.assert_allclose(np.asarray(losses.negative_weights(jnp.asarray(sim, jnp.float32), groups)),
                             np_weights(sim, groups), rtol=1e-5, atol=1e-7)


def test_negative_weights_global_by_image_id():
  sim = np.random.RandomState(2).randn(6, 6) * 3
  idx = np.array([0, 0, 1, 2, 2, 3])
  got = losses.negative_weights(jnp.asarray(sim, jnp.float32), 1, floor=0.0, idx=jnp.asarray(idx))
  np.testing.assert_allclose(np.asarray(got), np_weights(sim, 1, floor=0.0, idx=idx), rtol=1e-5, atol=1e-7)


def test_local_negatives_mask_same_image_and_64bit_ids_stay_exact():
  """'local' scope with ids: a caption of the same image is never a negative. Ids that differ only
  above bit 31 (hashed TFRecord keys) are different images, as int64 ids are."""
  from blip_jax.train.step import split_ids
  sim = np.random.RandomState(3).randn(8, 8) * 3
  ids = np.array([7, 7, 7 + 2 ** 32, 9, 2 ** 40, 2 ** 40, 5, 5 + 2 ** 33], np.int64)
  got = np.asarray(losses.negative_weights(jnp.asarray(sim, jnp.float32), 2, idx=jnp.asarray(split_ids(ids))))
  np.testing.assert_allclose(got, np_weights(sim, 2, idx=ids), rtol=1e-5, atol=1e-7)
  assert got[0, 2] > 0 and got[0, 1] == 0 and got[4, 5] == 0
  # ITC positives by id: 7 and 7 + 2**32 are not the same image
  pos = np.asarray(losses.same_id(jnp.asarray(split_ids(ids)), jnp.asarray(split_ids(ids))))
  np.testing.assert_array_equal(pos, ids[:, None] == ids[None])


def test_sampling_follows_weights_and_never_picks_positives():
  w = np.array([[0, 1, 3, 0], [1, 0, 1, 2], [2, 2, 0, 0], [1, 1, 1, 0]], np.float32)
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  draws = np.asarray(jax.vmap(lambda k: losses.sample_negatives(k, jnp.asarray(w)))(keys))
  for row in range(4):
    freq = np.bincount(draws[:, row], minlength=4) / len(draws)
    np.testing.assert_allclose(freq, w[row] / w[row].sum(), atol=0.03)  # multinomial, not argmax
    assert freq[row] == 0  # never the positive (zero weight)


def test_itm_loss_and_collapse_value():
  r = np.random.RandomState(3)
  pos, neg = r.randn(4, 2), r.randn(8, 2)
  logits = np.concatenate([pos, neg]); labels = np.array([1] * 4 + [0] * 8)
  want = -_log_softmax(logits)[np.arange(12), labels].mean()
  loss, acc = losses.itm_loss(jnp.asarray(pos), jnp.asarray(neg))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(acc) == pytest.approx(((logits.argmax(1) == labels).mean()))
  prior = np.log(np.array([2 / 3, 1 / 3]))  # a collapsed model predicts the 1:2 prior
  loss, acc = losses.itm_loss(jnp.tile(prior, (4, 1)), jnp.tile(prior, (8, 1)))
  assert float(loss) == pytest.approx(0.6365, abs=1e-4) and float(acc) == pytest.approx(2 / 3)


def test_lm_loss_label_smoothing_and_masks():
  r = np.random.RandomState(4)
  b, l, v = 2, 6, 11
  logits = r.randn(b, l, v)
  ids = r.randint(1, v, (b, l)); mask = np.ones((b, l), int); mask[1, 4:] = 0
  eps, prompt = 0.1, 2
  lp = _log_softmax(logits[:, :-1].reshape(-1, v)).reshape(b, l - 1, v)
  tot, cnt = 0.0, 0
  for i in range(b):
    for t in range(1, l):
      if mask[i, t] and t >= prompt:
        tot += (1 - eps) * -lp[i, t - 1, ids[i, t]] + eps * -lp[i, t - 1].mean(); cnt += 1
  got = losses.lm_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), label_smoothing=eps, prompt_length=prompt)
  np.testing.assert_allclose(float(got), tot / cnt, rtol=1e-5)
