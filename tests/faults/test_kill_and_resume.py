"""Killing a run at any moment loses nothing: SIGTERM and Ctrl-C save and exit 0; kill -9 at
random moments and while a checkpoint is being written, and kill -9 of a grain worker process,
all end in a run bit-identical to the uninterrupted reference run (tests/conftest.py).

Real train.py processes on 8 fake CPU devices; they share the persistent compilation cache, so
only the first one compiles.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from cli_runs import (TIMEOUT, TOTAL_STEPS, assert_same_run, finish, grain_workers,
                      kill_group, run, saving, start, steps, train_command,
                      wait_for_checkpoint)

pytestmark = pytest.mark.slow


def test_sigterm_ctrl_c_then_kill_then_resume_is_bit_identical(reference_run, run_env,
                                                               tmp_path):
    reference = reference_run[0]
    workdir = tmp_path / "run"
    # SIGTERM, then Ctrl-C (SIGINT to the whole process group, as a terminal sends it): the
    # step in flight finishes, a checkpoint is written, the process exits 0.
    stopped = 0
    for signum in (signal.SIGTERM, signal.SIGINT):
        process = start(train_command(workdir), run_env())
        wait_for_checkpoint(process, workdir, after=stopped)
        os.killpg(process.pid, signum)
        rc, out, err = finish(process)
        assert rc == 0, err[-3000:]
        stopped = steps(workdir)[-1]
        assert f"stopped at step {stopped} on {signal.Signals(signum).name}" in out
        assert stopped < TOTAL_STEPS

    # kill -9 after a further checkpoint: no clean-up at all.
    process = start(train_command(workdir), run_env())
    wait_for_checkpoint(process, workdir, after=stopped)
    kill_group(process)
    assert process.returncode == -signal.SIGKILL
    assert steps(workdir)[-1] < TOTAL_STEPS

    result = run(train_command(workdir), run_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert_same_run(workdir, reference)


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
        process = start(train_command(workdir), run_env())
        before = steps(workdir)[-1] if steps(workdir) else 0
        deadline = time.monotonic() + TIMEOUT
        if moment == "mid_save":
            while not saving(workdir) and process.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.002)
            mid_save_kills += saving(workdir)
        else:
            wait_for_checkpoint(process, workdir, after=before)
            time.sleep(float(rng.uniform(0.0, 1.0)))
        assert process.poll() is None, "the run ended before it could be killed"
        kill_group(process)
    assert mid_save_kills >= 1  # at least one kill landed inside a save
    result = run(train_command(workdir), run_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(workdir, reference)


def test_kill_and_resume_with_worker_processes_is_bit_identical(reference_run, run_env,
                                                                 tmp_path):
    """kill -9 of the whole run, then, in the resumed run, kill -9 of one grain worker: the
    workers restart at the same batch and the run ends exactly as the uninterrupted one."""
    reference = reference_run[0]
    workdir = tmp_path / "run"
    command = train_command(workdir, "--config.data.worker_count=2")
    process = start(command, run_env())
    first = wait_for_checkpoint(process, workdir, after=0)
    kill_group(process)
    assert steps(workdir)[-1] < TOTAL_STEPS
    # The resumed run also writes a profiler trace (which must not change any number).
    process = start(command + ["--profile_steps=38,39"], run_env())
    wait_for_checkpoint(process, workdir, after=first)
    workers = grain_workers(process.pid)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    rc, _, err = finish(process)
    assert rc == 0, err[-3000:]
    assert "restarting the data workers at this batch (1 of at most 3 restarts)" in err
    assert list((workdir / "profile").rglob("*.xplane.pb"))
    assert_same_run(workdir, reference)


