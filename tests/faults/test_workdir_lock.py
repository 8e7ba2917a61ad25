"""Two runs on one workdir: the second refuses while the first is alive; a lock left by a run
that died (kill -9, a lost machine) is taken over (zoo/training/workdir_lock.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from zoo.training import trainer, workdir_lock
from zoo.training.errors import ConfigError


def _lock(tmp_path):
    return tmp_path / workdir_lock.LOCK_NAME


def _write_lock(tmp_path, pid: int, host: str, age: float = 0.0):
    path = _lock(tmp_path)
    path.write_text(json.dumps({"pid": pid, "host": host, "started": "earlier"}))
    then = time.time() - age
    os.utime(path, (then, then))


def test_a_live_owner_blocks_a_second_run_and_the_lock_goes_with_the_run(tmp_path):
    with workdir_lock.hold(str(tmp_path)):
        owner = json.loads(_lock(tmp_path).read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=rf"workdir {tmp_path} is in use by another "
                                              rf"train.py \(pid {os.getpid()} on host "):
            with workdir_lock.hold(str(tmp_path)):
                pass
        assert _lock(tmp_path).exists()  # the refused run did not remove the owner's lock
    assert not _lock(tmp_path).exists()

    with pytest.raises(RuntimeError, match="boom"):  # released on an exception too
        with workdir_lock.hold(str(tmp_path)):
            raise RuntimeError("boom")
    assert not _lock(tmp_path).exists()


def test_stale_locks_are_taken_over(tmp_path, caplog):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    import socket
    _write_lock(tmp_path, dead_pid, socket.gethostname())  # killed on this host
    with workdir_lock.hold(str(tmp_path)):
        assert json.loads(_lock(tmp_path).read_text())["pid"] == os.getpid()
    assert "has ended" in caplog.text

    _write_lock(tmp_path, 1, "another-host", age=workdir_lock.STALE_SECONDS + 60)  # gone
    with workdir_lock.hold(str(tmp_path)):
        pass
    assert "last refreshed" in caplog.text

    _write_lock(tmp_path, 1, "another-host", age=5.0)  # alive elsewhere, as far as we know
    with pytest.raises(ConfigError, match="pid 1 on host another-host"):
        with workdir_lock.hold(str(tmp_path)):
            pass


def test_train_refuses_a_workdir_in_use(tmp_path):
    from configs import vit as vit_configs
    config = vit_configs.get_config("smoke")
    config.logging.tensorboard = False
    _write_lock(tmp_path, 1, "another-host")
    with pytest.raises(ConfigError, match="is in use by another train.py"):
        trainer.train_and_evaluate(config, str(tmp_path), profile_steps=None)
    assert sorted(os.listdir(tmp_path)) == [workdir_lock.LOCK_NAME]  # nothing written


def test_the_lock_in_a_bucket(gcs_bucket, monkeypatch, caplog):
    """A gs:// workdir (local GCS emulator): the same refusal and release; a lock object a dead
    run left behind is taken over by its update time (a bucket has no utime)."""
    from zoo import storage
    monkeypatch.setattr(workdir_lock, "BUCKET_SETTLE_SECONDS", 0.05)
    workdir = f"{gcs_bucket}/run"
    lock = f"{workdir}/{workdir_lock.LOCK_NAME}"
    with workdir_lock.hold(workdir):
        assert json.loads(storage.read_text(lock))["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=rf"workdir {workdir} is in use by another "):
            with workdir_lock.hold(workdir):
                pass
        assert storage.exists(lock)
    assert not storage.exists(lock)

    storage.write_text(lock, json.dumps({"pid": 1, "host": "another-host"}))
    monkeypatch.setattr(workdir_lock, "STALE_SECONDS", -1.0)  # every lock is old enough
    with workdir_lock.hold(workdir):
        assert json.loads(storage.read_text(lock))["pid"] == os.getpid()
    assert "last refreshed" in caplog.text
