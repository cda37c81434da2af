"""`blip-jax`: one module per family of commands, each registering its parsers next to its handlers:
training.py (train, bootstrap, compile: config files and absl flags), infer.py (score, caption,
vqa, capfilt, demo), evaluate.py (eval retrieval | caption | vqa | nlvr), tools.py (convert,
checkpoints, train-tokenizer, make-shards). User errors exit 2 with one line on stderr; library
start-up logs are muted unless --verbose."""
from __future__ import annotations

import argparse
import os
import sys

from absl import logging as absl_logging

from blip_jax.checkpoints.hub import DownloadError
from blip_jax.cli import evaluate, infer, tools, training
from blip_jax.cli.common import fail
from blip_jax.cli.training import train_main  # noqa: F401 (the pod launcher's entry, tests/test_pod.py)

FAMILIES = (training, tools, infer, evaluate)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="blip-jax", description="BLIP in JAX/Flax. Add --verbose to any command for "
                              "TensorFlow's and JAX's own start-up messages.",
                              epilog="example:\n  blip-jax caption --model model_base_caption_capfilt_large --beams 3 "
                                     "photos/", formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--verbose", action="store_true", help="show library start-up logs (TensorFlow, absl)")
  sub = p.add_subparsers(dest="cmd", required=True)
  for family in FAMILIES:
    family.register(sub)
  return p


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--verbose" in argv:
    argv.remove("--verbose")
    os.environ["BLIP_JAX_VERBOSE"] = "1"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
  else:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    absl_logging.set_verbosity(absl_logging.WARNING)
  if argv and argv[0] in training.MAINS:  # absl parses the config commands' flags
    if any(x in ("-h", "--help", "--helpfull") for x in argv[1:]):
      training.print_help(argv[0])
      return
    return training.MAINS[argv[0]](argv[1:])
  args = build_parser().parse_args(argv)
  try:
    args.fn(args)
  except DownloadError as e:  # the network, not the user: exit 1, the message without a traceback
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  except (ValueError, FileNotFoundError, FileExistsError) as e:  # CheckpointError, ImageDecodeError, bad configs
    fail(e)
  except KeyboardInterrupt:
    sys.exit(130)


if __name__ == "__main__":
  main()
