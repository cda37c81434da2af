"""Reading `torch.save` files without torch: a restricted unpickler that builds NumPy arrays.

Two layouts exist:
- zip (torch >= 1.6, every official BLIP release): `<root>/data.pkl` is the pickle, each tensor
  storage is a raw little-endian member `<root>/data/<key>`, `<root>/byteorder` may say otherwise.
  Members are read through zipfile, which checks every member's CRC-32: a corrupt file fails here.
- legacy (`_use_new_zipfile_serialization=False`): pickles of a magic number, a protocol version
  and system info, then the object pickle, then the list of storage keys, then each storage as an
  int64 element count followed by its bytes, in that order.

In the pickle, tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
calls whose storage comes through `persistent_load(('storage', StorageType, key, location, numel))`.
The unpickler resolves only the globals listed in `_GLOBALS` (tensor rebuilds, storage and dtype
types, OrderedDict, and a few harmless builtins) to functions of this module; every other global
raises before anything is called, so a crafted pickle can name `os.system` but never run it.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle names a global that is not a tensor rebuild or storage type; nothing was run."""


# torch dtype name -> NumPy dtype (little-endian; byteorder applied when a file says big)
_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
    "complex64": np.complex64, "complex128": np.complex128,
}
# storage class name (torch.FloatStorage ...) -> torch dtype name
_STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}


class _TorchType:
  """What a storage type (`torch.FloatStorage`, a persistent id's type) or a dtype (`torch.float32`,
  an argument of _rebuild_tensor_v3) unpickles to: its NumPy dtype."""
  def __init__(self, dtype_name: str):
    self.dtype = np.dtype(_DTYPES[dtype_name])


class _Storage:
  """A tensor storage's bytes as a flat array of its dtype."""
  def __init__(self, data: np.ndarray):
    self.data = data


class _Pending:
  """A legacy-file tensor whose storage bytes come after the pickle (see _resolve_pending)."""
  def __init__(self, *args):
    self.args = args


def _tensor(storage: _Storage, offset: int, size, stride, dtype=None) -> np.ndarray:
  if storage.data is None:
    return _Pending(storage, offset, size, stride, dtype)
  flat = storage.data if dtype is None else storage.data.view(dtype.dtype)
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if not size:
    return flat[offset:offset + 1].reshape(()).copy()
  extent = 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else 0
  if offset < 0 or offset + extent > flat.size or any(s < 0 for s in stride):
    raise pickle.UnpicklingError(f"tensor of size {size}, stride {stride} at offset {offset} does not fit "
                                 f"its storage of {flat.size} elements")
  view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                         strides=tuple(s * flat.itemsize for s in stride), writeable=False)
  return np.array(view)  # owned and contiguous, as tensor.numpy() of a loaded tensor reads


def _rebuild_tensor(storage, offset, size, stride):
  return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
  return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
  return _tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  return data


def _encode(s, encoding="latin1"):
  """`_codecs.encode`: how protocol-2 pickles spell bytes; latin-1 only (what pickle writes)."""
  if encoding != "latin1" or not isinstance(s, str):
    raise UnsafePickleError("_codecs.encode with anything but a str and latin1 is refused")
  return s.encode("latin1")


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _encode,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray,
    **{("torch", name): _TorchType(dt) for name, dt in _STORAGES.items()},
    **{("torch", name): _TorchType(name) for name in _DTYPES},
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, load_storage):
    super().__init__(file, encoding="utf-8")
    self._load_storage = load_storage

  def find_class(self, module, name):
    fn = _GLOBALS.get((module, name))
    if fn is None:
      raise UnsafePickleError(f"refused global {module}.{name}: only tensor rebuilds, storage and dtype "
                              f"types, OrderedDict and plain containers may appear in a weights file")
    return fn

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage")
            and isinstance(pid[1], _TorchType)):
      raise UnsafePickleError(f"refused persistent id {str(pid)[:80]}: only tensor storages are read")
    return self._load_storage(pid[1:])


def _find_root(names: list[str]) -> str:
  for n in names:
    if n == "data.pkl" or n.endswith("/data.pkl"):
      return n[:-len("data.pkl")]
  raise pickle.UnpicklingError("a zip file without data.pkl: not a torch.save file")


def _load_zip(f) -> object:
  with zipfile.ZipFile(f) as zf:
    root = _find_root(zf.namelist())
    order = "<"
    if root + "byteorder" in zf.namelist():
      order = ">" if zf.read(root + "byteorder").strip() == b"big" else "<"
    storages: dict = {}

    def load_storage(args):
      storage_type, key, _location, numel = args[:4]
      key = key.decode() if isinstance(key, bytes) else str(key)
      if key not in storages:
        dtype = storage_type.dtype.newbyteorder(order)
        raw = zf.read(f"{root}data/{key}")  # checks the member's CRC-32
        if len(raw) != int(numel) * dtype.itemsize:
          raise pickle.UnpicklingError(f"storage {key}: {len(raw)} bytes for {numel} x {dtype}")
        data = np.frombuffer(raw, dtype)  # a view of the bytes read: each tensor copies its own part
        storages[key] = _Storage(data if order == "<" else data.astype(dtype.newbyteorder("=")))
      return storages[key]

    return _Unpickler(io.BytesIO(zf.read(root + "data.pkl")), load_storage).load()


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _load_legacy(f) -> object:
  safe = lambda: _Unpickler(f, _no_storage).load()  # header pickles hold no globals
  if safe() != _LEGACY_MAGIC:
    raise pickle.UnpicklingError("not a torch.save file (neither zip nor the legacy magic number)")
  if safe() != 1001:
    raise pickle.UnpicklingError("legacy torch file of an unknown protocol version")
  safe()  # sys info: {'protocol_version', 'little_endian', 'type_sizes'}
  storages: dict = {}  # root key -> (_TorchType, numel, _Storage filled below)

  def load_storage(args):
    storage_type, root_key, _location, numel, view = args
    if root_key not in storages:
      storages[root_key] = (storage_type, int(numel), _Storage(None))
    if view is not None:
      raise pickle.UnpicklingError("legacy storage views are not supported")
    return storages[root_key][2]

  obj = _Unpickler(f, load_storage).load()
  keys = safe()
  for key in keys:
    storage_type, numel, storage = storages[key]
    (n,) = struct.unpack("<q", f.read(8))
    raw = f.read(n * storage_type.dtype.itemsize)
    if n != numel or len(raw) != n * storage_type.dtype.itemsize:
      raise pickle.UnpicklingError(f"storage {key}: truncated ({len(raw)} bytes for {numel} elements)")
    storage.data = np.frombuffer(raw, storage_type.dtype).copy()
  return _resolve_pending(obj)


def _no_storage(args):
  raise UnsafePickleError("a storage where none is expected")


def load(path_or_file) -> object:
  """The object a `torch.save` file holds, with every tensor as a NumPy array. Raises
  UnsafePickleError for a pickle that names anything else, pickle.UnpicklingError,
  zipfile.BadZipFile or EOFError for truncated or corrupt files."""
  f = open(path_or_file, "rb") if isinstance(path_or_file, (str, bytes)) or hasattr(path_or_file, "__fspath__") \
      else path_or_file
  try:
    if zipfile.is_zipfile(f):
      f.seek(0)
      return _load_zip(f)
    f.seek(0)
    return _load_legacy(f)
  finally:
    if f is not path_or_file:
      f.close()


def _resolve_pending(obj):
  """Legacy files: tensors rebuilt before their storage's bytes were read, now built for real."""
  if isinstance(obj, _Pending):
    return _tensor(*obj.args)
  if isinstance(obj, dict):
    return type(obj)((k, _resolve_pending(v)) for k, v in obj.items())
  if isinstance(obj, list):
    return [_resolve_pending(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_resolve_pending(v) for v in obj)
  return obj
