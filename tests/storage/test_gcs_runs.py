"""A run whose workdir is a bucket of the local GCS emulator (tests/gcs_emulator.py), as on a
TPU pod: train.py killed with kill -9 after a checkpoint and resumed ends bit-identical to the
uninterrupted local reference run (tests/conftest.py); eval.py and zoo.load read the bucket;
metrics.jsonl, TensorBoard events, config.json and the eval output are objects in it; nothing
is written to a local folder. (The two-process run on one bucket workdir is in
tests/training/test_train_cli.py.)"""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from cli_runs import (REPO, RUN_FLAGS, TIMEOUT, TOTAL_STEPS, assert_same_run, final_params,
                      kill_group, metrics, run, start, steps, train_command,
                      wait_for_checkpoint)
from conftest import gcs_env
from zoo import storage

pytestmark = pytest.mark.slow


def test_bucket_workdir_killed_resumed_evaluated_and_loaded(reference_run, run_env,
                                                            gcs_emulator, gcs_bucket):
    reference = reference_run[0]
    workdir = f"{gcs_bucket}/run"
    env = gcs_env(run_env(), gcs_emulator)
    command = train_command(workdir, "--config.logging.tensorboard=True")

    process = start(command, env)
    first = wait_for_checkpoint(process, workdir, after=0)
    kill_group(process)
    assert process.returncode == -signal.SIGKILL
    assert first < TOTAL_STEPS

    result = run(command, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from gs://zoo-test/run/checkpoints" in result.stderr
    assert_same_run(workdir, reference)  # metrics.jsonl (rewritten whole) and the weights
    assert steps(workdir)[-1] == TOTAL_STEPS
    assert json.loads(storage.read_text(f"{workdir}/config.json"))["total_steps"] == TOTAL_STEPS
    events = storage.glob(f"{workdir}/tensorboard/events.out.tfevents.*")
    assert events and storage.getsize(events[0]) > 0
    assert not storage.exists(f"{workdir}/.train.lock")  # released at the end

    evaluated = run([sys.executable, "eval.py", "--config", "configs/vit.py:smoke",
                     "--workdir", workdir, *RUN_FLAGS], gcs_env(run_env(devices=1),
                                                                gcs_emulator))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["step"] == TOTAL_STEPS
    assert result["top1"] == metrics(reference)[1][TOTAL_STEPS]["eval/top1"]
    assert json.loads(storage.read_text(f"{workdir}/eval_{TOTAL_STEPS}.json")) == result

    import zoo
    loaded = zoo.load(workdir)
    assert loaded.step == TOTAL_STEPS
    from flax import nnx
    for got, want in zip(jax.tree.leaves(nnx.state(loaded.model, nnx.Param)),
                         final_params(reference)):
        np.testing.assert_array_equal(np.asarray(got), want)

    # the bug this replaces: a URL taken for a relative folder ("gs:/zoo-test/run")
    assert not (REPO / "gs:").exists()


def test_eval_of_a_bucket_without_a_run_is_one_line(run_env, gcs_emulator, gcs_bucket):
    env = gcs_env(run_env(), gcs_emulator)
    result = subprocess.run([sys.executable, "eval.py", "--config", "configs/vit.py:smoke",
                             "--workdir", f"{gcs_bucket}/nothing"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
            f"--workdir={gcs_bucket}/nothing holds no config.json; allowed: the workdir of a "
            f"train.py run")
