"""Attention inspection: `kernels_pallas.attention_weights`, `halo_attention_weights` and
`zoo.capture_attention` on one tiny model per attention kind. The captured pass must give the
model's own (jitted) output, leave no switch or intermediate behind, and sow what
the module docstrings promise."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernels_pallas
import zoo
from kernels_pallas import halo as halo_ops
from zoo import registry


def _random(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


@pytest.mark.parametrize("options", [
    dict(), dict(causal=True), dict(logits="sigmoid"), dict(causal=True, causal_chunk=2),
    dict(kv_lengths=np.array([5, 3]), q_segment_ids=np.array([[0, 0, 1, 1, 1, 2]] * 2),
         kv_segment_ids=np.array([[0, 1, 1, 1, 2, 2, 2]] * 2)),
])
def test_attention_weights_are_what_attention_applies(options):
    rng = np.random.default_rng(0)
    tq = 6
    tk = 6 if options.get("causal") else 7
    q, k, v = (_random(rng, (2, t, 3, 8)) for t in (tq, tk, tk))
    bias = _random(rng, (1, 3, tq, tk))
    weights = kernels_pallas.attention_weights(q, k, bias, **options)
    assert weights.shape == (2, 3, tq, tk) and weights.dtype == jnp.float32
    expected = kernels_pallas.attention(q, k, v, bias, impl="xla", **options)
    np.testing.assert_allclose(jnp.einsum("bhqk,bkhd->bqhd", weights, v), expected, rtol=1e-5,
                               atol=1e-6)
    if options.get("logits", "softmax") == "softmax":
        sums = np.asarray(weights.sum(-1))
        assert np.all(np.isclose(sums, 1.0, atol=1e-5) | (sums == 0))


def test_attention_weights_validate_like_attention():
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="head_dim differ"):
        kernels_pallas.attention_weights(q, jnp.ones((1, 4, 2, 4)))


def test_halo_weights_are_each_query_over_its_neighbourhood():
    """Brute force for every query of one block: softmax over the (block + 2 halo)^2 window
    around the block, keys outside the map zero, raster order (relative logits zero here; the
    reference output uses the same function with them)."""
    rng = np.random.default_rng(1)
    block, halo, heads, dim = 4, 1, 2, 8
    q, k = (_random(rng, (1, 8, 8, heads, dim)) for _ in range(2))
    rel = jnp.zeros((2 * (block + 2 * halo) - 1, dim))
    weights = halo_ops.halo_attention_weights(q, k, rel, rel, block=block, halo=halo)
    win = block + 2 * halo
    assert weights.shape == (1, 2, 2, heads, block * block, win * win)
    padded = np.pad(np.asarray(k), ((0, 0), (halo, halo), (halo, halo), (0, 0), (0, 0)))
    bi, bj = 1, 0
    keys = padded[0, bi * block:bi * block + win, bj * block:bj * block + win]  # [win, win, h, d]
    for qy in range(block):
        for qx in range(block):
            query = np.asarray(q)[0, bi * block + qy, bj * block + qx]  # [h, d]
            logits = np.einsum("hd,yxhd->hyx", query, keys).reshape(heads, -1) * dim ** -0.5
            expected = np.exp(logits - logits.max(-1, keepdims=True))
            expected /= expected.sum(-1, keepdims=True)
            np.testing.assert_allclose(weights[0, bi, bj, :, qy * block + qx], expected,
                                       rtol=1e-5, atol=1e-7)


def _inputs(name):
    rng = np.random.default_rng(0)
    inputs = {}
    for key, (shape, dtype) in registry.tiny_input(name).items():
        if jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
            inputs[key] = _random(rng, (2, *shape), dtype)
        else:
            inputs[key] = jnp.asarray(rng.integers(0, 2, (2, *shape)), dtype)
    return inputs


@pytest.mark.parametrize("name", ["vit_ti16", "vsa_swin_t", "halonet_h0", "ssa_gpt2_small",
                                  "nvist_small"])
def test_capture_attention(name):
    model = zoo.create_model(name, **registry.tiny_overrides(name))
    inputs = _inputs(name)
    if len(inputs) == 1:  # one input is positional (the all-models test's convention)
        args, inputs = tuple(inputs.values()), {}
    else:
        args = ()
    expected = nnx.jit(lambda m, a, kw: m(*a, **kw))(model, args, inputs)
    output, maps = zoo.capture_attention(model, *args, **inputs)
    # The same computation; XLA may fuse the larger program differently (float rounding only).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), output,
                 expected)
    modules = zoo.attention_maps.attention_modules(model)
    assert sorted(maps) == sorted(path for path, _ in modules)
    assert not any("capture_attention" in vars(module) for _, module in modules)
    assert not nnx.state(model, nnx.Intermediate)  # nothing left behind
    for path, captured in maps.items():
        weights = np.asarray(captured["attention_weights"])
        assert np.all(weights >= 0) and np.allclose(weights.sum(-1), 1.0, atol=1e-5), path
    first_path, first_module = modules[0]
    first = maps[first_path]
    if name == "vit_ti16":
        tokens = 1 + (224 // 32) ** 2  # class token + patches of the tiny 224 input
        assert first["attention_weights"].shape == (2, first_module.num_heads, tokens, tokens)
        _, eager = zoo.capture_attention(model, *args, jit=False)
        np.testing.assert_allclose(eager[first_path]["attention_weights"],
                                   first["attention_weights"], rtol=1e-5, atol=1e-7)
    if name == "vsa_swin_t":
        # The regressor starts at zero: every window is the default one, corners on the grid.
        corners = np.asarray(first["window_corners"])
        ws = first_module.window_size
        per_side = int(round(np.sqrt(corners.shape[2])))
        i, j = np.divmod(np.arange(per_side * per_side), per_side)
        x0, y0, x1, y1 = j * ws, i * ws, j * ws + ws - 1, i * ws + ws - 1
        grid = np.stack([np.stack([x0, y0], -1), np.stack([x1, y0], -1),
                         np.stack([x1, y1], -1), np.stack([x0, y1], -1)], axis=1)
        np.testing.assert_allclose(corners, np.broadcast_to(grid, corners.shape), atol=1e-4)
    if name == "ssa_gpt2_small":
        for kind in ("query_temperatures", "value_temperatures"):
            assert first[kind].shape == (2, 16, first_module.num_heads), kind
            assert np.all(np.asarray(first[kind]) > 0), kind
    if name == "nvist_small":
        cross = [p for p, m in modules if maps[p]["attention_weights"].shape[-1]
                 != maps[p]["attention_weights"].shape[-2]]
        assert cross, "no cross-attention block captured"


def test_capture_attention_refuses_a_model_without_attention():
    with pytest.raises(ValueError, match="no attention module"):
        zoo.capture_attention(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), jnp.ones((1, 2)))
