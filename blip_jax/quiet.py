"""Keeping TensorFlow's start-up banners (oneDNN, absl's "All log messages before
absl::InitializeLog()") off the terminal: TF 2.21 prints them through absl's C++ logging, which
TF_CPP_MIN_LOG_LEVEL no longer reaches, so the import itself runs with file descriptor 2 pointed
at a temporary file. What it printed is shown if the import fails, or always with
BLIP_JAX_VERBOSE=1 (`blip-jax --verbose ...`)."""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile


def verbose() -> bool:
  return os.environ.get("BLIP_JAX_VERBOSE", "") not in ("", "0")


@contextlib.contextmanager
def stderr_muted():
  """Process-level stderr (C++ logs included) to a temporary file for the block; replayed if the
  block raises."""
  if verbose():
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      tmp.seek(0)
      sys.stderr.write(tmp.read().decode(errors="replace"))
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


def quiet_import(name: str):
  """importlib.import_module(name) without the banners it prints while loading."""
  if name in sys.modules:
    return sys.modules[name]
  with stderr_muted():
    return importlib.import_module(name)
