"""ViT (zoo/vit.py) and the shared layers it is built from (zoo/layers/).

Checks: parameter counts equal timm's (by formula and by abstract build), the intermediates API,
argument validation, the sigmoid-attention switch, bf16 compute with f32 params, model cards and
their configs, and the layer conventions other models rely on (timm conv-weight layout of the
patch embedding, attention projections around the kernel, cross-attention, dropout/drop-path).
"""
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from kernels_pallas import attention_reference
from zoo import layers

# One small shape shared by most tests so eager ops compile once per process.
SMALL = dict(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
BATCH = 2


def small_vit(**overrides):
    return zoo.create_model("vit_ti16", rngs=nnx.Rngs(0), **{**SMALL, **overrides})


def images(size=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (BATCH, size, size, 3), jnp.float32)


def timm_vit_params(*, image_size, patch_size, width, depth, mlp_ratio=4, num_classes=1000,
                    in_chans=3):
    """Parameter count of timm's VisionTransformer (class token, learned pos-emb, qkv bias)."""
    tokens = (image_size // patch_size) ** 2 + 1
    patch_embed = patch_size * patch_size * in_chans * width + width
    hidden = mlp_ratio * width
    block = (2 * 2 * width                      # norm1, norm2
             + width * 3 * width + 3 * width    # qkv
             + width * width + width            # proj
             + width * hidden + hidden          # fc1
             + hidden * width + width)          # fc2
    return (patch_embed + width + tokens * width + depth * block + 2 * width
            + width * num_classes + num_classes)


# name -> (timm model, its parameter count as printed by timm, architecture)
TIMM_COUNTS = {
        "vit_ti16": ("vit_tiny_patch16_224", 5_717_416, dict(patch_size=16, width=192, depth=12)),
        "vit_s16": ("vit_small_patch16_224", 22_050_664, dict(patch_size=16, width=384,
                                                              depth=12)),
        "vit_b16": ("vit_base_patch16_224", 86_567_656, dict(patch_size=16, width=768, depth=12)),
        "vit_b32": ("vit_base_patch32_224", 88_224_232, dict(patch_size=32, width=768, depth=12)),
        "vit_l16": ("vit_large_patch16_224", 304_326_632, dict(patch_size=16, width=1024,
                                                               depth=24)),
}


@pytest.mark.parametrize("name", sorted(TIMM_COUNTS))
def test_param_count_equals_timm(name):
    timm_name, timm_count, arch = TIMM_COUNTS[name]
    assert timm_vit_params(image_size=224, **arch) == timm_count, timm_name
    assert zoo.count_params(zoo.create_model(name, abstract=True)) == timm_count


@pytest.fixture(scope="module")
def model():
    return small_vit()


@nnx.jit
def intermediates_bundle(model, x):
    """Every forward_intermediates variant the test needs, compiled as one program."""
    features, maps = model.forward_intermediates(x)
    _, last_normed = model.forward_intermediates(x, indices=1, norm=True)
    _, picked = model.forward_intermediates(x, indices=[0, -1])
    return features, maps, last_normed, picked, model.forward_features(x)


def test_forward_intermediates_shapes_and_consistency(model):
    features, maps, last_normed, picked, forward_features = intermediates_bundle(model, images())
    assert features.shape == (BATCH, 1 + 16, 32)
    assert [m.shape for m in maps] == [(BATCH, 4, 4, 32)] * 2
    np.testing.assert_allclose(features, forward_features, rtol=1e-5, atol=1e-6)
    assert len(last_normed) == 1
    # The last block's patch tokens, normalised, are forward_features without the class token.
    np.testing.assert_allclose(last_normed[0].reshape(BATCH, 16, 32), features[:, 1:],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(picked[0], maps[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(picked[1], maps[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="indices"):
        model.forward_intermediates(images(), indices=[2])

    gap = small_vit(pool="gap")
    gap_features, gap_maps, logits, pre_logits = nnx.eval_shape(
            lambda m, x: (*m.forward_intermediates(x), m(x),
                          m.forward_head(m.forward_features(x), pre_logits=True)),
            gap, images())
    assert gap_features.shape == (BATCH, 16, 32) and len(gap_maps) == 2
    assert logits.shape == (BATCH, 10) and pre_logits.shape == (BATCH, 32)


@pytest.mark.parametrize("overrides, match", [
        (dict(image_size=100), r"image_size .*100.* not divisible by patch_size 8"),
        (dict(pool="max"), r"pool must be one of .*'max'"),
        (dict(logits="relu"), r"logits must be one of .*'relu'"),
        (dict(attn_impl="cuda"), r"attn_impl must be one of .*'cuda'"),
        (dict(dtype="int8"), r"dtype must be one of .*'int8'"),
        (dict(num_classes=-1), r"num_classes must be an integer >= 0.*-1"),
        (dict(drop_path_rate=1.5), r"drop_path_rate must be a float in \[0, 1\).*1.5"),
        (dict(embed_dim=30, num_heads=4), r"dim \(30\) must be divisible by num_heads \(4\)"),
        (dict(widht=64), r"unknown vit_ti16 argument.*'widht'"),
])
def test_bad_arguments_raise_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        small_vit(**overrides)


def test_wrong_input_shape_raises_value_error(model):
    with pytest.raises(ValueError, match=r"PatchEmbed expects images \[batch, 32, 32, 3\]"):
        model(jnp.zeros((BATCH, 3, 32, 32)))


def test_sigmoid_attention_switch(model):
    sigmoid_model = small_vit(logits="sigmoid")
    # The switch changes the normaliser of every block and nothing else: same parameters.
    assert [block.attn.logits for block in sigmoid_model.blocks] == ["sigmoid"] * 2
    assert jax.tree.all(jax.tree.map(jnp.array_equal, nnx.state(model, nnx.Param),
                                     nnx.state(sigmoid_model, nnx.Param)))

    # Each layer computes projections, head split and output projection around the reference
    # kernel with the chosen normaliser (the same weights give different softmax outputs).
    tokens = jax.random.normal(jax.random.key(1), (BATCH, 5, 32))

    @functools.partial(nnx.jit, static_argnames="logits")
    def layer_and_by_hand(attn, tokens, logits):
        kernel, bias = attn.qkv.kernel[...], attn.qkv.bias[...]
        q, k, v = (jnp.einsum("btd,de->bte", tokens, kernel[:, i]) + bias[i] for i in range(3))
        q, k, v = (t.reshape(BATCH, 5, 2, 16) for t in (q, k, v))
        out = attention_reference(q, k, v, logits=logits).reshape(BATCH, 5, 32)
        return attn(tokens), out @ attn.proj.kernel[...] + attn.proj.bias[...]

    sigmoid_out, expected = layer_and_by_hand(sigmoid_model.blocks[0].attn, tokens, "sigmoid")
    np.testing.assert_allclose(sigmoid_out, expected, rtol=1e-5, atol=1e-5)
    softmax_out, _ = layer_and_by_hand(model.blocks[0].attn, tokens, "softmax")
    assert float(jnp.max(jnp.abs(softmax_out - sigmoid_out))) > 1e-3


def test_bf16_compute_keeps_f32_params(model):
    bf16_model = small_vit(dtype="bfloat16")
    params = jax.tree.leaves(nnx.state(bf16_model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)

    @nnx.jit
    def output_and_grads(model, x):
        loss = lambda m: jnp.mean(jnp.square(m(x).astype(jnp.float32)))  # noqa: E731
        return model(x), nnx.grad(loss)(model)

    out, grads = output_and_grads(bf16_model, images())
    reference = nnx.jit(lambda m, x: m(x))(model, images())
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
    relative_l2 = float(jnp.linalg.norm(out.astype(jnp.float32) - reference)
                        / jnp.linalg.norm(reference))
    assert relative_l2 < 5e-2, relative_l2
    grad_leaves = jax.tree.leaves(grads)
    assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in grad_leaves)
    # No dead parameters: every Param influences the output.
    dead = [path for path, g in nnx.to_flat_state(grads) if not bool(jnp.any(g[...] != 0))]
    assert not dead, dead


@pytest.mark.parametrize("name", zoo.list_models("vit_*"))
def test_model_card_and_config(name):
    card = zoo.model_card(name)
    assert set(card) >= {"name", "paper", "reference", "params", "paper_params_millions",
                         "default_input", "config", "notes"}
    assert card["name"] == name
    assert "Dosovitskiy" in card["paper"] and "timm" in card["reference"]
    assert card["params"] == TIMM_COUNTS[name][1]
    assert card["default_input"] == {"image": {"shape": [224, 224, 3], "dtype": "float32"}}

    # The card's config resolves, names this model and its overrides build it.
    path, _, arg = card["config"].partition(":")
    assert path == "configs/vit.py" and arg == name.removeprefix("vit_")
    config = importlib.import_module("configs.vit").get_config(arg)
    assert config.model.name == name
    model = zoo.create_model(name, abstract=True, **config.model.overrides.to_dict())
    assert zoo.count_params(model) == card["params"]


def test_smoke_config_model_fits_generated_data():
    config = importlib.import_module("configs.vit").get_config("smoke")
    model = zoo.create_model(config.model.name, abstract=True,
                             **config.model.overrides.to_dict())
    size = config.data.image_size
    batch = jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32)
    logits = nnx.eval_shape(lambda m, x: m(x), model, batch)
    assert logits.shape == (config.batch_size, config.data.num_classes)
    with pytest.raises(ValueError, match="variant must be one of"):
        importlib.import_module("configs.vit").get_config("variant=h14")


# --- shared layers ------------------------------------------------------------------------------

def test_patch_embed_matches_timm_conv_layout():
    embed = layers.PatchEmbed(32, 8, 3, 32, rngs=nnx.Rngs(0))
    x = images()
    # timm holds proj.weight as [out, in, kh, kw] and runs an NCHW stride-p convolution.
    torch_weight = jnp.transpose(embed.kernel[...], (3, 2, 0, 1))
    np.testing.assert_array_equal(jnp.transpose(torch_weight, (2, 3, 1, 0)), embed.kernel[...])
    conv = jax.lax.conv_general_dilated(
            jnp.transpose(x, (0, 3, 1, 2)), torch_weight, window_strides=(8, 8),
            padding="VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"),
            precision=jax.lax.Precision.HIGHEST)
    expected = jnp.transpose(conv, (0, 2, 3, 1)) + embed.bias[...]
    np.testing.assert_allclose(embed(x), expected, rtol=1e-5, atol=1e-5)


def test_cross_attention_fused_equals_unfused_and_respects_kv_lengths():
    fused = layers.Attention(32, 2, cross_attention=True, kv_dim=24, qk_norm=True,
                             rngs=nnx.Rngs(0))
    unfused = layers.Attention(32, 2, cross_attention=True, kv_dim=24, qk_norm=True,
                               fused_qkv=False, rngs=nnx.Rngs(1))
    unfused.q.kernel[...] = fused.q.kernel[...]
    unfused.q.bias[...] = fused.q.bias[...]
    for i, proj in enumerate((unfused.k, unfused.v)):
        proj.kernel[...] = fused.kv.kernel[...][:, i]
        proj.bias[...] = fused.kv.bias[...][i]
    unfused.proj.kernel[...] = fused.proj.kernel[...]
    unfused.proj.bias[...] = fused.proj.bias[...]

    x = jax.random.normal(jax.random.key(0), (BATCH, 5, 32))
    context = jax.random.normal(jax.random.key(1), (BATCH, 7, 24))
    # Context tokens past kv_lengths are masked: changing them must change nothing.
    altered = context.at[1, 3:].set(100.0)
    lengths = jnp.array([7, 3])

    @nnx.jit
    def run(fused, unfused):
        return (fused(x, context, kv_lengths=lengths), unfused(x, context, kv_lengths=lengths),
                fused(x, altered, kv_lengths=lengths))

    out, out_unfused, out_altered = run(fused, unfused)
    assert out.shape == (BATCH, 5, 32)
    np.testing.assert_allclose(out, out_unfused, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_altered[1], out[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs `context`"):
        fused(x)
    with pytest.raises(ValueError, match="self-attention layer"):
        layers.Attention(32, 2, rngs=nnx.Rngs(0))(x, context)


def test_dropout_and_drop_path_use_call_time_rngs():
    x = jnp.ones((64, 4, 8))
    drop_path, dropout = layers.DropPath(0.5), layers.Dropout(0.25)
    np.testing.assert_array_equal(drop_path(x), x)  # eval: identity, no rngs needed
    with pytest.raises(ValueError, match="needs `rngs`"):
        drop_path(x, train=True)
    with pytest.raises(ValueError, match="needs `rngs`"):
        dropout(x, train=True)

    @jax.jit
    def train_mode(key):
        return (drop_path(x, train=True, rngs=nnx.Rngs(dropout=key)),
                dropout(x, train=True, rngs=nnx.Rngs(dropout=key)))

    paths, dropped = train_mode(jax.random.key(0))
    per_sample = paths.reshape(64, -1)
    # Whole samples are either dropped or kept and rescaled by 1 / (1 - rate).
    assert bool(jnp.all((per_sample == 0).all(1) | (per_sample == 2).all(1)))
    assert 0 < int((per_sample[:, 0] == 0).sum()) < 64
    np.testing.assert_allclose(np.unique(np.asarray(dropped)), [0.0, 1.0 / 0.75])
    # Same call-time key, same mask; the layers hold no random state of their own.
    np.testing.assert_array_equal(train_mode(jax.random.key(0))[0], paths)
    assert not np.array_equal(train_mode(jax.random.key(1))[0], paths)


def test_sincos_2d():
    table = layers.sincos_2d(3, 4, 16)
    assert table.shape == (12, 16) and table.dtype == np.float32
    # Row 0 is position (0, 0): sines 0, cosines 1.
    np.testing.assert_allclose(table[0], np.tile(np.repeat([0.0, 1.0], 4), 2), atol=1e-7)
    # Rows in raster order: row 5 is (y=1, x=1); its x and y halves agree.
    np.testing.assert_allclose(table[5, :8], table[5, 8:], atol=1e-7)
    assert len({tuple(np.round(np.asarray(r), 6)) for r in table}) == 12
    with pytest.raises(ValueError, match="multiple of 4"):
        layers.sincos_2d(3, 4, 18)
