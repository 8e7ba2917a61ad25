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
from training_helpers import synthetic_batch, tiny_config
from kernels_pallas import sharding
from zoo.training import config as config_lib
from zoo.training import hlo
from zoo.training import mesh as mesh_lib
from zoo.training import state as state_lib
from zoo.training import step as step_lib
from zoo.training import tasks
from zoo.training.errors import ConfigError

ssa_configs = importlib.import_module("configs.ssa")
fit_configs = importlib.import_module("configs.fit")
BATCH, SEQ_LEN = 4, 32
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4


def _config(model: str, sequence: int, strategy: str = "ring", impl: str = "xla"):
    """A tiny LM config of `model` ("ssa": SSA GPT, "fit_ar": FIT-AR) with a `sequence` axis of
    `sequence` devices (1: one device, no sequence axis)."""
    if model == "ssa":
        c = ssa_configs.get_config("smoke")
        c.model.overrides = ml_collections.ConfigDict(dict(
                vocab_size=256, max_seq_len=SEQ_LEN, width=32, depth=1, num_heads=4,
                **{k: v for k, v in c.model.overrides.items() if k.startswith("ssa_")}))
    else:
        c = fit_configs.get_config("ar_smoke")
        # 16 groups of 2 tokens and 2 latents: the causal ring over 8 devices needs 16
        # half-chunks of whole groups.
        c.model.overrides = ml_collections.ConfigDict(dict(
                vocab_size=256, seq_len=SEQ_LEN, num_groups=16, latents_per_group=2,
                layer_spec="(1)1(1)", x_dim=16, latent_dim=32, x_heads=2, latent_heads=4,
                mlp_ratio=2.0))
    c.lm.seq_len = SEQ_LEN
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


def _step_gradients(config, devices, batch=None):
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
    batch = jax.device_put({"tokens": _tokens()} if batch is None else batch, data_sharding)
    with sharding.record_kernel_calls() as calls:
        compiled = step.lower(state, batch).compile()
    new_state, metrics = compiled(state, batch)
    return (float(metrics["loss"]), jax.device_get(new_state["optimizer"]), compiled.as_text(),
            calls)


_REFERENCE = {}


def _reference(model: str, impl: str):
    if (model, impl) not in _REFERENCE:
        _REFERENCE[model, impl] = _step_gradients(_config(model, 1, impl=impl),
                                                  jax.devices()[:1])
    return _REFERENCE[model, impl]


@pytest.mark.parametrize("model,sequence,strategy,impl", [
        ("ssa", 4, "ring", "xla"),  # mesh (data 2, sequence 4)
        ("ssa", 8, "ring", "xla"),  # mesh (sequence 8)
        ("ssa", 4, "all_to_all", "xla"),
        ("ssa", 4, "ring", "interpret"),  # the Triton kernel per key block
        ("fit_ar", 4, "ring", "xla"),
        ("fit_ar", 8, "ring", "xla"),
        ("fit_ar", 4, "all_to_all", "interpret"),
])
def test_lm_step_with_context_parallelism_equals_one_device(model, sequence, strategy, impl):
    ref_loss, ref_grads, _, _ = _reference(model, impl)
    config = _config(model, sequence, strategy, impl)
    loss, grads, text, calls = _step_gradients(config, jax.devices())
    np.testing.assert_allclose(loss, ref_loss, rtol=LOSS_RTOL)
    leaves = jax.tree.leaves(ref_grads)
    nonzero = 0
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), leaves):
        scale = float(np.linalg.norm(want))
        error = float(np.linalg.norm(got - want))
        # A parameter the loss does not use (FIT-AR's final latent norm) has zero gradient.
        assert error <= GRAD_RTOL * scale, (f"{jax.tree_util.keystr(path)}: error {error:.2e} "
                                            f"vs gradient norm {scale:.2e}")
        nonzero += scale > 0
    assert nonzero >= len(leaves) - 2, "most gradients are zero: the step tests nothing"
    # Self-attention over the whole sequence ran context-parallel; FIT's group-local layers
    # kept each group on one device, their folded batch split over data and sequence.
    cp_calls = [c for c in calls if c.what == f"attention[{strategy}]"]
    assert cp_calls and all(tuple(c.in_specs[0])[1] == "sequence" for c in cp_calls), calls
    for call in calls:
        if call not in cp_calls:
            assert call.what == "attention", call
            assert "sequence" in str(call.in_specs[0][0]), call
    kinds = hlo.counts(hlo.collectives(text))
    if strategy == "ring":
        assert kinds.get("collective-permute", 0) > 0, kinds
    if model == "ssa":
        # Nothing activation-sized is gathered: tokens stay split along the sequence, and
        # only the ring (or Ulysses' all-to-alls) moves K/V.
        assert not kinds.get("all-gather"), kinds
        assert bool(kinds.get("all-to-all")) == (strategy == "all_to_all"), kinds


def _vit_config(sequence: int, pool: str):
    c = tiny_config(batch_size=BATCH)
    c.model.overrides.pool = pool
    c.mesh_shape = (-1, 1, 1) if sequence > 1 else (1, 1, 1)
    if sequence > 1:
        common.with_context_parallelism(c, sequence)
    return c


def test_vit_step_with_context_parallelism_equals_one_device():
    """ViT (average pooling: 16 patch tokens, no class token) splits its tokens over
    (data 2, sequence 4); non-causal ring attention, no load balancing needed."""
    batch = synthetic_batch(0, BATCH)
    ref_loss, ref_grads, _, _ = _step_gradients(_vit_config(1, "gap"), jax.devices()[:1], batch)
    loss, grads, _, calls = _step_gradients(_vit_config(4, "gap"), jax.devices(), batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=LOSS_RTOL)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads),
                                 jax.tree.leaves(ref_grads)):
        error, scale = float(np.linalg.norm(got - want)), float(np.linalg.norm(want))
        assert error <= GRAD_RTOL * scale, f"{jax.tree_util.keystr(path)}: {error:.2e}"
    assert calls and all(c.what == "attention[ring]" for c in calls), calls


def test_vit_with_class_token_names_the_sequence_it_cannot_split():
    with pytest.raises(sharding.ShardingError, match="a sequence of 17 tokens cannot be split "
                                                     "over mesh axes"):
        _step_gradients(_vit_config(4, "cls"), jax.devices(), synthetic_batch(0, BATCH))


def test_sequence_axis_config_errors():
    c = _config("ssa", 4)
    c.lm.seq_len = 36
    c.model.overrides.max_seq_len = 36
    with pytest.raises(ConfigError, match="config.lm.seq_len=36 must be divisible by 8"):
        config_lib.validate_config(c, num_devices=8)
    c = _config("ssa", 4)
    c.logical_axis_rules = tuple(r for r in c.logical_axis_rules
                                 if r[0] != "activation_length")
    with pytest.raises(ConfigError, match="no logical_axis_rules entry maps "
                                          "'activation_length' to it"):
        config_lib.validate_config(c, num_devices=8)
    c = _config("ssa", 4)
    c.context_parallel.strategy = "spiral"
    with pytest.raises(ConfigError, match="config.context_parallel.strategy='spiral' is "
                                          "invalid; allowed: one of"):
        config_lib.validate_config(c, num_devices=8)
    c = _config("ssa", 4)
    c.data_axes = ("data", "sequence")
    with pytest.raises(ConfigError, match="without 'sequence'"):
        config_lib.validate_config(c, num_devices=8)
