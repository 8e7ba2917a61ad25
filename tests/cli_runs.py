"""Running train.py / eval.py as real processes, shared by the end-to-end and fault tests
(tests/training/test_train_cli.py, tests/faults/test_kill_and_resume.py) and by their
session fixtures in tests/conftest.py (`shared_dir`, `run_env`, `reference_run`).

The runs use the tiny ViT of tests/training/training_helpers.py; every run is compared with one
uninterrupted reference run of TOTAL_STEPS steps.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from training_helpers import cli_overrides, tiny_config
from zoo import storage
from zoo.training import checkpoint as ckpt_lib
from zoo.training import state as state_lib

REPO = Path(__file__).resolve().parents[1]
TOTAL_STEPS = 40
# Shuffled and augmented: the global batches do not depend on the process count (data.py), so
# one process and two processes must train on the same examples in every global batch.
RUN_FLAGS = cli_overrides(**{
        "total_steps": TOTAL_STEPS, "checkpoint_every": 4, "log_every": 2, "eval_every": 20,
        "keep_checkpoints": 3, "data.shuffle": True, "data.augment": "flip",
        "optimizer.learning_rate": 0.003})
TIMEOUT = 240


@contextlib.contextmanager
def exclusive(lock_path: Path):
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def train_command(workdir, *extra) -> list[str]:
    return [sys.executable, "train.py", "--config", "configs/vit.py:smoke", "--workdir",
            str(workdir), *RUN_FLAGS, *extra]


def start(command, env) -> subprocess.Popen:
    # A session of its own, so that kill -9 also reaches grain's worker processes.
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def run(command, env) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=TIMEOUT)
    return process.returncode, out, err


def steps(workdir) -> list[int]:
    """Committed checkpoint steps of a local or bucket (gs://) workdir. Locally orbax writes a
    temporary folder and renames it; in a bucket the step folder is written in place and
    committed by its commit_success.txt."""
    directory = storage.join(str(workdir), "checkpoints")
    if not storage.isdir(directory):
        return []
    found = sorted(int(name) for name in storage.listdir(directory) if name.isdigit())
    if storage.is_remote(directory):
        found = [step for step in found
                 if storage.exists(storage.join(directory, str(step), "commit_success.txt"))]
    return found


def wait_for_checkpoint(process, workdir, after: int) -> int:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        newer = [s for s in steps(workdir) if s > after]
        if newer:
            return newer[-1]
        if process.poll() is not None:
            raise AssertionError(f"run ended (rc={process.returncode}) before a checkpoint "
                                 f"after step {after}: {process.stderr.read()[-3000:]}")
        time.sleep(0.3 if storage.is_remote(str(workdir)) else 0.02)
    raise AssertionError(f"no checkpoint after step {after} within {TIMEOUT}s")


def kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=TIMEOUT)


def metrics(workdir) -> tuple[dict, dict]:
    """(train records, eval records) by step, timing fields dropped."""
    train, evals = {}, {}
    for line in storage.read_text(storage.join(str(workdir), "metrics.jsonl")).splitlines():
        record = json.loads(line)
        step = record.pop("step")
        record = {k: v for k, v in record.items() if not k.startswith("perf/")}
        (evals if any(k.startswith("eval/") for k in record) else train)[step] = record
    return train, evals


def final_params(workdir) -> list[np.ndarray]:
    skeleton = state_lib.ModelSkeleton(tiny_config())
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device),
                          skeleton.abstract_pure())
    step, model = ckpt_lib.restore_model_only(storage.join(str(workdir), "checkpoints"),
                                              target)
    assert step == TOTAL_STEPS
    return [np.asarray(x) for x in jax.tree.leaves(model)]


def assert_same_run(workdir, reference) -> None:
    ref_train, ref_eval = metrics(reference)
    train, evals = metrics(workdir)
    assert train == ref_train  # exact: same floats, same steps, nothing duplicated
    assert evals == ref_eval
    for got, want in zip(final_params(workdir), final_params(reference)):
        np.testing.assert_array_equal(got, want)


def saving(workdir) -> bool:
    """True while orbax is writing a checkpoint (its temporary folder exists)."""
    return any(p.name.endswith(".orbax-checkpoint-tmp")
               for p in (Path(workdir) / "checkpoints").glob("*"))


def read_proc(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except (FileNotFoundError, ProcessLookupError):  # a thread or process that just ended
        return b""


def grain_workers(pid: int) -> list[int]:
    """The grain worker processes (multiprocessing spawn children) of process `pid`."""
    # Each thread lists the children it started (grain starts them from a helper thread).
    children = [c for task in Path(f"/proc/{pid}/task").iterdir()
                for c in read_proc(f"{task}/children").split()]
    return [int(c) for c in children if b"spawn_main" in read_proc(f"/proc/{int(c)}/cmdline")]


