"""ms/step of our pretraining step (ITC + ITM + LM, fwd + bwd + AdamW, momentum + queue) against a
PyTorch step computing the same three losses from transformers' BLIP modules (official
BLIP_Pretrain.forward, encoder/decoder sharing all but self-attention), same config, batch, fp32,
measured in one run. Also prints model FLOPs per example (XLA cost analysis) and, on an accelerator,
MFU.

  .venv/bin/python bench/pretrain_step.py --sizes tiny,base --steps 3 [--threads 2]
"""
import argparse
import os
import sys
import time

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("--sizes", default="tiny,base")
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--dtype", default="float32")
ap.add_argument("--batch", type=int, default=0, help="override the batch size of every size")
ap.add_argument("--peak-tflops", type=float, default=0.0, help="accelerator peak (e.g. 989 for H100 bf16)")
ap.add_argument("--no-torch", action="store_true")
A = ap.parse_args()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SIZES = {  # vision (width, depth, heads, mlp), text (width, depth, heads, mlp), image, batch, text len
    "tiny": dict(v=(192, 4, 3, 768), t=(192, 4, 3, 768), image=224, batch=8, length=30, queue=256),
    "base": dict(v=(768, 12, 12, 3072), t=(768, 12, 12, 3072), image=224, batch=4, length=30, queue=256),
}


def batch_np(s):
  r = np.random.RandomState(0)
  b, l = s["batch"], s["length"]
  ids = r.randint(1000, 30000, (b, l)).astype(np.int32)
  ids[:, 0] = 101
  mask = np.ones((b, l), np.int32)
  mask[1::2, l // 2:] = 0
  ids[mask == 0] = 0
  img = r.randint(0, 256, (b, s["image"], s["image"], 3)).astype(np.uint8)
  return img, ids, mask


def ours(s):
  import jax
  from jax.sharding import Mesh

  from blip_jax.data.device import global_batch
  from blip_jax.train.setup import build, model_config
  from blip_jax.train.step import split_ids
  from configs.pretrain import get_config
  c = get_config("vit_b")
  c.unlock()
  c.model.vit, c.model.image_size, c.model.dtype = "", s["image"], A.dtype
  w, d, h, m = s["v"]
  c.model.vision.update(width=w, depth=d, heads=h, mlp_dim=m, patch=16)
  w, d, h, m = s["t"]
  c.model.text.update(width=w, depth=d, heads=h, mlp_dim=m)
  c.batch_size, c.loss.queue_size = s["batch"], s["queue"]
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  mcfg = model_config(c)
  step_fn, init_fn, _, bsh, _ = build(c, mcfg, mesh, 100, 1000)
  img, ids, mask = batch_np(s)
  b = global_batch({"image": img, "text_ids": ids, "text_mask": mask, "image_id": split_ids(np.arange(len(img)))}, bsh)
  with jax.set_mesh(mesh):
    state = init_fn(jax.random.PRNGKey(0))
    t = time.perf_counter()
    compiled = step_fn.lower(state, b).compile()
    compile_s = time.perf_counter() - t
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    state, m = compiled(state, b)
    jax.block_until_ready(m)
    times = []
    for _ in range(A.steps):
      t = time.perf_counter()
      state, m = compiled(state, b)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
  return float(np.median(times)), flops / s["batch"], compile_s, float(m["loss"])


def torch_step(s):
  import copy

  import torch
  import torch.nn.functional as F
  from transformers import BlipTextConfig, BlipVisionConfig
  from transformers.models.blip.modeling_blip import BlipVisionModel
  from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel
  torch.set_num_threads(A.threads)
  torch.manual_seed(0)
  w, d, h, m = s["v"]
  vc = BlipVisionConfig(hidden_size=w, num_hidden_layers=d, num_attention_heads=h, intermediate_size=m,
                        image_size=s["image"], patch_size=16, layer_norm_eps=1e-6)
  tw, td, th, tm = s["t"]
  tc = BlipTextConfig(hidden_size=tw, num_hidden_layers=td, num_attention_heads=th, intermediate_size=tm,
                      encoder_hidden_size=w, vocab_size=30524, hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1, label_smoothing=0.1)

  class Pretrain(torch.nn.Module):  # official BLIP_Pretrain.forward with HF modules
    def __init__(self):
      super().__init__()
      self.visual = BlipVisionModel(vc)
      self.text = BlipTextModel(tc, add_pooling_layer=False)
      self.dec = BlipTextLMHeadModel(tc)
      for enc, dec in zip(self.text.encoder.layer, self.dec.bert.encoder.layer):  # share all but SA
        dec.crossattention, dec.intermediate, dec.output = enc.crossattention, enc.intermediate, enc.output
      self.dec.bert.embeddings = self.text.embeddings
      self.vision_proj, self.text_proj = torch.nn.Linear(w, 256), torch.nn.Linear(tw, 256)
      self.itm_head = torch.nn.Linear(tw, 2)
      self.temp = torch.nn.Parameter(torch.tensor(0.07))
      self.visual_m, self.text_m = copy.deepcopy(self.visual), copy.deepcopy(self.text)
      self.vision_proj_m, self.text_proj_m = copy.deepcopy(self.vision_proj), copy.deepcopy(self.text_proj)
      for p in [*self.visual_m.parameters(), *self.text_m.parameters(), *self.vision_proj_m.parameters(),
                *self.text_proj_m.parameters()]:
        p.requires_grad = False
      self.register_buffer("iq", F.normalize(torch.randn(256, s["queue"]), dim=0))
      self.register_buffer("tq", F.normalize(torch.randn(256, s["queue"]), dim=0))
      self.ptr = 0

    def forward(self, img, ids, mask, alpha=0.4):
      with torch.no_grad():
        self.temp.clamp_(0.001, 0.5)
      emb = self.visual(pixel_values=img).last_hidden_state
      fi = F.normalize(self.vision_proj(emb[:, 0]), dim=-1)
      ft = F.normalize(self.text_proj(self.text(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]), dim=-1)
      with torch.no_grad():
        for a, b in ((self.visual, self.visual_m), (self.text, self.text_m), (self.vision_proj, self.vision_proj_m),
                     (self.text_proj, self.text_proj_m)):
          for p, pm in zip(a.parameters(), b.parameters()):
            pm.data.mul_(0.995).add_(p.data, alpha=0.005)
        em = self.visual_m(pixel_values=img).last_hidden_state
        fim = F.normalize(self.vision_proj_m(em[:, 0]), dim=-1)
        ftm = F.normalize(self.text_proj_m(self.text_m(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]), dim=-1)
        fi_all, ft_all = torch.cat([fim.t(), self.iq], 1), torch.cat([ftm.t(), self.tq], 1)
        tgt = torch.zeros(len(ids), fi_all.shape[1]); tgt.fill_diagonal_(1)
        ti2t = alpha * F.softmax(fim @ ft_all / self.temp, 1) + (1 - alpha) * tgt
        tt2i = alpha * F.softmax(ftm @ fi_all / self.temp, 1) + (1 - alpha) * tgt
      si2t, st2i = fi @ ft_all / self.temp, ft @ fi_all / self.temp
      l_itc = (-(F.log_softmax(si2t, 1) * ti2t).sum(1).mean() - (F.log_softmax(st2i, 1) * tt2i).sum(1).mean()) / 2
      with torch.no_grad():
        n = len(ids)
        self.iq[:, self.ptr:self.ptr + n], self.tq[:, self.ptr:self.ptr + n] = fim.T, ftm.T
        self.ptr = (self.ptr + n) % self.iq.shape[1]
      enc = ids.clone(); enc[:, 0] = 30523
      pos = self.text(input_ids=enc, attention_mask=mask, encoder_hidden_states=emb).last_hidden_state[:, 0]
      with torch.no_grad():
        wt = F.softmax(st2i[:, :n], 1) + 1e-4; wt.fill_diagonal_(0)
        wi = F.softmax(si2t[:, :n], 1) + 1e-4; wi.fill_diagonal_(0)
      ni, nt = torch.multinomial(wt, 1)[:, 0], torch.multinomial(wi, 1)[:, 0]
      neg = self.text(input_ids=torch.cat([enc, enc[nt]]), attention_mask=torch.cat([mask, mask[nt]]),
                      encoder_hidden_states=torch.cat([emb[ni], emb])).last_hidden_state[:, 0]
      logits = self.itm_head(torch.cat([pos, neg]))
      l_itm = F.cross_entropy(logits, torch.cat([torch.ones(n), torch.zeros(2 * n)]).long())
      dec = ids.clone(); dec[:, 0] = 30522
      l_lm = self.dec(input_ids=dec, attention_mask=mask, encoder_hidden_states=emb,
                      labels=dec.masked_fill(mask == 0, -100)).loss
      return l_itc + l_itm + l_lm

  model = Pretrain().train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
  img, ids, mask = batch_np(s)
  img = torch.tensor(((img / 255.0 - 0.45) / 0.27).astype(np.float32)).permute(0, 3, 1, 2)
  ids, mask = torch.tensor(ids.astype(np.int64)), torch.tensor(mask.astype(np.int64))
  def step():
    opt.zero_grad()
    loss = model(img, ids, mask)
    loss.backward()
    opt.step()
    return float(loss)
  step()
  times = []
  for _ in range(A.steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main():
  import jax
  dev = jax.devices()[0]
  print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')}; dtype {A.dtype}; median of {A.steps} steps")
  for name in A.sizes.split(","):
    s = dict(SIZES[name])
    if A.batch:
      s["batch"] = A.batch
    t_ours, flops, compile_s, loss = ours(s)
    line = (f"{name:5s} batch {s['batch']:3d}: ours {t_ours * 1000:9.1f} ms/step (compile {compile_s:.0f} s), "
            f"{flops / 1e9:.1f} GFLOP/example")
    if A.peak_tflops:
      line += f", MFU {flops * s['batch'] / t_ours / (A.peak_tflops * 1e12) * 100:.1f}%"
    if not A.no_torch:
      t_torch = torch_step(s)
      line += f" | PyTorch {t_torch * 1000:9.1f} ms/step | speed-up x{t_torch / t_ours:.2f}"
    print(line, flush=True)


if __name__ == "__main__":
  main()
