"""Files of runs and data sets, on a local disk or in a bucket (`gs://...`), through one API.

Every run-directory and data read or write of the platform goes through these helpers:
config.json, metrics.jsonl, eval outputs, TensorBoard events, the checkpoint quarantine, the
workdir lock, model artifacts, and the data sources' listings and reads. Orbax writes the
checkpoints themselves (tensorstore reaches buckets on its own).

Local paths keep the plain `os` calls (and their atomic rename); a path with a scheme
(`gs://bucket/run`, or any other fsspec protocol) goes through `etils.epath`, which reaches
buckets through gcsfs (the `gcs` extra). What differs in a bucket, and what these helpers do
about it:
  * an object is written whole or not at all, so `write_text`/`write_bytes` need no temporary
    file there; locally they write a temporary file and rename it;
  * objects cannot be appended to: `append_text` is not offered; writers that add lines
    (metrics.jsonl) keep the text and rewrite the object (zoo/training/reporting.py);
  * a rename is a copy and a delete (not atomic); `move` is used only for the quarantine of
    unreadable checkpoints, where a half-moved step is still not loaded;
  * gcsfs caches directory listings by default, so another process's (or tensorstore's) new
    objects would stay invisible: the cache is switched off when this module is imported,
    before orbax or anything else makes a bucket filesystem object.

Testing against a local emulator (tests/gcs_emulator.py) needs only environment variables:
STORAGE_EMULATOR_HOST (gcsfs) and TENSORSTORE_GCS_HTTP_URL (tensorstore), with anonymous
credentials.
"""
from __future__ import annotations

import builtins
import contextlib
import glob as glob_lib
import os
import posixpath
import shutil
import tempfile
from typing import IO, Iterator

builtins_open = builtins.open  # this module defines its own `open`


def is_remote(path) -> bool:
    """True for a URL with a scheme (gs://bucket/...), False for a local path."""
    return "://" in os.fspath(path)


def _configure_fsspec() -> None:
    """Switches gcsfs's listing cache off before any bucket filesystem object exists (orbax
    makes its own through etils.epath; fsspec keeps one per set of options, so this must come
    first): a cached listing would hide objects other processes, tensorstore or orbax's
    background threads wrote since, and a recursive delete would then leave them behind."""
    try:
        import fsspec.config
    except ImportError:  # pragma: no cover - fsspec comes with orbax
        return
    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_configure_fsspec()


def _epath(path):
    from etils import epath
    try:
        return epath.Path(os.fspath(path))
    except ImportError as error:  # pragma: no cover - depends on the installed extras
        raise ImportError(f"{path}: buckets need gcsfs; install the package with the 'gcs' "
                          f"extra (pip install 'attention-zoo[gcs]')") from error


def join(path, *parts: str) -> str:
    """os.path.join for local paths; '/'-joined for URLs (whatever the host OS)."""
    path = os.fspath(path)
    if is_remote(path):
        return posixpath.join(path, *parts)
    return os.path.join(path, *parts)


def abspath(path) -> str:
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def dirname(path) -> str:
    path = os.fspath(path).rstrip("/") if is_remote(path) else os.fspath(path)
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def basename(path) -> str:
    path = os.fspath(path)
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def makedirs(path) -> None:
    if is_remote(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
    return _epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def getsize(path) -> int:
    return _epath(path).stat().length if is_remote(path) else os.path.getsize(path)


def listdir(path) -> list[str]:
    """Names in the directory (not sorted)."""
    if is_remote(path):
        return [child.name for child in _epath(path).iterdir()]
    return os.listdir(path)


def walk(top) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk, top-down, for local folders and bucket folders (one listing call per folder
    in a bucket); sorting the folder list in place orders the descent."""
    if not is_remote(top):
        yield from os.walk(top)
        return
    scheme = os.fspath(top).split("://", 1)[0] + "://"
    for root, folders, names in _epath(top).walk():
        root = str(root)  # fsspec may give it without the scheme
        yield (root if is_remote(root) else scheme + root.lstrip("/")), folders, names


def glob(pattern: str) -> list[str]:
    """Paths matching `pattern` ('*', '?' and '[]' in the last components; no '**' in
    buckets), sorted."""
    if not is_remote(pattern):
        return sorted(glob_lib.glob(pattern))
    # epath globs relative to a directory: split at the first component with a wildcard
    parts = pattern.split("/")
    first = next(i for i, part in enumerate(parts) if any(c in part for c in "*?[")) \
        if any(c in pattern for c in "*?[") else len(parts)
    if first == len(parts):
        return [pattern] if exists(pattern) else []
    base = "/".join(parts[:first])
    return sorted(str(p) for p in _epath(base).glob("/".join(parts[first:])))


def open(path, mode: str = "r") -> IO:  # noqa: A001 - the module's open
    """A file object (also a context manager) for reading ('r', 'rb') or writing a whole file
    ('w', 'wb')."""
    if mode not in ("r", "rb", "w", "wb"):
        raise ValueError(f"mode={mode!r}; allowed: 'r', 'rb', 'w', 'wb' (buckets cannot "
                         f"append)")
    if is_remote(path):
        return _epath(path).open(mode)
    return builtins_open(path, mode)


def read_text(path) -> str:
    with open(path) as f:
        return f.read()


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path, data: bytes) -> None:
    """Writes the whole file so that a reader sees the old or the new content, never a part:
    one object upload in a bucket; a synced temporary file renamed over it locally."""
    path = os.fspath(path)
    if is_remote(path):
        _epath(path).write_bytes(data)
        return
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def remove(path) -> None:
    """Deletes a file; a missing one is not an error."""
    if is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            _epath(path).unlink()
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def rmtree(path) -> None:
    if is_remote(path):
        target = _epath(path)
        if target.exists():
            target.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def move(source, destination) -> None:
    """Moves a file or directory (a rename locally; in a bucket a server-side copy of every
    object, then the deletion of the source: folders exist there only through their objects,
    so the destination needs none)."""
    if is_remote(source) != is_remote(destination):
        raise ValueError(f"cannot move {source} to {destination}: one local, one remote")
    if not is_remote(source):
        shutil.move(source, destination)
        return
    _epath(source)  # configures the filesystem layer
    import fsspec.core
    filesystem, source_path = fsspec.core.url_to_fs(os.fspath(source))
    _, destination_path = fsspec.core.url_to_fs(os.fspath(destination))
    recursive = filesystem.isdir(source_path)
    filesystem.copy(source_path, destination_path, recursive=recursive)
    filesystem.rm(source_path, recursive=recursive)


def modified_time(path) -> float:
    """Seconds since the epoch of the last modification."""
    if is_remote(path):
        return float(_epath(path).stat().mtime)
    return os.path.getmtime(path)


def upload_tree(local_dir: str, destination) -> None:
    """Copies the files under the local folder `local_dir` to `destination` (any path)."""
    for folder, _, names in os.walk(local_dir):
        relative = os.path.relpath(folder, local_dir)
        target = destination if relative == "." else join(destination,
                                                          *relative.split(os.sep))
        makedirs(target)
        for name in names:
            with builtins_open(os.path.join(folder, name), "rb") as f:
                write_bytes(join(target, name), f.read())
