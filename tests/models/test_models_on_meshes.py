"""The kernel path on device meshes: every registered model trains one step on 8 CPU devices with
`attn_impl="interpret"` (the Pallas kernels, interpreted) and matches one device; the compiled
step keeps every kernel call sharded.

For each model's tiny instance, the real platform step (`zoo.training.step.make_train_step`:
state shardings from the rules, batch over the data axes, the activation-sharding context) runs
on the (2,4,1) data x FSDP and (4,1,2) data x tensor meshes (plus the (8,1,1) data mesh for
one group per kernel kind, see DATA_MESH_GROUPS), and on one device:
  * the loss and every gradient agree with the one-device step (the optimizer below stores the
    gradients as its state, so the step hands them back exactly);
  * every kernel call traced in the step is shard-mapped with its batch split over the data axes
    and, on the tensor mesh, its heads over `tensor`;
  * the compiled HLO has no all-gather or all-to-all of a kernel operand or result (q, k, v,
    the attention output, also in its [B, T, H*D] form), whatever the mesh. On the data mesh it
    has no all-gather or all-to-all at all: parameters are replicated, and activations never
    leave their device. On the tensor mesh every all-gather has a parameter's shape (a weight
    or per-channel statistic the rules keep whole) and activations are only all-reduced.

Registered models whose tiny instances are the same program (same graph, shapes and input, e.g.
the five ViTs) share one run; the test id lists them all. HaloNet H3-H5 and H7 use blocks the
fused halo kernel does not take (not powers of two): they run the XLA reference, the path
impl="auto" takes for them on GPU/TPU too; for them the gradients and the tensor mesh's
"activations are never gathered" are checked (no kernel call is traced).
Budget: ~10-60 s per run on 2 cores.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import zoo
from configs import common
from kernels_pallas import sharding
from test_all_models import call, float_leaves, make_inputs
from zoo import registry
from zoo.training import hlo
from zoo.training import mesh as mesh_lib
from zoo.training import state as state_lib
from zoo.training import step as step_lib
from zoo.training import tasks

BATCH = 8
MESHES = {"data8": (8, 1, 1), "data2_fsdp4": (2, 4, 1), "data4_tensor2": (4, 1, 2)}
# The pure data mesh's check (nothing moves between devices) is implied by the tensor mesh's
# (activations are never gathered; a data-layout slip there gathers an activation), so to keep
# the suite inside its budget it runs only for one cheap group per attention kernel kind
# (flash causal, flash, window, MAE's masked layout). HaloNets that run the XLA reference
# (H3-H5, H7: no fused kernel takes their blocks) run only the tensor mesh: their FSDP
# layouts are those of H0-H2 and H6, which run all meshes they need.
DATA_MESH_GROUPS = {"ssa_gpt2_medium", "vit_b16", "swin_b", "mae_vit_b5"}


def _meshes(names: tuple[str, ...], kernel_path: bool) -> dict[str, tuple[int, int, int]]:
    if not kernel_path:
        return {"data4_tensor2": MESHES["data4_tensor2"]}
    if names[0] in DATA_MESH_GROUPS:
        return MESHES
    return {k: v for k, v in MESHES.items() if k != "data8"}
# Loss: relative. Gradients, per parameter in the L2 norm:
#     |g - g_ref| <= GRAD_RTOL * |g_ref| + GRAD_GLOBAL_RTOL * |whole gradient of the model|.
# A wrong split shows up as a factor (2x, 1/8) or a missing slice: an error of the order of
# |g_ref| itself. The second term covers two kinds of rounding that are not errors:
#   * gradients that are zero in exact arithmetic (a key bias under softmax) and ~1e-12 here;
#   * train-mode BatchNorm, whose statistics are summed across devices in another order: in
#     HaloNet's final conv (1536-2048 channels) a channel with almost no batch variance
#     amplifies that rounding; one channel then carries >99.9% of the difference (measured:
#     H5, relative error 1.1e-3 with it, 1.8e-6 without it).
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_GLOBAL_RTOL = 1e-3, 1e-4


def _kernel_impl(name: str) -> str:
    """"interpret", or "xla" where the model's kernel configuration has no fused kernel (HaloNet
    blocks that are not powers of two: impl="auto" then uses the XLA reference on GPU/TPU too,
    so that is the path users run)."""
    model = zoo.create_model(name, **_overrides(name))
    try:
        jax.eval_shape(lambda: call(model, make_inputs(name, batch=BATCH)))
    except ValueError as error:
        if "does not support" not in str(error):
            raise
        return "xla"
    return "interpret"


def _program_groups() -> list[tuple[str, ...]]:
    """Registered models grouped by identical tiny programs (graph, shapes, input)."""
    groups: dict = {}
    for name in zoo.list_models():
        model = zoo.create_model(name, abstract=True, **_overrides(name))
        graphdef, state = nnx.split(model)
        shapes = tuple((jax.tree_util.keystr(path), leaf.shape, str(leaf.dtype))
                       for path, leaf in jax.tree_util.tree_leaves_with_path(state))
        key = (graphdef, shapes, tuple(sorted(registry.tiny_input(name).items())))
        groups.setdefault(key, []).append(name)
    return [tuple(names) for names in groups.values()]


def _overrides(name: str, impl: str = "interpret") -> dict:
    return {**registry.tiny_overrides(name), "attn_impl": impl}


class _OutputNormTask(tasks.Task):
    """Loss = mean square of every float output (the all-models test's loss), any model."""

    def loss_and_metrics(self, model, batch, rngs, train):
        out = call(model, batch, train=train, rngs=rngs)
        return sum(jnp.mean(jnp.square(x.astype(jnp.float32))) for x in float_leaves(out)), {}


def _gradients_as_state() -> optax.GradientTransformation:
    """An 'optimizer' whose state after a step is that step's gradient (updates are zero)."""
    return optax.GradientTransformation(
            lambda params: jax.tree.map(jnp.zeros_like, params),
            lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _initial_model(skeleton) -> dict:
    """The model's own initialisation, on the host (the same values for every mesh). Random
    values for every variable would give some BatchNorm channel a near-zero batch variance,
    whose gradients then differ between meshes by rounding alone."""
    return jax.device_get(skeleton.init_pure())


def _train_step(name: str, impl: str, mesh_shape, devices=None):
    """(loss, gradients, compiled HLO text, kernel calls, parameter shapes) of one step."""
    config = common.base_config()
    config.model.name = name
    config.model.overrides = ml_collections.ConfigDict(registry.tiny_overrides(name))
    config.model.attn_impl = impl
    config.batch_size = BATCH
    config.mesh_shape = mesh_shape
    mesh = mesh_lib.make_mesh(config, devices)
    skeleton = state_lib.ModelSkeleton(config)
    tx = _gradients_as_state()
    abstract = state_lib.abstract_train_state(skeleton, tx)
    shardings = state_lib.train_state_shardings(skeleton, abstract, mesh,
                                                config.logical_axis_rules)
    data_sharding = mesh_lib.batch_sharding(mesh, config.data_axes)
    step = step_lib.make_train_step(config=config, skeleton=skeleton,
                                    task=_OutputNormTask(config), tx=tx,
                                    lr_schedule=lambda _: 0.0, mesh=mesh,
                                    state_shardings=shardings, data_sharding=data_sharding)
    model = _initial_model(skeleton)
    params, _ = skeleton.split(model)
    state = jax.device_put({"model": model, "optimizer": tx.init(params),
                            "step": np.int32(0)}, shardings)
    batch = jax.device_put(make_inputs(name, seed=1, batch=BATCH), data_sharding)
    with sharding.record_kernel_calls() as calls:
        compiled = step.lower(state, batch).compile()
    new_state, metrics = compiled(state, batch)
    param_shapes = [leaf.shape for leaf in jax.tree.leaves(params)]
    return (float(metrics["loss"]), jax.device_get(new_state["optimizer"]), compiled.as_text(),
            calls, param_shapes)


def _split_axes(spec_entry) -> tuple[str, ...]:
    if spec_entry is None:
        return ()
    return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _without_ones(shape) -> tuple[int, ...]:
    return tuple(sorted(d for d in shape if d != 1))


def _check_kernel_calls(calls, mesh_name, mesh_shape):
    assert calls, f"{mesh_name}: no kernel call was traced (attn_impl='interpret' ignored?)"
    sizes = dict(zip(("data", "fsdp", "tensor"), mesh_shape))
    data_axes = {a for a in ("data", "fsdp") if sizes[a] > 1}
    for call_ in calls:
        rank = len(call_.shapes[0])
        spec = tuple(call_.in_specs[0]) + (None,) * (rank - len(call_.in_specs[0]))
        batch, heads = call_.shapes[0][0], call_.shapes[0][-2]
        batch_axes = set(_split_axes(spec[0]))
        if batch % math.prod(sizes[a] for a in data_axes) == 0:
            assert batch_axes == data_axes, (
                    f"{mesh_name}: {call_.what} {call_.shapes[0]} batch split over "
                    f"{batch_axes or 'nothing'}, expected {data_axes}")
        if sizes["tensor"] > 1:
            assert _split_axes(spec[-2]) == ("tensor",), (
                    f"{mesh_name}: {call_.what} {call_.shapes[0]} has {heads} heads not split "
                    f"over tensor: {call_.in_specs[0]}")


GROUPS = _program_groups()
assert DATA_MESH_GROUPS <= {g[0] for g in GROUPS}, "DATA_MESH_GROUPS names a missing group"


@pytest.mark.parametrize("names", GROUPS, ids=["+".join(g) for g in GROUPS])
def test_kernel_path_step_on_meshes_matches_one_device(names):
    name = names[0]
    impl = _kernel_impl(name)
    kernel_path = impl == "interpret"
    ref_loss, ref_grads, _, ref_calls, _ = _train_step(name, impl, (1, 1, 1),
                                                       jax.devices()[:1])
    assert ref_calls or not kernel_path, f"{name}: the step traced no kernel call"
    ref_leaves = jax.tree.leaves(ref_grads)
    global_norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in ref_leaves)))
    assert global_norm > 0, f"{name}: all gradients are zero"
    worst = 0.0
    report = []
    for mesh_name, mesh_shape in _meshes(names, kernel_path).items():
        loss, grads, text, calls, param_shapes = _train_step(name, impl, mesh_shape)
        np.testing.assert_allclose(loss, ref_loss, rtol=LOSS_RTOL,
                                   err_msg=f"{name}: loss on {mesh_name}")
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), ref_leaves):
            scale, error = float(np.linalg.norm(want)), float(np.linalg.norm(got - want))
            bound = GRAD_RTOL * scale + GRAD_GLOBAL_RTOL * global_norm
            worst = max(worst, error / bound)
            assert error <= bound, (
                    f"{name}: gradient {jax.tree_util.keystr(path)} on {mesh_name} differs "
                    f"from one device by {error:.3e} (L2; its norm {scale:.3e}, the model's "
                    f"{global_norm:.3e}, allowed {bound:.3e})")
        if kernel_path:
            _check_kernel_calls(calls, mesh_name, mesh_shape)
        found = hlo.collectives(text)
        moved = [c for c in found if c.kind in ("all-gather", "all-to-all")]
        arrays = hlo.kernel_arrays(calls)
        offending = [str(c) for c in moved
                     if hlo.gathers_kernel_array(c, arrays, param_shapes, len(jax.devices()))]
        assert not offending, (f"{name} on {mesh_name}: kernel operands are gathered: "
                               f"{offending}")
        if mesh_name == "data8":
            assert not moved, (f"{name}: data-parallel step moves data between devices: "
                               f"{[str(c) for c in moved]}")
        if mesh_name == "data4_tensor2":
            # Megatron: activations are all-reduced, never gathered; what is gathered is a
            # weight (or per-channel statistic) that the rules keep whole.
            params = {_without_ones(s) for s in param_shapes}
            gathered = [str(c) for c in moved
                        if not all(_without_ones(shape) in params for shape in c.shapes)]
            assert not gathered, f"{name} on {mesh_name}: activations gathered: {gathered}"
        report.append(f"{mesh_name}: {hlo.counts(found)}")
    print(f"{'+'.join(names)} ({impl}): largest gradient error {worst:.2f} of the "
          f"allowed;"
          f" collectives per step:", *report, sep="\n  ")
