"""One run per workdir: a lock file that a second `train.py` on the same workdir refuses to pass.

`<workdir>/.train.lock` holds JSON {pid, host, started} of the run that owns the workdir. It is
created atomically (O_CREAT | O_EXCL) by process 0 before the run writes anything, its
modification time is refreshed every HEARTBEAT_SECONDS by a daemon thread, and it is removed
when the run ends (normally or by an exception). A kill -9 or a lost machine leaves it behind;
such a lock is stale, and taken over with a warning, when
  * its host is this host and its pid is no longer alive, or
  * it has not been refreshed for STALE_SECONDS (the owner on another host is gone: the usual
    case on a preemptible pod, where the restarted job may land on other machines).
Otherwise the second run stops with a one-line ConfigError naming the owner.

In a bucket (a `gs://...` workdir) there is no exclusive create through the filesystem layer,
so the lock is taken by writing it and reading it back a moment later: of two runs starting
within that moment the later writer keeps it and the other stops. The heartbeat rewrites the
object (a bucket has no utime); staleness is judged by the object's update time as above.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Iterator

import jax
import numpy as np
from absl import logging

from zoo import storage
from zoo.training.errors import ConfigError

LOCK_NAME = ".train.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 180.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# How long a run waits before reading back the lock it wrote to a bucket: a second starter
# that wrote in between has then overwritten it.
BUCKET_SETTLE_SECONDS = 1.0


def _read(path: str) -> dict:
    try:
        owner = json.loads(storage.read_text(path))
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}  # half-written or unreadable: judged by its age alone


def _stale_reason(path: str, owner: dict) -> str | None:
    """Why the lock at `path` may be taken over, or None while its owner may be running."""
    try:
        age = time.time() - storage.modified_time(path)
    except FileNotFoundError:
        return "it disappeared"
    host, pid = owner.get("host"), owner.get("pid")
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        return f"its process {pid} on this host has ended"
    if age > STALE_SECONDS:
        return f"it was last refreshed {age:.0f} s ago (> {STALE_SECONDS:.0f} s)"
    return None


def _create_exclusively(path: str, record: str) -> None:
    """Writes the lock, or raises FileExistsError when another run holds it."""
    if not storage.is_remote(path):
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(record)
        return
    if storage.exists(path):
        raise FileExistsError(path)
    storage.write_text(path, record)
    time.sleep(BUCKET_SETTLE_SECONDS)
    if storage.read_text(path) != record:  # a run that started at the same time wrote after us
        raise FileExistsError(path)


def _acquire(path: str) -> None:
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                         "token": os.urandom(8).hex()})
    for _ in range(3):  # a takeover races at most a few other starters
        try:
            _create_exclusively(path, record)
        except FileExistsError:
            owner = _read(path)
            reason = _stale_reason(path, owner)
            if reason is None:
                raise ConfigError(
                        f"workdir {storage.dirname(path)} is in use by another train.py "
                        f"(pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started "
                        f"{owner.get('started', '?')}); wait for it to finish, or if it is gone, "
                        f"delete {path}") from None
            logging.warning("taking over the stale lock %s of pid %s on %s: %s", path,
                            owner.get("pid"), owner.get("host"), reason)
            storage.remove(path)
            continue
        return
    raise ConfigError(f"could not take the lock {path}: other runs keep starting on this "
                      f"workdir")


def _agree(error: ConfigError | None, workdir: str) -> None:
    """Every process of a multi-process run learns process 0's verdict (a collective: all
    processes call it at the same point), so none trains on while process 0 refused."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        granted = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not granted and error is None:
            error = ConfigError(f"workdir {workdir} is in use by another train.py (process 0 "
                                f"of this run found its lock {LOCK_NAME})")
    if error is not None:
        raise error


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Owns `workdir` for the duration: process 0 takes the lock, every process learns whether
    it got it. Raises ConfigError (in every process) when another live run owns it."""
    if jax.process_index() != 0:
        _agree(None, workdir)
        yield
        return
    storage.makedirs(workdir)
    path = storage.join(workdir, LOCK_NAME)
    error = None
    try:
        _acquire(path)
    except ConfigError as refused:
        error = refused
    _agree(error, workdir)
    record = storage.read_text(path)  # ours; released at the end only if still ours
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                if storage.is_remote(path):
                    storage.write_text(path, record)  # a new update time
                else:
                    os.utime(path)

    thread = threading.Thread(target=heartbeat, name="workdir-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if storage.exists(path) and storage.read_text(path) == record:
            storage.remove(path)
