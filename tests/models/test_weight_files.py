"""zoo/weight_files.py: weight files read without torch and without running code from them.

The torch and safetensors fixtures were written by torch and safetensors themselves
(tools/make_weight_file_fixture.py). Hostile torch archives are written here with stand-in
`torch` modules placed in sys.modules, so the pickles name exactly the globals a real torch
checkpoint names.
"""
from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest

from zoo import weight_files

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures"


def _expected():
    data = np.load(FIXTURES / "torch_weights_expected.npz")
    names = sorted(k.partition("/")[2] for k in data if k.startswith("value/"))
    return {n: (data[f"value/{n}"], str(data[f"dtype/{n}"])) for n in names}


NUMPY_DTYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
               "int64": np.int64, "bool": np.bool_}


@pytest.mark.parametrize("filename", ["torch_weights.pth", "torch_weights.safetensors"])
def test_files_written_by_torch_and_safetensors_read_exactly(filename):
    loaded = weight_files.load_state_dict(str(FIXTURES / filename))
    expected = _expected()
    assert sorted(loaded) == sorted(expected)  # .pth: {"state_dict": ..., "epoch": 3} unwrapped
    for name, (value, dtype) in expected.items():
        got = loaded[name]
        assert got.dtype == np.dtype(NUMPY_DTYPE[dtype]), name
        assert got.shape == value.shape, name
        np.testing.assert_array_equal(got.astype(value.dtype), value, err_msg=name)


def test_safetensors_round_trip_all_dtypes_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
            "a/bf16": rng.normal(size=(3, 4)).astype(ml_dtypes.bfloat16),
            "a/f8": rng.normal(size=(5,)).astype(ml_dtypes.float8_e4m3fn),
            "b/f64": rng.normal(size=(2, 1, 3)),
            "b/i8": rng.integers(-100, 100, (7,)).astype(np.int8),
            "c/u16": rng.integers(0, 60000, (2, 2)).astype(np.uint16),
            "c/bool": rng.random((3,)) > 0.5,
            "d/scalar": np.float32(1.5),
            "d/empty": np.zeros((0, 3), np.float16),
            "e/noncontiguous": rng.normal(size=(4, 6)).astype(np.float32).T,
    }
    path = str(tmp_path / "w.safetensors")
    weight_files.save_safetensors(arrays, path, metadata={"model": "swin_t"})
    loaded, metadata = weight_files.read_safetensors(path)
    assert metadata == {"model": "swin_t"}
    assert sorted(loaded) == sorted(arrays)
    for name, value in arrays.items():
        value = np.asarray(value)
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape, name
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    assert os.listdir(tmp_path) == ["w.safetensors"]  # no temporary file left behind


def test_agrees_with_the_reference_safetensors_library(tmp_path):
    library = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(1)
    arrays = {"x": rng.normal(size=(3, 5)).astype(np.float32),
              "y": rng.integers(0, 9, (4,)).astype(np.int64), "z": np.float16(3.0)}
    ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
    weight_files.save_safetensors(arrays, ours)
    library.save_file({k: np.asarray(v) for k, v in arrays.items()}, theirs)
    for name, value in library.load_file(ours).items():
        np.testing.assert_array_equal(value, arrays[name])
    for name, value in weight_files.read_safetensors(theirs)[0].items():
        np.testing.assert_array_equal(value, arrays[name])


@pytest.mark.parametrize("damage,match", [
        (lambda raw: raw[:5], "too short"),
        (lambda raw: (10**9).to_bytes(8, "little") + raw[8:], "exceeds the file"),
        (lambda raw: raw[:-4], "do not fit"),
        (lambda raw: raw[:8] + b"\xff" + raw[9:], "not JSON"),
])
def test_malformed_safetensors_are_refused_with_the_reason(tmp_path, damage, match):
    path = tmp_path / "w.safetensors"
    weight_files.save_safetensors({"x": np.ones((4, 4), np.float32)}, str(path))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(weight_files.WeightFileError, match=match):
        weight_files.load_state_dict(str(path))


# ------------------------------------------------------------------------------------------------
# torch archives written without torch
# ------------------------------------------------------------------------------------------------

class _Storage:
    def __init__(self, key: str, data: np.ndarray):
        self.key, self.data = key, data


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False,
                     collections.OrderedDict())

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


class _Payload:
    """What a malicious checkpoint does: a REDUCE of os.system."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def fake_torch(monkeypatch):
    """Stand-in `torch` / `torch._utils` modules so that pickle writes torch's global names."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled, never called here")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    storage_type = type("FloatStorage", (), {"__module__": "torch"})
    torch.FloatStorage = storage_type
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def _write_archive(path, obj, storages: list[_Storage], drop_storage: str | None = None):
    torch = sys.modules["torch"]

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                return ("storage", torch.FloatStorage, o.key, "cpu", o.data.size)
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        for storage in storages:
            if storage.key != drop_storage:
                archive.writestr(f"archive/data/{storage.key}",
                                 storage.data.astype("<f4").tobytes())


def test_hand_written_archive_with_strided_views_reads(fake_torch, tmp_path):
    storage = _Storage("0", np.arange(12, dtype=np.float32))
    state = collections.OrderedDict([
            ("module.w", _Tensor(storage, 2, (2, 3), (1, 2))),  # a strided view at offset 2
            ("module.b", _Tensor(storage, 0, (12,), (1,)))])
    _write_archive(tmp_path / "ok.pth", {"model": state, "step": 7}, [storage])
    loaded = weight_files.load_state_dict(str(tmp_path / "ok.pth"))
    # "model" unwrapped, then the DDP "module." prefix shared by every key dropped
    assert sorted(loaded) == ["b", "w"]
    # element [i, j] = storage[2 + i * 1 + j * 2]
    np.testing.assert_array_equal(loaded["w"], np.array([[2, 4, 6], [3, 5, 7]], np.float32))
    np.testing.assert_array_equal(loaded["b"], np.arange(12, dtype=np.float32))


def test_malicious_pickle_is_refused_and_never_run(fake_torch, tmp_path):
    marker = tmp_path / "pwned"
    _write_archive(tmp_path / "evil.pth", {"state_dict": {"w": _Payload(str(marker))}}, [])
    with pytest.raises(weight_files.WeightFileError,
                       match=r"evil\.pth: refused: it refers to (posix|os|nt)\.system"):
        weight_files.load_state_dict(str(tmp_path / "evil.pth"))
    assert not marker.exists()


@pytest.mark.parametrize("offset,size,stride,drop,match", [
        (0, (4, 4), (4, 1), None, "reaches element 15 of a 12-element storage"),
        (0, (3,), (-1,), None, "invalid tensor layout"),
        (0, (3,), (1,), "0", "storage '0' is missing"),
])
def test_archives_that_point_outside_their_data_are_refused(fake_torch, tmp_path, offset, size,
                                                            stride, drop, match):
    storage = _Storage("0", np.arange(12, dtype=np.float32))
    _write_archive(tmp_path / "bad.pth", {"w": _Tensor(storage, offset, size, stride)},
                   [storage], drop_storage=drop)
    with pytest.raises(weight_files.WeightFileError, match=match):
        weight_files.load_state_dict(str(tmp_path / "bad.pth"))


def test_other_files_are_refused_with_what_is_allowed(tmp_path):
    legacy = tmp_path / "legacy.pth"  # torch < 1.6: a bare pickle stream
    legacy.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    with pytest.raises(weight_files.WeightFileError, match="not a zip archive"):
        weight_files.load_state_dict(str(legacy))
    objects = tmp_path / "objects.npz"
    np.savez(objects, w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(weight_files.WeightFileError, match="refused.*never run"):
        weight_files.load_state_dict(str(objects))
    other = tmp_path / "weights.h5"
    other.write_bytes(b"\x89HDF")
    with pytest.raises(weight_files.WeightFileError, match=r"suffix '\.h5'.*\.safetensors"):
        weight_files.load_state_dict(str(other))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weight_files.load_state_dict(str(tmp_path / "missing.safetensors"))
    plain = tmp_path / "plain.npz"
    np.savez(plain, **{"head.weight": np.ones((2, 2))})
    assert list(weight_files.load_state_dict(str(plain))) == ["head.weight"]
