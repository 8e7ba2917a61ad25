"""Weight files in and out, without running code from them and without torch.

  load_state_dict(path)              name -> numpy array, from .safetensors, .npz, or a
                                     torch .pth/.pt/.bin (the zip format of torch >= 1.6)
  save_safetensors(arrays, path)     the safetensors format, written atomically
  read_safetensors(path)             (arrays, metadata) of a safetensors file

Why our own readers:
  * safetensors' numpy API cannot hold bfloat16 (numpy has no such dtype), and most Hugging Face
    weights are bfloat16; here bfloat16 and float8 come from `ml_dtypes` (a jax dependency).
  * torch's `torch.load(weights_only=True)` needs torch. A torch checkpoint is a zip of raw
    storages plus a pickle that says how tensors are cut from them. The pickle is read by an
    unpickler that resolves only the handful of names a state_dict needs (tensor and parameter
    rebuilds, storage types, OrderedDict). Any other global (`os.system`, an `argparse.Namespace`
    in a training checkpoint, a custom class) refuses the whole file with an error naming it:
    nothing from the file is ever called. Strided views are bounds-checked against their
    storage before any byte is read.
  * `.npz` goes through `np.load(allow_pickle=False)`: object arrays are refused.

Nested checkpoints are flattened with "." ("model.head.weight"); a top level that holds only
a "state_dict", "model" or "module" entry of arrays (timm, DDP and Lightning habits) is unwrapped,
as is a "module." prefix shared by every key. Non-array leaves (epoch counters, strings) are
dropped.
"""
from __future__ import annotations

import collections
import json
import math
import os
import pickle
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

# safetensors dtype names <-> numpy dtypes.
_SAFETENSORS_DTYPES = {
        "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
        "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
        "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
        "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
        "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
        "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
# Largest header we accept: the format's own readers cap it at 100 MB.
_MAX_HEADER_BYTES = 100_000_000

# torch storage classes (pickled as globals of module "torch") -> element dtype.
_TORCH_STORAGES = {
        "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
        "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
        "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
        "BoolStorage": np.bool_,
}
_WRAPPER_KEYS = ("state_dict", "model", "module")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SUFFIXES = (".safetensors", ".npz") + TORCH_SUFFIXES


class WeightFileError(ValueError):
    """A weight file that cannot be read safely; the message names the file and the reason."""


# ------------------------------------------------------------------------------------------------
# safetensors
# ------------------------------------------------------------------------------------------------

def save_safetensors(arrays: Mapping[str, Any], path: str,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Writes name -> array as safetensors (tensors in sorted name order, 8-byte aligned data)
    through a temporary file and a rename, so a crash never leaves a partial file at `path`."""
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise WeightFileError(f"{path}: safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    blobs, offset = [], 0
    for name in sorted(arrays):
        array = np.asarray(arrays[name])  # tobytes() below writes C order whatever the strides
        if array.dtype not in _SAFETENSORS_NAMES:
            raise WeightFileError(f"{path}: array {name!r} has dtype {array.dtype}, which "
                                  f"safetensors cannot store; allowed: "
                                  f"{sorted(str(d) for d in _SAFETENSORS_NAMES)}")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _SAFETENSORS_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes with spaces
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(name -> array, metadata) of a safetensors file; every offset is checked."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise WeightFileError(f"{path}: {len(raw)} bytes, too short for a safetensors file")
    size = int.from_bytes(raw[:8], "little")
    if size > min(_MAX_HEADER_BYTES, len(raw) - 8):
        raise WeightFileError(f"{path}: header length {size} exceeds the file "
                              f"({len(raw)} bytes): not a safetensors file, or truncated")
    try:
        header = json.loads(raw[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightFileError(f"{path}: the safetensors header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data = memoryview(raw)[8 + size:]
    arrays = {}
    for name, entry in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise WeightFileError(f"{path}: tensor {name!r} has a malformed entry {entry!r} "
                                  f"(dtype one of {sorted(_SAFETENSORS_DTYPES)}, shape, "
                                  f"data_offsets)") from None
        expected = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= len(data) or end - begin != expected or min(shape,
                                                                              default=0) < 0:
            raise WeightFileError(f"{path}: tensor {name!r} ({entry['dtype']} {list(shape)}) "
                                  f"has data_offsets {[begin, end]}, which do not fit "
                                  f"{expected} bytes inside the {len(data)}-byte data section")
        arrays[name] = np.frombuffer(data[begin:end], dtype.newbyteorder("<")).astype(
                dtype).reshape(shape)
    return arrays, dict(metadata)


# ------------------------------------------------------------------------------------------------
# torch zip checkpoints, read without torch and without executing the pickle
# ------------------------------------------------------------------------------------------------

class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(_TORCH_STORAGES[name])


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    """A tensor cut from its storage: (offset, size, stride) are element counts, as in torch."""
    if not isinstance(storage, np.ndarray):
        raise pickle.UnpicklingError(f"a tensor rebuild got {type(storage).__name__}, not a "
                                     f"storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    offset = int(offset)
    if len(size) != len(stride) or min(size, default=1) < 0 or min(stride, default=0) < 0 \
            or offset < 0:
        raise pickle.UnpicklingError(f"invalid tensor layout: size {size}, stride {stride}, "
                                     f"offset {offset}")
    if math.prod(size) == 0:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise pickle.UnpicklingError(f"tensor (size {size}, stride {stride}, offset {offset}) "
                                     f"reaches element {last} of a {storage.size}-element "
                                     f"storage")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * item for s in stride))
    return np.array(view)  # a copy: the result owns its memory and outlives the zip


def _rebuild_parameter(data, *_ignored):
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only what a torch state_dict pickle refers to; anything else is refused."""

    _ALLOWED = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
        super().__init__(file)
        self._archive, self._prefix, self._byteorder, self._path = (archive, prefix, byteorder,
                                                                   path)
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _TORCH_STORAGES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which loading would have to execute; only "
                f"tensors, parameters and (Ordered)dicts of them are read")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, kind, key, _location, numel = pid
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key!r} is missing from the "
                                             f"archive") from None
            dtype = kind.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            if len(raw) % dtype.itemsize or len(raw) // dtype.itemsize < int(numel):
                raise pickle.UnpicklingError(f"storage {key!r} has {len(raw)} bytes, not "
                                             f"{numel} x {kind.name}")
            self._storages[key] = np.frombuffer(raw, dtype).astype(kind.dtype)
        return self._storages[key]


def _read_torch_zip(path: str) -> Any:
    if not zipfile.is_zipfile(path):
        raise WeightFileError(
                f"{path}: not a zip archive. Only torch's zip format (torch >= 1.6, the default "
                f"of torch.save) can be read without running the file's pickle; re-save it "
                f"with a recent torch, or as .safetensors")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise WeightFileError(f"{path}: a torch archive holds one data.pkl, found "
                                  f"{len(pickles)}")
        prefix = pickles[0][:-len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode().strip()
        with archive.open(pickles[0]) as f:
            try:
                return _StateDictUnpickler(f, archive, prefix, byteorder, path).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError,
                    ValueError) as error:
                raise WeightFileError(f"{path}: refused: {error}") from None


# ------------------------------------------------------------------------------------------------
# The entry point
# ------------------------------------------------------------------------------------------------

def _flatten(tree: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    if isinstance(tree, np.ndarray):
        out[prefix] = tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)


def _unwrap(tree: Any) -> Any:
    while isinstance(tree, Mapping):
        wrappers = [k for k in _WRAPPER_KEYS if isinstance(tree.get(k), Mapping)]
        if len(wrappers) != 1 or any(isinstance(v, np.ndarray) for v in tree.values()):
            break
        tree = tree[wrappers[0]]
    return tree


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Name -> numpy array from a weight file, chosen by its suffix (see the module docstring).

    Raises FileNotFoundError for a missing file and WeightFileError (a ValueError) for a file
    that is malformed, has an unknown suffix, or would need code to run to be read."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file {path} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        tree: Any = read_safetensors(path)[0]
    elif suffix == ".npz":
        try:  # an .npz reads its members lazily: materialise them inside the try
            loaded = np.load(path, allow_pickle=False)
            tree = dict(loaded)
        except ValueError as error:
            raise WeightFileError(f"{path}: refused: {error} (object arrays need pickle, "
                                  f"which is never run)") from None
    elif suffix in TORCH_SUFFIXES:
        tree = _read_torch_zip(path)
    else:
        raise WeightFileError(f"{path}: unknown weight file suffix {suffix!r}; allowed: "
                              f"{list(SUFFIXES)}")
    flat: dict[str, np.ndarray] = {}
    _flatten(_unwrap(tree), "", flat)
    if not flat:
        raise WeightFileError(f"{path}: holds no arrays")
    if all(k.startswith("module.") for k in flat):  # saved from a DDP-wrapped model
        flat = {k[len("module."):]: v for k, v in flat.items()}
    return flat
