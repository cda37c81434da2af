"""Pretraining (the paper §3.2; official pretrain.py): ITC + ITM + LM on image-text pairs. No
per-epoch evaluation (the official script has none); with eval.enabled, a held-out check after the
last step: ITC R@1 both ways and a few greedy captions (what the tiny demo shows)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import blip_jax.data as D
from blip_jax import objectives
from blip_jax.models.blip import Blip
from blip_jax.models.generate import greedy
from blip_jax.objectives import normalize_images
from blip_jax.tasks import Task


def evaluate_retrieval(cfg, params, images, ids, mask, groups=None, batch=64):
  """R@1 both ways with ITC cosine over a held-out set with one caption per image. `groups`: pairs
  with the same group id (identical captions) count as correct for each other."""
  f_img = jax.jit(lambda p, x: Blip(cfg).apply({"params": p}, normalize_images(x),
                                               method=lambda m, x: m.image_feat(m.encode_image(x))))
  f_txt = jax.jit(lambda p, i, k: Blip(cfg).apply({"params": p}, i, k, method=Blip.text_feat))
  fi = np.concatenate([np.asarray(f_img(params, images[s:s + batch])) for s in range(0, len(images), batch)])
  ft = np.concatenate([np.asarray(f_txt(params, ids[s:s + batch], mask[s:s + batch]))
                       for s in range(0, len(ids), batch)])
  sim = fi @ ft.T
  n = len(fi)
  g = np.arange(n) if groups is None else np.asarray(groups)
  i2t = float((g[sim.argmax(1)] == g).mean())
  t2i = float((g[sim.argmax(0)] == g).mean())
  chance = float(np.mean([(g == x).mean() for x in g]))  # expected R@1 of a random ranking
  return {"i2t_r1": i2t, "t2i_r1": t2i, "chance": chance, "n": n}


def greedy_captions(cfg, params, images, tokenizer, max_len=30):
  """Greedy captions (no prompt) of uint8 images, decoded to text."""
  encode = jax.jit(lambda p, x: Blip(cfg).apply({"params": p}, normalize_images(x), method=Blip.encode_image))
  memory = encode(params, images)
  prompt = jnp.full((images.shape[0], 1), cfg.text.dec_id, jnp.int32)
  tokens = greedy(cfg, params, memory, prompt, max_length=max_len)
  return [tokenizer.decode(r) for r in np.asarray(tokens)]


def held_out_check(c, mcfg, params, tok):
  """With eval.enabled: ITC R@1 on eval.source's pairs and eval.num_captions greedy captions beside
  their references, printed and returned."""
  if not c.eval.enabled:
    return None
  params = jax.device_get(params)
  src = D.make_source(c.eval.source.to_dict())
  pipe = D.InputPipeline(src, tok, dict(batch_size=64, image_size=mcfg.vision.image_size, train=False,
                                        text_length=c.data.pipeline.text_length, max_words=c.data.pipeline.max_words))
  images, ids, mask, groups = [], [], [], []
  for b in pipe:
    v = b["valid"]
    images.append(b["image"][v])
    ids.append(b["text_ids"][v])
    mask.append(b["text_mask"][v])
    groups.append(b["image_id"][v])
  images, ids, mask, groups = (np.concatenate(x) for x in (images, ids, mask, groups))
  r = evaluate_retrieval(mcfg, params, images, ids, mask, groups)
  print(f"held-out retrieval on {r['n']} pairs: image->text R@1 {r['i2t_r1']:.3f}  text->image R@1 "
        f"{r['t2i_r1']:.3f}  (chance {r['chance']:.3f})", flush=True)
  caps = greedy_captions(mcfg, params, images[:c.eval.num_captions], tok)
  refs = [tok.decode(r) for r in ids[:c.eval.num_captions]]
  for g, ref in zip(caps, refs):
    print(f"  generated: {g!r:60s} reference: {ref!r}", flush=True)
  r["captions"] = list(zip(caps, refs))
  return r


TASK = Task("pretrain", "pretrain", objectives.itc_itm_lm,
            log_terms="itc {loss_itc:.4f} itm {loss_itm:.4f} (acc {itm_acc:.3f}) lm {loss_lm:.4f} temp {temp:.4f}",
            final_evaluate=held_out_check)
