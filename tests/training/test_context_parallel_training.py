"""Context-parallel training through the real platform step: a `sequence` mesh axis splits every
token activation, attention runs ring or all-to-all (kernels_pallas/context_parallel.py), and
one training step equals the one-device step.

The SSA LM is the demanding case: its query temperature depends on each query's absolute
position, so a shard that used local positions would give a different loss. The step's optimizer
stores the gradients as its state, so the step hands back the exact gradients it computed.
"""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from kernels_pallas import sharding
from zoo.training import config as config_lib
from zoo.training import hlo
from zoo.training import mesh as mesh_lib
from zoo.training import state as state_lib
from zoo.training import step as step_lib
from zoo.training import tasks
from zoo.training.errors import ConfigError

ssa_configs = importlib.import_module("configs.ssa")
BATCH, SEQ_LEN = 4, 32
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4


def _ssa_config(sequence: int, strategy: str = "ring", impl: str = "xla"):
    c = ssa_configs.get_config("smoke")
    c.lm.seq_len = SEQ_LEN
    c.model.overrides = ml_collections.ConfigDict(dict(
            vocab_size=256, max_seq_len=SEQ_LEN, width=32, depth=1, num_heads=4,
            **{k: v for k, v in c.model.overrides.items() if k.startswith("ssa_")}))
    c.model.attn_impl = impl
    c.batch_size = c.eval.batch_size = BATCH
    c.mesh_shape = (-1, 1, 1) if sequence > 1 else (1, 1, 1)
    if sequence > 1:
        common.with_context_parallelism(c, sequence, strategy=strategy)
    return c


def _gradients_as_state() -> optax.GradientTransformation:
    return optax.GradientTransformation(
            lambda params: jax.tree.map(jnp.zeros_like, params),
            lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _tokens() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(BATCH, SEQ_LEN + 1)).astype(np.int32)


def _step_gradients(config, devices):
    """(loss, gradients, compiled HLO text, kernel calls) of one platform train step."""
    config_lib.validate_config(config, num_devices=len(devices))
    mesh = mesh_lib.make_mesh(config, devices)
    skeleton = state_lib.ModelSkeleton(config)
    tx = _gradients_as_state()
    abstract = state_lib.abstract_train_state(skeleton, tx)
    shardings = state_lib.train_state_shardings(skeleton, abstract, mesh,
                                                config.logical_axis_rules)
    data_sharding = mesh_lib.batch_sharding(mesh, config.data_axes)
    step = step_lib.make_train_step(config=config, skeleton=skeleton,
                                    task=tasks.get_task(config), tx=tx,
                                    lr_schedule=lambda _: 0.0, mesh=mesh,
                                    state_shardings=shardings, data_sharding=data_sharding)
    model = jax.device_get(skeleton.init_pure())
    params, _ = skeleton.split(model)
    state = jax.device_put({"model": model, "optimizer": tx.init(params),
                            "step": np.int32(0)}, shardings)
    batch = jax.device_put({"tokens": _tokens()}, data_sharding)
    with sharding.record_kernel_calls() as calls:
        compiled = step.lower(state, batch).compile()
    new_state, metrics = compiled(state, batch)
    return (float(metrics["loss"]), jax.device_get(new_state["optimizer"]), compiled.as_text(),
            calls)


_REFERENCE = {}


def _reference(impl: str):
    if impl not in _REFERENCE:
        _REFERENCE[impl] = _step_gradients(_ssa_config(1, impl=impl), jax.devices()[:1])
    return _REFERENCE[impl]


@pytest.mark.parametrize("sequence,strategy,impl", [
        (4, "ring", "xla"),  # mesh (data 2, sequence 4)
        (8, "ring", "xla"),  # mesh (sequence 8)
        (4, "all_to_all", "xla"),
        (4, "ring", "interpret"),  # the Triton kernel per key block
])
def test_ssa_lm_step_with_context_parallelism_equals_one_device(sequence, strategy, impl):
    ref_loss, ref_grads, _, _ = _reference(impl)
    config = _ssa_config(sequence, strategy, impl)
    loss, grads, text, calls = _step_gradients(config, jax.devices())
    np.testing.assert_allclose(loss, ref_loss, rtol=LOSS_RTOL)
    leaves = jax.tree.leaves(ref_grads)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), leaves):
        scale = float(np.linalg.norm(want))
        assert scale > 0, f"{jax.tree_util.keystr(path)}: zero gradient, nothing tested"
        error = float(np.linalg.norm(got - want)) / scale
        assert error <= GRAD_RTOL, f"{jax.tree_util.keystr(path)}: rel error {error:.2e}"
    # Every attention call ran context-parallel, its sequence split over `sequence`.
    assert calls and all(c.what == f"attention[{strategy}]" for c in calls), calls
    assert all(tuple(c.in_specs[0])[1] == "sequence" for c in calls)
    kinds = hlo.counts(hlo.collectives(text))
    if strategy == "ring":
        assert kinds.get("collective-permute", 0) > 0, kinds


def test_sequence_axis_config_errors():
    c = _ssa_config(4)
    c.lm.seq_len = 36
    c.model.overrides.max_seq_len = 36
    with pytest.raises(ConfigError, match="config.lm.seq_len=36 must be divisible by 8"):
        config_lib.validate_config(c, num_devices=8)
    c = _ssa_config(4)
    c.logical_axis_rules = tuple(r for r in c.logical_axis_rules
                                 if r[0] != "activation_length")
    with pytest.raises(ConfigError, match="no logical_axis_rules entry maps "
                                          "'activation_length' to it"):
        config_lib.validate_config(c, num_devices=8)
    c = _ssa_config(4)
    c.context_parallel.strategy = "spiral"
    with pytest.raises(ConfigError, match="config.context_parallel.strategy='spiral' is "
                                          "invalid; allowed: one of"):
        config_lib.validate_config(c, num_devices=8)
    c = _ssa_config(4)
    c.data_axes = ("data", "sequence")
    with pytest.raises(ConfigError, match="without 'sequence'"):
        config_lib.validate_config(c, num_devices=8)
