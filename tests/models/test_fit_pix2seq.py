"""FIT against pix2seq (google-research/pix2seq architectures/transformers.py):
  * the official TF FIT, FITAR and FITDenoiser with random weights
    (tests/fixtures/fit_pix2seq_random.npz, tools/make_fit_fixture.py), imported with
    `zoo.convert.from_pix2seq_fit`: outputs equal to f32 precision;
  * the Keras MultiHeadAttention initialisation at the registered sizes, the denoiser's time
    embedding and its output normalisation, against pix2seq's formulas written out in numpy."""
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from zoo import fit as fit_lib

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "fit_pix2seq_random.npz"


def _fixture(kind):
    data = np.load(FIXTURE)
    prefix = f"{kind}/"
    part = {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}
    state = {k[len("state/"):]: v for k, v in part.items() if k.startswith("state/")}
    return part, state, json.loads(str(part["spec"]))


def _image_args(spec):
    """Our image geometry for the fixture's patches: T = 4 groups (2 x 2), n = 5 patches of
    2 x 2 x 3 per group as a 5 x 1 grid."""
    side = math.isqrt(spec["num_groups"])
    n = spec["x_size"] // spec["num_groups"]
    return dict(image_size=(side * 2 * n, side * 2), patch_size=2, in_chans=3), side


def _relative_error(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return np.abs(ours - theirs).max() / np.abs(theirs).max()


def test_official_fit_encoder():
    part, state, spec = _fixture("fit")
    args, side = _image_args(spec)
    model = zoo.convert.from_pix2seq_fit(state, num_groups=spec["num_groups"], **args)
    image = fit_lib.group_patches_to_image(jnp.asarray(part["inputs/patches"]), side, 2,
                                           *args["image_size"])
    x, latents = nnx.jit(lambda m, i: m.forward_features(i))(model, image)
    assert _relative_error(x, part["outputs/x"]) < 1e-5
    assert _relative_error(latents, part["outputs/latents"]) < 1e-5


def _assert_official_logits(model, part):
    tokens = jnp.asarray(part["inputs/tokens"]).reshape(2, -1)
    logits = nnx.jit(lambda m, t: m(t))(model, tokens)
    expected = part["outputs/logits"].reshape(2, tokens.shape[1], -1)
    assert _relative_error(logits, expected) < 1e-5


def test_official_fit_ar():
    part, state, spec = _fixture("fitar")
    model = zoo.convert.from_pix2seq_fit(state, num_groups=spec["num_groups"])
    _assert_official_logits(model, part)


def _denoise(model, part, side, args):
    """(prediction as the fixture's patches, raw latents) on the fixture's inputs."""
    image = fit_lib.group_patches_to_image(jnp.asarray(part["inputs/patches"]), side, 2,
                                           *args["image_size"])
    run = nnx.jit(lambda m, i, g, c, p: m(i, g, c, latents_prev=p))
    prediction, latents = run(model, image, jnp.asarray(part["inputs/gamma"]),
                              jnp.asarray(part["inputs/cond"]),
                              jnp.asarray(part["inputs/latents_prev"]))
    return fit_lib.image_to_group_patches(prediction, side, 2), latents


def _assert_official_denoising(model, part, side, args):
    patches, latents = _denoise(model, part, side, args)
    assert _relative_error(patches, part["outputs/prediction"]) < 1e-5
    assert _relative_error(latents, part["outputs/latents"]) < 1e-5  # raw, not normalised


def test_official_fit_denoiser():
    part, state, spec = _fixture("denoiser")
    args, side = _image_args(spec)
    model = zoo.convert.from_pix2seq_fit(state, num_groups=spec["num_groups"], **args)
    assert model.cond_dim == spec["cond_dim"] and model.self_condition
    _assert_official_denoising(model, part, side, args)


# pix2seq's options (tools/make_fit_fixture.py "*_options"): sin-cos positions, the causal latent
# mask, y tokens, local layers without attention, read/write layers with an MLP and without LN_kv.

def test_official_fit_encoder_options():
    part, state, spec = _fixture("fit_options")
    assert spec["x_pos_encoding"] == "sin_cos2d" and spec["mask"] == "causal"
    side = math.isqrt(spec["num_groups"])
    grid = math.isqrt(spec["x_size"] // spec["num_groups"])  # 2 x 2 patches per group
    size = side * grid * 2
    model = zoo.convert.from_pix2seq_fit(
            state, num_groups=spec["num_groups"], image_size=size, patch_size=2,
            x_pos_encoding="sin_cos2d", latents_per_group=spec["latents_per_group"],
            latent_mask="causal")
    assert model.latent_pos_emb is None and model.x_pos_emb is None
    assert model.y_dim == part["inputs/y"].shape[-1]
    image = fit_lib.group_patches_to_image(jnp.asarray(part["inputs/patches"]), side, 2,
                                           size, size)
    x, latents = nnx.jit(lambda m, i, y: m.forward_features(i, y))(
            model, image, jnp.asarray(part["inputs/y"]))
    assert _relative_error(x, part["outputs/x"]) < 1e-5  # y tokens first, as pix2seq
    assert _relative_error(latents, part["outputs/latents"]) < 1e-5


def test_official_fit_ar_options():
    part, state, spec = _fixture("fitar_options")
    with pytest.raises(ValueError, match=r"pass \['latents_per_group', 'x_pos_encoding', "
                                         r"'seq_len'\]"):
        zoo.convert.from_pix2seq_fit(state, num_groups=spec["num_groups"])
    model = zoo.convert.from_pix2seq_fit(
            state, num_groups=spec["num_groups"], x_pos_encoding="sin_cos",
            latents_per_group=spec["latents_per_group"], seq_len=spec["x_size"])
    _assert_official_logits(model, part)


def test_official_fit_denoiser_options():
    part, state, spec = _fixture("denoiser_options")
    args, side = _image_args(spec)
    model = zoo.convert.from_pix2seq_fit(
            state, num_groups=spec["num_groups"], x_pos_encoding="sin_cos",
            latents_per_group=spec["latents_per_group"], latent_mask="causal", **args)
    trunk = model.trunk
    assert trunk.x_networks[0][0].attn is None and trunk.reads[0].mlp is not None
    assert trunk.reads[0].kv_norm is None and trunk.cond_attention[0].kv_norm is None
    _assert_official_denoising(model, part, side, args)
    # without the mask the latents of early groups would see later ones: a different answer
    unmasked = zoo.convert.from_pix2seq_fit(
            state, num_groups=spec["num_groups"], x_pos_encoding="sin_cos",
            latents_per_group=spec["latents_per_group"], **args)
    _, other = _denoise(unmasked, part, side, args)
    assert _relative_error(other, part["outputs/latents"]) > 1e-3


def test_converter_errors_name_what_is_missing():
    _, state, spec = _fixture("denoiser")
    args, _ = _image_args(spec)
    with pytest.raises(ValueError, match="num_groups"):
        zoo.convert.from_pix2seq_fit(state, num_groups=None, **args)
    with pytest.raises(ValueError, match="pass image_size"):
        zoo.convert.from_pix2seq_fit(state, num_groups=4)
    with pytest.raises(ValueError, match="does not divide"):
        zoo.convert.from_pix2seq_fit(state, num_groups=5, **args)
    extra = dict(state, **{"denoiser/unknown/kernel": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="does not map"):
        zoo.convert.from_pix2seq_fit(extra, num_groups=4, **args)


def keras_glorot_std(shape) -> float:
    """The std of Keras's GlorotUniform on a kernel of `shape`: fans as keras.initializers
    computes them (rank > 2: receptive field = prod(shape[:-2]))."""
    receptive = math.prod(shape[:-2]) if len(shape) > 2 else 1
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    return math.sqrt(2.0 / (fan_in + fan_out))  # limit sqrt(6 / (fi + fo)) / sqrt(3)


def _kernels(attn):
    """(name, our kernel as [in, heads, head_dim] or [heads, head_dim, out], Keras shape)."""
    h, k = attn.num_heads, attn.head_dim
    out = []
    if attn.fused_qkv and not attn.cross_attention:
        qkv = np.asarray(attn.qkv.kernel[...])
        for i, name in enumerate("qkv"):
            out.append((name, qkv[:, i].reshape(-1, h, k)))
    else:
        out.append(("q", np.asarray(attn.q.kernel[...]).reshape(-1, h, k)))
        kv = np.asarray(attn.kv.kernel[...])
        out += [("k", kv[:, 0].reshape(-1, h, k)), ("v", kv[:, 1].reshape(-1, h, k))]
    out.append(("o", np.asarray(attn.proj.kernel[...]).reshape(h, k, -1)))
    return out


def _ours(model, keras_name):
    """Our kernel for a Keras kernel name of the official model (query/key/value parts of a
    fused projection reshaped to [in, heads, head_dim]); None where the names do not match."""
    trunk = model.trunk
    m = re.match(r"(x_network|l_network|l2x_cross_attn|x2l_cross_attn|l2c_cross_attn)(?:_(\d+))?"
                 r"/(?:transformer_\w+?(?:_(\d+))?/)?(?:mha|self_mha|cross_mha|mlp/ffn)/"
                 r"(query|key|value|attention_output|dense1|dense2)/kernel$", keras_name)
    if m is None:
        return None
    network, i, j, role = m.group(1), int(m.group(2) or 0), int(m.group(3) or 0), m.group(4)
    block = {"x_network": lambda: trunk.x_networks[i][j],
             "l_network": lambda: trunk.latent_networks[i][j],
             "l2x_cross_attn": lambda: trunk.reads[i], "x2l_cross_attn": lambda: trunk.writes[i],
             "l2c_cross_attn": lambda: trunk.cond_attention[i]}[network]()
    if role in ("dense1", "dense2"):
        return np.asarray((block.mlp.fc1 if role == "dense1" else block.mlp.fc2).kernel[...])
    attn = block.attn
    for name, kernel in _kernels(attn):
        if name == {"query": "q", "key": "k", "value": "v", "attention_output": "o"}[role]:
            return kernel
    return None


@pytest.mark.parametrize("name", ["fit_ar_small", "fit_denoiser_64", "fit_encoder_b"])
def test_initialisation_statistics_are_the_official_keras_ones(name):
    """Per-kernel std of our freshly built model against the same kernel of the official Keras
    model at the same size (tools/make_fit_fixture.py), and within the Glorot bound."""
    data = np.load(FIXTURE)
    prefix = f"init/{name}/"
    official = {k[len(prefix):]: float(data[k]) for k in data.files
                if k.startswith(prefix) and not k.endswith("/spec")}
    model = zoo.create_model(name)
    checked = 0
    for keras_name, std in official.items():
        kernel = _ours(model, keras_name)
        if kernel is None:
            continue
        assert np.std(kernel) == pytest.approx(std, rel=0.05), keras_name
        assert np.abs(kernel).max() <= math.sqrt(3) * keras_glorot_std(kernel.shape) * 1.0001
        checked += 1
    assert checked >= 40, checked
    if name == "fit_ar_small":  # the figures of issue 17: local qkv 0.011, read q 0.0076
        local = model.trunk.x_networks[0][0].attn
        read = model.trunk.reads[0].attn
        assert np.std(np.asarray(local.qkv.kernel[...])) == pytest.approx(0.0107, rel=0.05)
        assert np.std(np.asarray(read.q.kernel[...])) == pytest.approx(0.0076, rel=0.05)


def _positional_encoding(coords, dim):
    """pix2seq `positional_encoding` (get_angles + sin of even / cos of odd channels)."""
    i = np.arange(dim)[None, :]
    rates = 1.0 / np.power(10000.0, (2 * (i // 2)).astype(np.float64) / dim)
    angles = coords[:, None] * rates
    return np.concatenate([np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])], -1)


def test_time_embedding_is_pix2seqs_scalar_embedding():
    """ScalarEmbedding(dim, scaling=1000) with normalize=True, last_swish=False, on the noise
    level: sin-cos of 1000 gamma, standardised (population std), dense0 -> SiLU -> dense1."""
    model = zoo.create_model("fit_denoiser_64", image_size=16, patch_size=2, num_groups=4,
                             layer_spec="(1)1", latents_per_group=2, x_dim=16, latent_dim=32,
                             x_heads=2, latent_heads=2)
    emb = model.time_emb
    gamma = np.asarray([1e-4, 0.3, 0.97], np.float64)
    code = _positional_encoding(gamma * 1000.0, emb.dim)
    code = (code - code.mean(-1, keepdims=True)) / code.std(-1, keepdims=True)
    w0, b0 = np.asarray(emb.dense0.kernel[...]), np.asarray(emb.dense0.bias[...])
    w1, b1 = np.asarray(emb.dense1.kernel[...]), np.asarray(emb.dense1.bias[...])
    hidden = code @ w0 + b0
    expected = (hidden / (1 + np.exp(-hidden))) @ w1 + b1
    got = np.asarray(emb(jnp.asarray(gamma, jnp.float32)))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_denoiser_returns_raw_latents_and_normalises_x_once():
    """pix2seq's FITDenoiser: x_output_linear(x_output_ln(x)), raw latents for self-conditioning;
    no trunk output norms (FIT and FITAR keep theirs)."""
    kw = dict(layer_spec="(1)1", latents_per_group=2, x_dim=16, latent_dim=32, x_heads=2,
              latent_heads=2)
    model = zoo.create_model("fit_denoiser_64", image_size=16, patch_size=2, num_groups=4, **kw)
    assert model.trunk.x_norm is None and model.trunk.latent_norm is None
    encoder = zoo.create_model("fit_encoder_b", image_size=16, patch_size=2, num_groups=4,
                               num_classes=3, **kw)
    assert encoder.trunk.x_norm is not None and encoder.trunk.latent_norm is not None
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    gamma = jnp.asarray([0.2, 0.8])
    _, latents = model(images, gamma)
    per_token = np.asarray(latents).reshape(-1, 32)
    # Layer-normalised latents would have zero mean and unit variance per token.
    assert np.abs(per_token.mean(-1)).max() > 1e-2 or np.abs(per_token.std(-1) - 1).max() > 1e-2
