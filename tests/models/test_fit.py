"""FIT (zoo/fit.py): spec parser, group locality, AR causality, chunk-causal mask, remat,
parameter formula."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from kernels_pallas.reference import chunk_causal_bias
from zoo import fit, fit_trunk

TRUNK = dict(layer_spec="(1)1(1)", latents_per_group=4, x_dim=16, latent_dim=32, x_heads=2,
             latent_heads=2)


@pytest.mark.parametrize("spec,expected", [
        ("(2)4(2)", [(2, 4), (2, 0)]), ("(2)4", [(2, 4)]), ("(1)2(3)4", [(1, 2), (3, 4)]),
        ("(0)3", [(0, 3)]), ("(12)10(2)", [(12, 10), (2, 0)]), ("(2)", [(2, 0)])])
def test_layer_spec_parser(spec, expected):
    assert fit_trunk.parse_layer_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "2(4)", "(2)0(2)", "(a)1", "(2)4(2)x", "(2) 4"])
def test_layer_spec_parser_rejects(spec):
    with pytest.raises(ValueError, match="layer_spec="):
        fit_trunk.parse_layer_spec(spec)


def test_chunk_causal_bias_matches_brute_force():
    t, m = 3, 2
    bias = np.asarray(chunk_causal_bias(t * m, m))
    for i in range(t * m):
        for j in range(t * m):
            allowed = j // m <= i // m  # full inside a group, causal across groups
            assert (bias[i, j] == 0) == allowed


def encoder(**kw):
    return zoo.create_model("fit_encoder_b", rngs=nnx.Rngs(0),
                            **{**dict(image_size=32, patch_size=4, num_classes=10,
                                      num_groups=4), **TRUNK, **kw})


def test_local_layers_never_cross_groups():
    """Before the first read, a group's tokens depend only on its own sub-image."""
    model = encoder(layer_spec="(2)1")
    images = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
    changed = images.at[:, :16, :16].add(1.0)  # group 0 = top-left sub-image
    tokens = fit.image_to_group_patches(images, 2, 4)
    assert tokens.shape == (1, 4, 16, 48)

    def local_only(imgs):
        x = fit.image_to_group_patches(imgs, 2, 4)
        x = model.stem_norm(model.stem(x)) + model._x_pos()
        x = x.reshape(4, 16, -1)
        for layer in model.trunk.x_networks[0]:
            x = layer(x)
        return x

    a, b = local_only(images), local_only(changed)
    assert np.abs(np.asarray(a[0] - b[0])).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(a[1:]), np.asarray(b[1:]))


def test_group_patch_round_trip():
    images = jax.random.normal(jax.random.key(1), (2, 16, 24, 3))
    tokens = fit.image_to_group_patches(images, 2, 4)
    assert tokens.shape == (2, 4, 6, 48)
    np.testing.assert_array_equal(np.asarray(fit.group_patches_to_image(tokens, 2, 4, 16, 24)),
                                  np.asarray(images))


def ar_model(**kw):
    return zoo.create_model("fit_ar_small", rngs=nnx.Rngs(0),
                            **{**dict(vocab_size=64, seq_len=24, num_groups=4), **TRUNK,
                               "layer_spec": "(1)2(1)2(1)", **kw})


def test_ar_model_is_causal():
    model = ar_model()
    forward = nnx.jit(lambda m, t: m(t))
    ids = jax.random.randint(jax.random.key(2), (2, 24), 0, 64)
    a = forward(model, ids)
    for cut in (1, 5, 6, 7, 13, 23):  # inside and at group boundaries (n = 6)
        changed = ids.at[:, cut:].set((ids[:, cut:] + 11) % 64)
        b = forward(model, changed)
        np.testing.assert_allclose(np.asarray(a[:, :cut]), np.asarray(b[:, :cut]), atol=1e-6,
                                   err_msg=f"cut {cut}")
        assert np.abs(np.asarray(a[:, cut:] - b[:, cut:])).max() > 1e-4, cut


def test_ar_latent_shift_is_what_keeps_it_causal():
    """Without the one-group shift the write would leak a group's own future tokens."""
    model = ar_model()
    ids = jax.random.randint(jax.random.key(3), (1, 24), 0, 64)
    changed = ids.at[:, 11].set((ids[:, 11] + 5) % 64)  # last token of group 1

    def forward_unshifted(tokens):
        b, t, n = 1, 4, 6
        x = jnp.take(model.token_embedding[...], tokens, axis=0).reshape(b, t, n, -1)
        x = x + model._x_pos()
        trunk = model.trunk
        x = x.reshape(b * t, n, -1)
        latents = model._initial_latents(b)
        for i, (_, g) in enumerate(trunk.pairs):
            for layer in trunk.x_networks[i]:
                x = layer(x, causal=True)
            if g:
                latents = trunk.reads[i](latents.reshape(b * t, 4, -1), x).reshape(b, t * 4, -1)
                for layer in trunk.latent_networks[i]:
                    latents = layer(latents, causal=True, causal_chunk=4)
                latents = latents.reshape(b, t, 4, -1)
                if trunk.writes[i] is not None:
                    x = trunk.writes[i](x, latents.reshape(b * t, 4, -1))
        return x.reshape(b, t * n, -1)

    leak = np.abs(np.asarray(forward_unshifted(ids) - forward_unshifted(changed)))[0, 6:11]
    assert leak.max() > 1e-4  # earlier tokens of the same group would see token 11
    ours = np.abs(np.asarray(model(ids) - model(changed)))[0, :11]
    assert ours.max() < 1e-6


# The encoder shares the trunk (and its remat path) with these two heads.
@pytest.mark.parametrize("name,kw,call", [
        ("fit_ar_small", dict(vocab_size=64, seq_len=16, num_groups=4),
         lambda m: m(jnp.ones((2, 16), jnp.int32))),
        ("fit_denoiser_64", dict(image_size=16, patch_size=2, num_groups=4),
         lambda m: m(jnp.ones((2, 16, 16, 3)), jnp.asarray([0.2, 0.7]))[0]),
])
def test_remat_gives_identical_outputs_and_gradients(name, kw, call):
    plain = zoo.create_model(name, rngs=nnx.Rngs(0), **kw, **TRUNK)
    remat = zoo.create_model(name, rngs=nnx.Rngs(0), remat=True, **kw, **TRUNK)

    def loss(model):
        return jnp.sum(jnp.sin(call(model).astype(jnp.float32)))

    @nnx.jit  # one compile per model instead of op-by-op eager calls (budget)
    def outputs_and_gradients(model):
        return call(model), nnx.state(nnx.grad(loss)(model))

    out_plain, g_plain = outputs_and_gradients(plain)
    out_remat, g_remat = outputs_and_gradients(remat)
    np.testing.assert_allclose(np.asarray(out_plain), np.asarray(out_remat), atol=1e-6)
    # Under jit XLA fuses the rematerialised graph differently: f32 rounding of ~2e-5 on
    # gradients of size ~0.05 (measured); a remat bug differs by the gradient itself.
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_denoiser_shapes_conditioning_and_self_conditioning():
    model = zoo.create_model("fit_denoiser_64", rngs=nnx.Rngs(0), image_size=16, patch_size=2,
                             num_groups=4, cond_dim=10, **TRUNK)
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    t = jnp.asarray([0.1, 0.9])
    cond = jax.nn.one_hot(jnp.asarray([1, 2]), 10)
    eps, latents = model(images, t, cond=cond)
    assert eps.shape == images.shape and latents.shape == (2, 4, 4, 32)
    # The self-conditioning output LN starts at scale 0: latents_prev has no effect at init.
    again, _ = model(images, t, cond=cond, latents_prev=latents + 5.0)
    np.testing.assert_allclose(np.asarray(eps), np.asarray(again), atol=1e-6)
    other, _ = model(images, t, cond=jax.nn.one_hot(jnp.asarray([3, 4]), 10))
    assert np.abs(np.asarray(eps - other)).max() > 1e-5
    with pytest.raises(ValueError, match="conditional"):
        model(images, t)


def count(model):
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("kind,name,kw", [
        ("encoder", "fit_encoder_b", dict()),
        ("encoder", "fit_encoder_b", dict(layer_spec="(2)3", x_dim=96, latent_dim=64,
                                          x_heads=4, latent_heads=4, num_classes=0)),
        ("encoder", "fit_encoder_b", dict(layer_spec="(1)2(1)", x_pos_encoding="sin_cos2d",
                                          latent_pos_encoding="sin_cos", y_dim=7)),
        ("ar", "fit_ar_small", dict()),
        ("ar", "fit_ar_small", dict(x_pos_encoding="sin_cos", latent_pos_encoding="sin_cos")),
        ("ar", "fit_ar_small", dict(layer_spec="(3)1(2)2", x_dim=512, latent_dim=128,
                                    x_heads=8, latent_heads=2, mlp_ratio=2.0)),
        ("denoiser", "fit_denoiser_64", dict()),
        ("denoiser", "fit_denoiser_64", dict(cond_dim=1000, self_condition=False)),
        ("denoiser", "fit_denoiser_64", dict(x_self_attention=False, xattn_with_mlp=True,
                                             xattn_enc_ln=False, cond_dim=10,
                                             x_pos_encoding="sin_cos", latent_mask="causal")),
])
def test_parameter_formula_matches_the_module(kind, name, kw):
    base = {"encoder": fit._ENCODER_B, "ar": fit._AR_SMALL, "denoiser": fit._DENOISER_64}[kind]
    model = zoo.create_model(name, abstract=True, **kw)
    assert count(model) == fit.fit_param_count(kind, **{**base, **kw})


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_groups=3 must be a square"):
        encoder(num_groups=3)
    with pytest.raises(ValueError, match="seq_len=20 must be divisible by num_groups=3"):
        ar_model(seq_len=20, num_groups=3)
    with pytest.raises(ValueError, match="x_dim \\(16\\) must be divisible by its heads"):
        encoder(x_heads=3)
    with pytest.raises(ValueError, match="unknown fit_encoder_b argument"):
        encoder(layers="(1)1")
    model = ar_model()
    with pytest.raises(ValueError, match="expects tokens \\[B, 24\\]"):
        model(jnp.zeros((1, 12), jnp.int32))


def test_pix2seq_option_errors_name_the_field():
    with pytest.raises(ValueError, match="x_pos_encoding must be one of .*'sincos'"):
        encoder(x_pos_encoding="sincos")
    with pytest.raises(ValueError, match="latent_pos_encoding must be one of"):
        encoder(latent_pos_encoding="sin_cos2d")
    with pytest.raises(ValueError, match="latent_mask must be one of"):
        encoder(latent_mask="chunk")
    with pytest.raises(ValueError, match="'sin_cos2d' needs a square grid"):
        ar_model(x_pos_encoding="sin_cos2d")
    with pytest.raises(ValueError, match="y_dim must be an int >= 0"):
        encoder(y_dim=-1)
    model = encoder()
    with pytest.raises(ValueError, match="y_dim=0"):
        model(jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 4, 2, 3)))
