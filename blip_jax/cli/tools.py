"""Model and data tools: `convert` (between checkpoint formats), `checkpoints` (the official
releases by name), `train-tokenizer` (SentencePiece with BLIP's special tokens) and `make-shards`
(BLIP JSON + images -> TFRecord shards)."""
from __future__ import annotations

import json
import os
import sys

from tqdm import tqdm

import blip_jax
from blip_jax.api import BlipModel, detect_format
from blip_jax.checkpoints import hub, mapping
from blip_jax.checkpoints.convert import infer_hf_config, infer_official_config, load_hf, load_official
from blip_jax.checkpoints.torch_io import read_hf_dir, read_pth
from blip_jax.cli.common import MODEL_HELP, command
from blip_jax.data.shards import make_shards
from blip_jax.models.config import KINDS
from blip_jax.tasks import REGISTRY
from blip_jax.tokenizers import BertTokenizer, SentencePieceTokenizer, load_tokenizer_dir, train_sentencepiece


def _progress(total: int, desc: str):
  bar = tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=None)
  return bar, bar.update


def cmd_convert(a):
  a.src, named_vocab, _ = hub.resolve(a.src)  # a name: the cached download, with bert-base-uncased's vocab
  a.vocab = a.vocab or (None if a.spm else named_vocab)
  fmt = detect_format(a.src)
  eps = a.vision_eps if a.vision_eps is not None else 1e-6
  if fmt == "native":
    model = blip_jax.load(a.src)
  elif fmt == "official":
    sd = read_pth(a.src)
    cfg = infer_official_config(sd, a.kind, vision_eps=eps, image_size=a.image_size)
    bar, tick = _progress(len(mapping.official_table(cfg)) + (len(mapping.momentum_table(cfg))
                          if any(k.endswith("_m.cls_token") for k in sd) and cfg.has_itc else 0), "converting")
    cfg, params, extras = load_official(a.src, a.kind, image_size=a.image_size, sd=sd, progress=tick, vision_eps=eps)
    bar.close()
    model = BlipModel(cfg, params, extras)
  else:
    cfg = infer_hf_config(read_hf_dir(a.src)[0], vision_eps=a.vision_eps)
    bar, tick = _progress(len(mapping.hf_table(cfg, keep_temp=True)), "converting")
    cfg, params = load_hf(a.src, vision_eps=a.vision_eps, image_size=a.image_size, progress=tick)
    bar.close()
    model = BlipModel(cfg, params, tokenizer=load_tokenizer_dir(a.src))
  if a.vocab:
    model.tokenizer = BertTokenizer(a.vocab)
  elif a.spm:
    model.tokenizer = SentencePieceTokenizer(a.spm)
  if a.to == "hf":
    out = model.export_hf(a.dst, overwrite=a.overwrite)
    if model.tokenizer is not None and model.tokenizer.kind == "bert":
      model.tokenizer.save(out)  # vocab.txt, as transformers' processor dirs hold it
  else:
    out = model.save(a.dst, overwrite=a.overwrite)
  c = model.config
  print(f"wrote {out}: {c.kind} model, ViT {c.vision.width}x{c.vision.depth} @ {c.vision.image_size}px, "
        f"text {c.text.width}x{c.text.depth}, tokenizer: {model.tokenizer.kind if model.tokenizer else 'none'}")


def cmd_checkpoints(a):
  if a.fetch:
    if not (hub.is_name(a.fetch) or hub.is_hf_id(a.fetch)):
      raise ValueError(f"unknown checkpoint name {a.fetch!r}; `blip-jax checkpoints` lists them")
    print(hub.resolve(a.fetch)[0])
    return
  rows = [r for r in hub.listing() if not a.task or r["task"] == a.task]
  if a.json:
    for r in rows:
      print(json.dumps(r))
    return
  print(f"{'name':40s} {'task':9s} {'ViT':5s} {'image':>5s} {'params':>7s}  {'cached':6s} about")
  for r in rows:
    params = f"{r['params_m']}M" if r["params_m"] else "-"
    print(f"{r['name']:40s} {r['task']:9s} {r['vit']:5s} {r['image_size']:5d} {params:>7s}  "
          f"{'yes' if r['cached'] else 'no':6s} {r['about']}")
  print(f"\nofficial files are cached in {hub.cache_dir()} ($BLIP_JAX_CACHE); hub ids in huggingface_hub's cache. "
        f"Use a name wherever a command takes --model.")


def cmd_train_tokenizer(a):
  path = train_sentencepiece(a.input, a.out, vocab_size=a.vocab_size, model_type=a.model_type,
                             lowercase=not a.cased)
  tok = SentencePieceTokenizer(path)
  print(f"wrote {path}: {tok.vocab_size} pieces; pad={tok.pad_id} [CLS]={tok.cls_id} [SEP]={tok.sep_id} "
        f"[DEC]={tok.dec_id} [ENC]={tok.enc_id}")


def cmd_make_shards(a):
  stats = make_shards(a.annotations, a.image_root, a.out, per_shard=a.per_shard, workers=a.workers)
  print(f"wrote {stats['written']} examples in {stats['shards']} shards to {a.out} "
        f"({stats['already_done']} shards already done, {stats['missing_images']} missing images skipped)")


def register(sub) -> None:
  c = command(sub, "convert", cmd_convert, "blip-jax convert model_base_retrieval_coco ckpt/retrieval_coco",
              help="official .pth | HF dir | ours | a name -> ours (Orbax) or an HF dir")
  c.add_argument("src", help=MODEL_HELP)
  c.add_argument("dst")
  c.add_argument("--to", choices=("native", "hf"), default="native")
  c.add_argument("--kind", choices=KINDS,
                 help="official files: load as this model kind (default: the file's own; a pretraining file "
                      "starts any task model)")
  c.add_argument("--image-size", type=int, help="interpolate the position embedding to this size")
  c.add_argument("--vision-eps", type=float, help="ViT LayerNorm eps (official 1e-6; HF config's)")
  c.add_argument("--vocab", help="bert-base-uncased vocab.txt to store as the tokenizer")
  c.add_argument("--spm", help="SentencePiece .model to store as the tokenizer")
  c.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST")

  ck = command(sub, "checkpoints", cmd_checkpoints, "blip-jax checkpoints --task caption",
               help="the official checkpoints by name: task, size, image size, cached or not")
  ck.add_argument("--task", choices=tuple(REGISTRY), help="only this task's")
  ck.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
  ck.add_argument("--fetch", metavar="NAME", help="download NAME into the cache now (resumable) and print its path")

  t = command(sub, "train-tokenizer", cmd_train_tokenizer,
              "blip-jax train-tokenizer --input captions.txt --out spm --vocab-size 8000",
              help="train a SentencePiece model with BLIP's special tokens")
  t.add_argument("--input", required=True, help="text file, one sentence per line")
  t.add_argument("--out", required=True, help="output prefix (writes PREFIX.model, PREFIX.vocab)")
  t.add_argument("--vocab-size", type=int, default=8000)
  t.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
  t.add_argument("--cased", action="store_true")

  m = command(sub, "make-shards", cmd_make_shards,
              "blip-jax make-shards --annotations coco_karpathy_train.json --image-root coco/ --out shards/",
              help="BLIP JSON + images -> img2dataset-style TFRecord shards")
  m.add_argument("--annotations", required=True, action="append", help="BLIP JSON file (repeatable)")
  m.add_argument("--image-root", default="")
  m.add_argument("--out", required=True)
  m.add_argument("--per-shard", type=int, default=1000)
  m.add_argument("--workers", type=int, default=os.cpu_count() or 2)
