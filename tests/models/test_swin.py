"""Swin Transformer: window geometry, shifted-window mask, window attention, model API, and
parity with timm.

  * `window_partition`/`window_reverse` round-trip and put the right pixels in each window;
    `relative_position_index` equals timm's definition written out per token pair;
  * the shifted-window mask equals a direct construction from where each token came from
    before the cyclic shift (no region bookkeeping), and timm's small-map rule (no shift,
    window = map) holds;
  * `WindowAttention` equals an explicit jnp softmax with the relative position bias and
    timm's -100 mask (outputs and the gradient of the bias table), through the XLA path and
    the Pallas kernel in the interpreter;
  * PatchMerging's channel order is timm's x0..x3 concat;
  * parameter counts: swin_t exactly timm's 28,288,354 (S and B too), built abstractly;
  * `zoo.convert.from_timm("swin_tiny_patch4_window7_224", ...)` reproduces timm's eval logits
    on tests/fixtures/swin_small_random.npz (tools/make_swin_fixture.py), the fixture really
    exercises the shift mask, and bad state dicts raise;
  * model API: block_factory hook, intermediates, bf16, drop-path schedule, bad arguments.

Budget: about 40 s on a 2-core CPU.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo import convert
from zoo import windows as windows_lib
from zoo import swin as swin_lib
from zoo.registry import count_params

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "swin_small_random.npz"


# ---------------------------------------------------------------------------------------------
# window geometry
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [2, (2, 3)])
def test_window_partition_round_trip_and_contents(window):
    wh, ww = (window, window) if isinstance(window, int) else window
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 3)).astype(np.float32)
    windows = np.asarray(windows_lib.window_partition(jnp.asarray(x), window))
    per_row, per_col = 4 // wh, 6 // ww
    assert windows.shape == (2 * per_row * per_col, wh * ww, 3)
    for b in range(2):
        for r in range(per_row):
            for c in range(per_col):
                expected = x[b, r * wh:(r + 1) * wh, c * ww:(c + 1) * ww].reshape(-1, 3)
                index = (b * per_row + r) * per_col + c
                np.testing.assert_array_equal(windows[index], expected)
    back = windows_lib.window_reverse(jnp.asarray(windows), window, 4, 6)
    np.testing.assert_array_equal(np.asarray(back), x)


def test_window_partition_rejects_indivisible_map():
    with pytest.raises(ValueError, match="not divisible by the window"):
        windows_lib.window_partition(jnp.zeros((1, 5, 4, 2)), 2)


@pytest.mark.parametrize("window", [3, 7, (2, 3)])
def test_relative_position_index_matches_pairwise_offsets(window):
    wh, ww = (window, window) if isinstance(window, int) else window
    index = windows_lib.relative_position_index(window)
    tokens = [(r, c) for r in range(wh) for c in range(ww)]
    expected = np.array([[(ri - rj + wh - 1) * (2 * ww - 1) + (ci - cj + ww - 1)
                          for rj, cj in tokens] for ri, ci in tokens])
    np.testing.assert_array_equal(index, expected)
    assert index.min() == 0 and index.max() == (2 * wh - 1) * (2 * ww - 1) - 1


def direct_shift_mask(height, width, window, shift):
    """-100 where two tokens of a shifted window were not neighbours before the shift.

    Token (r, c) of the rolled map came from ((r + shift) mod H, (c + shift) mod W); it
    "wrapped" along an axis when that sum reached the side. Two tokens of one window may
    attend iff they wrapped along the same axes.
    """
    masks = []
    for top in range(0, height, window):
        for left in range(0, width, window):
            tokens = [(r, c) for r in range(top, top + window)
                      for c in range(left, left + window)]
            wraps = [(r + shift >= height, c + shift >= width) for r, c in tokens]
            masks.append([[0.0 if a == b else -100.0 for b in wraps] for a in wraps])
    return np.array(masks, np.float32)


@pytest.mark.parametrize("height,width,window,shift", [(8, 8, 4, 2), (14, 21, 7, 3),
                                                       (12, 12, 4, 1)])
def test_shift_mask_matches_direct_construction(height, width, window, shift):
    mask = windows_lib.shift_attention_mask(height, width, window, shift)
    np.testing.assert_array_equal(mask, direct_shift_mask(height, width, window, shift))


def test_small_maps_clamp_window_and_drop_shift():
    assert windows_lib.clamp_window_and_shift((7, 7), 7, 3) == ((7, 7), (0, 0))
    assert windows_lib.clamp_window_and_shift((4, 4), 7, 3) == ((4, 4), (0, 0))
    assert windows_lib.clamp_window_and_shift((14, 14), 7, 3) == ((7, 7), (3, 3))
    block = swin_lib.SwinBlock(dim=8, num_heads=2, window_size=7, shift_size=3, mlp_ratio=2.0,
                               qkv_bias=True, drop_path=0.0, input_resolution=(4, 4),
                               rngs=nnx.Rngs(0))
    assert block.window_size == (4, 4) and block.shift_size == (0, 0)
    assert block.attn.relative_position_bias_table.shape == (49, 2)


# ---------------------------------------------------------------------------------------------
# window attention vs an explicit softmax
# ---------------------------------------------------------------------------------------------

def explicit_window_attention(attn, x, mask):
    """timm's WindowAttention written out: softmax(q k^T * scale + RPB (+ mask)) v, proj."""
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = x @ attn.qkv.kernel[...].reshape(x.shape[-1], -1) + attn.qkv.bias[...].reshape(-1)
    qkv = qkv.reshape(x.shape[0], x.shape[1], 3, heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim ** -0.5
    index = windows_lib.relative_position_index(attn.window_size)
    rpb = attn.relative_position_bias_table[...][index].transpose(2, 0, 1)
    logits = logits + rpb[None]
    if mask is not None:
        windows = mask.shape[0]
        logits = logits.reshape(-1, windows, heads, *logits.shape[-2:]) + mask[None, :, None]
        logits = logits.reshape(-1, heads, *logits.shape[-2:])
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    return out.reshape(*x.shape[:2], -1) @ attn.proj.kernel[...] + attn.proj.bias[...]


@pytest.mark.parametrize("impl", ["xla", "interpret"])
@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_matches_explicit_softmax(impl, shifted):
    height = width = 8
    window, shift, dim, heads, batch = 4, 2, 16, 2, 2
    attn = swin_lib.WindowAttention(dim, heads, window, attn_impl=impl, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    # A table far from its 0.02 init so the bias visibly moves the attention.
    attn.relative_position_bias_table[...] = jnp.asarray(
            rng.standard_normal(attn.relative_position_bias_table.shape), jnp.float32)
    x = jnp.asarray(rng.standard_normal((batch * 4, window * window, dim)), jnp.float32)
    labels = windows_lib.shift_region_labels(height, width, window, shift) if shifted else None
    mask = (jnp.asarray(windows_lib.shift_attention_mask(height, width, window, shift))
            if shifted else None)

    ours = attn(x, region_labels=labels)
    expected = explicit_window_attention(attn, x, mask)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), atol=2e-5, rtol=2e-5)

    graphdef, state = nnx.split(attn)

    def table_grad(fn):
        def loss(state):
            return jnp.sum(jnp.sin(fn(nnx.merge(graphdef, state))))
        return jax.grad(loss)(state)["relative_position_bias_table"][...]

    grad_ours = table_grad(lambda module: module(x, region_labels=labels))
    grad_expected = table_grad(lambda module: explicit_window_attention(module, x, mask))
    assert grad_ours.shape == attn.relative_position_bias_table.shape
    np.testing.assert_allclose(np.asarray(grad_ours), np.asarray(grad_expected), atol=1e-4,
                               rtol=1e-4)
    assert float(jnp.abs(grad_expected).max()) > 1e-3


def test_patch_merging_channel_order_is_timm_concat():
    merge = swin_lib.PatchMerging(3, 5, rngs=nnx.Rngs(0))
    x = np.random.default_rng(2).standard_normal((1, 4, 4, 3)).astype(np.float32)
    # timm / original Swin: cat([x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]])
    concat = np.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                             x[:, 1::2, 1::2]], axis=-1)
    expected = merge.reduction(merge.norm(jnp.asarray(concat)))
    np.testing.assert_allclose(np.asarray(merge(jnp.asarray(x))), np.asarray(expected),
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------
# sizes, timm parity
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [("swin_t", 28_288_354), ("swin_s", 49_606_258),
                                           ("swin_b", 87_768_224)])
def test_param_counts_equal_timm(name, expected):
    model = nnx.eval_shape(lambda r: getattr(swin_lib, name)(rngs=r), nnx.Rngs(0))
    assert count_params(model) == expected


def fixture_state():
    data = np.load(FIXTURE)
    state = {k[len("state/"):]: data[k] for k in data.files if k.startswith("state/")}
    return data, state, json.loads(str(data["spec"]))


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_timm_fixture_logits(impl):
    data, state, spec = fixture_state()
    model = convert.from_timm("swin_tiny_patch4_window7_224", state,
                              image_size=spec["img_size"], attn_impl=impl)
    assert model.layers[0].blocks[1].shift_size == (2, 2)  # the fixture has shifted blocks
    logits = np.asarray(model(jnp.asarray(data["image"])))
    np.testing.assert_allclose(logits, data["logits"], atol=1e-4, rtol=0)


def test_timm_fixture_depends_on_the_shift_mask(monkeypatch):
    data, state, spec = fixture_state()
    monkeypatch.setattr(swin_lib, "shift_region_labels",
                        lambda h, w, window, shift: np.zeros(
                                ((h // window[0]) * (w // window[1]), window[0] * window[1]),
                                np.int32))
    model = convert.from_timm("swin_tiny_patch4_window7_224", state,
                              image_size=spec["img_size"], attn_impl="xla")
    unmasked = np.asarray(model(jnp.asarray(data["image"])))
    assert np.abs(unmasked - data["logits"]).max() > 1e-3


def test_converter_rejects_bad_state_dicts():
    _, state, spec = fixture_state()
    size = dict(image_size=spec["img_size"])
    missing = {k: v for k, v in state.items() if k != "layers.1.blocks.0.mlp.fc2.bias"}
    with pytest.raises(ValueError, match="layers.1.blocks.0.mlp.fc2.bias"):
        convert.from_timm("swin_tiny_patch4_window7_224", missing, **size)
    with pytest.raises(ValueError, match="does not map.*extra.weight"):
        convert.from_timm("swin_tiny_patch4_window7_224",
                          {**state, "extra.weight": np.zeros(3, np.float32)}, **size)
    bad_shape = dict(state, **{"norm.bias": np.zeros(7, np.float32)})
    with pytest.raises(ValueError, match="norm.bias"):
        convert.from_timm("swin_tiny_patch4_window7_224", bad_shape, **size)
    with pytest.raises(ValueError, match="cannot be overridden"):
        convert.from_timm("swin_tiny_patch4_window7_224", state, embed_dim=32, **size)
    with pytest.raises(ValueError, match="not a timm >= 0.9"):
        convert.from_timm("swin_tiny_patch4_window7_224",
                          {k: v for k, v in state.items() if k.startswith("patch_embed")},
                          **size)
    # Older checkpoints store the recomputed buffers: accepted and ignored.
    with_buffers = {**state, "layers.0.blocks.0.attn.relative_position_index":
                    np.zeros((16, 16), np.int64),
                    "layers.0.blocks.1.attn_mask": np.zeros((16, 16, 16), np.float32)}
    model = convert.from_timm("swin_tiny_patch4_window7_224", with_buffers, **size)
    assert model.num_classes == 10


# ---------------------------------------------------------------------------------------------
# model API
# ---------------------------------------------------------------------------------------------

SMALL = dict(image_size=32, patch_size=2, embed_dim=8, depths=(2, 2), num_heads=(1, 2),
             window_size=4, num_classes=5)


def test_block_factory_builds_every_block_with_documented_arguments():
    calls = []

    def factory(**kwargs):
        calls.append(kwargs)
        return swin_lib.SwinBlock(**kwargs)

    model = swin_lib.SwinTransformer(**SMALL, drop_path_rate=0.3, block_factory=factory,
                                     rngs=nnx.Rngs(0))
    assert len(calls) == 4
    assert set(calls[0]) == {"dim", "num_heads", "window_size", "shift_size", "mlp_ratio",
                             "qkv_bias", "drop_path", "input_resolution", "dtype",
                             "param_dtype", "attn_impl", "rngs"}
    assert [c["shift_size"] for c in calls] == [0, 2, 0, 2]
    assert [c["input_resolution"] for c in calls] == [(16, 16), (16, 16), (8, 8), (8, 8)]
    np.testing.assert_allclose([c["drop_path"] for c in calls], [0.0, 0.1, 0.2, 0.3])
    assert model(jnp.zeros((1, 32, 32, 3))).shape == (1, 5)


def test_intermediates_and_bf16():
    model = swin_lib.SwinTransformer(**SMALL, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 32, 32, 3)), jnp.float32)
    features, maps = model.forward_intermediates(x)
    assert [m.shape for m in maps] == [(2, 16, 16, 8), (2, 8, 8, 16)]
    np.testing.assert_allclose(np.asarray(features), np.asarray(model.forward_features(x)),
                               atol=1e-6)
    _, last_normed = model.forward_intermediates(x, indices=[-1], norm=True)
    assert len(last_normed) == 1
    np.testing.assert_allclose(np.asarray(last_normed[0]), np.asarray(features), atol=1e-6)
    with pytest.raises(ValueError, match="stage indices"):
        model.forward_intermediates(x, indices=[2])
    logits = model(x)
    model_bf16 = swin_lib.SwinTransformer(**SMALL, dtype="bfloat16", rngs=nnx.Rngs(0))
    logits_bf16 = model_bf16(x)
    assert logits_bf16.dtype == jnp.bfloat16
    assert model_bf16.head.kernel.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits_bf16, np.float32), np.asarray(logits),
                               atol=0.1)


@pytest.mark.parametrize("overrides,match", [
        (dict(image_size=200), "divisible"),
        (dict(image_size=64), "not divisible by window_size"),
        (dict(depths=(2, 2, 6)), "one entry per stage"),
        (dict(embed_dim=100), "not divisible by num_heads"),
        (dict(window_size=0), "window_size"),
        (dict(attn_impl="cuda"), "attn_impl"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(num_classes=-1), "num_classes"),
        (dict(block_factory="swin"), "block_factory"),
        (dict(depths=[]), "depths"),
        (dict(patch=4), "unknown swin_t argument"),
])
def test_bad_arguments_raise_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        nnx.eval_shape(lambda r: swin_lib.swin_t(rngs=r, **overrides), nnx.Rngs(0))
