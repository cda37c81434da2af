"""Memory and cost of a training config on a TPU pod or on NVIDIA GPUs, known before paying for
them (MaxText's ahead-of-time compile): the real sharded train step (or, for a bootstrap config,
CapFilt's captioner and filter programs) is compiled for the topology on this machine and XLA's
own memory and cost analyses are read back.

  blip-jax compile --config=configs/pretrain.py:vit_l --topology=v5e-256 [--config.k=v]
  blip-jax compile --config=configs/caption.py:coco --topology=h100-1 --config.batch_size=32

TPU: libtpu provides the compiler, but should not sit in the training environment of a CPU/GPU
machine (JAX would then try to start a TPU backend): `pip install --target DIR "libtpu==0.0.42.*"`
and `--libtpu DIR`; the command runs JAX with JAX_PLATFORMS=cpu. GPU: the CUDA plugin compiles for
a described card (GPU_TARGETS) with no GPU or driver; it lives in its own venv
(docs/accelerators.md). XLA reports no FLOPs for GPU compiles.
"""
from __future__ import annotations

import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from blip_jax.capfilt import itm_match_prob
from blip_jax.data import batch_shapes
from blip_jax.models import generate, layers
from blip_jax.models.blip import Blip
from blip_jax.models.init import init_params
from blip_jax.objectives import normalize_images
from blip_jax.parallel import DataParallel
from blip_jax.train.setup import build, check_batch, make_mesh, model_config

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # JAX topology name (TPU: "v5e:4x4"; GPU: "1x1x8", one host of 8)
  chips_per_host: tuple | None
  hbm_bytes: int  # per device
  peak_flops: float  # bf16 dense, per device
  devices_per_host: int
  gpu: str = ""  # GPU topologies: the card, a key of GPU_TARGETS


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

# NVIDIA cards as XLA's GpuTargetConfig describes them (what a real card reports to XLA; the
# memory is the card's total, of which JAX takes 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION says
# otherwise), and their dense bf16 peaks (NVIDIA's datasheets: H100 SXM 989 TFLOP/s, A100 312).
_GPU_INFO = ("threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152 "
             "threads_per_core_limit: 2048 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 "
             "block_dim_limit_z: 65535 registers_per_core_limit: 65536 registers_per_block_limit: 65536 ")
GPU_TARGETS = {
    "H100 80GB": (_GPU_INFO + "shared_memory_per_core: 233472 core_count: 132 fpus_per_core: 128 "
                  "memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98 "
                  "device_memory_size: 84929347584 shared_memory_per_block_optin: 232448 "
                  "cuda_compute_capability { major: 9 }", "NVIDIA H100 80GB HBM3"),
    "A100 80GB": (_GPU_INFO + "shared_memory_per_core: 167936 core_count: 108 fpus_per_core: 64 "
                  "memory_bandwidth: 2039000000000 l2_cache_size: 41943040 clock_rate_ghz: 1.41 "
                  "device_memory_size: 85198045184 shared_memory_per_block_optin: 166912 "
                  "cuda_compute_capability { major: 8 }", "NVIDIA A100-SXM4-80GB"),
}
for _n in (1, 8):
  TOPOLOGIES[f"h100-{_n}"] = Topology(f"1x1x{_n}", None, 84929347584, 989e12, _n, gpu="H100 80GB")
  TOPOLOGIES[f"a100-{_n}"] = Topology(f"1x1x{_n}", None, 85198045184, 312e12, _n, gpu="A100 80GB")


def gpu_target_config(card: str) -> str:
  info, name = GPU_TARGETS[card]
  return (f'gpu_device_info {{ {info} }} platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 8 }} '
          f'runtime_version {{ major: 12 minor: 9 patch: 0 }} device_description_str: "{name}"')


def topology_devices(name: str):
  if name not in TOPOLOGIES:
    raise ValueError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
  t = TOPOLOGIES[name]
  if t.gpu:  # the CUDA plugin compiles for a described card; no GPU or driver is needed
    return topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(t.gpu),
                                        topology=t.name).devices
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


def lower_step(c, devices, hosts: int = 1, steps_per_epoch: int = 10_000):
  """The sharded train step of config `c` lowered (traced, not compiled) over `devices`, "auto"
  attention choosing for their platform: (lowered, abstract state, model config, mesh)."""
  mesh = make_mesh(c, devices)
  check_batch(c, mesh, processes=hosts)
  mcfg = model_config(c)
  total = c.total_steps if c.total_steps > 0 else c.epochs * steps_per_epoch
  step_fn, init_fn, shardings, batch_sharding, _ = build(c, mcfg, mesh, steps_per_epoch, total)
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       jax.eval_shape(init_fn, jax.random.PRNGKey(0)), shardings)
  batch = train_batch(c, mcfg.vision.image_size, batch_sharding)
  with jax.set_mesh(mesh), layers.compiling_for(devices[0].platform):
    return step_fn.lower(state, batch), state, mcfg, mesh


def step_flops(c) -> float:
  """XLA's FLOP count of one whole train step (the global batch), from the step lowered for one CPU
  device: GPU lowerings and compiles report no cost analysis. Attention counts as the einsum path's
  matmuls, whatever kernel the target runs (cuDNN's custom call has no FLOP count either)."""
  one = copy.deepcopy(c)
  with one.unlocked():
    for axis in one.mesh:
      one.mesh[axis] = 1
    one.model.attention = "einsum"  # a CPU cannot lower cuDNN's kernel; the matmuls are the same
  return _flops(lower_step(one, jax.devices("cpu")[:1])[0].cost_analysis())


def _flops(cost) -> float:
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def analyze(c, devices, hosts: int, hbm_bytes: int, peak_flops: float, steps_per_epoch: int = 10_000) -> dict:
  """Lowers and compiles the sharded train step of config `c` over `devices` (abstract TPU or GPU
  devices of a topology, or real ones) without running it; XLA's memory and cost analyses per
  device (GPU: the FLOPs of step_flops, split over the devices)."""
  lowered, state, mcfg, mesh = lower_step(c, devices, hosts, steps_per_epoch)
  with jax.set_mesh(mesh):
    compiled = lowered.compile()
  v = mcfg.vision
  with layers.compiling_for(devices[0].platform):
    attention = layers.attention_implementation(
        v.attention, jax.ShapeDtypeStruct((1, 1, v.heads, v.width // v.heads), jnp.dtype(mcfg.dtype)))
  flops = _flops(compiled.cost_analysis()) or step_flops(c) / len(devices)
  g, s = c.batch_size, mcfg.vision.image_size
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  return {"topology": None, "task": c.task, "devices": len(devices), "hosts": hosts, "mesh": dict(mesh.shape),
          "batch": g, "image_size": s, "dtype": mcfg.dtype, "remat": bool(c.model.vision.remat),
          "attention": attention, "state_bytes_unsharded": state_bytes,
          **memory_figures(compiled, hbm_bytes), "hbm": hbm_bytes,
          "flops_per_device": flops, "step_s_at_peak": flops / peak_flops if flops else None,
          "examples_per_s_at_peak": g / (flops / peak_flops) if flops else None}


def compile_capfilt(c, topology: str, per_device: int = 64) -> dict:
  """CapFilt's two programs (blip_jax/capfilt.py) compiled for a topology from a bootstrap config
  (configs/bootstrap.py): the captioner's nucleus sampling and the filter's ITM on the web and
  synthetic texts, `per_device` images per device (neither the paper nor the official code gives
  CapFilt's batch). Params are replicated and images split over every device, as CapFilt's
  DataParallel does."""
  t = TOPOLOGIES[topology]
  devices = topology_devices(topology)
  r = analyze_capfilt(c, devices, t.hbm_bytes, per_device)
  r.update(topology=topology, hosts=len(devices) // t.devices_per_host)
  return r


def analyze_capfilt(c, devices, hbm_bytes: int, per_device: int) -> dict:
  """compile_capfilt over `devices` (a topology's abstract devices, or real ones)."""
  dp = DataParallel(devices)
  s, n = c.capfilt.settings, per_device * len(devices)
  spec = lambda shape, dtype, sharding=dp.batch: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  out = {"topology": None, "devices": len(devices), "hosts": 1, "images_per_device": per_device, "hbm": hbm_bytes}
  cap_cfg, filt_cfg = model_config(c.captioner), model_config(c.filter)
  prompt_tokens = 1 + len(s.prompt.split())  # [DEC] + the prompt's words (one WordPiece each in "a picture of ")

  def caption(params, images, prompt, rng):
    m = Blip(cap_cfg)
    embeds = m.apply({"params": params}, normalize_images(images), method=m.encode_image)
    return generate.sample(cap_cfg, params, embeds, prompt, rng, max_length=s.max_length, min_length=s.min_length,
                           top_p=s.top_p, top_k=s.top_k, temperature=s.temperature,
                           repetition_penalty=s.repetition_penalty, num_return_sequences=s.num_captions)

  texts = n * (s.num_captions + 1)  # each image's web text and its synthetic captions (one web text each here)

  def filter_scores(params, images, image_index, ids, mask):
    m = Blip(filt_cfg)
    embeds = m.apply({"params": params}, normalize_images(images), method=m.encode_image)
    return itm_match_prob(filt_cfg, params, embeds, image_index, ids, mask)

  images = lambda mcfg: spec((n, mcfg.vision.image_size, mcfg.vision.image_size, 3), np.uint8)
  programs = (("captioner", cap_cfg, caption, (images(cap_cfg), spec((n, prompt_tokens), np.int32),
                                               spec((2,), np.uint32, dp.replicated))),
              ("filter", filt_cfg, filter_scores, (images(filt_cfg), spec((texts,), np.int32),
                                                   spec((texts, s.text_length), np.int32),
                                                   spec((texts, s.text_length), np.int32))))
  for name, mcfg, fn, args in programs:
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dp.replicated),
                          jax.eval_shape(functools.partial(init_params, mcfg)))
    with layers.compiling_for(devices[0].platform):
      compiled = jax.jit(fn).lower(params, *args).compile()
    out[name] = {"image_size": mcfg.vision.image_size, "dtype": mcfg.dtype, **memory_figures(compiled, hbm_bytes)}
  return out


def memory_figures(compiled, hbm_bytes: int) -> dict:
  """XLA's memory analysis of a compiled program per device: its parts, their total, and whether it fits."""
  mem = compiled.memory_analysis()
  args, outs, temp = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
  alias, code = mem.alias_size_in_bytes, mem.generated_code_size_in_bytes
  total = args + outs - alias + temp + code
  return {"arguments": args, "outputs": outs, "aliased": alias, "temporaries": temp, "code": code, "total": total,
          "fits": total <= hbm_bytes}


def train_batch(c, image_size: int, sharding) -> dict:
  """The abstract global batch the trainer hands the step (blip_jax/train/trainer.py): the input
  pipeline's batch for the task's source kind, with split image ids and the stop flags."""
  kind = c.task if c.task in ("vqa", "nlvr") else "caption"  # pretraining and retrieval read captions
  shapes = batch_shapes(kind, dict(c.data.pipeline.to_dict(), image_size=image_size), c.batch_size)
  shapes.pop("index")
  shapes.update(image_id=((c.batch_size, 2), np.int32), stop=((c.batch_size,), np.int32))  # split_ids
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


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


def format_capfilt(r: dict) -> str:
  gib = lambda b: f"{b / GiB:.2f} GiB"
  lines = [f"{r['topology']}: CapFilt inference, {r['devices']} devices on {r['hosts']} hosts, "
           f"{r['images_per_device']} images per device"]
  for name in ("captioner", "filter"):
    m = r[name]
    lines.append(f"  {name} ({m['image_size']} px, {m['dtype']}): arguments {gib(m['arguments'])}, temporaries "
                 f"{gib(m['temporaries'])}, code {gib(m['code'])}; total {gib(m['total'])} of {gib(r['hbm'])}: "
                 f"{'fits' if m['fits'] else 'DOES NOT FIT'}")
  return "\n".join(lines)
