"""train.py and eval.py end to end, as real processes on 8 fake CPU devices.

The uninterrupted reference run (tests/conftest.py, tests/cli_runs.py) is checked here; eval.py
on one device must reproduce its final eval, two processes x 4 devices must reproduce its losses
(also on the kernel path, attn_impl="interpret", over a data x tensor mesh), a bad config is one
line, and a diverging run must stop with the step range and keep its last good checkpoint.
Interrupted and resumed runs (SIGTERM, Ctrl-C, kill -9, dead grain workers) are
tests/faults/test_kill_and_resume.py's.

All runs share a persistent compilation cache, so only the first run of each program pays for
XLA compilation.
"""
from __future__ import annotations

import json
import math
import socket
import sys

import pytest

from cli_runs import (REPO, RUN_FLAGS, TOTAL_STEPS, metrics, run, start, steps, finish,
                      train_command)
from training_helpers import goodput_figures

pytestmark = pytest.mark.slow

def test_reference_run_trains_logs_evaluates_and_checkpoints(reference_run):
    workdir, stdout, stderr = reference_run
    train, evals = metrics(workdir)
    assert sorted(train) == list(range(2, TOTAL_STEPS + 1, 2))
    assert sorted(evals) == [20, 40]
    assert train[TOTAL_STEPS]["train/loss"] < 0.8 * train[2]["train/loss"]
    assert evals[40]["eval/count"] == 64.0 and 0.0 <= evals[40]["eval/top1"] <= 1.0
    assert steps(workdir) == [32, 36, 40]  # keep_checkpoints=3
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == TOTAL_STEPS
    # Start-up report: model summary with a total, and the throughput line with MFU's status.
    assert "trainable parameters per top-level module" in stdout
    assert "inputs image float32[16, 16, 16, 3] -> outputs float32[16, 10]" in stdout
    assert "TFLOP/s/device" in stdout and "MFU n/a" in stdout
    assert "FLOPs per step per device" in stderr
    # Goodput (zoo/training/goodput.py) on every train record: totals so far, so wall time and
    # every kind only grow; saves (every 4 steps, asynchronous) are counted once one happened.
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    figures = [goodput_figures(r) for r in records if "train/loss" in r]
    assert len(figures) == TOTAL_STEPS // 2
    for before, after in zip(figures, figures[1:]):
        assert all(after[k] >= before[k] for k in before if k.endswith("_s")), (before, after)
    assert figures[-1]["checkpoint_save_s"] > 0 and figures[-1]["eval_s"] > 0
    assert figures[-1]["data_wait_s"] > 0 and figures[-1]["step_s"] > 0
    assert stdout.strip().splitlines()[-1].startswith("goodput ")


def test_eval_cli_on_one_device_reproduces_the_training_eval(reference_run, run_env):
    workdir = reference_run[0]
    result = run([sys.executable, "eval.py", "--config", "configs/vit.py:smoke", "--workdir",
                   str(workdir), *RUN_FLAGS], run_env(devices=1))
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed == json.loads((workdir / f"eval_{TOTAL_STEPS}.json").read_text())
    _, evals = metrics(workdir)
    assert printed["step"] == TOTAL_STEPS and printed["count"] == 64
    assert printed["top1"] == evals[TOTAL_STEPS]["eval/top1"]
    assert math.isclose(printed["loss"], evals[TOTAL_STEPS]["eval/loss"], rel_tol=1e-5)


def test_eval_cli_rejects_a_missing_step(reference_run, run_env):
    workdir = reference_run[0]
    result = run([sys.executable, "eval.py", "--config", "configs/vit.py:smoke", "--workdir",
                   str(workdir), "--step", "7", *RUN_FLAGS], run_env(devices=1))
    assert result.returncode == 2
    assert "--step=7 has no checkpoint" in result.stderr.strip().splitlines()[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags, loss_rtol, in_bucket", [
        # Both processes write one shared workdir in a bucket of the local GCS emulator
        # (tests/gcs_emulator.py): orbax's multi-host save, process 0's metrics and lock.
        ((), 2e-5, True),
        # The Pallas kernel (interpreted), shard-mapped over a data x tensor mesh that spans the
        # two processes, against the XLA path of the reference run.
        (("--config.model.attn_impl=interpret", "--config.mesh_shape=(4,1,2)"), 1e-4, False),
], ids=["xla_gcs_workdir", "kernel_path"])
def test_two_processes_match_one_process(reference_run, run_env, tmp_path, request, flags,
                                         loss_rtol, in_bucket):
    reference = reference_run[0]
    env = run_env(devices=4)
    if in_bucket:
        from conftest import gcs_env
        workdir = request.getfixturevalue("gcs_bucket") + "/two_processes"
        env = gcs_env(env, request.getfixturevalue("gcs_emulator"))
    else:
        workdir = tmp_path / "two_processes"
    address = f"localhost:{_free_port()}"
    processes = [
            start(train_command(workdir, f"--coordinator_address={address}",
                                  "--num_processes=2", f"--process_id={i}",
                                  f"--config.checkpoint_every={TOTAL_STEPS}", *flags), env)
            for i in range(2)]
    results = [finish(p) for p in processes]
    for rc, _, err in results:
        assert rc == 0, err[-5000:]
    train, evals = metrics(workdir)
    ref_train, ref_eval = metrics(reference)
    assert sorted(train) == sorted(ref_train)
    for step in ref_train:
        assert math.isclose(train[step]["train/loss"], ref_train[step]["train/loss"],
                            rel_tol=loss_rtol), step
    assert evals[TOTAL_STEPS]["eval/top1"] == ref_eval[TOTAL_STEPS]["eval/top1"]
    if in_bucket:  # nothing went to a local folder named after the URL (gs:/zoo-test/...)
        assert not (REPO / "gs:").exists()
        assert steps(workdir) == [TOTAL_STEPS]


@pytest.mark.parametrize("flags, message", [
        (("--config.batch_size=12",), "ConfigError: config.batch_size=12 must be divisible"),
        # The tiny ViT's 2 heads on a tensor axis of 4, on the kernel path: found while tracing
        # the step, before any state or data exists.
        (("--config.mesh_shape=(2,1,4)", "--config.model.attn_impl=interpret"),
         "ConfigError: config.mesh_shape=(2, 1, 4) with logical_axis_rules: attention: 2 "
         "attention heads cannot be split over mesh axis 'tensor' of size 4"),
], ids=["batch", "heads_vs_tensor"])
def test_bad_config_is_one_line_and_nonzero_exit(run_env, tmp_path, flags, message):
    result = run(train_command(tmp_path, *flags), run_env())
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(message), last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_divergence_stops_with_the_step_range_and_keeps_good_checkpoints(run_env, tmp_path):
    # Plain SGD at lr 1e10: the first update is finite, the next forward/backward is not.
    result = run(train_command(tmp_path, "--config.optimizer.name=sgd",
                                 "--config.optimizer.learning_rate=1e10",
                                 "--config.optimizer.grad_clip_norm=0.0",
                                 "--config.optimizer.weight_decay=0.0",
                                 "--config.schedule.warmup_steps=0",
                                 "--config.checkpoint_every=1"), run_env())
    assert result.returncode == 3, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("TrainingDiverged: loss became nan/inf within steps [2, 2]"), last
    assert "the last good checkpoint is step 1" in last
    assert steps(tmp_path) == [1]  # the diverged state was not saved
