"""Per-device memory (and FLOPs, on TPUs) of every recipe before launch, from `blip-jax compile`:
the real sharded train step (or, for a bootstrap config, CapFilt's captioner and filter programs)
compiled on this machine for a TPU or GPU topology. One `blip-jax compile` process per run; prints
each report and a markdown table of them (README / docs/pretraining.md).

  pip install --target /opt/libtpu "libtpu==0.0.42.*"
  python bench/recipe_memory.py --libtpu /opt/libtpu --json out.json --runs \\
      pretrain.py:vit_b@v4-64 retrieval.py:coco@v5e-16 vqa.py:vqav2@v4-8:batch_size=128,model.vision.remat=true \\
      bootstrap.py:vit_b_14m@v5e-16

A run is CONFIG:VARIANT@TOPOLOGY[:key=value,...] (configs/CONFIG; model.dtype is bfloat16 unless a
run sets it; for CapFilt, the captioner's and the filter's). GPU topologies (h100-1, h100-8, a100-1, a100-8) need the CUDA plugin's venv
(docs/accelerators.md): --python /opt/cuda_venv/bin/python. A compile takes minutes on 2 cores.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
GiB = 2 ** 30


def parse_run(text):
  head, _, over = text.partition("@")
  topology, _, pairs = over.partition(":")
  overrides = dict(kv.split("=", 1) for kv in pairs.split(",") if kv)
  models = ("captioner.model", "filter.model") if head.startswith("bootstrap") else ("model",)
  for m in models:
    overrides.setdefault(f"{m}.dtype", "bfloat16")
  return head, topology, overrides


def row(config, r):
  gib = lambda b: f"{b / GiB:.1f}"
  if "captioner" in r:  # CapFilt inference
    return "\n".join(
        f"| {config} {name} | {r['topology']} | {r['images_per_device']} / device | data x{r['devices']} | - | "
        f"{m.get('attention', '')} | {gib(m['arguments'])} | {gib(m['temporaries'])} | {gib(m['total'])} / "
        f"{gib(r['hbm'])}{'' if m['fits'] else ' (does not fit)'} | - |" for name, m in (
            ("captioner (nucleus sampling)", r["captioner"]), ("filter (ITM)", r["filter"])))
  mesh = "x".join(str(r["mesh"][k]) for k in ("data", "fsdp", "tensor"))
  flops = f"{r['flops_per_device'] / 1e12:.1f}" if r["flops_per_device"] else "-"
  return (f"| {config} | {r['topology']} | {r['batch']} ({r['batch'] // r['devices']} / device) | {mesh} | "
          f"{'yes' if r['remat'] else 'no'} | {r['attention']} | {gib(r['arguments'])} | {gib(r['temporaries'])} | "
          f"{gib(r['total'])} / {gib(r['hbm'])}{'' if r['fits'] else ' (does not fit)'} | {flops} |")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--libtpu", default="", help="folder of `pip install --target DIR libtpu` (TPU topologies)")
  p.add_argument("--python", default=sys.executable, help="the Python whose blip-jax compiles (GPU: the CUDA venv)")
  p.add_argument("--runs", nargs="+", required=True)
  p.add_argument("--json", default="")
  a = p.parse_args()
  rows, reports = [], []
  for run in a.runs:
    config, topology, over = parse_run(run)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
      cmd = [a.python, "-c", "import sys; from blip_jax.cli import main; sys.argv[0] = 'blip-jax'; main()", "compile", f"--config=configs/{config}", f"--topology={topology}",
             f"--json={out.name}"] + ([f"--libtpu={a.libtpu}"] if a.libtpu else [])
      cmd += [f"--config.{k}={v}" for k, v in over.items()]
      print("$", " ".join(cmd), flush=True)
      done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
      if done.returncode:
        print(done.stderr[-3000:], flush=True)
        rows.append(f"| {config} | {topology} | failed: {done.stderr.strip().splitlines()[-1][:200]} |")
        continue
      r = json.load(open(out.name))
    r.update(config=config, overrides=over)
    reports.append(r)
    print(done.stdout.strip(), flush=True)
    rows.append(row(config, r))
    print(rows[-1], flush=True)
  print("| recipe | topology | global batch | mesh data x fsdp x tensor | ViT remat | attention | arguments GiB | "
        "temporaries GiB | total / HBM GiB | TFLOP / device / step |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(reports, f, indent=1)


if __name__ == "__main__":
  main()
