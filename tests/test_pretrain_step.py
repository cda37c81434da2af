"""The pretraining step's bookkeeping, each piece against what the official blip_pretrain.py does: the
momentum update and the order of the momentum forward, the alpha ramp, the queue (what is enqueued,
where, and the pointer), the temperature clamp, the per-shard ITM negatives, gradient accumulation
and the sharding of parameters. One tiny model (32 px, width 32, one layer), a few compiled steps.
Each test names the bug it is there to catch."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from pretrain_util import fixed_batch, tiny_config

from blip_jax import objectives
from blip_jax.models.blip import Blip
from blip_jax.models.init import momentum_config
from blip_jax.train import step as S
from blip_jax.train.setup import build, model_config

Q, B = 16, 8


@pytest.fixture(scope="module")
def setup():
  c = tiny_config()
  mcfg = model_config(c)
  tx, lr_fn = S.make_optimizer(c.optim.to_dict(), 10, 20)
  return c, mcfg, tx, lr_fn


def _step(setup, **loss):
  _, mcfg, tx, lr_fn = setup
  lc = S.LossConfig(queue_size=Q, **loss)
  return jax.jit(S.make_train_step(mcfg, lc, tx, lr_fn, objectives.itc_itm_lm)), lc


def _state(setup, lc, seed=0):
  _, mcfg, tx, _ = setup
  return S.init_state(mcfg, tx, lc, jax.random.PRNGKey(seed))


def _mesh(shape):
  return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), ("data", "fsdp", "tensor"))


def _batch(seed=0):
  return jax.tree.map(jnp.asarray, fixed_batch(seed))


def _features(mcfg, towers, params, batch):
  """Image and text features of `towers` (a momentum-shaped dict) on a batch, computed here."""
  def f(m):
    return m.image_feat(m.encode_image(objectives.normalize_images(batch["image"]))), m.text_feat(batch["text_ids"],
                                                                                        batch["text_mask"])
  full = {**towers, "temp": params["temp"], "itm_head": params["itm_head"]}
  return jax.tree.map(np.asarray, Blip(momentum_config(mcfg)).apply({"params": full}, method=f))


@pytest.fixture(scope="module")
def momentum_run(setup):
  """One step of momentum 0.5 from a state whose momentum towers differ from the online weights
  (at init they are equal, and an EMA of equal trees shows nothing)."""
  step, lc = _step(setup, momentum=0.5)
  state = _state(setup, lc)
  noise = jax.random.split(jax.random.PRNGKey(9), 1)[0]
  leaves, tree = jax.tree.flatten(state["momentum"])
  keys = jax.random.split(noise, len(leaves))
  state["momentum"] = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  before = jax.tree.map(np.asarray, state)
  after, metrics = step(state, _batch(0))
  after2, _ = step(after, _batch(1))
  return before, jax.tree.map(np.asarray, after), jax.tree.map(np.asarray, after2), metrics


def test_momentum_update_and_enqueued_features(setup, momentum_run):
  """Bugs: the momentum forward uses the towers from before this step's EMA update; the online
  features are enqueued instead of the momentum ones; the queue pointer is not advanced."""
  _, mcfg, _, _ = setup
  before, after, after2, _ = momentum_run
  want = jax.tree.map(lambda m, p: 0.5 * m + 0.5 * p, before["momentum"], S.momentum_view(before["params"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), after["momentum"], want)
  batch = _batch(0)
  img_new, txt_new = _features(mcfg, want, before["params"], batch)
  img_old, txt_old = _features(mcfg, before["momentum"], before["params"], batch)
  img_online, txt_online = _features(mcfg, S.momentum_view(before["params"]), before["params"], batch)
  # the features of the updated towers, at the pointer (0); the rest of the queue untouched
  np.testing.assert_allclose(after["image_queue"][:B], img_new, atol=2e-5)
  np.testing.assert_allclose(after["text_queue"][:B], txt_new, atol=2e-5)
  for other in (img_old, img_online):
    assert np.abs(other - img_new).max() > 100 * 2e-5  # the bugs above would be seen
  assert np.abs(txt_old - txt_new).max() > 100 * 2e-5 and np.abs(txt_online - txt_new).max() > 100 * 2e-5
  np.testing.assert_array_equal(after["image_queue"][B:], before["image_queue"][B:])
  np.testing.assert_array_equal(after["idx_queue"][:B], np.asarray(batch["image_id"]))
  assert int(after["queue_ptr"]) == B
  # the second batch lands after the first; the pointer wraps at the queue's end
  np.testing.assert_array_equal(after2["image_queue"][:B], after["image_queue"][:B])
  assert np.abs(after2["image_queue"][B:] - before["image_queue"][B:]).min() > 0
  np.testing.assert_array_equal(after2["idx_queue"][B:], np.asarray(_batch(1)["image_id"]))
  assert int(after2["queue_ptr"]) == 0


def test_alpha_ramps_linearly_in_the_loss(setup):
  """Bug: the ramp ignored (alpha 0.4 from step 0). loss_itc is affine in alpha (hard and soft
  targets mixed), so on one state and batch at steps 0, 2, 4 and 8 of a 4-step ramp: alpha 0, 0.2,
  0.4, 0.4; the step-2 loss halfway between steps 0 and 4; step 8 equal to step 4."""
  step, lc = _step(setup, alpha=0.4, alpha_ramp_steps=4)
  base = _state(setup, lc)
  got = {}
  for s in (0, 2, 4, 8):
    st = jax.tree.map(jnp.asarray, jax.tree.map(np.asarray, base))
    st["step"] = jnp.asarray(s, jnp.int32)
    _, m = step(st, _batch(0))
    got[s] = (float(m["alpha"]), float(m["loss_itc"]))
  assert [got[s][0] for s in (0, 2, 4, 8)] == pytest.approx([0.0, 0.2, 0.4, 0.4], abs=1e-7)
  l0, l2, l4, l8 = (got[s][1] for s in (0, 2, 4, 8))
  assert abs(l0 - l4) > 1e-3  # the soft targets matter on this state
  assert l2 == pytest.approx((l0 + l4) / 2, abs=1e-5) and l8 == pytest.approx(l4, abs=1e-6)


def test_temperature_is_clamped_after_the_update(setup):
  """Bug: the clamp after the optimizer update removed (official: temp.clamp_(0.001, 0.5) each
  step). A temperature outside the range comes back on its bound."""
  step, lc = _step(setup)
  for start, bound in ((0.9, lc.temp_max), (1e-5, lc.temp_min)):
    st = _state(setup, lc)
    st["params"] = {**st["params"], "temp": jnp.asarray(start, jnp.float32)}
    new, m = step(st, _batch(0))
    assert float(new["params"]["temp"]) == pytest.approx(bound, rel=1e-6)
    assert float(m["temp"]) == pytest.approx(bound, rel=1e-6)  # the forward used the clamped value too


def test_local_itm_negatives_follow_the_data_shards(setup):
  """Bug: 'local' ITM negatives ignore the device split (itm_groups forced to 1). The trainer sets
  one group per data shard; the step's ITM loss with 4 groups differs from 1 group (same state,
  batch and key), and the sharded step on a data-4 mesh equals the one-device step with 4 groups."""
  c = tiny_config(**{"loss.itm_scope": "local"})
  mcfg = model_config(c)
  for shape, groups in (((4, 1, 1), 4), ((2, 2, 2), 4), ((1, 2, 4), 2)):
    mesh = _mesh(shape)
    assert build(c, mcfg, mesh, 10, 20)[4].itm_groups == groups
  _, _, tx, lr_fn = setup
  one = build(c, mcfg, _mesh((1, 1, 1)), 10, 20)[4]  # the trainer's loss config
  # a random ITM head scores every pair alike (its loss ~ln 2 whatever the negatives): sharpened
  sharpen = lambda st: {**st, "params": {**st["params"], "itm_head": jax.tree.map(lambda x: 300 * x, st["params"]["itm_head"])}}
  losses = {}
  for g in (1, 4):
    lc = dataclasses.replace(one, itm_groups=g)
    state = sharpen(S.init_state(mcfg, tx, lc, jax.random.PRNGKey(0)))
    _, m = jax.jit(S.make_train_step(mcfg, lc, tx, lr_fn, objectives.itc_itm_lm))(state, _batch(0))
    losses[g] = float(m["loss_itm"])
  assert abs(losses[4] - losses[1]) > 1e-3, losses
  mesh = _mesh((4, 1, 1))
  from blip_jax.data.device import global_batch
  step_fn, init_fn, _, batch_sharding, _ = build(c, mcfg, mesh, 10, 20)
  with jax.set_mesh(mesh):
    _, m = step_fn(sharpen(init_fn(jax.random.PRNGKey(0))), global_batch(fixed_batch(0), batch_sharding))
  assert float(m["loss_itm"]) == pytest.approx(losses[4], abs=1e-5)


def test_gradient_accumulation_averages(setup):
  """Bug: accumulation sums the micro-batch gradients. On a loss that is a mean over equal
  micro-batches (caption LM: each half of the batch holds the same number of target tokens, no
  dropout), grad_accum=2 equals grad_accum=1: loss, gradient norm and updated weights. (Adam's
  first update hardly sees a gradient's scale; the gradient norm does.)"""
  _, mcfg, tx, lr_fn = setup
  cap = dataclasses.replace(mcfg, kind="caption")
  batch = _batch(0)
  assert int(batch["text_mask"][:4].sum()) == int(batch["text_mask"][4:].sum())
  out = {}
  for k in (1, 2):
    lc = S.LossConfig(grad_accum=k)
    state = S.init_state(cap, tx, lc, jax.random.PRNGKey(0))
    new, m = jax.jit(S.make_train_step(cap, lc, tx, lr_fn, objectives.caption_lm))(state, batch)
    out[k] = (jax.tree.map(np.asarray, new["params"]), float(m["loss"]), float(m["grad_norm"]))
  assert out[2][1] == pytest.approx(out[1][1], rel=1e-5)
  assert out[2][2] == pytest.approx(out[1][2], rel=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), out[2][0], out[1][0])


def test_embed_axis_is_sharded_over_fsdp(setup):
  """Bug: the sharding rule for 'embed' loses 'fsdp' (parameters silently replicated). On a
  (2, 2, 2) mesh every parameter dimension named 'embed' is split over fsdp, and each device holds
  at most half of the parameters' bytes."""
  c, mcfg, tx, _ = setup
  mesh = _mesh((2, 2, 2))
  _, init_fn, shardings, _, lc = build(c, mcfg, mesh, 10, 20)
  abstract = jax.eval_shape(lambda r: S.init_state(mcfg, tx, lc, r, boxed=True), jax.random.PRNGKey(0))
  boxes = jax.tree.leaves(abstract["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  specs = jax.tree.leaves(shardings["params"])
  checked = 0
  for box, sharding in zip(boxes, specs):
    if not isinstance(box, nn.Partitioned):
      continue
    spec = tuple(sharding.spec) + (None,) * (len(box.names) - len(sharding.spec))
    for name, axes in zip(box.names, spec):
      if name == "embed":
        axes = axes if isinstance(axes, tuple) else (axes,)
        assert "fsdp" in axes, (box.names, sharding.spec)
        checked += 1
  assert checked >= 10
  with jax.set_mesh(mesh):
    params = init_fn(jax.random.PRNGKey(0))["params"]
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  on_one = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(params))
  # here 41% (the vocab rows, norms and biases are replicated by design); with 'embed' unsharded, 80%
  assert on_one <= 0.5 * total, (on_one, total)
