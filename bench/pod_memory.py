"""Per-device memory and FLOPs of the pretraining recipes on TPU pods, from ahead-of-time compiles
of the real sharded train step on this machine (blip_jax/train/aot.py; libtpu provides the compiler).

  pip install --target /tmp/libtpu "libtpu==0.0.42.*"
  python bench/pod_memory.py --libtpu /tmp/libtpu --runs vit_b@v4-64 vit_l@v5e-256:mesh.fsdp=4 --json out.json

A run is VARIANT@TOPOLOGY[:key=value,...]; each prints its report and a markdown row. Every
compile of a ViT-B/L step for 32-256 devices takes minutes on 2 cores.
"""
import argparse
import json
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def parse_run(text):
  head, _, over = text.partition(":")
  variant, topology = head.split("@")
  pairs = dict(kv.split("=", 1) for kv in over.split(",") if kv)
  return variant, topology, pairs


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--libtpu", required=True)
  p.add_argument("--runs", nargs="+", required=True)
  p.add_argument("--json", default="")
  a = p.parse_args()
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  sys.path.insert(0, a.libtpu)
  sys.path.insert(0, ROOT)
  import ml_collections

  from blip_jax.train import aot
  from configs.pretrain import get_config
  rows, reports = [], []
  for run in a.runs:
    variant, topology, over = parse_run(run)
    c = get_config(variant)
    c.unlock()
    c.model.dtype = "bfloat16"
    for k, v in over.items():
      node = c
      *path, last = k.split(".")
      for part in path:
        node = node[part]
      node[last] = type(node[last])(v) if not isinstance(node[last], bool) else v.lower() in ("1", "true")
    c.lock()
    assert isinstance(c, ml_collections.ConfigDict)
    r = aot.compile_step(c, topology)
    r.update(variant=variant, overrides=over)
    reports.append(r)
    print(aot.format_report(r), flush=True)
    gib = lambda b: f"{b / 2 ** 30:.1f}"
    rows.append(f"| {variant} | {topology} | {r['batch']} | {r['mesh']['data']}x{r['mesh']['fsdp']}x{r['mesh']['tensor']} | "
                f"{'yes' if r['remat'] else 'no'} | {gib(r['arguments'])} | {gib(r['temporaries'])} | {gib(r['total'])} / "
                f"{gib(r['hbm'])} | {r['flops_per_device'] / 1e12:.1f} | {r['step_s_at_peak'] * 1000:.0f} |")
    print(rows[-1], flush=True)
  print("| recipe | topology | global batch | mesh data x fsdp x tensor | ViT remat | arguments GiB | temporaries GiB | "
        "total / HBM GiB | TFLOP/device/step | ms/step at peak |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(reports, f, indent=1)


if __name__ == "__main__":
  main()
