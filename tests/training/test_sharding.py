"""Sharded training on 8 fake CPU devices: the rules place parameters where they say, and data-,
FSDP- and tensor-parallel meshes follow the single-device loss trajectory; gradient accumulation
over k micro-batches equals one step on the whole batch."""
from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from training_helpers import put, synthetic_batch, tiny_config
from zoo.training import mesh as mesh_lib
from zoo.training import state as state_lib
from zoo.training import step as step_lib
from zoo.training import tasks

jax.config.update("jax_threefry_partitionable", True)

RULES = tiny_config().logical_axis_rules


def _mesh(shape, devices=None):
    config = tiny_config(mesh_shape=shape)
    return mesh_lib.make_mesh(config, devices)


# --- the logical -> mesh mapping ------------------------------------------------------------

@pytest.mark.parametrize("names, shape, expected", [
        (("embed", "mlp"), (32, 128), P("fsdp", "tensor")),
        (("embed", None, "heads"), (32, 3, 32), P("fsdp", None, "tensor")),
        (("embed", "classes"), (32, 10), P("fsdp", None)),  # "classes" -> None
        (("heads", "embed"), (32, 32), P("tensor", "fsdp")),
        (("embed",), (6,), P(None)),  # 6 is not divisible by fsdp=4: replicated
        (("unknown_name", "mlp"), (8, 8), P(None, "tensor")),
        (None, (4, 4), P()),
])
def test_logical_rules_to_partition_spec(names, shape, expected):
    mesh = _mesh((1, 4, 2))
    assert mesh_lib.logical_to_partition_spec(names, shape, mesh, RULES) == expected


def test_a_mesh_axis_is_used_once_per_array_and_later_rules_are_tried():
    mesh = _mesh((1, 4, 2))
    rules = (("embed", "fsdp"), ("mlp", "fsdp"), ("mlp", "tensor"))
    # "mlp" cannot take fsdp (already used by "embed"), so its second rule applies.
    spec = mesh_lib.logical_to_partition_spec(("embed", "mlp"), (8, 8), mesh, rules)
    assert spec == P("fsdp", "tensor")
    # Size-1 mesh axes shard nothing and are skipped; a tuple target shards over both axes.
    mesh_2d = _mesh((2, 4, 1))
    spec = mesh_lib.logical_to_partition_spec(("embed",), (16,), mesh_2d,
                                              (("embed", ("data", "fsdp", "tensor")),))
    assert spec == P(("data", "fsdp"))


def test_train_state_is_sharded_as_the_rules_say():
    config = tiny_config(mesh_shape=(1, 4, 2))
    mesh = mesh_lib.make_mesh(config)
    skeleton = state_lib.ModelSkeleton(config)
    tx = optax.adamw(1e-3)
    abstract = state_lib.abstract_train_state(skeleton, tx)
    shardings = state_lib.train_state_shardings(skeleton, abstract, mesh, config.logical_axis_rules)
    state = state_lib.init_train_state(skeleton, tx, shardings)

    qkv = state["model"]["blocks"][0]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec == P("fsdp", None, "tensor")
    assert qkv.sharding.shard_shape(qkv.shape) == (8, 3, 16)  # really split, not replicated
    fc1 = state["model"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == P("fsdp", "tensor")
    assert state["model"]["pos_embed"].sharding.spec == P(None, None, "fsdp")
    assert state["model"]["head"]["kernel"].sharding.spec == P("fsdp", None)
    assert state["model"]["norm"]["scale"].sharding.spec == P(None)
    # Adam's moments follow their parameter; the step counters are replicated.
    adam = state["optimizer"][0]
    assert adam.mu["blocks"][0]["attn"]["qkv"]["kernel"].sharding.spec == P("fsdp", None, "tensor")
    assert adam.nu["blocks"][0]["mlp"]["fc1"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert adam.count.sharding.spec == P()
    assert state["step"].sharding.spec == P()


# --- same trajectory on every mesh ----------------------------------------------------------

@pytest.fixture(scope="module")
def initial_model():
    """Initial model variables on the host, drawn with numpy (no compile); every run below
    starts from them, placed on its own mesh, so each mesh compiles only its train step."""
    skeleton = state_lib.ModelSkeleton(tiny_config())
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype),
                        skeleton.abstract_pure())


def _train(initial_model, mesh_shape, *, devices=None, steps=2, grad_accum=1, dropout=0.0,
           batches=None):
    config = tiny_config(mesh_shape=mesh_shape, grad_accum_steps=grad_accum)
    config.model.overrides.dropout_rate = dropout
    mesh = mesh_lib.make_mesh(config, devices)
    skeleton = state_lib.ModelSkeleton(config)
    tx = optax.sgd(0.1, momentum=0.9)
    abstract = state_lib.abstract_train_state(skeleton, tx)
    shardings = state_lib.train_state_shardings(skeleton, abstract, mesh, config.logical_axis_rules)
    data_sharding = mesh_lib.batch_sharding(mesh, config.data_axes)
    train_step = step_lib.make_train_step(
            config=config, skeleton=skeleton, task=tasks.get_task(config), tx=tx,
            lr_schedule=lambda step: 0.1, mesh=mesh, state_shardings=shardings,
            data_sharding=data_sharding)
    params, _ = skeleton.split(initial_model)
    state = jax.device_put({"model": initial_model, "optimizer": tx.init(params),
                            "step": np.int32(0)}, shardings)
    losses = []
    for step in range(steps):
        batch = batches[step] if batches else synthetic_batch(step)
        state, metrics = train_step(state, put(batch, data_sharding))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state["model"])


MESHES = {"data8": (8, 1, 1), "data2_fsdp4": (2, 4, 1), "data4_tensor2": (4, 1, 2)}


def test_sharded_training_matches_one_device(initial_model):
    # One test for all meshes (not parametrized) so that one worker computes the reference.
    reference_losses, reference_params = _train(initial_model, (1, 1, 1),
                                                devices=jax.devices()[:1], dropout=0.1)
    moved = max(float(np.max(np.abs(p - s))) for p, s in
                zip(jax.tree.leaves(reference_params), jax.tree.leaves(initial_model)))
    assert moved > 1e-3  # the compared steps really trained
    for name, mesh_shape in MESHES.items():
        losses, params = _train(initial_model, mesh_shape, dropout=0.1)
        np.testing.assert_allclose(losses, reference_losses, rtol=2e-5, atol=2e-6,
                                   err_msg=f"losses on mesh {name} {mesh_shape}")
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference_params)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5,
                                       err_msg=f"parameters on mesh {name} {mesh_shape}")


def test_gradient_accumulation_equals_one_big_batch(initial_model):
    batch = [synthetic_batch(0, batch_size=16)]
    devices = jax.devices()[:2]
    one_losses, one_params = _train(initial_model, (2, 1, 1), devices=devices, steps=1,
                                    batches=batch)
    acc_losses, acc_params = _train(initial_model, (2, 1, 1), devices=devices, steps=1,
                                    grad_accum=4, batches=batch)
    np.testing.assert_allclose(acc_losses, one_losses, rtol=1e-5)
    moved = 0.0
    for got, want, start in zip(jax.tree.leaves(acc_params), jax.tree.leaves(one_params),
                                jax.tree.leaves(initial_model)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        moved = max(moved, float(np.max(np.abs(want - start))))
    assert moved > 1e-3  # the compared step really changed the parameters


def test_bfloat16_compute_keeps_float32_params_and_loss(initial_model):
    config = tiny_config(mesh_shape=(1, 1, 1), **{"precision.compute_dtype": "bfloat16"})
    mesh = mesh_lib.make_mesh(config, jax.devices()[:1])
    skeleton = state_lib.ModelSkeleton(config)
    tx = optax.sgd(0.1)
    abstract = state_lib.abstract_train_state(skeleton, tx)
    shardings = state_lib.train_state_shardings(skeleton, abstract, mesh, config.logical_axis_rules)
    data_sharding = mesh_lib.batch_sharding(mesh, config.data_axes)
    train_step = step_lib.make_train_step(
            config=config, skeleton=skeleton, task=tasks.get_task(config), tx=tx,
            lr_schedule=lambda step: 0.1, mesh=mesh, state_shardings=shardings,
            data_sharding=data_sharding)
    params, _ = skeleton.split(initial_model)
    state = jax.device_put({"model": initial_model, "optimizer": tx.init(params),
                            "step": np.int32(0)}, shardings)
    state, metrics = train_step(state, put(synthetic_batch(0), data_sharding))
    assert metrics["loss"].dtype == np.float32
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state["model"]))
    # Same numbers as float32 compute, to bfloat16 accuracy.
    reference_losses, _ = _train(initial_model, (1, 1, 1), devices=jax.devices()[:1], steps=1)
    np.testing.assert_allclose(float(metrics["loss"]), reference_losses[0], rtol=2e-2)
