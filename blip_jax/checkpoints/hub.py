"""Checkpoints by name: the official BLIP releases (the official README's table) and transformers hub ids.

`resolve("model_base_capfilt_large")` downloads the official file once into the cache
(`$BLIP_JAX_CACHE`, default `~/.cache/blip_jax`, or `$XDG_CACHE_HOME/blip_jax`) and returns its
path, with bert-base-uncased's vocab.txt beside it (official files hold no tokenizer).
`resolve("Salesforce/blip-image-captioning-base")` goes through huggingface_hub: its cache, its
`HF_HUB_OFFLINE`, its `HF_ENDPOINT`.

A download is written to `<file>.part`, resumed from where it stopped (HTTP Range) on a retry or a
later run, checked, and only then renamed to its name; a sidecar `<file>.json` records its size and
MD5. Checks: the byte count the server announced; the MD5 the server announced (Google Cloud
Storage's `x-goog-hash`), when it does; and for zip files (every torch.save file) each member's
CRC-32. A cached file whose size no longer matches its record, or that fails to read later, is
fetched again; a file that fails its checks is never returned. `$BLIP_JAX_MIRROR` replaces the
base URL of the official files (a mirror, or a local server in tests).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
import zipfile

from tqdm import tqdm

OFFICIAL_BASE = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
BERT_VOCAB_URL = "https://huggingface.co/bert-base-uncased/resolve/main/vocab.txt"


class DownloadError(OSError):
  """A file that could not be fetched whole and intact (after retries)."""


@dataclasses.dataclass(frozen=True)
class Release:
  name: str
  task: str         # pretrain | retrieval | caption | vqa | nlvr
  vit: str          # base | large
  image_size: int   # the resolution it was trained / fine-tuned at
  params_m: int     # parameters of the model it loads into, millions (tests/test_hub.py checks them)
  about: str

  @property
  def file(self) -> str:
    return self.name + ".pth"


# The official release names (the official README's table). params_m: our model of that kind and size.
RELEASES = {r.name: r for r in [
    Release("model_base_14M", "pretrain", "base", 224, 252, "ViT-B pretrained on 14M images (CapFilt-B data)"),
    Release("model_base", "pretrain", "base", 224, 252, "ViT-B pretrained on 129M images (CapFilt-B data)"),
    Release("model_base_capfilt_large", "pretrain", "base", 224, 252,
            "ViT-B pretrained on 129M images, CapFilt-L data; captions directly"),
    Release("model_large", "pretrain", "large", 224, 475, "ViT-L pretrained on 129M images (CapFilt-L data)"),
    Release("model_base_retrieval_coco", "retrieval", "base", 384, 224, "ViT-B image-text retrieval, COCO"),
    Release("model_large_retrieval_coco", "retrieval", "large", 384, 446, "ViT-L image-text retrieval, COCO"),
    Release("model_base_retrieval_flickr", "retrieval", "base", 384, 224, "ViT-B image-text retrieval, Flickr30K"),
    Release("model_large_retrieval_flickr", "retrieval", "large", 384, 446, "ViT-L image-text retrieval, Flickr30K"),
    Release("model_base_caption_capfilt_large", "caption", "base", 384, 224, "ViT-B captioning, COCO (CapFilt-L)"),
    Release("model_large_caption", "caption", "large", 384, 446, "ViT-L captioning, COCO"),
    Release("model_vqa", "vqa", "base", 480, 361, "ViT-B VQA v2 (129M pretraining)"),
    Release("model_base_vqa_capfilt_large", "vqa", "base", 480, 361, "ViT-B VQA v2 (CapFilt-L)"),
    Release("model_base_nlvr", "nlvr", "base", 384, 259, "ViT-B NLVR2"),
]}

# transformers hub ids of the same models (the official README's table), listed for discovery; any other
# owner/name id is passed to huggingface_hub as it is.
HF_IDS = {  # id: (task, ViT)
    "Salesforce/blip-image-captioning-base": ("caption", "base"),
    "Salesforce/blip-image-captioning-large": ("caption", "large"),
    "Salesforce/blip-vqa-base": ("vqa", "base"), "Salesforce/blip-vqa-capfilt-large": ("vqa", "base"),
    "Salesforce/blip-itm-base-coco": ("retrieval", "base"), "Salesforce/blip-itm-large-coco": ("retrieval", "large"),
    "Salesforce/blip-itm-base-flickr": ("retrieval", "base"),
    "Salesforce/blip-itm-large-flickr": ("retrieval", "large"),
}


def cache_dir() -> str:
  root = os.environ.get("BLIP_JAX_CACHE")
  if not root:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.path.join(xdg, "blip_jax")
  return root


def official_url(release: Release) -> str:
  base = os.environ.get("BLIP_JAX_MIRROR") or OFFICIAL_BASE
  return base.rstrip("/") + "/" + release.file


def vocab_url() -> str:
  mirror = os.environ.get("BLIP_JAX_MIRROR")
  return mirror.rstrip("/") + "/bert-base-uncased/vocab.txt" if mirror else BERT_VOCAB_URL


def is_name(s: str) -> bool:
  return s in RELEASES


def is_hf_id(s: str) -> bool:
  """owner/name with no such local path: a transformers hub id."""
  parts = s.split("/")
  return (len(parts) == 2 and all(parts) and not os.path.exists(s) and "://" not in s
          and not s.startswith((".", "~")))


# ---- downloading ----
def _record_path(path: str) -> str:
  return path + ".json"


def is_cached(path: str) -> bool:
  """The file is there and has the size its download recorded."""
  try:
    with open(_record_path(path)) as f:
      rec = json.load(f)
    return os.path.getsize(path) == rec["size"]
  except (OSError, ValueError, KeyError):
    return False


def forget(path: str) -> None:
  for p in (path, _record_path(path)):
    if os.path.exists(p):
      os.remove(p)


def _announced_md5(headers) -> str | None:
  """GCS's `x-goog-hash: crc32c=...,md5=...` (base64 of the digest), as hex."""
  for part in (headers.get("x-goog-hash") or "").split(","):
    k, _, v = part.strip().partition("=")
    if k == "md5" and v:
      return base64.b64decode(v).hex()
  return None


def _check_zip(path: str) -> None:
  """Every member's CRC-32 (torch.save files are zips): a flipped byte anywhere is found."""
  try:
    with zipfile.ZipFile(path) as zf:
      bad = zf.testzip()
  except zipfile.BadZipFile as e:
    raise DownloadError(f"not a whole zip file: {e}") from None
  if bad is not None:
    raise DownloadError(f"member {bad} fails its CRC-32 check")


def _looks_zip(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == b"PK\x03\x04"


def fetch(url: str, dest: str, *, retries: int = 3, progress: bool = True, timeout: float = 60.0) -> str:
  """Downloads url to dest (see the module docstring): resumes a `.part`, verifies, renames.
  Returns dest. Raises DownloadError when the file cannot be fetched intact."""
  if is_cached(dest):
    return dest
  os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
  part = dest + ".part"
  last_error = None
  for attempt in range(retries + 1):
    try:
      total, md5 = _fetch_once(url, part, progress=progress, timeout=timeout)
      size = os.path.getsize(part)
      if total is not None and size != total:
        raise DownloadError(f"{size} bytes of {total}")
      digest = _md5(part)
      if md5 is not None and digest != md5:
        raise DownloadError(f"MD5 {digest} differs from the server's {md5}")
      if _looks_zip(part):
        _check_zip(part)
      with open(_record_path(dest), "w") as f:
        json.dump({"url": url, "size": size, "md5": digest, "fetched": time.time()}, f)
      os.replace(part, dest)
      return dest
    except DownloadError as e:  # the bytes are wrong: start over from nothing
      last_error = e
      if os.path.exists(part):
        os.remove(part)
    except (urllib.error.URLError, OSError, ConnectionError) as e:  # cut off: resume the .part
      if isinstance(e, urllib.error.HTTPError) and e.code in (401, 403, 404):
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
      last_error = e
    if attempt < retries:
      time.sleep(min(2 ** attempt, 10) * (0.05 if os.environ.get("BLIP_JAX_FAST_RETRY") else 1))
  raise DownloadError(f"{url}: could not be fetched intact after {retries + 1} tries ({last_error}); "
                      f"what arrived is kept in {part} if it can be resumed")


def _md5(path: str) -> str:
  h = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _fetch_once(url: str, part: str, *, progress: bool, timeout: float):
  """One request, appending to `part` from its current size. Returns (total size or None, the
  announced MD5 or None). A short transfer raises ConnectionError (the caller resumes)."""
  have = os.path.getsize(part) if os.path.exists(part) else 0
  req = urllib.request.Request(url, headers={"User-Agent": "blip_jax", **({"Range": f"bytes={have}-"} if have else {})})
  with urllib.request.urlopen(req, timeout=timeout) as resp:
    if have and resp.status != 206:  # the server ignored Range: start over
      have = 0
    length = resp.headers.get("Content-Length")
    total = have + int(length) if length is not None else None
    md5 = _announced_md5(resp.headers)
    bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
               desc=os.path.basename(part)[:-5], disable=not progress or None, leave=False)
    got = have
    with open(part, "ab" if have else "wb") as f, bar:
      while True:
        chunk = resp.read(1 << 20)
        if not chunk:
          break
        f.write(chunk)
        got += len(chunk)
        bar.update(len(chunk))
  if total is not None and got < total:
    raise ConnectionError(f"transfer cut off at {got} of {total} bytes")
  return total, md5


# ---- names -> local paths ----
def official_path(name: str) -> str:
  return os.path.join(cache_dir(), "official", RELEASES[name].file)


def vocab_path() -> str:
  return os.path.join(cache_dir(), "bert-base-uncased", "vocab.txt")


def fetch_official(name: str, progress: bool = True) -> tuple[str, str]:
  """(checkpoint path, vocab.txt path) of an official release, downloaded if not cached."""
  if name not in RELEASES:
    raise ValueError(f"unknown checkpoint name {name!r}; `blip-jax checkpoints` lists them")
  vocab = fetch(vocab_url(), vocab_path(), progress=progress)
  return fetch(official_url(RELEASES[name]), official_path(name), progress=progress), vocab


def resolve(model: str) -> tuple[str, str | None, str | None]:
  """What every loader does with a model argument: (local path, vocab.txt to use or None, the
  official release name or None). An official name is downloaded (with BERT's vocab), a hub id
  fetched through huggingface_hub; anything else is returned as it is."""
  if is_name(model):
    path, vocab = fetch_official(model)
    return path, vocab, model
  if is_hf_id(model):
    return fetch_hf(model), None, None
  return model, None, None


def refetch_official(name: str) -> str:
  """A cached release that fails to read (damaged since its download): removed, fetched again."""
  path = official_path(name)
  forget(path)
  return fetch(official_url(RELEASES[name]), path)


HF_FILES = ("config.json", "vocab.txt")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def fetch_hf(repo_id: str, revision: str | None = None) -> str:
  """A transformers hub repo's config, tokenizer vocab and weights through huggingface_hub (its
  cache and offline mode); returns the snapshot folder holding them."""
  try:
    from huggingface_hub import hf_hub_download  # noqa: PLC0415  (slow import; hub ids only)
    from huggingface_hub.errors import (  # noqa: PLC0415  (slow import; hub ids only)
      EntryNotFoundError,
      LocalEntryNotFoundError,
    )
  except ImportError:
    raise ValueError(f"{repo_id}: hub ids need huggingface_hub (pip install huggingface_hub)") from None
  offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
  kw = dict(revision=revision, endpoint=os.environ.get("HF_ENDPOINT") or None, local_files_only=offline)
  try:
    folder = os.path.dirname(hf_hub_download(repo_id, HF_FILES[0], **kw))
    hf_hub_download(repo_id, HF_FILES[1], **kw)
    for i, name in enumerate(HF_WEIGHTS):
      try:
        hf_hub_download(repo_id, name, **kw)
        break
      except EntryNotFoundError:
        if i == len(HF_WEIGHTS) - 1:
          raise
  except LocalEntryNotFoundError as e:
    raise ValueError(f"{repo_id}: not in the Hugging Face cache and HF_HUB_OFFLINE is set "
                     f"(or the hub cannot be reached): {str(e).splitlines()[0]}") from None
  except Exception as e:  # noqa: BLE001 - huggingface_hub raises many types (404, auth, network)
    raise ValueError(f"{repo_id}: could not be fetched from the hub: {type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}") from None
  return folder


def listing() -> list[dict]:
  """What `blip-jax checkpoints` prints: every official name and hub id, and whether it is cached."""
  rows = []
  for r in RELEASES.values():
    path = official_path(r.name)
    rows.append({"name": r.name, "task": r.task, "vit": r.vit, "image_size": r.image_size,
                 "params_m": r.params_m, "weights_mb": r.params_m * 4, "about": r.about,
                 "cached": is_cached(path), "path": path})
  for repo, (task, vit) in HF_IDS.items():
    rows.append({"name": repo, "task": task, "vit": vit, "image_size": 384,
                 "params_m": None, "weights_mb": None, "about": "transformers hub (huggingface_hub cache)",
                 "cached": _hf_cached(repo), "path": None})
  return rows


def _hf_cached(repo_id: str) -> bool:
  try:
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415  (slow import; hub ids only)
  except ImportError:
    return False
  return all(isinstance(try_to_load_from_cache(repo_id, f), str) for f in HF_FILES)
