"""checkpoints.pth, the torch-free reader of torch.save files, against torch.load(weights_only=True):
bit-exact on every dtype, stride, offset and shared storage in both the zip and the legacy layout;
crafted pickles refused without running; truncated and bit-flipped files refused; and a whole
official checkpoint loaded by blip_jax in a process where importing torch is impossible."""
import collections
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import torch_reference_equal

from blip_jax.checkpoints import pth
from blip_jax.checkpoints.torch_io import CheckpointError, read_pth


def _assorted():
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 8, generator=g)
  sd = collections.OrderedDict()
  sd["f32"] = base
  sd["transposed"] = base.t()                       # non-contiguous strides
  sd["slice"] = base[2:5, 1:7]                       # offset into a shared storage
  sd["tied"] = base                                  # the same storage twice
  sd["f16"] = torch.randn(3, 5, generator=g).half()
  sd["bf16"] = torch.randn(7, generator=g).bfloat16()
  sd["f64"] = torch.randn(2, 2, generator=g).double()
  sd["i64"] = torch.arange(12).reshape(3, 4)[:, ::2]  # strided ints
  sd["i32"] = torch.tensor([-1, 2, 2 ** 31 - 1], dtype=torch.int32)
  sd["u8"] = torch.tensor([0, 255], dtype=torch.uint8)
  sd["bool"] = torch.tensor([True, False, True])
  sd["scalar"] = torch.tensor(3.5)
  sd["empty"] = torch.zeros(0, 4)
  sd["param"] = torch.nn.Parameter(torch.randn(2, 3, generator=g))
  return {"model": sd, "epoch": 7, "config": {"lr": 1e-4, "name": "blip", "sizes": [224, 384], "t": (1, 2)},
          "blob": b"\x00\xffraw"}


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_bit_exact_against_torch_load(tmp_path, zip_format):
  path = tmp_path / "assorted.pth"
  torch.save(_assorted(), path, _use_new_zipfile_serialization=zip_format)
  with open(path, "rb") as f:
    assert (f.read(2) == b"PK") == zip_format  # really the layout the test names
  ours = pth.load(str(path))
  torch_reference_equal(ours, torch.load(path, weights_only=True))
  assert ours["model"]["bf16"].dtype.name == "bfloat16"
  sd = read_pth(str(path))  # the state dict the loaders use: 'model' unwrapped, all arrays
  assert set(sd) == set(_assorted()["model"]) and all(isinstance(v, np.ndarray) for v in sd.values())


def test_cross_check_saw_the_suites_files():
  """The session-wide cross-check (conftest.pth_cross_check) compares with torch.load on every read;
  this test's own read goes through it."""
  import tempfile

  from conftest import PTH_CROSS_CHECKED
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "m.pth")
    torch.save({"model": {"w": torch.ones(2, 2)}}, path)
    n = len(PTH_CROSS_CHECKED)
    read_pth(path)
    assert PTH_CROSS_CHECKED[n:] == [path]


class _System:
  def __init__(self, cmd):
    self.cmd = cmd

  def __reduce__(self):
    return (os.system, (self.cmd,))


class _Eval:
  def __init__(self, code):
    self.code = code

  def __reduce__(self):
    return (eval, (self.code,))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", ["system", "eval", "getattr"])
def test_crafted_pickles_never_run(tmp_path, zip_format, payload):
  marker = tmp_path / "pwned"
  evil = {"system": _System(f"touch {marker}"),
          "eval": _Eval(f"open({str(marker)!r}, 'w').close()"),
          "getattr": collections.OrderedDict}[payload]
  obj = {"model": {"w": torch.zeros(2)}, "x": evil}
  path = tmp_path / "evil.pth"
  if payload == "getattr":  # a hand-written pickle: builtins.getattr, the first step of most gadgets
    import pickle
    body = (b"\x80\x02cbuiltins\ngetattr\nq\x00cos\npath\nX\x06\x00\x00\x00existsq\x01\x86R.")
    assert pickle.loads(body) is os.path.exists  # plain pickle resolves it
    path.write_bytes(body)
  else:
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
  with pytest.raises(pth.UnsafePickleError, match="refused global"):
    pth.load(str(path))
  with pytest.raises(CheckpointError, match="refused to unpickle"):
    read_pth(str(path))
  assert not marker.exists()
  if payload == "system":  # torch's own weights-only reader refuses it too
    import pickle
    with pytest.raises(pickle.UnpicklingError):
      torch.load(path, weights_only=True)


DANGEROUS = ("getattr", "setattr", "delattr", "eval", "exec", "__import__", "globals", "locals", "vars", "open",
             "compile", "input", "breakpoint", "type", "object", "super", "memoryview", "print", "help", "exit")


@pytest.mark.parametrize("name", DANGEROUS)
def test_each_dangerous_builtin_is_refused_on_its_own(tmp_path, name):
  """A pickle whose only other global is allowed (OrderedDict): builtins.NAME(OrderedDict, '__init__').
  The refusal must name NAME itself; if NAME were allowed, the pickle would load (or fail some
  other way) and the test would fail. getattr reaches __globals__ from any allowed callable."""
  import pickletools
  body = (b"\x80\x02cbuiltins\n" + name.encode() + b"\nccollections\nOrderedDict\n"
          b"X\x08\x00\x00\x00__init__\x86R.")
  globals_named = [arg for op, arg, _ in pickletools.genops(body) if op.name == "GLOBAL"]
  assert globals_named == [f"builtins {name}", "collections OrderedDict"]
  assert ("collections", "OrderedDict") in pth._GLOBALS  # the other global is one the reader allows
  path = tmp_path / "gadget.pth"
  path.write_bytes(body)
  with pytest.raises(pth.UnsafePickleError, match=f"refused global builtins.{name}:"):
    pth.load(str(path))


def test_truncated_and_corrupt_files_are_refused(tmp_path):
  path = tmp_path / "good.pth"
  torch.save({"model": {"w": torch.randn(64, 64)}}, path)
  data = path.read_bytes()
  cut = tmp_path / "cut.pth"
  cut.write_bytes(data[: len(data) * 2 // 3])
  with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
    read_pth(str(cut))
  # one flipped bit inside the weights: the member's CRC-32 no longer matches
  flipped = bytearray(data)
  at = data.index(b"data/0") + 200
  flipped[at] ^= 0x10
  bad = tmp_path / "flipped.pth"
  bad.write_bytes(bytes(flipped))
  with pytest.raises(CheckpointError, match="CRC"):
    read_pth(str(bad))
  legacy = tmp_path / "legacy.pth"
  torch.save({"model": {"w": torch.randn(64, 64)}}, legacy, _use_new_zipfile_serialization=False)
  lcut = tmp_path / "legacy_cut.pth"
  lcut.write_bytes(legacy.read_bytes()[:-100])
  with pytest.raises(CheckpointError, match="truncated"):
    read_pth(str(lcut))


def test_official_checkpoint_loads_where_torch_cannot_be_imported(tmp_path, vocab_path):
  """An official-layout caption .pth through blip_jax.load and one caption, in a process whose
  import system refuses torch and transformers: the run-time path needs neither."""
  from official_ref import official_state_dict, shared_pair
  torch.save({"model": official_state_dict("keys_official_decoder.txt", *shared_pair())}, tmp_path / "cap.pth")
  code = textwrap.dedent(f"""
      import sys
      class Block:
        def find_spec(self, name, path=None, target=None):
          if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError('blocked: ' + name)
      sys.meta_path.insert(0, Block())
      import numpy as np, blip_jax
      m = blip_jax.load({str(tmp_path / 'cap.pth')!r}, vocab={vocab_path!r})
      img = np.random.RandomState(0).randint(0, 255, (64, 48, 3)).astype(np.uint8)
      print('caption:', repr(m.generate(m.preprocess([img]), max_length=8, min_length=2)[0]))
      assert not any(k.split('.')[0] in ('torch', 'transformers') for k in sys.modules)
      """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "caption:" in out.stdout
