"""train.py and eval.py end to end, as real processes on 8 fake CPU devices.

One uninterrupted reference run is shared by the module; the other runs are compared with it:
SIGTERM / kill -9 / resume (with and without grain worker processes) must reproduce its
parameters and metrics bit for bit, eval.py on one device must reproduce its final eval, two
processes x 4 devices must reproduce its losses (also on the kernel path, attn_impl="interpret",
over a data x tensor mesh), and a diverging run must stop with the step range and keep its last
good checkpoint.

All runs share a persistent compilation cache, so only the first run of each program pays for
XLA compilation.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from training_helpers import cli_overrides, tiny_config
from zoo.training import checkpoint as ckpt_lib
from zoo.training import state as state_lib

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOTAL_STEPS = 40
# Shuffled and augmented: the global batches do not depend on the process count (data.py), so
# one process and two processes must train on the same examples in every global batch.
RUN_FLAGS = cli_overrides(**{
        "total_steps": TOTAL_STEPS, "checkpoint_every": 4, "log_every": 2, "eval_every": 20,
        "keep_checkpoints": 3, "data.shuffle": True, "data.augment": "flip",
        "optimizer.learning_rate": 0.003})
TIMEOUT = 240


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, request) -> Path:
    """A directory shared by all pytest-xdist workers of this session (the plain session
    directory without xdist), so the reference run and the compilation cache are made once
    whichever worker gets which test."""
    if not hasattr(request.config, "workerinput"):  # not an xdist worker
        return tmp_path_factory.mktemp("train_cli_shared")
    return tmp_path_factory.getbasetemp().parent


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def run_env(shared_dir):
    cache = shared_dir / "jax_cache"

    def env(devices: int = 8) -> dict:
        values = dict(os.environ)
        values.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                      JAX_COMPILATION_CACHE_DIR=str(cache),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        return values

    return env


def _train_command(workdir, *extra) -> list[str]:
    return [sys.executable, "train.py", "--config", "configs/vit.py:smoke", "--workdir",
            str(workdir), *RUN_FLAGS, *extra]


def _start(command, env) -> subprocess.Popen:
    # A session of its own, so that kill -9 also reaches grain's worker processes.
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _run(command, env) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=TIMEOUT)
    return process.returncode, out, err


def _steps(workdir) -> list[int]:
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _wait_for_checkpoint(process, workdir, after: int) -> int:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        newer = [s for s in _steps(workdir) if s > after]
        if newer:
            return newer[-1]
        if process.poll() is not None:
            raise AssertionError(f"run ended (rc={process.returncode}) before a checkpoint "
                                 f"after step {after}: {process.stderr.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint after step {after} within {TIMEOUT}s")


def _kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=TIMEOUT)


def _metrics(workdir) -> tuple[dict, dict]:
    """(train records, eval records) by step, timing fields dropped."""
    train, evals = {}, {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record.pop("step")
        record = {k: v for k, v in record.items() if not k.startswith("perf/")}
        (evals if any(k.startswith("eval/") for k in record) else train)[step] = record
    return train, evals


def _final_params(workdir) -> list[np.ndarray]:
    skeleton = state_lib.ModelSkeleton(tiny_config())
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device),
                          skeleton.abstract_pure())
    step, model = ckpt_lib.restore_model_only(str(Path(workdir) / "checkpoints"), target)
    assert step == TOTAL_STEPS
    return [np.asarray(x) for x in jax.tree.leaves(model)]


def _assert_same_run(workdir, reference) -> None:
    ref_train, ref_eval = _metrics(reference)
    train, evals = _metrics(workdir)
    assert train == ref_train  # exact: same floats, same steps, nothing duplicated
    assert evals == ref_eval
    for got, want in zip(_final_params(workdir), _final_params(reference)):
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="session")
def reference_run(shared_dir, run_env):
    """The uninterrupted run: (workdir, its stdout, its stderr)."""
    workdir = shared_dir / "reference_run"
    record = shared_dir / "reference_run.json"
    with _exclusive(shared_dir / "reference_run.lock"):
        if not record.exists():
            result = _run(_train_command(workdir, "--config.logging.tensorboard=True"),
                          run_env())
            record.write_text(json.dumps({"returncode": result.returncode,
                                          "stdout": result.stdout, "stderr": result.stderr}))
    outcome = json.loads(record.read_text())
    assert outcome["returncode"] == 0, outcome["stderr"][-5000:]
    return workdir, outcome["stdout"], outcome["stderr"]


def test_reference_run_trains_logs_evaluates_and_checkpoints(reference_run):
    workdir, stdout, stderr = reference_run
    train, evals = _metrics(workdir)
    assert sorted(train) == list(range(2, TOTAL_STEPS + 1, 2))
    assert sorted(evals) == [20, 40]
    assert train[TOTAL_STEPS]["train/loss"] < 0.8 * train[2]["train/loss"]
    assert evals[40]["eval/count"] == 64.0 and 0.0 <= evals[40]["eval/top1"] <= 1.0
    assert _steps(workdir) == [32, 36, 40]  # keep_checkpoints=3
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == TOTAL_STEPS
    # Start-up report: model summary with a total, and the throughput line with MFU's status.
    assert "trainable parameters per top-level module" in stdout
    assert "inputs image float32[16, 16, 16, 3] -> outputs float32[16, 10]" in stdout
    assert "TFLOP/s/device" in stdout and "MFU n/a" in stdout
    assert "FLOPs per step per device" in stderr


def test_sigterm_then_kill_then_resume_is_bit_identical(reference_run, run_env, tmp_path):
    reference = reference_run[0]
    workdir = tmp_path / "run"
    # SIGTERM: the step in flight finishes, a checkpoint is written, the process exits 0.
    process = _start(_train_command(workdir), run_env())
    _wait_for_checkpoint(process, workdir, after=0)
    process.send_signal(signal.SIGTERM)
    rc, out, err = _finish(process)
    assert rc == 0, err[-3000:]
    stopped = _steps(workdir)[-1]
    assert f"stopped at step {stopped} on SIGTERM" in out
    assert stopped < TOTAL_STEPS

    # kill -9 after a further checkpoint: no clean-up at all.
    process = _start(_train_command(workdir), run_env())
    _wait_for_checkpoint(process, workdir, after=stopped)
    _kill_group(process)
    assert process.returncode == -signal.SIGKILL
    assert _steps(workdir)[-1] < TOTAL_STEPS

    result = _run(_train_command(workdir), run_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    _assert_same_run(workdir, reference)


def _saving(workdir) -> bool:
    """True while orbax is writing a checkpoint (its temporary folder exists)."""
    return any(p.name.endswith(".orbax-checkpoint-tmp")
               for p in (Path(workdir) / "checkpoints").glob("*"))


def test_kill_9_at_random_moments_and_mid_save_then_resume_is_bit_identical(
        reference_run, run_env, tmp_path):
    """Three kill -9s: two while a checkpoint is being written (its temporary folder exists),
    one at a random moment between steps; the run then finishes and equals the uninterrupted
    one exactly: no half-written checkpoint is ever restored."""
    reference = reference_run[0]
    workdir = tmp_path / "run"
    rng = np.random.default_rng(0)
    mid_save_kills = 0
    for moment in ("mid_save", "random", "mid_save"):
        process = _start(_train_command(workdir), run_env())
        before = _steps(workdir)[-1] if _steps(workdir) else 0
        deadline = time.monotonic() + TIMEOUT
        if moment == "mid_save":
            while not _saving(workdir) and process.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.002)
            mid_save_kills += _saving(workdir)
        else:
            _wait_for_checkpoint(process, workdir, after=before)
            time.sleep(float(rng.uniform(0.0, 1.0)))
        assert process.poll() is None, "the run ended before it could be killed"
        _kill_group(process)
    assert mid_save_kills >= 1  # at least one kill landed inside a save
    result = _run(_train_command(workdir), run_env())
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(workdir, reference)


def _read_proc(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except (FileNotFoundError, ProcessLookupError):  # a thread or process that just ended
        return b""


def _grain_workers(pid: int) -> list[int]:
    """The grain worker processes (multiprocessing spawn children) of process `pid`."""
    # Each thread lists the children it started (grain starts them from a helper thread).
    children = [c for task in Path(f"/proc/{pid}/task").iterdir()
                for c in _read_proc(f"{task}/children").split()]
    return [int(c) for c in children if b"spawn_main" in _read_proc(f"/proc/{int(c)}/cmdline")]


def test_kill_and_resume_with_worker_processes_is_bit_identical(reference_run, run_env,
                                                                 tmp_path):
    """kill -9 of the whole run, then, in the resumed run, kill -9 of one grain worker: the
    workers restart at the same batch and the run ends exactly as the uninterrupted one."""
    reference = reference_run[0]
    workdir = tmp_path / "run"
    command = _train_command(workdir, "--config.data.worker_count=2")
    process = _start(command, run_env())
    first = _wait_for_checkpoint(process, workdir, after=0)
    _kill_group(process)
    assert _steps(workdir)[-1] < TOTAL_STEPS
    # The resumed run also writes a profiler trace (which must not change any number).
    process = _start(command + ["--profile_steps=38,39"], run_env())
    _wait_for_checkpoint(process, workdir, after=first)
    workers = _grain_workers(process.pid)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    rc, _, err = _finish(process)
    assert rc == 0, err[-3000:]
    assert "restarting the data workers at this batch (1 of at most 3 restarts)" in err
    assert list((workdir / "profile").rglob("*.xplane.pb"))
    _assert_same_run(workdir, reference)


def test_eval_cli_on_one_device_reproduces_the_training_eval(reference_run, run_env):
    workdir = reference_run[0]
    result = _run([sys.executable, "eval.py", "--config", "configs/vit.py:smoke", "--workdir",
                   str(workdir), *RUN_FLAGS], run_env(devices=1))
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed == json.loads((workdir / f"eval_{TOTAL_STEPS}.json").read_text())
    _, evals = _metrics(workdir)
    assert printed["step"] == TOTAL_STEPS and printed["count"] == 64
    assert printed["top1"] == evals[TOTAL_STEPS]["eval/top1"]
    assert math.isclose(printed["loss"], evals[TOTAL_STEPS]["eval/loss"], rel_tol=1e-5)


def test_eval_cli_rejects_a_missing_step(reference_run, run_env):
    workdir = reference_run[0]
    result = _run([sys.executable, "eval.py", "--config", "configs/vit.py:smoke", "--workdir",
                   str(workdir), "--step", "7", *RUN_FLAGS], run_env(devices=1))
    assert result.returncode == 2
    assert "--step=7 has no checkpoint" in result.stderr.strip().splitlines()[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags, loss_rtol", [
        ((), 2e-5),
        # The Pallas kernel (interpreted), shard-mapped over a data x tensor mesh that spans the
        # two processes, against the XLA path of the reference run.
        (("--config.model.attn_impl=interpret", "--config.mesh_shape=(4,1,2)"), 1e-4),
], ids=["xla", "kernel_path"])
def test_two_processes_match_one_process(reference_run, run_env, tmp_path, flags, loss_rtol):
    reference = reference_run[0]
    workdir = tmp_path / "two_processes"
    address = f"localhost:{_free_port()}"
    processes = [
            _start(_train_command(workdir, f"--coordinator_address={address}",
                                  "--num_processes=2", f"--process_id={i}",
                                  f"--config.checkpoint_every={TOTAL_STEPS}", *flags),
                   run_env(devices=4))
            for i in range(2)]
    results = [_finish(p) for p in processes]
    for rc, _, err in results:
        assert rc == 0, err[-5000:]
    train, evals = _metrics(workdir)
    ref_train, ref_eval = _metrics(reference)
    assert sorted(train) == sorted(ref_train)
    for step in ref_train:
        assert math.isclose(train[step]["train/loss"], ref_train[step]["train/loss"],
                            rel_tol=loss_rtol), step
    assert evals[TOTAL_STEPS]["eval/top1"] == ref_eval[TOTAL_STEPS]["eval/top1"]


@pytest.mark.parametrize("flags, message", [
        (("--config.batch_size=12",), "ConfigError: config.batch_size=12 must be divisible"),
        # The tiny ViT's 2 heads on a tensor axis of 4, on the kernel path: found while tracing
        # the step, before any state or data exists.
        (("--config.mesh_shape=(2,1,4)", "--config.model.attn_impl=interpret"),
         "ConfigError: config.mesh_shape=(2, 1, 4) with logical_axis_rules: attention: 2 "
         "attention heads cannot be split over mesh axis 'tensor' of size 4"),
], ids=["batch", "heads_vs_tensor"])
def test_bad_config_is_one_line_and_nonzero_exit(run_env, tmp_path, flags, message):
    result = _run(_train_command(tmp_path, *flags), run_env())
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(message), last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_divergence_stops_with_the_step_range_and_keeps_good_checkpoints(run_env, tmp_path):
    # Plain SGD at lr 1e10: the first update is finite, the next forward/backward is not.
    result = _run(_train_command(tmp_path, "--config.optimizer.name=sgd",
                                 "--config.optimizer.learning_rate=1e10",
                                 "--config.optimizer.grad_clip_norm=0.0",
                                 "--config.optimizer.weight_decay=0.0",
                                 "--config.schedule.warmup_steps=0",
                                 "--config.checkpoint_every=1"), run_env())
    assert result.returncode == 3, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("TrainingDiverged: loss became nan/inf within steps [2, 2]"), last
    assert "the last good checkpoint is step 1" in last
    assert _steps(tmp_path) == [1]  # the diverged state was not saved
