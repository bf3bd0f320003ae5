"""Torch-free, code-free readers for PyTorch and safetensors weight files.

Supported (detected by content, not by file name):
- zip archives written by `torch.save` (torch >= 1.6) and TorchScript
  archives from `torch.jit.save` (OpenAI's RN50.pt, RN101.pt, ...);
- safetensors files (e.g. open_clip's `.safetensors`).

Pickles are read with a restricted unpickler: it rebuilds tensors (as numpy
arrays), plain containers and TorchScript modules (as inert attribute
holders), and refuses every other global, so a malicious file cannot run
code. Legacy (pre-1.6, non-zip) `torch.save` files are refused.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

StateDict = dict[str, np.ndarray]

_ZIP_MAGIC = b"PK\x03\x04"
# A legacy torch.save file starts with a protocol-2 pickle of a magic long.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_TORCH_STORAGES = {
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}
_SAFETENSORS_DTYPES = {
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "F32": np.float32,
  "F64": np.float64,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


class CheckpointError(ValueError):
  """A weight file that cannot (or must not) be read."""


class _Storage:
  """Marker for a torch storage type (a dtype); never instantiated."""

  def __init__(self, dtype: np.dtype):
    self.dtype = np.dtype(dtype)


class TorchScriptObject:
  """Inert stand-in for a TorchScript module: only holds its attributes."""

  def __setstate__(self, state: Any) -> None:
    if not isinstance(state, dict):
      raise CheckpointError(
        f"Unexpected TorchScript object state of type {type(state).__name__}."
      )
    self.__dict__.update(state)


def _rebuild_tensor(
  storage: np.ndarray,
  offset: int,
  size: tuple[int, ...],
  stride: tuple[int, ...],
  *unused: Any,
) -> np.ndarray:
  """A copy of the strided view `storage[offset:]` (0-d tensors stay 0-d)."""
  del unused  # requires_grad, backward hooks, metadata.
  itemsize = storage.dtype.itemsize
  extent = (
    sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if all(size)
    else -1
  )
  if offset + extent >= storage.size:
    raise CheckpointError(
      f"Tensor of size {size} at offset {offset} overruns its storage of "
      f"{storage.size} elements (corrupted file?)."
    )
  view = np.lib.stride_tricks.as_strided(
    storage[offset:],
    shape=tuple(size),
    strides=tuple(s * itemsize for s in stride),
  )
  return np.array(view)


def _rebuild_parameter(data: np.ndarray, *unused: Any) -> np.ndarray:
  """`torch._utils._rebuild_parameter`: a Parameter is just its data."""
  del unused
  return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("collections", "OrderedDict"): collections.OrderedDict,
  **{("torch", n): _Storage(d) for n, d in _TORCH_STORAGES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Rebuilds tensors from a torch zip archive; refuses any other global."""

  def __init__(
    self,
    data: bytes,
    load_storage: Callable[[str, np.dtype], np.ndarray],
    source: str,
  ):
    super().__init__(io.BytesIO(data))
    self._load_storage = load_storage
    self._source = source
    self._script_classes: dict[str, type] = {}
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "__torch__" or module.startswith("__torch__."):
      qualname = f"{module}.{name}"
      if qualname not in self._script_classes:
        self._script_classes[qualname] = type(name, (TorchScriptObject,), {})
      return self._script_classes[qualname]
    raise CheckpointError(
      f"refusing to load global '{module}.{name}' from {self._source}: only "
      "tensors, containers and TorchScript modules are allowed (the file may "
      "be malicious, or holds objects other than weights; save a plain "
      "state_dict instead)."
    )

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (
      isinstance(pid, tuple)
      and len(pid) == 5
      and pid[0] == "storage"
      and isinstance(pid[1], _Storage)
    ):
      raise CheckpointError(
        f"Unsupported persistent id {pid!r} in {self._source}."
      )
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      storage = self._load_storage(str(key), storage_type.dtype)
      if storage.size < numel:
        raise CheckpointError(
          f"Storage {key} of {self._source} has {storage.size} elements, "
          f"expected {numel} (truncated file?)."
        )
      self._storages[key] = storage
    return self._storages[key]


def _read_torch_zip(path: str) -> Any:
  """Unpickles `<stem>/data.pkl` of a torch.save / torch.jit.save archive."""
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise CheckpointError(
      f"{path} is not a complete zip archive ({e}); the file is truncated or "
      "corrupted, download it again."
    ) from e
  with archive:
    pickles = [
      n
      for n in archive.namelist()
      if n.count("/") == 1 and n.endswith("/data.pkl")
    ]
    if len(pickles) != 1:
      raise CheckpointError(
        f"{path} is a zip file but not a torch archive (expected one "
        f"'<name>/data.pkl', found {pickles})."
      )
    stem = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if f"{stem}byteorder" in archive.namelist():
      byteorder = archive.read(f"{stem}byteorder").decode().strip()
    order = "<" if byteorder == "little" else ">"

    def load_storage(key: str, dtype: np.dtype) -> np.ndarray:
      raw = archive.read(f"{stem}data/{key}")
      return np.frombuffer(raw, dtype.newbyteorder(order)).astype(
        dtype, copy=False
      )

    try:
      return _RestrictedUnpickler(
        archive.read(pickles[0]), load_storage, path
      ).load()
    except CheckpointError:
      raise
    except Exception as e:  # Any failure of a damaged or foreign archive.
      raise CheckpointError(
        f"{path} is damaged or not a weights archive ({type(e).__name__}: "
        f"{e}); download it again."
      ) from e


def read_safetensors(path: str) -> StateDict:
  """Reads a safetensors file into numpy arrays (no torch, no code).

  Layout: 8-byte little-endian header length N, N bytes of JSON header
  {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"},
  then the raw little-endian buffer the offsets point into.

  Args:
    path: the .safetensors file.

  Returns:
    name -> array (copied out of the file).
  """
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < 8:
    raise CheckpointError(f"{path} is too short for a safetensors file.")
  (header_len,) = struct.unpack("<Q", data[:8])
  if 8 + header_len > len(data):
    raise CheckpointError(f"{path}: safetensors header overruns the file.")
  try:
    header = json.loads(data[8 : 8 + header_len])
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: bad safetensors header ({e}).") from e
  buffer = memoryview(data)[8 + header_len :]
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise CheckpointError(
        f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}."
      )
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if not 0 <= begin <= end <= len(buffer) or (
      end - begin != dtype.itemsize * int(np.prod(shape))
    ):
      raise CheckpointError(
        f"{path}: tensor {name!r} has inconsistent offsets {begin}..{end} "
        f"for shape {shape} {info['dtype']} (truncated file?)."
      )
    tensors[name] = (
      np.frombuffer(buffer[begin:end], dtype).reshape(shape).copy()
    )
  return tensors


def _script_state(obj: TorchScriptObject, prefix: str = "") -> StateDict:
  """Tensors reachable through the attributes of a TorchScript module."""
  out = {}
  for name, value in vars(obj).items():
    if isinstance(value, np.ndarray):
      out[prefix + name] = value
    elif isinstance(value, TorchScriptObject):
      out.update(_script_state(value, f"{prefix}{name}."))
  return out


def _find_state_dict(obj: Any, path: str) -> StateDict:
  """The flat name -> array dict inside an unpickled checkpoint object."""
  if isinstance(obj, TorchScriptObject):
    return _script_state(obj)
  if isinstance(obj, Mapping):
    arrays = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if arrays and len(arrays) == len(obj):
      return dict(arrays)
    for nested in ("state_dict", "model", "module"):
      if isinstance(obj.get(nested), Mapping):
        return _find_state_dict(obj[nested], path)
  raise CheckpointError(
    f"No state dict found in {path}: expected a dict of tensors, possibly "
    "under 'state_dict' or 'model', or a TorchScript module."
  )


def detect_format(path: str) -> str:
  """The format from the first bytes: torch_zip, safetensors, legacy_torch."""
  with open(path, "rb") as f:
    head = f.read(16)
  if head.startswith(_ZIP_MAGIC):
    return "torch_zip"
  if head.startswith(_LEGACY_MAGIC):
    return "legacy_torch"
  if len(head) > 8 and head[8:9] == b"{":
    return "safetensors"
  raise CheckpointError(
    f"{path}: unrecognised format (neither a torch zip archive nor a "
    "safetensors file)."
  )


def load_state_dict(path: str) -> tuple[StateDict, str]:
  """Reads the weights of a checkpoint file as flat numpy arrays.

  A leading "module." (DistributedDataParallel) is stripped when every key
  has it. Dtypes are kept (fp16 stays fp16).

  Args:
    path: torch.save / torch.jit.save zip archive or safetensors file.

  Returns:
    (state dict, format) with format "torchscript", "torch_zip" or
    "safetensors".

  Raises:
    CheckpointError: unreadable, unsafe or unsupported files.
  """
  fmt = detect_format(path)
  if fmt == "legacy_torch":
    raise CheckpointError(
      f"{path} uses the legacy (torch < 1.6) torch.save format, which is not "
      "supported. Re-save it with a current torch: "
      "torch.save(torch.load(path, weights_only=True), new_path)."
    )
  if fmt == "safetensors":
    state = read_safetensors(path)
  else:
    obj = _read_torch_zip(path)
    fmt = "torchscript" if isinstance(obj, TorchScriptObject) else fmt
    state = _find_state_dict(obj, path)
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module.") :]: v for k, v in state.items()}
  return state, fmt
