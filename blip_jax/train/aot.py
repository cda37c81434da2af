"""Memory and cost of a training config on a TPU pod, known before paying for the pod (MaxText's
ahead-of-time compile): the real sharded train step is compiled for the pod's topology on this
machine (libtpu provides the TPU compiler; no TPU is needed) and XLA's own memory and cost analyses
are read back.

  blip-jax compile --config=configs/pretrain.py:vit_l --topology=v5e-256 [--config.k=v]

libtpu must be importable but should not sit in the training environment of a CPU/GPU machine (JAX
would then try to start a TPU backend): `pip install --target DIR "libtpu==0.0.42.*"` and
`--libtpu DIR` (or PYTHONPATH=DIR). The command runs JAX with JAX_PLATFORMS=cpu.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from blip_jax.train.setup import build, check_batch, make_mesh, model_config

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # JAX topology name
  chips_per_host: tuple | None
  hbm_bytes: int  # per device
  peak_flops: float  # bf16 dense, per device
  devices_per_host: int


# Public per-chip figures (Cloud TPU docs): HBM and peak bf16 FLOP/s. v4 and v5p run as one
# device per chip (megacore).
TOPOLOGIES = {
    "v4-8": Topology("v4:2x2x1", None, 32 * GiB, 275e12, 4),
    "v4-32": Topology("v4:2x2x4", None, 32 * GiB, 275e12, 4),
    "v4-64": Topology("v4:2x4x4", None, 32 * GiB, 275e12, 4),
    "v4-128": Topology("v4:4x4x4", None, 32 * GiB, 275e12, 4),
    "v5e-16": Topology("v5e:4x4", (2, 2, 1), 16 * GiB, 197e12, 4),
    "v5e-64": Topology("v5e:8x8", (2, 2, 1), 16 * GiB, 197e12, 4),
    "v5e-256": Topology("v5e:16x16", (2, 2, 1), 16 * GiB, 197e12, 4),
    "v5p-64": Topology("v5p:2x4x4", None, 95 * GiB, 459e12, 4),
}


def topology_devices(name: str):
  if name not in TOPOLOGIES:
    raise ValueError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
  t = TOPOLOGIES[name]
  chip = "megacore" if name.startswith(("v4", "v5p")) else "default"
  kw = dict(platform="tpu", topology_name=t.name, chip_config_name=chip,
            num_slices=1)
  if t.chips_per_host:
    kw["chips_per_host_bounds"] = t.chips_per_host
  return topologies.get_topology_desc(**kw).devices


def compile_step(c, topology: str, steps_per_epoch: int = 10_000) -> dict:
  """Compiles the config's train step for a TPU topology; returns memory (bytes per device),
  FLOPs per step and the step time at peak."""
  t = TOPOLOGIES[topology]
  devices = topology_devices(topology)
  r = analyze(c, devices, hosts=len(devices) // t.devices_per_host, hbm_bytes=t.hbm_bytes, peak_flops=t.peak_flops,
              steps_per_epoch=steps_per_epoch)
  r["topology"] = topology
  return r


def analyze(c, devices, hosts: int, hbm_bytes: int, peak_flops: float, steps_per_epoch: int = 10_000) -> dict:
  """Lowers and compiles the sharded train step of config `c` over `devices` (abstract TPU devices
  of a topology, or real ones) without running it; XLA's memory and cost analyses per device."""

  mesh = make_mesh(c, devices)
  check_batch(c, mesh, processes=hosts)
  mcfg = model_config(c)
  total = c.total_steps if c.total_steps > 0 else c.epochs * steps_per_epoch
  step_fn, init_fn, shardings, batch_sharding, _ = build(c, mcfg, mesh, steps_per_epoch, total)
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       jax.eval_shape(init_fn, jax.random.PRNGKey(0)), shardings)
  g, s, length = c.batch_size, mcfg.vision.image_size, c.data.pipeline.text_length
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
  batch = {"image": spec((g, s, s, 3), jnp.uint8), "text_ids": spec((g, length), jnp.int32),
           "text_mask": spec((g, length), jnp.int32), "image_id": spec((g, 2), jnp.int32),
           "stop": spec((g,), jnp.int32)}
  with jax.set_mesh(mesh):
    compiled = step_fn.lower(state, batch).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  args, out, temp = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
  alias, code = mem.alias_size_in_bytes, mem.generated_code_size_in_bytes
  peak = args + out - alias + temp + code
  flops = float(cost.get("flops", 0.0))
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  return {"topology": None, "devices": len(devices), "hosts": hosts, "mesh": dict(mesh.shape),
          "batch": g, "image_size": s, "dtype": mcfg.dtype, "remat": bool(c.model.vision.remat),
          "state_bytes_unsharded": state_bytes,
          "arguments": args, "outputs": out, "aliased": alias, "temporaries": temp, "code": code,
          "total": peak, "hbm": hbm_bytes, "fits": peak <= hbm_bytes,
          "flops_per_device": flops, "step_s_at_peak": flops / peak_flops if flops else None,
          "examples_per_s_at_peak": g / (flops / peak_flops) if flops else None}


def format_report(r: dict) -> str:
  gib = lambda b: f"{b / GiB:.2f} GiB"
  lines = [f"{r['topology']}: {r['devices']} devices on {r['hosts']} hosts, mesh {r['mesh']}, global batch "
           f"{r['batch']} at {r['image_size']} px, {r['dtype']}, ViT remat {r['remat']}",
           f"  per device: arguments {gib(r['arguments'])} (state + batch), outputs {gib(r['outputs'])} "
           f"(aliased with arguments {gib(r['aliased'])}), temporaries {gib(r['temporaries'])}, code {gib(r['code'])}",
           f"  total {gib(r['total'])} of {gib(r['hbm'])} HBM: {'fits' if r['fits'] else 'DOES NOT FIT'}"]
  if r["step_s_at_peak"]:
    lines.append(f"  {r['flops_per_device'] / 1e12:.1f} TFLOP per device per step; at peak bf16 "
                 f"{r['step_s_at_peak'] * 1000:.0f} ms/step ({r['examples_per_s_at_peak']:.0f} examples/s); real "
                 "steps run at a fraction of peak (MFU)")
  return "\n".join(lines)
