"""What the command families share: the one-line failure, loading a model with the checks a command
needs, the decoding flags, the example each command shows at the end of its --help."""
from __future__ import annotations

import argparse
import sys

import blip_jax
from blip_jax import distributed, fs
from blip_jax.api import require

MODEL_HELP = ("an official release name (blip-jax checkpoints), a Salesforce/blip-... hub id, an official .pth, "
              "a transformers dir or our checkpoint dir")


def fail(e) -> None:
  """One line naming the problem, exit status 2 (as argparse's usage errors), no traceback."""
  print(f"error: {e}", file=sys.stderr, flush=True)
  sys.exit(2)


def command(sub, name: str, handler, example: str, **kw) -> argparse.ArgumentParser:
  """A subcommand with its handler and the example shown at the end of its --help."""
  p = sub.add_parser(name, epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
  p.set_defaults(fn=handler)
  return p


def model_flag(p, help_: str, dest: str = "--model") -> None:
  """--model-like flags: every one takes release names and hub ids too."""
  p.add_argument(dest, required=True, help=help_ + " (or an official release name / Salesforce/... hub id)")


def model_flags(p, help_: str, official_size: int) -> None:
  """--model (names and hub ids too), --vocab and --image-size, as every evaluation takes them."""
  model_flag(p, help_)
  p.add_argument("--vocab", help="bert-base-uncased vocab.txt, when the checkpoint has no tokenizer")
  p.add_argument("--image-size", type=int,
                 help=f"resize images to this (interpolates positions; official {official_size})")


def load_checked(a, use: str, *, kinds: tuple = (), itc: bool = False, hint: str = "", **load_kw):
  """blip_jax.load(--model, --vocab, --image-size) and the one check of what `use` needs (api.require)."""
  model = blip_jax.load(a.model, vocab=a.vocab, image_size=a.image_size, **load_kw)
  require(model, use, kinds=kinds, itc=itc, hint=hint, name=a.model)
  return model


def start_hosts() -> None:
  """After the input has been checked and before any device work: joins the other processes of a
  multi-host run (nothing on one host)."""
  distributed.maybe_initialize_distributed()


def check_out(a) -> None:
  fs.check_output(a.out, a.overwrite, "--out")


def generation_kwargs(a) -> dict:
  """The decoding flags shared by `caption` and `capfilt`."""
  if a.beams > 1 and a.top_p is not None:
    fail("choose --beams N or --top-p P, not both")
  if a.num_captions > 1 and a.beams == 1 and a.top_p is None:
    fail("--num-captions > 1 needs --beams or --top-p")
  return dict(max_length=a.max_length, min_length=a.min_length, num_beams=a.beams, top_p=a.top_p,
              top_k=a.top_k, temperature=a.temperature, repetition_penalty=a.repetition_penalty,
              length_penalty=a.length_penalty, num_captions=a.num_captions,
              length_normalization=a.length_normalization)


def add_generation_flags(p, *, max_length=20, min_length=5, top_p=None, repetition_penalty=1.0, beams=1):
  g = p.add_argument_group("decoding (max/min length count the prompt's 4 tokens, as the official code does)")
  g.add_argument("--beams", type=int, default=beams, help="beam search with N beams (official COCO eval: 3)")
  g.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling with this top-p (e.g. 0.9)")
  g.add_argument("--top-k", type=int, default=50, help="sampling: also keep only the k most likely tokens (default "
                 "50, transformers 4.15's default, which the official nucleus sampling inherits; 0 = off)")
  g.add_argument("--temperature", type=float, default=1.0)
  g.add_argument("--max-length", type=int, default=max_length)
  g.add_argument("--min-length", type=int, default=min_length)
  g.add_argument("--repetition-penalty", type=float, default=repetition_penalty)
  g.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score / length ** this")
  g.add_argument("--length-normalization", choices=("official", "transformers"), default="official",
                 help="beam scores as transformers 4.15, which the paper's run used (sum log p / (prompt + new "
                      "tokens)), or as current transformers (/ new tokens)")
  g.add_argument("--prompt", default="a picture of ")
  g.add_argument("--seed", type=int, default=0, help="sampling seed")
