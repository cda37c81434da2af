"""A tiny pretraining config and fixed batches shared by the pretraining tests and workers."""
import os
import sys

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)


def tiny_config(**over):
  from configs.pretrain import get_config
  c = get_config("tiny")
  c.unlock()
  c.model.image_size = 32
  c.model.vision.update(width=32, depth=1, heads=2, mlp_dim=64, patch=16)
  c.model.text.update(width=32, depth=1, heads=2, mlp_dim=64, vocab_size=128, max_positions=16,
                      pad_id=0, cls_id=2, sep_id=3, dec_id=4, enc_id=5)
  c.batch_size, c.loss.queue_size = 8, 16
  c.loss.itm_scope = "global"  # sampling that does not depend on the mesh
  c.optim.update(lr=1e-5, warmup_steps=1, schedule="cosine")
  for k, v in over.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  c.lock()
  return c


def fixed_batch(seed=0, n=8, length=10):
  from blip_jax.train.step import split_ids
  r = np.random.RandomState(seed)
  ids = r.randint(8, 120, (n, length)).astype(np.int32)
  ids[:, 0] = 2  # any first token: the roles rewrite it
  mask = np.ones((n, length), np.int32)
  mask[::2, 7:] = 0
  ids[mask == 0] = 0
  return {"image": r.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8), "text_ids": ids, "text_mask": mask,
          "image_id": split_ids(np.arange(n, dtype=np.int64))}


def run_steps(c, mesh, n_steps=2, seed=0):
  """Builds the sharded step on `mesh`, runs it on fixed batches; returns (losses, params on host)."""
  import jax

  from blip_jax.data.device import global_batch
  from blip_jax.train.setup import build, model_config
  mcfg = model_config(c)
  step_fn, init_fn, shardings, batch_sharding, _ = build(c, mcfg, mesh, steps_per_epoch=10, total_steps=20)
  with jax.set_mesh(mesh):
    state = init_fn(jax.random.PRNGKey(seed))
    out = []
    for i in range(n_steps):
      b = fixed_batch(i)
      rows = slice(jax.process_index() * len(b["image"]) // jax.process_count(),
                   (jax.process_index() + 1) * len(b["image"]) // jax.process_count())
      b = {k: v[rows] for k, v in b.items()}
      state, m = step_fn(state, global_batch(b, batch_sharding))
      out.append({k: float(v) for k, v in m.items()})
  from jax.experimental import multihost_utils
  params = multihost_utils.process_allgather(state["params"], tiled=True)
  return out, jax.tree.map(np.asarray, params)
