"""The optimizer factory: learning-rate schedules at key steps, the weight-decay mask, gradient
clipping, one working step of every optimizer, and clear errors for bad settings."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import common
from zoo.training import optim


def _config(**changes):
    c = common.base_config()
    c.total_steps = 110
    c.schedule.warmup_steps = 10
    c.optimizer.learning_rate = 1.0
    c.schedule.end_factor = 0.1
    for dotted, value in changes.items():
        target = c
        *parents, leaf = dotted.split(".")
        for key in parents:
            target = target[key]
        target[leaf] = value
    return c


def _params():
    return {
            "blocks": {"0": {"attn": {"qkv": {"kernel": jnp.full((4, 6), 2.0),
                                              "bias": jnp.full((6,), 2.0)}},
                             "norm": {"scale": jnp.full((4,), 2.0)}}},
            "pos_emb": jnp.full((3, 4), 2.0),
            "head": {"kernel": jnp.full((4, 2), 2.0)},
    }


# --- schedules -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
        # steps:  0    4    9    10   60 (halfway)  110 (end)  200 (held)
        ("cosine", [0.1, 0.5, 1.0, 1.0, 0.55, 0.1, 0.1]),
        ("linear", [0.1, 0.5, 1.0, 1.0, 0.55, 0.1, 0.1]),
        ("constant", [0.1, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_schedule_values_at_key_steps(name, expected):
    schedule = optim.make_schedule(_config(**{"schedule.name": name}))
    steps = [0, 4, 9, 10, 60, 110, 200]
    np.testing.assert_allclose([float(schedule(s)) for s in steps], expected, rtol=1e-6)
    # Cosine and linear differ between the anchors: cosine stays higher early in the decay.
    if name == "cosine":
        assert float(schedule(35)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 4)))
    if name == "linear":
        assert float(schedule(35)) == pytest.approx(1.0 - 0.9 * 0.25)
    # Usable inside jit with a traced step.
    assert float(jax.jit(schedule)(jnp.int32(60))) == pytest.approx(expected[4], rel=1e-6)


def test_schedule_without_warmup_starts_at_the_peak():
    schedule = optim.make_schedule(_config(**{"schedule.warmup_steps": 0,
                                              "schedule.end_factor": 0.0}))
    assert float(schedule(0)) == pytest.approx(1.0)
    assert float(schedule(55)) == pytest.approx(0.5, abs=1e-6)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-7)


# --- weight-decay mask -------------------------------------------------------------------------

EXPECTED_MASK = {"blocks": {"0": {"attn": {"qkv": {"kernel": True, "bias": False}},
                                  "norm": {"scale": False}}},
                 "pos_emb": False, "head": {"kernel": True}}


def test_weight_decay_mask_by_rank_and_path():
    params = _params()
    assert optim.weight_decay_mask(params, ("pos_emb",)) == EXPECTED_MASK
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    assert optim.weight_decay_mask(abstract, ("pos_emb",)) == EXPECTED_MASK
    # Regexes see the '/'-joined path.
    mask = optim.weight_decay_mask(params, (r"^blocks/\d+/attn/qkv/kernel$",))
    assert mask["blocks"]["0"]["attn"]["qkv"]["kernel"] is False
    assert mask["pos_emb"] is True and mask["head"]["kernel"] is True


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([nnx.Linear(3, 4, rngs=rngs)])
        self.pos_emb = nnx.Param(jnp.full((5, 4), 2.0))


def test_weight_decay_mask_on_nnx_state_uses_the_same_paths():
    abstract = nnx.state(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0))), nnx.Param)
    mask = optim.weight_decay_mask(abstract, common.base_config().optimizer.no_decay)
    by_path = {optim.param_path(path): value
               for path, value in jax.tree_util.tree_leaves_with_path(mask)}
    assert by_path == {"blocks/0/bias": False, "blocks/0/kernel": True, "pos_emb": False}


def test_decay_touches_only_masked_in_parameters():
    config = _config(**{"schedule.name": "constant", "schedule.warmup_steps": 0,
                        "optimizer.learning_rate": 0.1, "optimizer.weight_decay": 0.5,
                        "optimizer.grad_clip_norm": 0.0, "optimizer.no_decay": ("pos_emb",)})
    params = _params()
    for name in ("adamw", "sgd"):
        config.optimizer.name = name
        config.optimizer.momentum = 0.0
        tx, _ = optim.make_optimizer(config, params)
        zero_grads = jax.tree.map(jnp.zeros_like, params)
        updates, _ = tx.update(zero_grads, tx.init(params), params)
        # Zero gradients: the update is the decay alone, -lr * wd * p = -0.1 (p = 2).
        for (path, update), decayed in zip(jax.tree_util.tree_leaves_with_path(updates),
                                           jax.tree.leaves(EXPECTED_MASK)):
            expected = -0.1 if decayed else 0.0
            np.testing.assert_allclose(update, expected, atol=1e-7, err_msg=f"{name} {path}")


# --- clipping ------------------------------------------------------------------------------------

@pytest.mark.parametrize("clip, scale", [(1.0, 0.1), (20.0, 1.0), (0.0, 1.0)])
def test_global_norm_clipping(clip, scale):
    config = _config(**{"optimizer.name": "sgd", "optimizer.momentum": 0.0,
                        "optimizer.weight_decay": 0.0, "optimizer.grad_clip_norm": clip,
                        "schedule.name": "constant", "schedule.warmup_steps": 0})
    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros((4,))}
    grads = {"w": jnp.full((2, 2), 3.0), "b": jnp.full((4,), 4.0)}  # norm sqrt(36 + 64) = 10
    tx, _ = optim.make_optimizer(config, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for key in grads:
        np.testing.assert_allclose(updates[key], -scale * grads[key], rtol=1e-6)


# --- every optimizer trains ---------------------------------------------------------------------

@pytest.mark.parametrize("name, extra", [
        ("adamw", {}),
        ("lamb", {}),
        ("sgd", {"optimizer.momentum": 0.9}),
        ("sgd", {"optimizer.momentum": 0.9, "optimizer.nesterov": True}),
        ("sgd", {"optimizer.momentum": 0.0}),
])
def test_each_optimizer_reduces_a_quadratic_under_jit(name, extra):
    config = _config(**{"optimizer.name": name, "optimizer.learning_rate": 0.05,
                        "total_steps": 20, "schedule.warmup_steps": 2, **extra})
    target = jnp.arange(12.0).reshape(3, 4) / 12.0
    params = {"w": jnp.zeros((3, 4)), "b": jnp.ones((4,))}

    def loss_fn(p):
        return jnp.sum((p["w"] - target) ** 2) + jnp.sum(p["b"] ** 2)

    tx, _ = optim.make_optimizer(config, params)

    @jax.jit
    def step(p, state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state = tx.init(params)
    losses = []
    for _ in range(20):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


def test_nnx_optimizer_accepts_the_transformation():
    model = _Tiny(nnx.Rngs(0))
    config = _config(**{"optimizer.weight_decay": 0.5, "schedule.warmup_steps": 0,
                        "schedule.name": "constant", "optimizer.learning_rate": 0.1})
    abstract = nnx.state(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0))), nnx.Param)
    tx, _ = optim.make_optimizer(config, abstract)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    kernel = np.asarray(model.blocks[0].kernel[...])
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    np.testing.assert_allclose(model.pos_emb[...], 2.0)  # excluded by name: not decayed
    np.testing.assert_allclose(model.blocks[0].kernel[...], kernel * (1 - 0.1 * 0.5), rtol=1e-6)


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
        ({"optimizer.name": "adam"}, "config.optimizer.name='adam' is invalid; allowed: "
                                     "('adamw', 'lamb', 'sgd')"),
        ({"schedule.name": "step"}, "config.schedule.name='step' is invalid; allowed: "
                                    "('cosine', 'linear', 'constant')"),
        ({"schedule.warmup_steps": 200}, "config.schedule.warmup_steps=200"),
        ({"schedule.end_factor": -0.5}, "config.schedule.end_factor=-0.5"),
        ({"optimizer.learning_rate": 0.0}, "config.optimizer.learning_rate=0.0"),
        ({"optimizer.b2": 1.0}, "config.optimizer.b2=1.0 is invalid; allowed: a number in "
                                "[0.0, 1.0)"),
        ({"optimizer.weight_decay": -1.0}, "config.optimizer.weight_decay=-1.0"),
        ({"optimizer.no_decay": ("pos_emb", "(")}, "no_decay entry '('"),
        ({"optimizer.name": "sgd", "optimizer.momentum": 0.0, "optimizer.nesterov": True},
         "nesterov=True needs"),
])
def test_bad_optimizer_settings_raise_value_error(changes, message):
    with pytest.raises(ValueError) as info:
        optim.make_optimizer(_config(**changes), _params())
    assert message in str(info.value)


def _one_update(config, params, grads):
    tx, _ = optim.make_optimizer(config, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return updates


def test_parameter_groups_get_their_own_optimizer_rate_and_freeze():
    """SSA-style: a group with plain Adam at its own rate, a frozen group, the rest AdamW."""
    c = _config(**{"schedule.warmup_steps": 0, "schedule.name": "constant",
                   "optimizer.grad_clip_norm": 0.0, "optimizer.weight_decay": 0.0})
    c.optimizer.groups = ml_collections.ConfigDict({
            "beta": {"pattern": r"^pos_emb$", "learning_rate": 0.25, "name": "adamw"},
            "frozen": {"pattern": r"^head/", "freeze": True},
    })
    params = _params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates = _one_update(c, params, grads)
    # Adam's first step moves every coordinate by the learning rate (sign of the gradient).
    np.testing.assert_allclose(updates["pos_emb"], -0.25, rtol=1e-5)
    np.testing.assert_allclose(updates["blocks"]["0"]["attn"]["qkv"]["kernel"], -1.0, rtol=1e-5)
    np.testing.assert_array_equal(updates["head"]["kernel"], 0.0)
    labels = optim.param_labels(c, params)
    assert labels["pos_emb"] == "beta" and labels["head"]["kernel"] == "frozen"
    assert labels["blocks"]["0"]["norm"]["scale"] == "default"


def test_group_schedule_override():
    c = _config(**{"optimizer.grad_clip_norm": 0.0, "optimizer.weight_decay": 0.0,
                   "optimizer.name": "sgd", "optimizer.momentum": 0.0})
    c.optimizer.groups = ml_collections.ConfigDict({
            "head": {"pattern": "^head/", "schedule": {"name": "constant", "warmup_steps": 0}},
    })
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    updates = _one_update(c, params, grads)
    np.testing.assert_allclose(updates["head"]["kernel"], -1.0)  # constant peak
    np.testing.assert_allclose(updates["pos_emb"], -0.1)  # warmup step 0: peak * 1/10


def test_layer_wise_learning_rate_decay():
    c = _config(**{"schedule.warmup_steps": 0, "schedule.name": "constant",
                   "optimizer.grad_clip_norm": 0.0, "optimizer.weight_decay": 0.0,
                   "optimizer.name": "sgd", "optimizer.momentum": 0.0,
                   "optimizer.layer_decay": 0.5})
    params = _params()
    params["blocks"]["1"] = jax.tree.map(jnp.copy, params["blocks"]["0"])
    grads = jax.tree.map(jnp.ones_like, params)
    updates = _one_update(c, params, grads)
    # L = 2 blocks: pos_emb is layer 0 (0.5^3), block 0 layer 1 (0.5^2), block 1 (0.5), head 1.
    np.testing.assert_allclose(updates["pos_emb"], -0.125)
    np.testing.assert_allclose(updates["blocks"]["0"]["attn"]["qkv"]["kernel"], -0.25)
    np.testing.assert_allclose(updates["blocks"]["1"]["norm"]["scale"], -0.5)
    np.testing.assert_allclose(updates["head"]["kernel"], -1.0)


@pytest.mark.parametrize("groups,message", [
        ({"beta": {"pattern": "nothing_matches"}}, "groups.beta.pattern='nothing_matches' "
                                                   "matches no parameter"),
        ({"beta": {"pattern": "(", }}, "groups.beta.pattern='(' is not a valid regex"),
        ({"beta": {"pattern": "pos", "lr": 1.0}}, "groups.beta.lr is not a group field"),
        ({"beta": {"pattern": "pos", "learning_rate": -1.0}},
         "config.optimizer.groups.beta.learning_rate=-1.0 is invalid"),
        ({"default": {"pattern": "pos"}}, "'default' is reserved"),
])
def test_bad_parameter_groups_are_named(groups, message):
    c = _config()
    c.optimizer.groups = ml_collections.ConfigDict(groups)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        optim.make_optimizer(c, _params())


def test_parameter_groups_and_layer_decay_train_on_a_sharded_mesh(tmp_path):
    """Through the real loop on (data 4, fsdp 2): a frozen head stays at its initial value, the
    optimizer state of the grouped parameters is sharded like them, the rest trains."""
    import os

    from training_helpers import tiny_config
    from zoo.training import checkpoint as ckpt_lib
    from zoo.training import state as state_lib
    from zoo.training import trainer

    config = tiny_config(**{"mesh_shape": (4, 2, 1), "total_steps": 2, "eval_every": 0,
                            "checkpoint_every": 2, "async_checkpointing": False,
                            "optimizer.layer_decay": 0.75})
    config.optimizer.groups = ml_collections.ConfigDict({
            "head": {"pattern": r"^head/", "freeze": True},
            "embed": {"pattern": r"patch_embed", "name": "sgd", "learning_rate": 0.01}})
    trainer.train_and_evaluate(config, str(tmp_path), profile_steps=None)
    skeleton = state_lib.ModelSkeleton(config)
    initial = skeleton.init_pure()
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          skeleton.abstract_pure())
    _, trained = ckpt_lib.restore_model_only(os.path.join(tmp_path, "checkpoints"), target)
    np.testing.assert_array_equal(trained["head"]["kernel"], initial["head"]["kernel"])
    assert not np.array_equal(trained["blocks"][0]["attn"]["qkv"]["kernel"],
                              initial["blocks"][0]["attn"]["qkv"]["kernel"])
    assert not np.array_equal(trained["patch_embed"]["kernel"],
                              initial["patch_embed"]["kernel"])
