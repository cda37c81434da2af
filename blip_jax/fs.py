"""Paths of every file the trainer, evaluation, CapFilt and make-shards read or write: local paths
and URLs (gs://, s3://, any scheme etils/fsspec knows) through one layer, etils.epath (what Orbax
uses). A URL is never passed to os.path: `os.path.abspath("gs://b/run")` is a local directory.

Writes that readers may see half-done go to a temporary name and are renamed when complete.
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid

from etils import epath


def is_url(p) -> bool:
  return "://" in str(p)


def path(p) -> epath.Path:
  """A local path made absolute (Orbax wants absolute paths), or the URL as it is."""
  p = str(p)
  return epath.Path(p) if is_url(p) else epath.Path(os.path.abspath(os.path.expanduser(p)))


def join(p, *parts) -> str:
  return str(path(p).joinpath(*parts))


def exists(p) -> bool:
  return path(p).exists()


def makedirs(p) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def read_text(p) -> str:
  return path(p).read_text()


def read_json(p):
  return json.loads(read_text(p))


def _tmp_name(p: epath.Path, tag: str | None = None) -> epath.Path:
  return p.parent / f".{p.name}.tmp-{tag or uuid.uuid4().hex[:8]}"


def write_text(p, text: str) -> str:
  """Writes `text` to p through a temporary name: readers see the old file or the whole new one."""
  return write_bytes(p, text.encode("utf-8"))


def write_bytes(p, data: bytes) -> str:
  """As write_text, for bytes."""
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_name(p)
  tmp.write_bytes(data)
  tmp.replace(p)
  return str(p)


def write_json(p, obj, indent=1) -> str:
  return write_text(p, json.dumps(obj, indent=indent))


def is_nonempty_dir(p) -> bool:
  p = path(p)
  return p.is_dir() and any(True for _ in p.iterdir())


def check_output(p, overwrite: bool, what: str = "output") -> None:
  """Refuses to replace an existing non-empty file or folder unless overwrite."""
  q = path(p)
  if not overwrite and ((q.is_dir() and is_nonempty_dir(q)) or (q.exists() and not q.is_dir() and q.stat().length > 0)):
    raise FileExistsError(f"{what} {p} exists and is not empty; pass --overwrite to replace it")


def temp_sibling(p, tag: str | None = None) -> str:
  """A temporary name next to p (a folder or file written there is then `publish`ed): fresh, or
  the same for every process given the same tag."""
  return str(_tmp_name(path(p), tag))


def publish(tmp, final) -> str:
  """Moves a completed temporary folder or file to its final name, replacing what was there."""
  tmp, final = path(tmp), path(final)
  if not tmp.is_dir():
    tmp.replace(final)  # a file: one atomic rename on POSIX file systems
  elif final.exists():
    old = _tmp_name(final)
    final.rename(old)
    tmp.rename(final)
    (old.rmtree if old.is_dir() else old.unlink)()
  else:
    tmp.rename(final)
  return str(final)


def resume_settings(p, settings: dict, what: str, write: bool = True) -> None:
  """A resumable output's settings: recorded at its first run (when `write`); a rerun with other
  settings is refused, naming them (its output would mix two runs)."""
  if exists(p):
    old = read_json(p)
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if diff:
      raise ValueError(f"{path(p).parent} holds {what} made with other settings (was, now): {diff}; use another "
                       "output folder, or the same settings to resume")
  elif write:
    write_json(p, settings)


class JsonLines:
  """An append-only JSON-lines log (metrics.jsonl). Object stores have no append: a URL's file is
  rewritten whole (through a temporary name) on each flush; a local file is appended to."""

  def __init__(self, p):
    self.path = path(p)
    self._lines = None
    if is_url(p):
      self._lines = self.path.read_text().splitlines() if self.path.exists() else []

  def append(self, record: dict) -> None:
    line = json.dumps(record)
    if self._lines is None:
      with open(self.path, "a") as f:
        f.write(line + "\n")
    else:
      self._lines.append(line)
      write_text(self.path, "\n".join(self._lines) + "\n")


def local_copy(p) -> str:
  """A local file or folder with p's contents (readers that open only local paths: torch.load,
  transformers-style dirs); p itself when it is local."""
  if not is_url(p):
    return str(path(p))
  src = path(p)
  out = os.path.join(tempfile.mkdtemp(prefix="blip_jax_"), src.name)
  def walk(d):  # object stores forbid recursive globs
    for f in d.iterdir():
      yield from walk(f) if f.is_dir() else [f]
  for f in (walk(src) if src.is_dir() else [src]):
    dst = os.path.join(out, str(f.relative_to(src))) if src.is_dir() else out
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "wb") as h:
      h.write(f.read_bytes())
  return out
