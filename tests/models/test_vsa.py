"""VSA (zoo/vsa.py): zero-init equivalence, sampling semantics, QFormer parity, param count."""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from kernels_pallas.grid_sample import grid_sample
from zoo import convert, swin, vsa, windows
from zoo.converters import vsa as vsa_converter

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "vsa_small_random.npz")


def copy_weights(src: vsa.VSAAttention, dst: swin.WindowAttention) -> None:
    for name in ("qkv", "proj"):
        getattr(dst, name).kernel.set_value(getattr(src, name).kernel[...])
        getattr(dst, name).bias.set_value(getattr(src, name).bias[...])
    dst.relative_position_bias_table.set_value(src.relative_position_bias_table[...])


def test_zero_initialised_vsa_is_window_attention_with_rpb():
    attn = vsa.VSAAttention(32, 4, 7, rngs=nnx.Rngs(0))
    assert not np.any(np.asarray(attn.transform.kernel[...]))
    window = swin.WindowAttention(32, 4, 7, rngs=nnx.Rngs(1))
    copy_weights(attn, window)
    x = jax.random.normal(jax.random.key(0), (2, 14, 21, 32))
    expected = windows.window_reverse(window(windows.window_partition(x, 7)), 7, 14, 21)
    np.testing.assert_allclose(np.asarray(attn(x)), np.asarray(expected), atol=1e-5)


def explicit_vsa(attn: vsa.VSAAttention, x):
    """VSA written out per head and window with explicit coordinates (no kernel)."""
    ws, heads, hd = attn.window_size, attn.num_heads, attn.head_dim
    b, h, w, c = x.shape
    qkv = (x @ attn.qkv.kernel[...].reshape(c, -1) + attn.qkv.bias[...].reshape(-1))
    q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, h, w, heads, hd) for i in range(3))
    pooled = x.reshape(b, h // ws, ws, w // ws, ws, c).mean(axis=(2, 4))
    pred = jax.nn.leaky_relu(pooled, 0.01) @ attn.transform.kernel[...].reshape(c, -1)
    pred = (pred + attn.transform.bias[...].reshape(-1)).reshape(b, h // ws, w // ws, heads, 4)
    bias = attn.relative_position_bias()[0]
    out = np.zeros((b, h, w, heads, hd), np.float32)
    for wy in range(h // ws):
        for wx in range(w // ws):
            # Window centre and unit steps, normalised with align_corners=True.
            cx = np.mean([-1 + 2 * (wx * ws + i) / (w - 1) for i in range(ws)])
            cy = np.mean([-1 + 2 * (wy * ws + i) / (h - 1) for i in range(ws)])
            steps_x = np.array([2 * i / (w - 1) for i in range(ws)])
            steps_y = np.array([2 * i / (h - 1) for i in range(ws)])
            for head in range(heads):
                ox, oy, sx, sy = np.asarray(pred[:, wy, wx, head]).T
                gx = (cx + (1 + sx)[:, None] * (steps_x - steps_x.mean())[None]
                      + ox[:, None] / (w // ws))
                gy = (cy + (1 + sy)[:, None] * (steps_y - steps_y.mean())[None]
                      + oy[:, None] / (h // ws))
                grid = np.stack(np.broadcast_arrays(gx[:, None, :], gy[:, :, None]), -1)
                ks = grid_sample(k[..., head, :], jnp.asarray(grid, jnp.float32))
                vs = grid_sample(v[..., head, :], jnp.asarray(grid, jnp.float32))
                qw = q[:, wy * ws:(wy + 1) * ws, wx * ws:(wx + 1) * ws, head]
                logits = jnp.einsum("bqd,bkd->bqk", qw.reshape(b, -1, hd),
                                    ks.reshape(b, -1, hd)) / math.sqrt(hd) + bias[head]
                o = jax.nn.softmax(logits, -1) @ vs.reshape(b, -1, hd)
                out[:, wy * ws:(wy + 1) * ws, wx * ws:(wx + 1) * ws, head] = np.asarray(
                        o).reshape(b, ws, ws, hd)
    return out.reshape(b, h, w, c) @ np.asarray(attn.proj.kernel[...]) + np.asarray(
            attn.proj.bias[...])


def test_random_windows_match_explicit_sampling_including_out_of_range():
    attn = vsa.VSAAttention(16, 2, 4, rngs=nnx.Rngs(0))
    key = jax.random.key(5)
    attn.transform.kernel.set_value(0.8 * jax.random.normal(key, attn.transform.kernel.shape))
    attn.transform.bias.set_value(jnp.asarray([[0.9, -0.7, 0.6, -0.4], [-0.3, 0.5, -0.5, 0.8]]))
    x = jax.random.normal(jax.random.key(6), (2, 8, 12, 16))
    coords = vsa.sampling_coords(attn.regress(x), 8, 12, 4)
    outside = float(jnp.mean(jnp.any(jnp.abs(coords) > 1, axis=-1)))
    assert 0.05 < outside < 0.95, outside  # the test does exercise zero padding
    np.testing.assert_allclose(np.asarray(attn(x)), explicit_vsa(attn, x), atol=2e-5)


def test_gradients_reach_the_regressor_and_are_finite():
    attn = vsa.VSAAttention(16, 2, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 16))

    def loss(module):
        return jnp.sum(module(x) ** 2)

    grads = nnx.grad(loss)(attn)
    g = np.asarray(grads.transform.kernel[...])
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


def load_fixture():
    data = np.load(FIXTURE)
    model = {k[len("model/"):]: data[k] for k in data.files if k.startswith("model/")}
    attention = {k[len("attention/"):]: data[k] for k in data.files
                 if k.startswith("attention/")}
    return data, model, attention


def test_qformer_swin_vsa_logits():
    data, state, _ = load_fixture()
    spec = json.loads(str(data["model_spec"]))
    model = convert.from_qformer_vsa(state, image_size=spec["img_size"])
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(data["image"]))), data["logits"],
                               atol=1e-4, rtol=1e-4)
    # Wrapped as a training checkpoint ({"model": ...}) it loads the same.
    wrapped = convert.from_qformer_vsa({"model": state}, image_size=spec["img_size"])
    assert wrapped.layers[1].downsample is not None


def test_qformer_attention_on_a_padded_non_square_map():
    data, _, state = load_fixture()
    attn = vsa_converter.vsa_attention_from_qformer(state)
    np.testing.assert_allclose(np.asarray(attn(jnp.asarray(data["tokens"]))),
                               data["attended"], atol=1e-4, rtol=1e-4)


def test_converter_rejects_bad_state_dicts():
    _, state, _ = load_fixture()
    with pytest.raises(ValueError, match="not a QFormer SwinTransformerVSA"):
        convert.from_qformer_vsa({k: v for k, v in state.items() if "transform" not in k})
    extra = dict(state, **{"layers.0.blocks.0.attn.extra": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="does not map"):
        convert.from_qformer_vsa(extra, image_size=28)
    with pytest.raises(ValueError, match="read from the state_dict"):
        convert.from_qformer_vsa(state, embed_dim=32)


def test_param_count_and_card():
    card = zoo.model_card("vsa_swin_t")
    assert card["params"] == 28_779_274
    swin_t = zoo.model_card("swin_t")["params"]
    assert card["params"] - swin_t == vsa._overhead(96, (2, 2, 6, 2), (3, 6, 12, 24))


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim \\(30\\) must be divisible by num_heads"):
        vsa.VSAAttention(30, 4, 7, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown vsa_swin_t argument"):
        zoo.create_model("vsa_swin_t", shift=True, abstract=True)
    attn = vsa.VSAAttention(16, 2, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"expects \[B, H, W, 16\]"):
        attn(jnp.zeros((1, 8, 8, 8)))


@pytest.mark.parametrize("mesh_shape", [(4, 1, 2), (2, 4, 1)], ids=["data4_tensor2", "data2_fsdp4"])
def test_depthwise_conv_gradient_on_a_mesh_equals_one_device(mesh_shape):
    """The CPE's depthwise conv runs per batch shard (sharding.per_shard). Left to XLA's
    partitioner (jax 0.10.2), its kernel gradient on the data x tensor mesh came out 2x too
    large, and on a (2, 4) data x tensor mesh 4x: multiplied by the replicated axis size."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    from kernels_pallas import sharding

    conv = vsa.DepthwiseConv(16, 7, dtype=jnp.float32, param_dtype=jnp.float32,
                             rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(conv)
    x = jax.random.normal(jax.random.key(1), (8, 14, 14, 16))
    cotangent = jax.random.normal(jax.random.key(2), (8, 14, 14, 16))
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"),
                         axis_types=(AxisType.Auto,) * 3)

    def loss(params, x, in_mesh):
        model = nnx.merge(graphdef, params)
        if not in_mesh:
            return jnp.sum(model(x) * cotangent)
        with sharding.activation_sharding(mesh):
            return jnp.sum(model(x) * cotangent)

    want = jax.grad(loss)(params, x, False)
    got = jax.jit(jax.grad(loss), static_argnums=2,
                  in_shardings=(None, NamedSharding(mesh, P(("data", "fsdp")))))(params, x, True)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)
