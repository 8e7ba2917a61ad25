"""Checkpoints: a state saved on one mesh restores on another (and the model alone on one
device) with identical values and eval output; a corrupted newest checkpoint falls back to the
previous one with a warning; a checkpoint that matches no target is an error, not a restart."""
from __future__ import annotations

import logging

import jax
import numpy as np
import optax
import pytest

from training_helpers import put, synthetic_batch, tiny_config
from zoo import storage
from zoo.training import checkpoint as ckpt_lib
from zoo.training import mesh as mesh_lib
from zoo.training import state as state_lib
from zoo.training import step as step_lib
from zoo.training import tasks
from zoo.training.errors import CheckpointError


class _CountingIterator:
    """Stands in for the data iterator: a position that must survive save/restore."""

    def __init__(self, position: int = 0):
        self.position = position

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = state["position"]


def _setup(mesh_shape, devices=None):
    config = tiny_config(mesh_shape=mesh_shape)
    mesh = mesh_lib.make_mesh(config, devices)
    skeleton = state_lib.ModelSkeleton(config)
    tx = optax.adamw(1e-3)
    abstract = state_lib.abstract_train_state(skeleton, tx)
    shardings = state_lib.train_state_shardings(skeleton, abstract, mesh, config.logical_axis_rules)
    return config, mesh, skeleton, abstract, shardings


def _random_state(abstract, shardings, seed=0):
    """Distinct values in every leaf, without compiling an initialiser."""
    rng = np.random.default_rng(seed)
    host = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype) if a.shape
                        else np.asarray(7, a.dtype), abstract)
    return jax.device_put(host, shardings)


def _eval_sums(config, mesh, skeleton, model_shardings, model_state):
    data_sharding = mesh_lib.batch_sharding(mesh, config.data_axes)
    eval_step = step_lib.make_eval_step(skeleton=skeleton, task=tasks.get_task(config),
                                        mesh=mesh, model_shardings=model_shardings,
                                        data_sharding=data_sharding,
                                        rules=mesh_lib.activation_rules(config))
    batch = put(synthetic_batch(5, with_mask=True), data_sharding)
    return {k: float(v) for k, v in jax.device_get(eval_step(model_state, batch)).items()}


@pytest.fixture(scope="module")
def saved_on_4x2(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
    config, mesh, skeleton, abstract, shardings = _setup((4, 2, 1))
    state = _random_state(abstract, shardings)
    checkpointer = ckpt_lib.Checkpointer(directory, keep=3, async_save=True)
    checkpointer.save(3, state, _CountingIterator(41))
    checkpointer.close()
    sums = _eval_sums(config, mesh, skeleton, shardings["model"], state["model"])
    return directory, jax.device_get(state), sums


@pytest.mark.parametrize("mesh_shape, num_devices", [((2, 4, 1), 8), ((1, 1, 1), 1)],
                         ids=["2x4", "1_device"])
def test_full_state_restores_on_another_mesh(saved_on_4x2, mesh_shape, num_devices):
    directory, saved, _ = saved_on_4x2
    _, _, _, abstract, shardings = _setup(mesh_shape, jax.devices()[:num_devices])
    iterator = _CountingIterator()
    checkpointer = ckpt_lib.Checkpointer(directory, keep=3, async_save=False)
    step, restored = checkpointer.restore_latest(state_lib.with_shardings(abstract, shardings),
                                                 iterator)
    checkpointer.close()
    assert step == 3 and iterator.position == 41
    for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(saved),
                                   jax.tree.leaves(shardings)):
        assert got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("mesh_shape, num_devices", [((2, 4, 1), 8), ((1, 1, 1), 1)],
                         ids=["2x4", "1_device"])
def test_model_only_restore_gives_equal_eval_output(saved_on_4x2, mesh_shape, num_devices):
    directory, _, saved_sums = saved_on_4x2
    config, mesh, skeleton, _, shardings = _setup(mesh_shape, jax.devices()[:num_devices])
    target = state_lib.with_shardings(skeleton.abstract_pure(), shardings["model"])
    step, model_state = ckpt_lib.restore_model_only(directory, target)
    assert step == 3
    sums = _eval_sums(config, mesh, skeleton, shardings["model"], model_state)
    assert sums.keys() == saved_sums.keys() and sums["count"] == 16
    for name in sums:
        np.testing.assert_allclose(sums[name], saved_sums[name], rtol=1e-6)


def _corrupt(step_dir: str, how: str) -> None:
    state_dir = storage.join(step_dir, "state")
    data_files = [storage.join(root, name) for root, _, names in storage.walk(state_dir)
                  for name in names if "ocdbt" in root or name.startswith("manifest")]
    assert data_files, f"no array files found under {state_dir}"
    for path in data_files:
        if how == "truncated":
            data = storage.read_bytes(path)
            storage.write_bytes(path, data[:max(len(data) // 3, 1)])
        else:
            storage.remove(path)


# "bucket": the run directory in the local GCS emulator (the quarantine is a copy and delete)
@pytest.mark.parametrize("how, where", [("truncated", "local"), ("deleted", "local"),
                                        ("truncated", "bucket")])
def test_corrupted_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog, request, how,
                                                               where):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("gcs_bucket")
    directory = storage.join(root, "checkpoints")
    _, _, _, abstract, shardings = _setup((8, 1, 1))
    checkpointer = ckpt_lib.Checkpointer(directory, keep=3, async_save=False)
    good, bad = _random_state(abstract, shardings, 1), _random_state(abstract, shardings, 2)
    checkpointer.save(4, good, _CountingIterator(4))
    checkpointer.save(8, bad, _CountingIterator(8))
    checkpointer.wait()
    _corrupt(storage.join(directory, "8"), how)

    iterator = _CountingIterator()
    target = state_lib.with_shardings(abstract, shardings)
    with caplog.at_level(logging.WARNING):
        step, restored = checkpointer.restore_latest(target, iterator)
    assert step == 4 and iterator.position == 4
    np.testing.assert_array_equal(np.asarray(restored["model"]["pos_embed"]),
                                  np.asarray(good["model"]["pos_embed"]))
    assert any("checkpoint at step 8" in r.getMessage() and "falling back to step 4"
               in r.getMessage() for r in caplog.records)
    assert storage.isdir(storage.join(root, "corrupt_checkpoints", "8"))
    assert not storage.exists(storage.join(directory, "8")), list(storage.walk(storage.join(directory, "8")))
    # The broken step no longer blocks the run from saving that step number again.
    checkpointer.save(8, restored, iterator)
    checkpointer.wait()
    assert checkpointer.all_steps() == [4, 8]
    checkpointer.close()


def test_checkpoint_matching_no_target_is_an_error_and_nothing_is_moved(saved_on_4x2):
    directory, _, _ = saved_on_4x2
    config = tiny_config()
    config.model.overrides.embed_dim = 64  # a different model than the one saved
    mesh = mesh_lib.make_mesh(config)
    skeleton = state_lib.ModelSkeleton(config)
    tx = optax.adamw(1e-3)
    abstract = state_lib.abstract_train_state(skeleton, tx)
    shardings = state_lib.train_state_shardings(skeleton, abstract, mesh, config.logical_axis_rules)
    checkpointer = ckpt_lib.Checkpointer(directory, keep=3, async_save=False)
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be restored: step 3: "):
        checkpointer.restore_latest(state_lib.with_shardings(abstract, shardings),
                                    _CountingIterator())
    assert checkpointer.all_steps() == [3]
    checkpointer.close()


def test_model_only_restore_reports_missing_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        ckpt_lib.restore_model_only(str(tmp_path / "empty"), {})
