"""Every registered model, one parametrised test each (timm's `test_models.py` pattern).

A model file that registers a variant is tested here without anyone writing a new test:
  * its `tiny` size builds, runs forward (eval) and backward (train mode, gradients w.r.t. every
    nnx.Param), with finite outputs and gradients; jit and eager forward agree;
  * every Param carries logical axis names from the shared vocabulary (scalars excepted), and no
    random state is stored in the model (stochastic layers take `rngs` at call time);
  * the full-size variant builds abstractly (shapes only) and its parameter count is within the
    tolerance of the published count, when the paper gives one.

Inputs come from the registry's `tiny_input` (name -> (shape without batch, dtype); defaults to
`default_input`). A model with one input is called as `model(x)`, one with several as `model(**inputs)`.
Budget: each tiny case should stay under 5 s on a 2-core CPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from zoo import registry
from zoo.axes import LOGICAL_AXES

MODELS = zoo.list_models()
BATCH = 2
# Relative tolerance on paper_params when the registry does not state one: published counts
# are rounded to whole millions (86M for 86.57M), so 2% covers rounding of models >= 25M.
DEFAULT_PAPER_PARAMS_RTOL = 0.02


def make_inputs(name: str, seed: int = 0, batch: int = BATCH) -> dict[str, jax.Array]:
    inputs = {}
    rng = np.random.default_rng(seed)
    for key, (shape, dtype) in registry.tiny_input(name).items():
        full_shape = (batch, *shape)
        if jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
            inputs[key] = jnp.asarray(rng.standard_normal(full_shape), dtype=dtype)
        else:
            # Ids 0 and 1 are valid for any vocabulary or index range a model may take.
            inputs[key] = jnp.asarray(rng.integers(0, 2, full_shape), dtype=dtype)
    return inputs


def call(model, inputs, **kwargs):
    if len(inputs) == 1:
        return model(next(iter(inputs.values())), **kwargs)
    return model(**inputs, **kwargs)


def float_leaves(tree) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]


def global_norm(leaves) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))


def logical_axes(variable) -> tuple | None:
    """The logical axis names a Param was created with (metadata key differs across flax)."""
    metadata = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        if metadata.get(key) is not None:
            return tuple(metadata[key])
    return None


def train_loss(model, inputs):
    out = call(model, inputs, train=True, rngs=nnx.Rngs(dropout=1))
    return sum(jnp.mean(jnp.square(x.astype(jnp.float32))) for x in float_leaves(out))


# Jitted once at module level: variants with identical tiny structure share one compilation.
jitted_call = nnx.jit(call)
jitted_loss_and_grads = nnx.jit(nnx.value_and_grad(train_loss))


@pytest.mark.parametrize("name", MODELS)
def test_tiny_model_forward_backward_jit(name):
    model = zoo.create_model(name, rngs=nnx.Rngs(0), **registry.tiny_overrides(name))
    inputs = make_inputs(name)

    random_state = nnx.to_flat_state(nnx.state(model, nnx.RngState))
    assert not list(random_state), f"{name} stores random state: {list(random_state)}"

    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, variable in params:
        if variable.ndim == 0:
            continue
        axes = logical_axes(variable)
        assert axes is not None, f"{name}: Param {path} has no logical axis names"
        assert len(axes) == variable.ndim, f"{name}: {path} axes {axes} vs shape {variable.shape}"
        assert all(a is None or a in LOGICAL_AXES for a in axes), f"{name}: {path} axes {axes}"

    eager = call(model, inputs)
    eager_leaves = float_leaves(eager)
    assert eager_leaves, f"{name} returned no floating-point output"
    for leaf in eager_leaves:
        assert bool(jnp.all(jnp.isfinite(leaf))), f"{name}: non-finite output"

    jitted = jitted_call(model, inputs)
    assert jax.tree.structure(jitted) == jax.tree.structure(eager)
    for a, b in zip(eager_leaves, float_leaves(jitted)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=1e-4, atol=1e-5, err_msg=f"{name}: jit != eager")

    loss, grads = jitted_loss_and_grads(model, inputs)
    assert bool(jnp.isfinite(loss)), f"{name}: non-finite loss {loss}"
    grad_paths = {path for path, _ in nnx.to_flat_state(grads)}
    assert grad_paths == {path for path, _ in params}, f"{name}: gradients miss some Params"
    grad_leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grad_leaves), f"{name}: non-finite grad"
    assert float(global_norm(grad_leaves)) > 0.0, f"{name}: all gradients are zero"


@pytest.mark.parametrize("name", MODELS)
def test_full_size_abstract_build_matches_paper_params(name):
    model = zoo.create_model(name, abstract=True)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves), (
            f"{name}: abstract build allocated arrays")
    count = zoo.count_params(model)
    card = zoo.model_card(name)
    assert card["params"] == count
    paper_millions = card["paper_params_millions"]
    if paper_millions is not None:
        rtol = card.get("paper_params_tolerance", DEFAULT_PAPER_PARAMS_RTOL)
        relative_error = abs(count / 1e6 - paper_millions) / paper_millions
        assert relative_error <= rtol, (
                f"{name}: {count:,} params vs paper {paper_millions}M "
                f"({relative_error:.1%} > {rtol:.0%})")


def test_every_weight_source_names_an_importable_converter():
    sources = registry.weight_sources()
    assert sources == {"timm:halonet_h1": "halonet_h1",
                       "timm:swin_tiny_patch4_window7_224": "swin_t",
                       "hf:gpt2": "ssa_gpt2_small", "hf:gpt2-medium": "ssa_gpt2_medium",
                       "qformer:swin_tiny_vsa": "vsa_swin_t", "nvist_official": "nvist",
                       "pix2seq:fit": "fit_encoder_b", "pix2seq:fitar": "fit_ar_small",
                       "pix2seq:fit_denoiser": "fit_denoiser_64"}
    for source in sources:
        assert callable(registry.weight_converter(source))
    # (The card measures the parameter count: one cheap model is enough here.)
    assert zoo.model_card("halonet_h1")["weights_from"] == ["timm:halonet_h1"]
    assert registry.weight_sources("timm:*").keys() == {"timm:halonet_h1",
                                                        "timm:swin_tiny_patch4_window7_224"}
    with pytest.raises(ValueError, match="no converter for weight source 'timm:vit_x'"):
        registry.weight_converter("timm:vit_x")


def test_a_weight_source_belongs_to_one_model():
    card = dict(paper="p", reference="r", default_input={"x": ((1,), "float32")}, config="c")
    with pytest.raises(ValueError, match="'hf:gpt2' of 'gpt2_again' already belongs to "
                                         "'ssa_gpt2_small'"):
        registry.register_model("gpt2_again", weights={"hf:gpt2": "m:f"}, **card)(lambda **_: 0)
    with pytest.raises(ValueError, match="must be 'module:function'"):
        registry.register_model("bad_target", weights={"x:y": "module.function"},
                                **card)(lambda **_: 0)
    assert "gpt2_again" not in zoo.list_models() and "bad_target" not in zoo.list_models()
