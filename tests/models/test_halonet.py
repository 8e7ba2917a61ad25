"""HaloNet: halo attention reference, H0-H7 sizes, model API, and parity with timm.

  * `halo_attention_reference` equals a direct per-query NumPy computation (zero, unmasked
    halo; unscaled or scaled relative logits; strided queries, average-pooled and `avg_down`
    down-sampling) and rejects bad shapes with a ValueError naming the argument;
  * the eight registered variants have the paper's parameter counts (within 1.5%; H1 exactly
    timm's halonet_h1), built abstractly;
  * a small HaloNet: per-stage shapes, logits, logical axis names on every parameter, BatchNorm
    train/eval semantics, bf16 compute, and a clear error for an image size it cannot tile;
  * `zoo.convert.from_timm("halonet_h1", state_dict)` reproduces timm's eval-mode logits on two
    fixtures made by tools/make_halonet_fixture.py from timm's own classes.

Budget: about 60 s on a 2-core CPU (most of it XLA compilation).
"""
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
import zoo.halonet  # noqa: F401  (registers the variants until zoo/registry.py lists it)
from kernels_pallas import halo
from zoo import convert, layers
from zoo import halonet as halonet_lib
from zoo.axes import LOGICAL_AXES

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


# ---------------------------------------------------------------------------------------------
# halo attention vs a direct per-query computation
# ---------------------------------------------------------------------------------------------

def naive_halo_attention(q, k, v, rel_h, rel_w, *, block, halo_size, stride, scale,
                         scale_relative, avg_down):
    """One query at a time: cut its window out of the zero-padded map, softmax, sum."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    rel_h, rel_w = np.asarray(rel_h, np.float64), np.asarray(rel_w, np.float64)
    batch, height, width, heads, _ = k.shape
    q_stride = stride if stride > 1 and not avg_down and block % stride == 0 else 1
    query_block = block // q_stride
    win = block + 2 * halo_size
    pad = ((0, 0), (halo_size, halo_size), (halo_size, halo_size), (0, 0), (0, 0))
    k_pad, v_pad = np.pad(k, pad), np.pad(v, pad)  # outside the image: zero keys and values
    out = np.zeros((batch, height // q_stride, width // q_stride, heads, v.shape[-1]))
    for y in range(out.shape[1]):
        for x in range(out.shape[2]):
            (block_y, qy), (block_x, qx) = divmod(y, query_block), divmod(x, query_block)
            rows = slice(block_y * block, block_y * block + win)
            cols = slice(block_x * block, block_x * block + win)
            keys, values = k_pad[:, rows, cols], v_pad[:, rows, cols]  # [B, win, win, h, d]
            query = q[:, y, x]  # [B, heads, d]
            content = np.einsum("bhd,bklhd->bhkl", query, keys)
            # timm indexes the tables with the query's row/column inside its (subsampled) block.
            rel_rows = np.einsum("bhd,kd->bhk", query, rel_h[win - 1 + np.arange(win) - qy])
            rel_cols = np.einsum("bhd,ld->bhl", query, rel_w[win - 1 + np.arange(win) - qx])
            relative = rel_rows[:, :, :, None] + rel_cols[:, :, None, :]
            logits = ((content + relative) * scale if scale_relative
                      else content * scale + relative)
            logits = logits.reshape(batch, heads, -1)
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            out[:, y, x] = np.einsum("bhn,bnhe->bhe", weights,
                                     values.reshape(batch, win * win, heads, -1))
    if stride > 1 and q_stride == 1:
        out = out.reshape(batch, height // stride, stride, width // stride, stride, heads,
                          -1).mean(axis=(2, 4))
    return out


HALO_CASES = {
        # name: (map height, width, block, halo, stride, avg_down, scale_relative)
        "stride1": (8, 12, 4, 1, 1, False, False),
        "no_halo": (8, 8, 4, 0, 1, False, False),
        "wide_halo_scaled_rel": (8, 8, 2, 2, 1, False, True),
        "strided_queries": (8, 12, 4, 2, 2, False, False),
        "odd_block_avg_pool": (6, 12, 3, 1, 2, False, False),
        "avg_down": (8, 8, 4, 1, 2, True, False),
}


@pytest.mark.parametrize("case", list(HALO_CASES))
def test_reference_matches_naive_per_query(case):
    height, width, block, halo_size, stride, avg_down, scale_relative = HALO_CASES[case]
    batch, heads, dk, dv = 2, 2, 3, 5  # dk != dv catches key/value layout mix-ups
    q_stride = halo.query_stride(block, stride, avg_down)
    win = block + 2 * halo_size
    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, height // q_stride, width // q_stride, heads, dk))
    k = rng.standard_normal((batch, height, width, heads, dk))
    v = rng.standard_normal((batch, height, width, heads, dv))
    rel_h, rel_w = rng.standard_normal((2, 2 * win - 1, dk))
    scale = 0.7
    args = [jnp.asarray(a, jnp.float32) for a in (q, k, v, rel_h, rel_w)]
    ours = halo.halo_attention(*args, block=block, halo=halo_size, stride=stride, scale=scale,
                               scale_relative=scale_relative, avg_down=avg_down, impl="xla")
    expected = naive_halo_attention(q, k, v, rel_h, rel_w, block=block, halo_size=halo_size,
                                    stride=stride, scale=scale, scale_relative=scale_relative,
                                    avg_down=avg_down)
    assert ours.shape == (batch, height // stride, width // stride, heads, dv)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)


def test_zero_halo_keys_take_part_in_the_softmax():
    """timm does not mask the padding: a border query's output differs from masked attention."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 4, 4, 1, 2)), jnp.float32) for _ in "qkv")
    tables = jnp.zeros((2 * (4 + 2) - 1, 2), jnp.float32)
    out = halo.halo_attention(q, k, v, tables, tables, block=4, halo=1, scale=1.0)
    # With zero tables, masking the 20 padded keys would give plain softmax attention over
    # the 16 real keys; unmasked, each padded key adds exp(0) to the denominator only.
    logits = np.einsum("qd,kd->qk", np.asarray(q).reshape(16, 2), np.asarray(k).reshape(16, 2))
    weights = np.exp(logits)
    unmasked = (weights @ np.asarray(v).reshape(16, 2)) / (weights.sum(-1, keepdims=True) + 20)
    np.testing.assert_allclose(np.asarray(out).reshape(16, 2), unmasked, rtol=1e-5, atol=1e-6)


def _halo_inputs(q_shape=(1, 8, 8, 2, 4), kv_shape=(1, 8, 8, 2, 4), table_rows=11):
    q = jnp.zeros(q_shape, jnp.float32)
    k = jnp.zeros(kv_shape, jnp.float32)
    v = jnp.zeros(kv_shape, jnp.float32)
    table = jnp.zeros((table_rows, kv_shape[-1]), jnp.float32)
    return q, k, v, table, table


@pytest.mark.parametrize("inputs, options, message", [
        (_halo_inputs(q_shape=(1, 6, 6, 2, 4), kv_shape=(1, 6, 6, 2, 4)), {},
         "multiples of block=4"),
        (_halo_inputs(), dict(stride=2), r"q must have shape \[batch, H/2, W/2"),
        (_halo_inputs(table_rows=9), {}, "rel_h must have shape"),
        (_halo_inputs(q_shape=(1, 8, 8, 2)), {}, "q must be 5-D"),
        (_halo_inputs(), dict(impl="triton"), "impl must be one of"),
        (_halo_inputs(), dict(impl="pallas"), "impl=.pallas. needs a GPU or TPU backend"),
        (_halo_inputs(), dict(block=0), "block must be an integer >= 1, got 0"),
        (_halo_inputs(), dict(scale=-1.0), "scale must be None or a positive"),
        (_halo_inputs(q_shape=(1, 9, 9, 2, 4), kv_shape=(1, 9, 9, 2, 4), table_rows=9),
         dict(block=3, halo=1, stride=2), "average-pooled by 2"),
])
def test_halo_attention_rejects_bad_arguments(inputs, options, message):
    kwargs = {"block": 4, "halo": 1, **options}
    with pytest.raises(ValueError, match=message):
        halo.halo_attention(*inputs, **kwargs)


# ---------------------------------------------------------------------------------------------
# H0-H7 parameter counts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(halonet_lib.PAPER_PARAMS))
def test_parameter_count_matches_paper(variant):
    model = zoo.create_model(f"halonet_{variant}", abstract=True)
    count = zoo.count_params(model)
    paper = halonet_lib.PAPER_PARAMS[variant] * 1e6
    assert abs(count - paper) / paper <= 0.015, f"{variant}: {count:,} vs paper {paper:,.0f}"
    if variant == "h1":
        assert count == 8_100_056  # timm halonet_h1, counted with timm 1.0.31


# ---------------------------------------------------------------------------------------------
# a small HaloNet: shapes, axes, BatchNorm, bf16, errors
# ---------------------------------------------------------------------------------------------

SMALL = dict(image_size=64, block_size=2, halo_size=1, base_widths=(8, 8, 16, 16),
             depths=(1, 2, 1, 1), num_heads=2, final_features=24, num_classes=5)


@pytest.fixture(scope="module")
def small_model():
    """Built abstractly and filled with random weights: no per-shape init compiles, and no
    zero-initialised BN scales that would switch the attention branches off."""
    model = zoo.create_model("halonet_h1", abstract=True, **SMALL)
    rng = np.random.default_rng(0)
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        fan_in = int(np.prod(variable.shape[:-1])) or 1
        value = rng.standard_normal(variable.shape) / np.sqrt(fan_in)
        variable.set_value(jnp.asarray(value, jnp.float32))
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
        variable.set_value(jnp.full(variable.shape, 0.5, jnp.float32))
    return model


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)


@pytest.fixture(scope="module")
def float32_outputs(small_model, images):
    features, maps = nnx.jit(lambda m, x: m.forward_intermediates(x))(small_model, images)
    return features, maps, small_model.forward_head(features)


def test_forward_shapes_per_stage(small_model, float32_outputs):
    features, maps, logits = float32_outputs
    # stem /4, then stages at strides 1, 2, 2, 2
    assert [m.shape for m in maps] == [(2, 16, 16, 8), (2, 8, 8, 8), (2, 4, 4, 16),
                                       (2, 2, 2, 16)]
    assert features.shape == (2, 2, 2, 24)  # final 1x1 conv (df)
    assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))
    assert float(jnp.std(logits)) > 0.1  # the random weights reach the logits
    assert small_model.forward_head(features, pre_logits=True).shape == (2, 24)
    assert small_model._stage_indices(2) == [2, 3]
    assert small_model._stage_indices([-1, 0]) == [3, 0]
    with pytest.raises(ValueError, match="indices"):
        small_model._stage_indices([4])


def logical_axes(variable):
    metadata = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        if metadata.get(key) is not None:
            return tuple(metadata[key])
    return None


def test_logical_axes_on_all_params(small_model):
    expected_by_name = {"scale": ("norm",), "height_rel": ("pos", "kv"),
                        "width_rel": ("pos", "kv")}
    params = nnx.to_flat_state(nnx.state(small_model, nnx.Param))
    assert params
    for path, variable in params:
        axes = logical_axes(variable)
        name = ".".join(map(str, path))
        assert axes is not None and len(axes) == variable.ndim, f"{name}: {axes}"
        assert all(a is None or a in LOGICAL_AXES for a in axes), f"{name}: {axes}"
        if path[0] == "head":
            assert axes == (("embed", "classes") if path[-1] == "kernel" else ("classes",))
        elif path[-1] == "kernel" and "attn" in path:  # q/kv: column-parallel by head
            assert axes == halonet_lib.HEADS_OUT_AXES, f"{name}: {axes}"
        elif path[-1] == "kernel" and "conv3" in path:  # row-parallel by head
            assert axes == halonet_lib.HEADS_IN_AXES, f"{name}: {axes}"
        elif path[-1] == "kernel":
            assert axes == layers.CONV_AXES, f"{name}: {axes}"
        elif path[-1] == "bias":
            assert axes == ("norm",), f"{name}: {axes}"
        else:
            assert axes == expected_by_name[path[-1]], f"{name}: {axes}"


def test_batch_norm_train_and_eval_follow_torch():
    bn = layers.BatchNorm(3)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 5, 5, 3)) * 2 + 1, jnp.float32)
    y = bn(x, train=True)
    flat = np.asarray(x).reshape(-1, 3)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 3),
                               (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5), atol=1e-5)
    # torch: running stats move 10% of the way, the variance unbiased.
    np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.var[...]), 0.9 + 0.1 * flat.var(0, ddof=1),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bn(x, train=False)),
                               (np.asarray(x) - np.asarray(bn.mean[...]))
                               / np.sqrt(np.asarray(bn.var[...]) + 1e-5), atol=1e-5)


def test_bfloat16_compute_tracks_float32(small_model, images, float32_outputs):
    bf16 = zoo.create_model("halonet_h1", abstract=True, dtype="bfloat16", **SMALL)
    nnx.update(bf16, nnx.state(small_model))  # same float32 weights, bf16 compute
    reference = float32_outputs[2]
    low = nnx.jit(lambda m, x: m(x))(bf16, images)
    assert low.dtype == jnp.bfloat16
    error = jnp.linalg.norm(low.astype(jnp.float32) - reference) / jnp.linalg.norm(reference)
    assert float(error) < 0.02  # measured 7e-3


@pytest.mark.parametrize("overrides, message", [
        (dict(image_size=600), r"image_size must have height and width that are multiples of "
                               r"320 .* got 600x600; nearest valid sides: 320, 640"),
        (dict(image_size=224, block_size=8), "multiples of 256"),
        (dict(num_heads=3), "divisible by num_heads=3"),
        (dict(mlp_ratio=4), r"unknown halonet_h7 argument\(s\) \['mlp_ratio'\]"),
        (dict(rv=0), "rv must be a positive number"),
        (dict(base_widths=(8, 16)), r"base_widths \(8, 16\) and depths \(3, 3, 26, 3\)"),
])
def test_bad_arguments_raise_before_building(overrides, message):
    with pytest.raises(ValueError, match=message):
        zoo.create_model("halonet_h7", abstract=True, **overrides)


def test_input_of_wrong_size_is_rejected(small_model):
    with pytest.raises(ValueError, match="input image must have height and width"):
        small_model(jnp.zeros((1, 48, 48, 3)))


# ---------------------------------------------------------------------------------------------
# timm parity
# ---------------------------------------------------------------------------------------------

def load_fixture(name):
    data = np.load(FIXTURES / f"halonet_{name}.npz")
    meta = json.loads(str(data["meta_json"]))
    state_dict = {key[len("state/"):]: data[key] for key in data.files
                  if key.startswith("state/")}
    return meta, state_dict, data["image_nhwc"], data["logits"]


@pytest.mark.parametrize("name", ["h1_small", "oddblock"])
def test_from_timm_reproduces_timm_logits(name):
    meta, state_dict, image, timm_logits = load_fixture(name)
    model = convert.from_timm("halonet_h1", state_dict, block_size=meta["block_size"],
                              halo_size=meta["halo_size"], image_size=meta["image_size"])
    assert zoo.count_params(model) == meta["params"]
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(image))
    assert np.abs(timm_logits).max() > 1.0  # unit-scale logits: the tolerance below is tight
    np.testing.assert_allclose(np.asarray(logits), timm_logits, rtol=0, atol=1e-4)


def test_from_timm_rejects_mismatched_checkpoints():
    meta, state_dict, _, _ = load_fixture("oddblock")
    with pytest.raises(ValueError, match="no timm converter for model_name='swin_t'"):
        convert.from_timm("swin_t", state_dict)
    with pytest.raises(ValueError, match=r"tables have \[9\] rows but block_size=8"):
        convert.from_timm("halonet_h1", state_dict, image_size=meta["image_size"])
    extra = {**state_dict, "stages.0.0.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match="does not map"):
        convert.from_timm("halonet_h1", extra, block_size=3, halo_size=1, image_size=96)
    missing = {k: v for k, v in state_dict.items() if k != "stages.1.0.post_attn.running_var"}
    with pytest.raises(ValueError, match="stages.1.0.post_attn.running_var"):
        convert.from_timm("halonet_h1", missing, block_size=3, halo_size=1, image_size=96)


def test_fused_kernel_model_matches_reference_model():
    """A HaloNet whose every halo layer runs the fused Pallas kernel (interpreted on CPU) gives
    the logits of the same weights on the XLA reference: b=8, h=3 at 256 px, so stage 1 runs
    full-resolution blocks and stages 2-4 strided queries (4x4 per block)."""
    geometry = dict(image_size=256, block_size=8, halo_size=3, base_widths=(8, 8, 16, 16),
                    depths=(1, 1, 1, 1), num_heads=2, final_features=0, num_classes=5,
                    stem_width=8)
    reference = zoo.create_model("halonet_h0", rngs=nnx.Rngs(0), attn_impl="xla", **geometry)
    rng = np.random.default_rng(0)
    for _, variable in nnx.to_flat_state(nnx.state(reference, nnx.Param)):
        fan_in = int(np.prod(variable.shape[:-1])) or 1
        variable.set_value(jnp.asarray(rng.standard_normal(variable.shape) / np.sqrt(fan_in),
                                       jnp.float32))
    fused = zoo.create_model("halonet_h0", rngs=nnx.Rngs(0), attn_impl="interpret", **geometry)
    nnx.update(fused, nnx.state(reference))
    image = jnp.asarray(np.random.default_rng(1).standard_normal((1, 256, 256, 3)), jnp.float32)
    expected = nnx.jit(lambda m, x: m(x))(reference, image)
    logits = nnx.jit(lambda m, x: m(x))(fused, image)
    assert float(jnp.max(jnp.abs(expected))) > 1.0  # the attention branches are switched on
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=0, atol=2e-5)
