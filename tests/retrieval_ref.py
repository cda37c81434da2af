"""An independent, plain implementation of the official retrieval evaluation (BLIP's
train_retrieval.evaluation + itm_eval, restated from the official train_retrieval.py), on transformers'
PyTorch BLIP modules. One image (text) at a time, its tokens repeated for each of its k candidates:
it shares no code with blip_jax."""
from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
ENC = 30523


def pre_caption(caption, max_words=30):
  caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
  caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
  return " ".join(caption.split(" ")[:max_words])


def pixels(path, size):
  img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
  x = (np.asarray(img, np.float32) / 255.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
  return torch.tensor(x).permute(2, 0, 1)


@torch.no_grad()
def official_retrieval_eval(model, tokenizer, image_paths, captions, size, k):
  """model: transformers BlipForImageTextRetrieval. Returns (score_i2t, score_t2i, sims)."""
  texts = [pre_caption(c) for c in captions]
  tok = tokenizer(texts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
  text_out = model.text_encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
  text_embeds = torch.nn.functional.normalize(model.text_proj(text_out.last_hidden_state[:, 0]), dim=-1)
  text_ids = tok.input_ids.clone()
  text_ids[:, 0] = ENC
  image_feats, image_embeds = [], []
  for s in range(0, len(image_paths), 32):
    batch = torch.stack([pixels(p, size) for p in image_paths[s:s + 32]])
    feat = model.vision_model(pixel_values=batch).last_hidden_state
    image_feats.append(feat)
    image_embeds.append(torch.nn.functional.normalize(model.vision_proj(feat[:, 0]), dim=-1))
  image_feats, image_embeds = torch.cat(image_feats), torch.cat(image_embeds)
  sims = image_embeds @ text_embeds.t()

  def itm(image_tokens, ids, att):
    out = model.text_encoder(input_ids=ids, attention_mask=att, encoder_hidden_states=image_tokens,
                             encoder_attention_mask=torch.ones(image_tokens.shape[:-1], dtype=torch.long))
    return model.itm_head(out.last_hidden_state[:, 0])[:, 1]

  score_i2t = torch.full((len(image_paths), len(texts)), -100.0)
  for i, row in enumerate(sims):
    topk_sim, topk_idx = row.topk(k=k, dim=0)
    score = itm(image_feats[i].repeat(k, 1, 1), text_ids[topk_idx], tok.attention_mask[topk_idx])
    score_i2t[i, topk_idx] = score + topk_sim
  score_t2i = torch.full((len(texts), len(image_paths)), -100.0)
  for t, row in enumerate(sims.t()):
    topk_sim, topk_idx = row.topk(k=k, dim=0)
    score = itm(image_feats[topk_idx], text_ids[t].repeat(k, 1), tok.attention_mask[t].repeat(k, 1))
    score_t2i[t, topk_idx] = score + topk_sim
  return score_i2t.numpy(), score_t2i.numpy(), sims.numpy()


def itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
  """The official metric loop, as written there."""
  ranks = np.zeros(scores_i2t.shape[0])
  for index, score in enumerate(scores_i2t):
    inds = np.argsort(score)[::-1]
    rank = 1e20
    for i in img2txt[index]:
      tmp = np.where(inds == i)[0][0]
      if tmp < rank:
        rank = tmp
    ranks[index] = rank
  tr1, tr5, tr10 = (100.0 * len(np.where(ranks < r)[0]) / len(ranks) for r in (1, 5, 10))
  ranks = np.zeros(scores_t2i.shape[0])
  for index, score in enumerate(scores_t2i):
    inds = np.argsort(score)[::-1]
    ranks[index] = np.where(inds == txt2img[index])[0][0]
  ir1, ir5, ir10 = (100.0 * len(np.where(ranks < r)[0]) / len(ranks) for r in (1, 5, 10))
  tr_mean, ir_mean = (tr1 + tr5 + tr10) / 3, (ir1 + ir5 + ir10) / 3
  return {"txt_r1": tr1, "txt_r5": tr5, "txt_r10": tr10, "txt_r_mean": tr_mean, "img_r1": ir1,
          "img_r5": ir5, "img_r10": ir10, "img_r_mean": ir_mean, "r_mean": (tr_mean + ir_mean) / 2}
