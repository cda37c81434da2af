"""Planted bugs and the tests that must catch them: each mutant is one exact edit of one file.

  .venv/bin/python tests/mutants.py [--only NAME ...] [--list]

For each mutant: the working tree's files (tracked and untracked-not-ignored) are copied into a
scratch folder, the edit is applied there (the text must occur exactly once), the mutant's tests
run there with this interpreter, and the mutant is 'caught' when they fail. The checkout itself is
never touched. Run on demand (minutes per mutant), not by CI. Exit status 1 when one survives.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TRAINING = "tests/test_official_training.py"


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str
  old: str
  new: str
  tests: tuple
  why: str = ""


MUTANTS = [
    # issue 25: training side by side with the official code (bugs a one-step test misses)
    Mutant("weight decay skipped on biases and norms", "blip_jax/train/step.py",
           'eps=opt["eps"], weight_decay=opt["weight_decay"]))',
           'eps=opt["eps"], weight_decay=opt["weight_decay"], mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))',
           (f"{TRAINING}::test_pretraining_matches_official", f"{TRAINING}::test_caption_finetuning_matches_official"),
           "the common convention, not BLIP's: the official AdamW decays every parameter"),
    Mutant("lr schedule one step late", "blip_jax/train/step.py",
           'chain.append(optax.adamw(lr_fn, ', 'chain.append(optax.adamw(lambda count: lr_fn(count + 1), ',
           (f"{TRAINING}::test_pretraining_matches_official",),
           "the step's reported lr stays right; only the update uses the next step's lr"),
    Mutant("momentum updated after the momentum forward", "blip_jax/train/step.py",
           "f = lambda p: _forward(cfg, loss_cfg, p, momentum, mb, queues, alpha, r)",
           'f = lambda p: _forward(cfg, loss_cfg, p, state["momentum"], mb, queues, alpha, r)',
           (f"{TRAINING}::test_pretraining_matches_official",),
           "the towers end equal; the features the step used (ITC, queue) do not"),
    Mutant("queue written before it is read", "blip_jax/losses.py",
           "image_keys = jnp.concatenate([image_feat_m, image_queue], axis=0)",
           "image_keys = jnp.concatenate([image_feat_m, jax.lax.dynamic_update_slice(image_queue, image_feat_m, (0, 0))], axis=0)",
           (f"{TRAINING}::test_pretraining_matches_official",)),
    Mutant("alpha ramped per epoch instead of per step", "blip_jax/train/step.py",
           "ramp = jnp.minimum(1.0, s / loss_cfg.alpha_ramp_steps)",
           "ramp = jnp.minimum(1.0, jnp.floor(2 * s / loss_cfg.alpha_ramp_steps) / 2)",
           (f"{TRAINING}::test_pretraining_matches_official",)),
    Mutant("warm-up continued past epoch 0", "blip_jax/train/step.py",
           "return jnp.where(epoch == 0, jnp.minimum(warm, lr), decayed)",
           "return jnp.where(step < warmup_steps, jnp.minimum(warm, lr), decayed)",
           (f"{TRAINING}::test_pretraining_matches_official",),
           "the difference the side-by-side run found at step 10"),
    Mutant("a checkpoint's queue pointer and image ids not restored", "blip_jax/train/trainer.py",
           'new.update(official_buffers(extras.get("buffers", {}), mcfg.kind, *state["image_queue"].shape))',
           'new.update({k: v for k, v in official_buffers(extras.get("buffers", {}), mcfg.kind, '
           '*state["image_queue"].shape).items() if k.endswith("_queue") and k != "idx_queue"})',
           (f"{TRAINING}::test_pretraining_matches_official", f"{TRAINING}::test_retrieval_finetuning_matches_official"),
           "the difference found when the runs start from a checkpoint in mid-run"),
    Mutant("ITM negatives drawn from the momentum similarities in retrieval", "blip_jax/train/step.py",
           "s = image_feat @ text_feat.T / temp",
           "s = image_feat_m @ text_feat_m.T / temp",
           (f"{TRAINING}::test_retrieval_finetuning_matches_official",),
           "official retrieval samples from online-vs-online similarities"),
    Mutant("VQA loss averaged over answers instead of questions", "blip_jax/losses.py",
           "return (weights * per_answer).sum() / b", "return (weights * per_answer).sum() / (b * a)",
           (f"{TRAINING}::test_vqa_finetuning_matches_official",)),
    # issue 25 item 3: inference against the official modules
    Mutant("VQA rank step 1 attends to padded question tokens", "blip_jax/models/answer.py",
           "logits = Blip(cfg).apply({\"params\": params}, states, q_mask, start, jnp.ones_like(start),",
           "logits = Blip(cfg).apply({\"params\": params}, states, jnp.ones_like(q_mask), start, jnp.ones_like(start),",
           ("tests/test_vqa.py::test_rank_equals_the_official_rank_answer",),
           "the official masks them; transformers' BLIP does not, so only the official code sees this"),
    Mutant("NLVR2 averaging layers keep the first image only", "blip_jax/models/med.py",
           "y = (outs[0] + outs[1]) / 2", "y = outs[0]",
           ("tests/test_nlvr.py::test_logits_equal_the_official_model",)),
    Mutant("ITC text feature not normalised", "blip_jax/models/blip.py",
           "return _l2_normalize(self.text_proj(self.text_embeds(ids, mask, train)[:, 0]))",
           "return self.text_proj(self.text_embeds(ids, mask, train)[:, 0])",
           ("tests/test_parity.py::test_itc_and_itm_heads_equal_official_blip_itm",)),
    Mutant("NLVR2 merge layers take the pair in the other order", "blip_jax/models/med.py",
           "(jnp.concatenate(outs, axis=-1))", "(jnp.concatenate(outs[::-1], axis=-1))",
           (f"{TRAINING}::test_nlvr_finetuning_matches_official",),
           "only text layers 6-7 merge: the side-by-side run needs 8 text layers to see it"),
]


def copy_tree(dst: str):
  files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode().split("\0")
  for f in filter(None, files):
    src = os.path.join(ROOT, f)
    if os.path.isfile(src):
      os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
      shutil.copy2(src, os.path.join(dst, f))


def run(m: Mutant) -> tuple[str, float, str]:
  with tempfile.TemporaryDirectory(prefix="blip_mutant_") as tmp:
    tree = os.path.join(tmp, "main")
    copy_tree(tree)
    os.symlink(os.path.join(ROOT, "..", "shared"), os.path.join(tmp, "shared"))  # the tests' ../shared
    path = os.path.join(tree, m.path)
    with open(path) as f:
      text = f.read()
    if text.count(m.old) != 1:
      return "stale", 0.0, f"the text to edit occurs {text.count(m.old)} times in {m.path}"
    with open(path, "w") as f:
      f.write(text.replace(m.old, m.new))
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests], cwd=tree,
                       capture_output=True, text=True)
    tail = [line for line in r.stdout.splitlines() if line.startswith(("E ", "FAILED", "ERROR"))][:2]
    status = "caught" if r.returncode == 1 else ("survived" if r.returncode == 0 else f"error {r.returncode}")
    return status, time.time() - t, " | ".join(tail)[:300]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only", nargs="*", help="run the mutants whose name contains one of these")
  ap.add_argument("--list", action="store_true")
  a = ap.parse_args()
  chosen = [m for m in MUTANTS if not a.only or any(o in m.name for o in a.only)]
  if a.list:
    for m in chosen:
      print(f"{m.name}: {m.path}  ->  {', '.join(m.tests)}")
    return 0
  results = []
  for m in chosen:
    status, secs, detail = run(m)
    results.append(status)
    print(f"{status:9s} {secs:6.1f}s  {m.name}  [{m.path}]  {detail}", flush=True)
  caught = results.count("caught")
  print(f"{caught} of {len(results)} mutants caught")
  return 0 if caught == len(results) else 1


if __name__ == "__main__":
  sys.exit(main())
