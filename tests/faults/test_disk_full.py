"""A full disk while a checkpoint is written: the run stops with one error naming the step and
the cause, every earlier checkpoint stays readable, and once there is space the same command
resumes and ends bit-identical to a run that never failed.

The real case writes the workdir to a 4 MB tmpfs (the tiny ViT's checkpoints are 1.4 MB: two
fit, a later one fails inside orbax's asynchronous writer), which needs permission to mount; the
second case makes orbax's save raise ENOSPC directly and runs everywhere."""
from __future__ import annotations

import ast
import errno
import os
import re
import subprocess
import uuid

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import vit as vit_configs
from zoo.training import checkpoint as ckpt_lib
from zoo.training import state as state_lib
from zoo.training import trainer
from zoo.training.errors import CheckpointError


def _config(total_steps: int = 8):
    c = vit_configs.get_config("smoke")
    c.total_steps, c.checkpoint_every, c.eval_every = total_steps, 2, 0
    c.schedule.warmup_steps = 1
    c.logging.progress_bar = c.logging.tensorboard = False
    return c


def _model(config, workdir) -> tuple[int, list[np.ndarray]]:
    skeleton = state_lib.ModelSkeleton(config)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          skeleton.abstract_pure())
    step, model = ckpt_lib.restore_model_only(os.path.join(workdir, "checkpoints"), target)
    return step, [np.asarray(x) for x in jax.tree.leaves(model)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference"))
    trainer.train_and_evaluate(_config(), workdir, profile_steps=None)
    return _model(_config(), workdir)


def _assert_same(workdir, reference):
    step, leaves = _model(_config(), workdir)
    assert step == reference[0] == 8
    for got, want in zip(leaves, reference[1]):
        np.testing.assert_array_equal(got, want)


@pytest.fixture
def small_tmpfs(tmp_path):
    mount_point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                             str(mount_point)], capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the ENOSPC-injection "
                    f"test covers the error path")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_keeps_earlier_checkpoints_and_the_run_resumes(small_tmpfs, reference):
    workdir = str(small_tmpfs / "run")
    with pytest.raises(CheckpointError) as caught:
        trainer.train_and_evaluate(_config(), workdir, profile_steps=None)
    # Which save fills the disk depends on what else the run wrote there; the ones before it
    # must all be intact and readable.
    match = re.fullmatch(r"could not write the checkpoint of step (\d+) to .*: the disk is full "
                         r"\(No space left on device\)\. The checkpoints already there "
                         r"\((\[.*\])\) are untouched; .*", str(caught.value))
    assert match, str(caught.value)
    failed, intact = int(match.group(1)), ast.literal_eval(match.group(2))
    assert failed >= 4 and intact == list(range(2, failed, 2))
    assert _model(_config(), workdir)[0] == failed - 2  # the newest complete checkpoint reads
    subprocess.run(["mount", "-o", "remount,size=32m", str(small_tmpfs)], check=True)
    trainer.train_and_evaluate(_config(), workdir, profile_steps=None)
    _assert_same(workdir, reference)


def test_an_enospc_from_the_writer_is_reported_and_the_run_resumes(tmp_path, monkeypatch,
                                                                   reference):
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    workdir = str(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"checkpoint of step 6 .*the disk is full.*"
                                              r"resume from step 4"):
        trainer.train_and_evaluate(_config(), workdir, profile_steps=None)
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    assert _model(_config(), workdir)[0] == 4
    trainer.train_and_evaluate(_config(), workdir, profile_steps=None)
    _assert_same(workdir, reference)
