"""A local stand-in for a gs:// bucket, behind the code paths a real bucket takes:

  python tests/fake_bucket.py ROOT blip-jax-args...   runs `blip-jax ARGS` with gs://B/P stored at ROOT/B/P

What is redirected, and nothing else: etils.epath's backend for gs:// URLs (our I/O and Orbax's
metadata), TensorStore's GCS kvstore (Orbax's array data) and Orbax's GCS-only helpers, and the
TensorBoard writer's log folder (TF's own GCS client). blip_jax sees and passes on the gs:// URLs
themselves, so an os.path call on a URL writes next to the working directory, not into ROOT.
"""
import os
import shutil
import sys


def install(root: str):
  """Installs the stand-in; returns a function that removes it."""
  from etils.epath import backend as B
  from etils.epath import gpath

  def local(p) -> str:
    p = os.fspath(p)
    return os.path.join(root, p[len("gs://"):]) if p.startswith("gs://") else p

  def url(p: str) -> str:
    return "gs://" + os.path.relpath(p, root) if p.startswith(root + os.sep) else p

  class Bucket(B._OsPathBackend):  # noqa: SLF001 (the os backend with gs:// paths translated)
    def open(self, path, mode):
      return super().open(local(path), mode)

    def exists(self, path):
      return super().exists(local(path))

    def isdir(self, path):
      return super().isdir(local(path))

    def listdir(self, path):
      return super().listdir(local(path))

    def glob(self, path):
      return [url(p) for p in super().glob(local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
      for d, dirs, files in super().walk(local(top), top_down=top_down, on_error=on_error):
        yield url(d), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
      return super().makedirs(local(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
      return super().mkdir(local(path), exist_ok=exist_ok)

    def rmtree(self, path):
      return super().rmtree(local(path))

    def remove(self, path):
      return super().remove(local(path))

    def rename(self, path, dst):
      return super().rename(local(path), local(dst))

    def replace(self, path, dst):
      return super().replace(local(path), local(dst))

    def copy(self, path, dst, *, overwrite=False):
      return super().copy(local(path), local(dst), overwrite=overwrite)

    def stat(self, path):
      return super().stat(local(path))

  bucket = Bucket()
  plain = gpath._GPath._backend  # noqa: SLF001
  gpath._GPath._backend = property(lambda self: bucket if self._uri_scheme == "gs" else plain.fget(self))  # noqa: SLF001

  from orbax.checkpoint._src.path import gcs_utils
  saved = {n: getattr(gcs_utils, n) for n in ("get_kvstore_for_gcs", "rmtree", "is_hierarchical_namespace_enabled")}
  gcs_utils.get_kvstore_for_gcs = lambda p: {"driver": "file", "path": local(p)}
  gcs_utils.rmtree = lambda p, missing_ok=False: shutil.rmtree(local(p), ignore_errors=missing_ok)
  gcs_utils.is_hierarchical_namespace_enabled = lambda p: False

  from clu import metric_writers
  make = metric_writers.create_default_writer
  metric_writers.create_default_writer = lambda logdir=None, **k: make(local(logdir) if logdir else logdir, **k)

  def uninstall():
    gpath._GPath._backend = plain  # noqa: SLF001
    for n, f in saved.items():
      setattr(gcs_utils, n, f)
    metric_writers.create_default_writer = make
  return uninstall


if __name__ == "__main__":
  install(os.path.abspath(sys.argv[1]))
  from blip_jax.cli import main
  main(sys.argv[2:])
