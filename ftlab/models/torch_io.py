"""Read PyTorch state-dict checkpoints into numpy arrays without importing torch.

`torch.save` pickles the object tree; each tensor is a call to `torch._utils._rebuild_tensor_v2`
over a storage named by a persistent id, and the storages' bytes live outside the pickle: after
it in the legacy stream (torch < 1.6, `.pth`), as `<folder>/data/<key>` records in the zip
format (torch >= 1.6). Pickle can run arbitrary code, so the unpickler here resolves only the
few globals a tensor state dict needs, each to an inert stand-in of our own, and refuses any
other global before it can run.

What `read_state_dict` returns from the unpickled object (the unwrap rule):
  1. a mapping whose values are all tensors is the state dict, keys unchanged;
  2. otherwise, if the mapping has a wrapper key (`WRAPPER_KEYS`, first one in that order)
     whose value is a mapping holding a tensor, that value is unwrapped and the rule repeats;
  3. otherwise every tensor reachable through mappings, lists and tuples is kept under its
     '.'-joined path, and non-tensor leaves (epoch, config, ...) are dropped.
Names are never rewritten (a DataParallel `module.` prefix stays): renaming is the model's job.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import ml_dtypes
import numpy as np
from numpy.lib.stride_tricks import as_strided

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of every legacy torch.save stream
LEGACY_PROTOCOL = 1001
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "params")
_MAX_DEPTH = 64
_FIX = ("only tensor state dicts can be read; re-save with "
        "`torch.save(model.state_dict(), path)` or convert the file to .safetensors")


class CheckpointError(ValueError):
    """The file is truncated, corrupt, or not a torch checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle names a global outside the tensor-state-dict allow-list (nothing was run)."""


@dataclasses.dataclass(frozen=True)
class DType:
    """Stand-in for a torch storage class or torch dtype: the numpy dtype of its elements."""
    torch_name: str
    numpy: np.dtype


_DTYPES = {  # torch dtype name -> numpy dtype
    "float32": np.dtype(np.float32), "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64), "int32": np.dtype(np.int32), "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64), "complex128": np.dtype(np.complex128),
}
_STORAGES = {  # torch storage class -> torch dtype name
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}


@dataclasses.dataclass(frozen=True)
class _Storage:
    """A storage named by a persistent id; its bytes are fetched only once the tree is read."""
    key: str
    dtype: DType
    view: Any = None  # legacy storage view: (element offset, element count) into `key`


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """A strided view of a storage, as `_rebuild_tensor_v2` describes it (unvalidated)."""
    storage: Any
    offset: Any
    size: Any
    stride: Any
    dtype: Any


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any,
                    *_ignored: Any) -> _Tensor:
    """`torch._utils._rebuild_tensor(_v2)`; requires_grad, hooks and metadata are dropped."""
    return _Tensor(storage, storage_offset, size, stride, getattr(storage, "dtype", None))


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any, backward_hooks: Any, dtype: Any,
                       *_ignored: Any) -> _Tensor:
    """`torch._utils._rebuild_tensor_v3`: an untyped storage, the element dtype given apart."""
    return _Tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    """`torch._utils._rebuild_parameter(_with_state)`: an nn.Parameter is just its tensor."""
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """Tensor subclasses (e.g. Parameters saved with keep_vars): keep the plain tensor.

    `func` can only be an allow-listed stand-in, since pickle obtained it via find_class.
    """
    return func(*args)


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """`_codecs.encode`, which protocol-2 pickles use for bytes; latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError(f"unexpected _codecs.encode of {type(text).__name__} "
                              f"to {encoding!r}")
    return text.encode("latin1")


def _allow_list() -> dict[tuple[str, str], Any]:
    """(module, name) -> the inert object that global resolves to; nothing else resolves."""
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch.nn.parameter", "Parameter"): "Parameter",
        ("torch", "Size"): tuple,
        ("_codecs", "encode"): _latin1,
    }
    table.update({("torch", n): DType(n, d) for n, d in _DTYPES.items()})
    for module in ("torch", "torch.storage"):
        table.update({(module, s): DType(s, _DTYPES[d]) for s, d in _STORAGES.items()})
    return table


_ALLOWED = _allow_list()


class _Unpickler(pickle.Unpickler):
    """Resolves allow-listed globals only; persistent ids become lazy `_Storage`s."""

    def __init__(self, file: BinaryIO, source: str) -> None:
        super().__init__(file, encoding="utf-8")
        self.source = source
        self.storage_dtypes: dict[str, DType] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing global '{module}.{name}' in {self.source}: {_FIX}") from None

    def persistent_load(self, pid: Any) -> _Storage:
        """('storage', storage type, key, location, numel[, legacy view]) -> `_Storage`."""
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], DType)):
            raise CheckpointError(f"unsupported persistent id {repr(pid)[:80]}: {_FIX}")
        key, view = str(pid[2]), pid[5] if len(pid) > 5 else None
        self.storage_dtypes[key] = pid[1]
        if view is not None:  # legacy storage view: (view key, element offset, element count)
            if not (isinstance(view, tuple) and len(view) == 3
                    and all(isinstance(i, int) and i >= 0 for i in view[1:])):
                raise CheckpointError(f"corrupt storage view {repr(view)[:80]}")
            view = view[1:]
        return _Storage(key, pid[1], view)


def _unpickle(file: BinaryIO, source: str) -> tuple[Any, dict[str, DType]]:
    """One pickle from `file` through the safe unpickler, with its storages' dtypes."""
    unpickler = _Unpickler(file, source)
    try:
        return unpickler.load(), unpickler.storage_dtypes
    except UnsafeCheckpointError:
        raise
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    except EOFError:
        raise CheckpointError(f"{source}: file ends inside a pickle (truncated?)") from None
    except Exception as e:  # hostile or damaged bytes can fail in any way
        detail = str(e).splitlines()[0][:100] if str(e) else ""
        raise CheckpointError(f"{source}: corrupt pickle ({type(e).__name__}: {detail})") from e


def _read_counted(f: BinaryIO, dtype: DType, order: str, source: str) -> bytes:
    """A legacy storage record: int64 element count, then the raw elements."""
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{source}: truncated: file ends before a storage's length")
    (count,) = struct.unpack(order + "q", head)
    if count < 0:
        raise CheckpointError(f"{source}: corrupt storage length {count}")
    nbytes, left = count * dtype.numpy.itemsize, os.fstat(f.fileno()).st_size - f.tell()
    if nbytes > left:  # checked before reading: a corrupt count must not allocate
        raise CheckpointError(f"{source}: truncated: a storage needs {nbytes} bytes, "
                              f"only {left} are left")
    return f.read(nbytes)


def _legacy_header(f: BinaryIO, source: str) -> str:
    """Check magic number and protocol; the byte order ('<' or '>') from the sys info."""
    try:
        magic = _unpickle(f, source)[0]
    except UnsafeCheckpointError:
        raise
    except CheckpointError:
        magic = None
    if type(magic) is not int or magic != LEGACY_MAGIC:
        raise CheckpointError(f"{source}: not a torch checkpoint (neither a zip archive nor "
                              "a legacy torch.save stream)")
    version = _unpickle(f, source)[0]
    if version != LEGACY_PROTOCOL:
        raise CheckpointError(f"{source}: legacy protocol {version!r} unsupported (want 1001)")
    sys_info = _unpickle(f, source)[0]
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    return "<" if little else ">"


def _read_legacy(f: BinaryIO, source: str) -> dict[str, np.ndarray]:
    """Legacy stream: header, object tree, storage keys, then each storage's counted bytes."""
    order = _legacy_header(f, source)
    tree, dtypes = _unpickle(f, source)
    keys = _unpickle(f, source)[0]
    data = {}
    for key in map(str, keys if isinstance(keys, (list, tuple)) else ()):
        if key not in dtypes:
            raise CheckpointError(f"{source}: corrupt: storage '{key}' is listed, never used")
        data[key] = _read_counted(f, dtypes[key], order, source)

    def fetch(key: str) -> bytes:
        if key not in data:
            raise CheckpointError(f"{source}: storage '{key}' is used but has no data")
        return data[key]
    return _materialize(tree, order, fetch, source)


def _read_zip(f: BinaryIO, source: str) -> dict[str, np.ndarray]:
    """Zip format: `<folder>/data.pkl` plus one `<folder>/data/<key>` record per storage."""
    try:
        with zipfile.ZipFile(f) as zf:
            names = set(zf.namelist())
            pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise CheckpointError(f"{source}: a zip archive but not a torch checkpoint "
                                      "(no single <folder>/data.pkl)")
            prefix = pkls[0][:-len("data.pkl")]
            order = prefix + "byteorder"
            big = order in names and zf.read(order).strip() == b"big"
            tree, _ = _unpickle(io.BytesIO(zf.read(pkls[0])), source)
            return _materialize(tree, ">" if big else "<", _zip_fetch(zf, prefix, source), source)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError,
            RuntimeError) as e:  # RuntimeError: encrypted member
        raise CheckpointError(f"{source}: zip archive is truncated or corrupt ({e})") from e


def _zip_fetch(zf: zipfile.ZipFile, prefix: str, source: str) -> Callable[[str], bytes]:
    """Storage key -> its record's bytes, each record read once."""
    cache: dict[str, bytes] = {}

    def fetch(key: str) -> bytes:
        if key not in cache:
            try:
                cache[key] = zf.read(f"{prefix}data/{key}")
            except KeyError:
                raise CheckpointError(f"{source}: storage record {prefix}data/{key} is "
                                      "missing (truncated archive?)") from None
        return cache[key]
    return fetch


def _flatten(obj: Any, prefix: str, out: dict[str, _Tensor], depth: int = 0) -> None:
    """Every `_Tensor` under `obj`, keyed by its '.'-joined path."""
    if depth > _MAX_DEPTH:
        raise CheckpointError(f"object nested deeper than {_MAX_DEPTH} levels (cyclic?)")
    if isinstance(obj, _Tensor):
        out[prefix] = obj
        return
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return
    for key, value in items:
        _flatten(value, f"{prefix}.{key}" if prefix else str(key), out, depth + 1)


def _select(tree: Any) -> dict[str, _Tensor]:
    """Apply the module docstring's unwrap rule to the unpickled tree."""
    while isinstance(tree, Mapping) and not all(isinstance(v, _Tensor) for v in tree.values()):
        inner = [tree[k] for k in WRAPPER_KEYS if isinstance(tree.get(k), Mapping)]
        inner = [v for v in inner if _holds_tensor(v)]
        if not inner:
            break
        tree = inner[0]
    found: dict[str, _Tensor] = {}
    _flatten(tree, "", found)
    return found


def _holds_tensor(obj: Any) -> bool:
    found: dict[str, _Tensor] = {}
    _flatten(obj, "", found)
    return bool(found)


def _frombuffer(raw: bytes, dtype: np.dtype, order: str) -> np.ndarray:
    """Raw storage bytes as a flat native-endian array."""
    count = len(raw) // dtype.itemsize
    if order == "<" or dtype.itemsize == 1:
        return np.frombuffer(raw, dtype, count=count)
    if dtype == _DTYPES["bfloat16"]:
        return np.frombuffer(raw, ">u2", count=count).astype("<u2").view(dtype)
    return np.frombuffer(raw, dtype.newbyteorder(">"), count=count).astype(dtype)


def _strided(flat: np.ndarray, t: _Tensor, name: str, source: str) -> np.ndarray:
    """Copy the view (offset, size, stride in elements) out of `flat`, bounds-checked."""
    size, stride, offset = t.size, t.stride, t.offset
    ints = [offset, *size, *stride] if isinstance(size, (tuple, list)) and isinstance(
        stride, (tuple, list)) and len(size) == len(stride) else [None]
    if not all(isinstance(i, int) and i >= 0 for i in ints):
        raise CheckpointError(f"{source}: tensor '{name}' has a corrupt view (offset "
                              f"{offset!r}, size {size!r}, stride {stride!r})")
    if 0 in size:
        return np.zeros(tuple(size), flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise CheckpointError(f"{source}: tensor '{name}' reaches element {last} of a "
                              f"{flat.size}-element storage (truncated or corrupt)")
    view = as_strided(flat[offset:], shape=tuple(size),
                      strides=tuple(s * flat.itemsize for s in stride))
    return np.array(view, order="C")  # copy: own memory, C layout whatever the strides


def _array(t: _Tensor, fetch: Callable[[str], bytes], order: str, name: str,
           source: str) -> np.ndarray:
    """Materialise one lazy tensor from its storage bytes."""
    if not isinstance(t.storage, _Storage) or not isinstance(t.dtype, DType):
        raise CheckpointError(f"{source}: tensor '{name}' is not built from a typed storage")
    raw = fetch(t.storage.key)
    if t.storage.view is not None:
        start, count = t.storage.view
        width = t.storage.dtype.numpy.itemsize
        raw = raw[start * width:(start + count) * width]
    return _strided(_frombuffer(raw, t.dtype.numpy, order), t, name, source)


def _materialize(tree: Any, order: str, fetch: Callable[[str], bytes],
                 source: str) -> dict[str, np.ndarray]:
    """Select the state dict in `tree` and read each of its tensors."""
    try:
        tensors = _select(tree)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if not tensors:
        raise CheckpointError(f"{source}: holds no tensors; {_FIX}")
    return {name: _array(t, fetch, order, name, source) for name, t in tensors.items()}


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Tensor name -> numpy array from a torch checkpoint (zip or legacy), torch not needed.

    The format is sniffed from the bytes, not the suffix. Arrays own their memory, keep
    torch's shape and dtype (bfloat16 as `ml_dtypes.bfloat16`), and are C-contiguous.

    Raises:
        FileNotFoundError: `path` is not a file.
        UnsafeCheckpointError: the pickle names a global a state dict never needs.
        CheckpointError: truncated, corrupt, or not a torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
        f.seek(0)
        return _read_zip(f, str(path)) if is_zip else _read_legacy(f, str(path))
