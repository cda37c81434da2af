"""Attention kernels on this machine: jax.nn.dot_product_attention (XLA) against the einsum path,
forward and forward+backward, at BLIP-base shapes (12 heads of 64, float32, bias [B,1,1,Lk]).
Why `model.attention=auto` keeps the einsum path on CPUs (docs/accelerators.md).

  python bench/attention_cpu.py
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from blip_jax.models.layers import dot_product_attention  # noqa: E402

SHAPES = {  # name: (batch, query length, key length, heads, head size)
    "ViT-B/16 224px, batch 8": (8, 197, 197, 12, 64),
    "text self-attention, 35 tok": (32, 35, 35, 12, 64),
    "cross-attention 35x197": (32, 35, 197, 12, 64),
    "decode step, cache 40": (24, 1, 40, 12, 64),
}


def ms(f, *args, n=20):
  jax.block_until_ready(f(*args))
  t = time.perf_counter()
  for _ in range(n):
    out = f(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / n * 1000


def main():
  r = np.random.RandomState(0)
  for name, (b, lq, lk, h, d) in SHAPES.items():
    heads_first = name.startswith("decode")  # the KV cache's layout
    q = jnp.asarray(r.randn(b, lq, h, d).astype(np.float32))
    kv = jnp.asarray(r.randn(*((b, h, lk, d) if heads_first else (b, lk, h, d))).astype(np.float32))
    bias = jnp.zeros((b, 1, 1, lk), jnp.float32)
    row = {}
    for impl in ("xla", "einsum"):
      attend = lambda q, k, v, bias, impl=impl: dot_product_attention(q, k, v, bias, heads_first=heads_first,
                                                                       implementation=impl)
      row[impl] = ms(jax.jit(attend), q, kv, kv, bias)
      grad = jax.jit(jax.grad(lambda *a, f=attend: f(*a).sum(), argnums=(0, 1, 2)))
      row[impl + " fwd+bwd"] = ms(grad, q, kv, kv, bias, n=10)
    print(f"{name:30s} forward: xla {row['xla']:7.2f} ms, einsum {row['einsum']:7.2f} ms "
          f"(xla/einsum {row['xla'] / row['einsum']:.2f}) | fwd+bwd: xla {row['xla fwd+bwd']:7.2f} ms, "
          f"einsum {row['einsum fwd+bwd']:7.2f} ms (xla/einsum {row['xla fwd+bwd'] / row['einsum fwd+bwd']:.2f})")


if __name__ == "__main__":
  main()
