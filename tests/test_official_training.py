"""Training equals the official BLIP, step for step: the official PyTorch models (salesforce/BLIP,
from PyPI's blip-vit, tests/official_code.py) and ours trained side by side from the same weights
(the official state dict saved as a .pth, read by our loader through init.blip as a user starts a
run), on the same images and captions, dropout and drop path off, the same ITM hard negatives
(ours drawn, handed to the official torch.multinomial). The official side: torch.optim.AdamW on
all parameters with the official yaml's hyper-parameters and the official scripts' schedules
(tests/official_side.py); ours: the task's recipe config -> trainer.build -> the jitted step.
Only the size, the lr (large enough to move every weight far beyond float noise), the warm-up and
the epoch length are shrunk, on both sides alike.

Tolerances (fp32), and why (docs/training_parity.md has the figures). Every step's losses, lr and
alpha agree to LOSS_TOL relative (measured: 3e-6 or less). After the last step the weights, the
momentum towers and the queues are held against the exact run: an fp64 twin of the official model
trained beside the two. Ours must end no farther from it than FP64_FACTOR x the official fp32
code's own distance, or within PARAM_TOL x the peak lr (weights: a quarter of the largest change
one AdamW step makes to a weight) / BUFFER_TOL relative (momentum towers and queues); every tensor
moved by more than 5x PARAM_TOL (asserted). Not 1e-4 of each weight's value: AdamW divides each
gradient by its running RMS + 1e-8, so an element whose exact gradient is near 1e-9 turns a 5e-9
rounding difference into a tenth of a step (NLVR2's 'out' embedding row here), and where a queue
of positives makes the word embeddings ill-conditioned (retrieval) the official fp32 run itself
ends 0.36 lr from the exact one. Elements whose exact gradient is zero (attention key biases:
softmax ignores a constant per row) move by rounding noise alone on every side: they are held to
the most Adam can move them (the sum of the lrs) and left out of the rest
(official_side.zero_gradient_elements).
"""
from __future__ import annotations

import contextlib
import copy
import os

import jax
import numpy as np
import official_side as S
import pytest
import torch
import yaml

from blip_jax import losses
from blip_jax.checkpoints.convert import load_state_dict
from blip_jax.data.device import global_batch
from blip_jax.objectives import contrastive_keys
from blip_jax.tokenizers import BertTokenizer
from blip_jax.train import setup as trainer
from blip_jax.train.step import micro_key, split_ids

LOSS_TOL = 1e-4  # relative, every step's losses, lr and alpha
PARAM_TOL = 0.25  # x the peak lr: a quarter of the largest change one AdamW step makes to a weight
BUFFER_TOL = 1e-4  # relative to the tensor's largest value: momentum towers and queues
FP64_FACTOR = 2.0  # ours may end at most this many times farther from the exact run than the official fp32
REPORT: dict = {}  # per task: steps, worst loss / state differences (printed at the module's end)


@pytest.fixture(scope="module")
def tok(vocab_path):
  return BertTokenizer(vocab_path)


@pytest.fixture(scope="module", autouse=True)
def report():
  yield REPORT
  for task, r in REPORT.items():
    print(f"\n{task}: {r}")


def official_yaml(official_blip, name) -> dict:
  """An official configs/*.yaml. The official scripts read it with ruamel (YAML 1.2: '1e-6' is a
  number); PyYAML (1.1) leaves such values strings, so numbers are parsed here."""
  def number(v):
    try:
      return float(v) if isinstance(v, str) else v
    except ValueError:
      return v
  with open(os.path.join(official_blip.root, "blip", "configs", name)) as f:
    return {k: number(v) for k, v in yaml.safe_load(f).items()}


def small(c, **over):
  """A task recipe config (configs/*.py) at the test's size; the rest of the recipe kept."""
  c.unlock()
  c.model.update(vit="", image_size=S.IMAGE)
  c.model.vision.update(width=S.WIDTH, depth=S.DEPTH, heads=S.HEADS, mlp_dim=4 * S.WIDTH, patch=16,
                        drop_path=0.0, layer_norm_eps=1e-6)
  c.model.text.update(width=S.WIDTH, depth=S.DEPTH, heads=S.HEADS, mlp_dim=2 * S.WIDTH, vocab_size=30524,
                      max_positions=64, dropout=0.0)
  c.tokenizer.update(type="bert", vocab="")
  c.update_from_flattened_dict(over)
  c.lock()
  return c


class Ours:
  """Our side as `blip-jax train` builds it: tokenizer -> model config -> mesh (one device, as the
  official world of one process) -> trainer.build (optimizer, schedule, jitted step) -> a fresh
  state initialised from the official .pth (init.blip)."""

  def __init__(self, c, pth, tok, steps_per_epoch):
    c.unlock()
    c.init.blip = str(pth)
    c.lock()
    self.cfg = trainer.model_config(c, tok)
    self.mesh = trainer.make_mesh(c, jax.devices()[:1])
    self.prompt_length = trainer.prompt_length(c, tok)
    self.step_fn, init_fn, shardings, self.batch_sharding, _ = trainer.build(
        c, self.cfg, self.mesh, steps_per_epoch, c.epochs * steps_per_epoch, self.prompt_length)
    with jax.set_mesh(self.mesh):
      state = init_fn(jax.random.PRNGKey(c.seed))
    self.state = trainer.initialise_from(c, self.cfg, state, shardings)
    self.rng = np.asarray(jax.device_get(self.state["rng"]))

  def host(self):
    return jax.tree.map(np.asarray, jax.device_get(self.state))

  def step(self, batch):
    with jax.set_mesh(self.mesh):
      self.state, m = self.step_fn(self.state, global_batch(batch, self.batch_sharding))
    return {k: float(v) for k, v in jax.device_get(m).items()}


def rel(a, b):
  return abs(a - b) / max(abs(b), 1e-6)


def _state_groups(params, extras_or_state, official_layout: bool) -> dict:
  """{group: tree}: the weights, and for the contrastive kinds the momentum towers and the queues
  (ours [Q, D]; an official state dict's buffers (D, Q) transposed)."""
  out = {"params": params}
  if official_layout:
    if "momentum" in extras_or_state:
      buf = extras_or_state["buffers"]
      out.update(momentum=extras_or_state["momentum"], image_queue={"q": buf["image_queue"].T},
                 text_queue={"q": buf["text_queue"].T})
  elif "momentum" in extras_or_state:
    out.update(momentum=extras_or_state["momentum"], image_queue={"q": extras_or_state["image_queue"]},
               text_queue={"q": extras_or_state["text_queue"]})
  return out


def check_state(ours: Ours, start: dict, official32, exact, where: str, lrs: list) -> dict:
  """Our state after the last step against the official one (both read from its final state dict
  by our loader). `exact`: the official model trained in fp64 beside it. Every tensor of ours must
  be as near the exact run as the official fp32 code is (FP64_FACTOR x its distance), or within
  PARAM_TOL x the peak lr (weights) / BUFFER_TOL relative (momentum towers, queues); the queue's
  image ids and pointer equal. Returns the figures for the report."""
  peak = max(lrs)
  end = ours.host()
  least, leaf = S.moved(start["params"], end["params"])
  assert least > 5 * PARAM_TOL * peak, f"{where}: {leaf} moved only {least:.2e}: the run must move every parameter"
  ref32, ref32_extras = load_state_dict(official32, ours.cfg, "official")
  ref64, ref64_extras = load_state_dict(exact, ours.cfg, "official")
  mine = _state_groups(end["params"], end, False)
  off = _state_groups(ref32, ref32_extras, True)
  ex = _state_groups(ref64, ref64_extras, True)
  assert set(mine) == set(off) == set(ex), (sorted(mine), sorted(off))
  report = {}
  for group in mine:
    kind, floor = ("abs", PARAM_TOL * peak) if group == "params" else ("rel", BUFFER_TOL)
    scale = peak if kind == "abs" else 1.0
    d_ours, leaf = S.worst_difference(mine[group], ex[group], f"{where} {group}", sum(lrs))[kind]
    d_off, _ = S.worst_difference(off[group], ex[group], f"{where} {group} official", sum(lrs))[kind]
    d_direct, _ = S.worst_difference(mine[group], off[group], f"{where} {group} direct", 2 * sum(lrs))[kind]
    bound = max(FP64_FACTOR * d_off, floor)
    assert d_ours <= bound, (f"{where}: {group} {leaf} is {d_ours:.2e} ({kind}) from the exact run, the official fp32 "
                             f"{d_off:.2e}; allowed {bound:.2e}")
    unit = "_over_lr" if kind == "abs" else "_rel"
    report[group] = {f"ours_vs_official{unit}": float(f"{d_direct / scale:.2e}"),
                     f"ours_vs_exact{unit}": float(f"{d_ours / scale:.2e}"),
                     f"official_vs_exact{unit}": float(f"{d_off / scale:.2e}")}
  report["least_move_over_lr"] = float(f"{least / peak:.2e}")
  if "momentum" in end:
    buf = ref32_extras["buffers"]
    ptr = "queue_ptr" if "queue_ptr" in buf else "ptr_queue"
    assert int(end["queue_ptr"]) == int(buf[ptr][0]), (int(end["queue_ptr"]), buf[ptr])
    if "idx_queue" in buf:
      np.testing.assert_array_equal(end["idx_queue"], split_ids(buf["idx_queue"][0]))
  return report


def side_by_side(task, ours: Ours, model, steps, batch_at, official_loss, names, lr_at, alpha_at=None,
                 weight_decay=0.05, replay=False):
  """Trains ours, the official model and its fp64 twin for `steps`: batch_at(s) -> (our batch,
  official inputs); official_loss(s, inputs, model) -> {name: loss tensor} whose sum is
  back-propagated; names: our metric -> official loss name."""
  runs = [(model, torch.float32), (copy.deepcopy(model).double(), torch.float64)]
  opts = [torch.optim.AdamW(m.parameters(), lr=lr_at(0), weight_decay=weight_decay) for m, _ in runs]  # torch defaults otherwise
  for m, _ in runs:
    m.train()
  start = ours.host()
  worst = {}
  for s in range(steps):
    batch, inputs = batch_at(s)
    metrics = ours.step(batch)
    for (m, dtype), opt in zip(runs, opts):
      S.set_lr(opt, lr_at(s))
      draws = (S.replayed_multinomial(contrastive_keys(micro_key(ours.rng, s)), losses.sample_negatives)
               if replay else contextlib.nullcontext())
      torch.set_default_dtype(dtype)
      try:
        with draws:
          out = official_loss(s, tuple(x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x
                                       for x in inputs), m)
      finally:
        torch.set_default_dtype(torch.float32)
      opt.zero_grad()
      sum(out.values()).backward()
      opt.step()
      if m is model:
        off = out
    diffs = {"lr": rel(metrics["lr"], lr_at(s))}
    if alpha_at is not None:
      diffs["alpha"] = abs(metrics["alpha"] - alpha_at(s))
    diffs.update({n: rel(metrics[n], off[o].item()) for n, o in names.items()})
    bad = {k: v for k, v in diffs.items() if v > LOSS_TOL}
    assert not bad, f"{task} step {s}: {bad}; ours {metrics}, official { {k: v.item() for k, v in off.items()} }"
    worst = {k: max(worst.get(k, 0.0), v) for k, v in diffs.items()}
  exact = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in runs[1][0].state_dict().items()}
  state = check_state(ours, start, S.state_dict_numpy(model), exact, task, [lr_at(s) for s in range(steps)])
  REPORT[task] = {"steps": steps, "worst_step_diff": {k: float(f"{v:.2e}") for k, v in worst.items()}, **state}


# ---- pretraining -----------------------------------------------------------------------------------
def test_pretraining_matches_official(official_blip, tok, tmp_path):
  """BLIP_Pretrain (ITC with momentum distillation over batch + queue, ITM on hard negatives, LM)
  and configs/pretrain.py:vit_b, 30 steps: 3 epochs of 10, a warm-up of 12 steps (cut at epoch 0's
  end, as pretrain.py does), the step decay per epoch, alpha ramped over 2 epochs, a queue of 3
  batches that wraps 10 times."""
  from configs.pretrain import get_config
  y = official_yaml(official_blip, "pretrain.yaml")
  b, q, spe, steps = 8, 24, 10, 30
  model = S.small_official(official_blip.blip_pretrain.BLIP_Pretrain, tmp_path, vocab_size=30522, seed=1, queue_size=q,
                           momentum=0.995)  # bert_config.json's vocab, resized by BLIP_Pretrain
  model.queue_ptr[0] = 8  # a checkpoint in mid-run: the queue continues where it was
  lr, warmup = 1e-3, 12
  c = small(get_config("vit_b"), batch_size=b, epochs=3,
            **{"loss.queue_size": q, "optim.lr": lr, "optim.warmup_steps": warmup})
  ours = Ours(c, S.save_pth(model, tmp_path / "start.pth"), tok, spe)

  def batch_at(s):
    caps, img = S.coco_captions(b, s), S.images(b, s)
    ids, mask = tok(caps, max_length=30)  # official: padding='max_length', max_length=30
    if s == 0:
      np.testing.assert_array_equal(ids, model.tokenizer(caps, padding="max_length", truncation=True, max_length=30,
                                                         return_tensors="np").input_ids)
    return ({"image": img, "text_ids": ids, "text_mask": mask,
             "image_id": split_ids(np.arange(s * b, (s + 1) * b))}, (S.nchw(img), caps))

  def official_loss(s, inputs, m):
    ita, itm, lm = m(*inputs, alpha=S.pretrain_alpha(s, spe, y["alpha"]))
    return {"ita": ita, "itm": itm, "lm": lm}

  side_by_side("pretraining", ours, model, steps, batch_at, official_loss,
               {"loss_itc": "ita", "loss_itm": "itm", "loss_lm": "lm"},
               lr_at=lambda s: S.pretrain_lr(s, spe, lr, y["warmup_lr"], warmup, y["lr_decay_rate"], y["min_lr"]),
               alpha_at=lambda s: S.pretrain_alpha(s, spe, y["alpha"]), weight_decay=y["weight_decay"], replay=True)


# ---- retrieval fine-tuning ----------------------------------------------------------------------------
def test_retrieval_finetuning_matches_official(official_blip, tok, tmp_path):
  """BLIP_Retrieval with negative_all_rank (configs/retrieval.py:coco): ITC positives by image id
  over batch + idx queue, every batch with repeated images (several captions of one image), hard
  negatives over the whole batch with same-image pairs excluded; alpha ramped over epoch 0, the
  cosine lr per epoch; 12 steps, 3 epochs of 4, a queue of 3 batches."""
  from configs.retrieval import get_config
  y = official_yaml(official_blip, "retrieval_coco.yaml")
  b, q, spe, epochs, steps = 8, 24, 4, 3, 12
  model = S.small_official(official_blip.blip_retrieval.BLIP_Retrieval, tmp_path, seed=2, queue_size=q,
                           negative_all_rank=y["negative_all_rank"])
  # a retrieval checkpoint in mid-run (as model_base_retrieval_coco.pth): the queue's image ids are
  # those of the images its features came from (here ids the batches reuse: positives) and the
  # pointer continues where it was, as official load_checkpoint restores them
  model.idx_queue.copy_(torch.from_numpy(np.random.RandomState(2).randint(0, 15, (1, q))))
  model.ptr_queue[0] = 16
  lr = 1e-3
  c = small(get_config("coco"), batch_size=b, epochs=epochs, **{"loss.queue_size": q, "optim.lr": lr})
  ours = Ours(c, S.save_pth(model, tmp_path / "start.pth"), tok, spe)
  groups = np.array([0, 0, 1, 2, 2, 2, 3, 4])  # captions of 5 images

  def batch_at(s):
    caps, img = S.coco_captions(b, 100 + s), S.images(5, 100 + s)[groups]
    idx = groups + 5 * (s % 3)  # image ids recur across steps: queue entries of the same image are positives
    ids, mask = tok(caps, max_length=35)
    return ({"image": img, "text_ids": ids, "text_mask": mask, "image_id": split_ids(idx)},
            (S.nchw(img), caps, torch.from_numpy(idx)))

  def official_loss(s, inputs, m):
    img, caps, idx = inputs
    ita, itm = m(img, caps, alpha=S.retrieval_alpha(s, spe, y["alpha"]), idx=idx)
    return {"ita": ita, "itm": itm}

  side_by_side("retrieval", ours, model, steps, batch_at, official_loss, {"loss_itc": "ita", "loss_itm": "itm"},
               lr_at=lambda s: S.cosine_lr(s, spe, epochs, lr, y["min_lr"]),
               alpha_at=lambda s: S.retrieval_alpha(s, spe, y["alpha"]), weight_decay=y["weight_decay"], replay=True)


# ---- captioning, VQA, NLVR2 ---------------------------------------------------------------------------
def test_caption_finetuning_matches_official(official_blip, tok, tmp_path):
  """BLIP_Decoder.forward (configs/caption.py:coco): 'a picture of ' + caption, [DEC] first, the
  prompt's tokens and padding not targets, label smoothing 0.1; 10 steps, cosine lr per epoch."""
  from configs.caption import get_config
  y = official_yaml(official_blip, "caption_coco.yaml")
  b, spe, epochs, steps = 8, 4, 3, 10
  model = S.small_official(official_blip.blip.BLIP_Decoder, tmp_path, seed=3, prompt=y["prompt"])
  lr = 1e-3
  c = small(get_config("coco"), batch_size=b, epochs=epochs, **{"optim.lr": lr})
  ours = Ours(c, S.save_pth(model, tmp_path / "start.pth"), tok, spe)
  assert c.data.pipeline.prompt == y["prompt"] and ours.prompt_length == model.prompt_length == 4

  def batch_at(s):
    caps = [y["prompt"] + t for t in S.coco_captions(b, 200 + s)]  # the official dataset prepends it
    img = S.images(b, 200 + s)
    ids, mask = tok(caps, max_length=c.data.pipeline.text_length)
    return {"image": img, "text_ids": ids, "text_mask": mask}, (S.nchw(img), caps)

  side_by_side("caption", ours, model, steps, batch_at, lambda s, inputs, m: {"lm": m(*inputs)}, {"loss_lm": "lm"},
               lr_at=lambda s: S.cosine_lr(s, spe, epochs, lr, y["min_lr"]), weight_decay=y["weight_decay"])


def test_vqa_finetuning_matches_official(official_blip, tok, tmp_path):
  """BLIP_VQA.forward(train=True) (configs/vqa.py:vqav2): the question encoded against the image,
  each question's several answers decoded from its states, loss = sum(weight x summed token loss)
  / questions; 10 steps."""
  from configs.vqa import get_config
  y = official_yaml(official_blip, "vqa.yaml")
  b, spe, epochs, steps, max_answers, answer_length = 4, 4, 3, 10, 10, 8
  model = S.small_official(official_blip.blip_vqa.BLIP_VQA, tmp_path, drop_path=0.0, seed=4)
  lr = 1e-3
  c = small(get_config("vqav2"), batch_size=b, epochs=epochs, **{"optim.lr": lr})
  ours = Ours(c, S.save_pth(model, tmp_path / "start.pth"), tok, spe)
  vocabulary = ["yes", "no", "two", "red", "a dog", "tennis racket", "on the table", "blue and white"]

  def batch_at(s):
    r = np.random.RandomState(300 + s)
    questions = [" ".join(t.split()[:8]) for t in S.coco_captions(b, 300 + s)]
    n = r.randint(1, 4, b)  # 1-3 answers per question, as VQA's unique answers
    answers = [list(r.choice(vocabulary, k, replace=False)) for k in n]
    weights = [list(np.round(w / w.sum(), 1)) for w in (r.randint(1, 10, k).astype(float) for k in n)]
    img = S.images(b, 300 + s)
    q_ids, q_mask = tok(questions, max_length=35)
    a_ids = np.zeros((b, max_answers, answer_length), np.int32)
    a_mask = np.zeros_like(a_ids)
    a_w = np.zeros((b, max_answers), np.float32)
    for i in range(b):
      a_ids[i, :n[i]], a_mask[i, :n[i]] = tok(answers[i], max_length=answer_length)
      a_w[i, :n[i]] = weights[i]
    flat_answers = [a for row in answers for a in row]
    flat_weights = torch.tensor([w for row in weights for w in row], dtype=torch.float32)
    return ({"image": img, "question_ids": q_ids, "question_mask": q_mask, "answer_ids": a_ids,
             "answer_mask": a_mask, "answer_weights": a_w},
            (S.nchw(img), questions, flat_answers, torch.tensor(n), flat_weights))

  def official_loss(s, inputs, m):
    img, questions, answers, n, weights = inputs
    return {"vqa": m(img, questions, answers, n=n, weights=weights, train=True)}

  side_by_side("vqa", ours, model, steps, batch_at, official_loss, {"loss_vqa": "vqa"},
               lr_at=lambda s: S.cosine_lr(s, spe, epochs, lr, y["min_lr"]), weight_decay=y["weight_decay"])


def test_nlvr_finetuning_matches_official(official_blip, tok, tmp_path):
  """BLIP_NLVR.forward(train=True) (configs/nlvr.py:nlvr2): both images through the ViT, the
  sentence grounded in each by its own cross-attention, averaged in text layers 0-5 and merged
  from layer 6 on (8 text layers here, so both kinds run), the MLP head's cross-entropy; 10 steps."""
  from configs.nlvr import get_config
  y = official_yaml(official_blip, "nlvr.yaml")
  b, spe, epochs, steps, depth = 8, 4, 3, 10, 8
  model = S.small_official(official_blip.blip_nlvr.BLIP_NLVR, tmp_path, depth=depth, drop_path=0.0, seed=5)
  lr = 1e-3
  c = small(get_config("nlvr2"), batch_size=b, epochs=epochs, **{"optim.lr": lr, "model.text.depth": depth})
  ours = Ours(c, S.save_pth(model, tmp_path / "start.pth"), tok, spe)

  def batch_at(s):
    sentences = S.coco_captions(b, 400 + s)
    left, right = S.images(b, 400 + s), S.images(b, 500 + s)
    label = (np.random.RandomState(400 + s).uniform(size=b) < 0.75).astype(np.int64)  # 3:1, so the head's bias moves
    ids, mask = tok(sentences, max_length=c.data.pipeline.text_length)
    return ({"image": left, "image2": right, "text_ids": ids, "text_mask": mask, "label": label.astype(np.int32)},
            (torch.cat([S.nchw(left), S.nchw(right)]), sentences, torch.from_numpy(label)))

  side_by_side("nlvr", ours, model, steps, batch_at, lambda s, inputs, m: {"nlvr": m(*inputs, train=True)},
               {"loss_nlvr": "nlvr"}, lr_at=lambda s: S.cosine_lr(s, spe, epochs, lr, y["min_lr"]),
               weight_decay=y["weight_decay"])
