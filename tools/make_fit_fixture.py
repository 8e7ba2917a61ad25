"""Writes the pix2seq-parity fixture for FIT: tests/fixtures/fit_pix2seq_random.npz.

Runs the official TF code (google-research/pix2seq `architectures/transformers.py`: `FIT`,
`FITAR`, `FITDenoiser`) on CPU with small sizes, every variable redrawn at random (LayerNorm
scales and offsets included, so that nothing is left at an initialisation that would hide a
mistake), and stores, per model:
  <kind>/state/<variable name>   every Keras variable, by its name (without ":0")
  <kind>/inputs/<name>           the call's inputs
  <kind>/outputs/<name>          its outputs (training=False)
  <kind>/spec                    the constructor arguments (JSON)
plus, for the initialisation test, `init/<zoo model>/<variable name>`: the std of every
attention and dense kernel of a freshly built official model at the sizes zoo/fit.py registers
(the Keras initialisers themselves, not a formula).
`tests/models/test_fit_pix2seq.py` imports the weights with `zoo.convert.from_pix2seq_fit` and
compares.

Needs TensorFlow (CPU), tf-keras (pix2seq is Keras 2 code) and einops, which the project does not
depend on, and a checkout of google-research/pix2seq; run it from a separate venv:

  python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu tf-keras einops
  /tmp/tfenv/bin/python tools/make_fit_fixture.py --pix2seq /path/to/pix2seq

Written with tensorflow 2.21.0 and tf-keras 2.21.0 at pix2seq commit eabd4e9.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import types

import numpy as np

SMALL = dict(num_groups=4, latents_per_group=3, x_dim=16, latent_dim=24, x_num_heads=2,
             latent_num_heads=4, mlp_ratio=2)
SPECS = {
        # '(1)2(1)': local, read, global, write, local; every kind of layer once at least.
        "fit": dict(layers="(1)2(1)", x_size=4 * 5, **SMALL),
        "fitar": dict(layers="(1)2(1)", x_size=4 * 5, vocab_size=11, **SMALL),
        "denoiser": dict(layers="(1)2(1)", x_size=4 * 5, out_dim=12, **SMALL),
        # pix2seq's options (issue 17, item 6), each model with every option it offers set
        # away from its default: fixed sin-cos codes, the causal latent mask, y tokens
        # (FIT), and the denoiser's local layers without attention, read/write layers with
        # an MLP and without the key/value LayerNorm.
        "fit_options": dict(layers="(1)2(1)", x_size=4 * 4, x_pos_encoding="sin_cos2d",
                            latent_pos_encoding="sin_cos", mask="causal", **SMALL),
        "fitar_options": dict(layers="(1)2(1)", x_size=4 * 5, vocab_size=11,
                              x_pos_encoding="sin_cos", latent_pos_encoding="sin_cos", **SMALL),
        "denoiser_options": dict(layers="(1)2(1)", x_size=4 * 5, out_dim=12,
                                 x_pos_encoding="sin_cos", latent_pos_encoding="sin_cos",
                                 mask="causal", x_self_attention=False, xattn_with_mlp=True,
                                 xattn_enc_ln=False, **SMALL),
}
PATCH_DIM = 12  # the encoder's and denoiser's input tokens: 2x2 patches of 3 channels
COND_DIM = 7
Y_TOKENS, Y_DIM = 2, 5  # fit_options' conditioning tokens y [B, T, 2, 5]
BATCH = 2


def _import_pix2seq(path: str):
    sys.path.insert(0, path)
    # transformers.py imports architectures.resnet (for ResNetTransformer), which needs
    # tensorflow_addons; FIT does not use it.
    sys.modules["architectures.resnet"] = types.ModuleType("architectures.resnet")
    from architectures import transformers
    return transformers


def _randomise(layer, rng, tf):
    for variable in layer.variables:
        variable.assign(rng.normal(0.0, 0.3, variable.shape).astype(np.float32))


def _registered_sizes(transformers):
    """pix2seq layers at the sizes zoo/fit.py registers (fit_encoder_b, fit_ar_small,
    fit_denoiser_64), with a call that builds them."""
    trunk = dict(layers="(2)4(2)4(2)", mlp_ratio=4)
    encoder = dict(trunk, x_size=16 * 64, num_groups=16, latents_per_group=16, x_dim=384,
                   latent_dim=768, x_num_heads=6, latent_num_heads=12)
    ar = dict(trunk, x_size=1024, num_groups=16, latents_per_group=16, x_dim=256,
              latent_dim=512, x_num_heads=4, latent_num_heads=8, vocab_size=256)
    denoiser = dict(trunk, x_size=4 * 64, num_groups=4, latents_per_group=32, x_dim=256,
                    latent_dim=512, x_num_heads=4, latent_num_heads=8, out_dim=48)
    return {
            "fit_encoder_b": (transformers.FIT, encoder, lambda m: m(
                    np.zeros((1, 16, 64, 192), np.float32), training=False)),
            "fit_ar_small": (transformers.FITAR, ar, lambda m: m(
                    np.zeros((1, 16, 64), np.int32), training=False)),
            "fit_denoiser_64": (transformers.FITDenoiser, denoiser, lambda m: m(
                    np.zeros((1, 4, 64, 48), np.float32), np.zeros((1,), np.float32),
                    np.zeros((1, 10), np.float32), training=False)),
    }


def _state(layer):
    return {v.name.split(":")[0]: v.numpy() for v in layer.variables}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pix2seq", required=True, help="google-research/pix2seq checkout")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1]
                                             / "tests" / "fixtures" / "fit_pix2seq_random.npz"))
    args = parser.parse_args()
    # pix2seq is Keras 2 code (layer names with '/'); TF >= 2.16 needs the tf-keras package and
    # this switch to give it Keras 2 as tf.keras.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    transformers = _import_pix2seq(args.pix2seq)
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {"tf_version": np.asarray(tf.__version__)}
    n = SPECS["fit"]["x_size"] // SMALL["num_groups"]
    t, m = SMALL["num_groups"], SMALL["latents_per_group"]

    # FIT (encoder): patches [B, T, n, patch_dim] -> (LN(x), LN(latents)).
    fit = transformers.FIT(**SPECS["fit"], name="fit")
    patches = rng.normal(size=(BATCH, t, n, PATCH_DIM)).astype(np.float32)
    fit(patches, training=False)
    _randomise(fit, rng, tf)
    x, latents = fit(patches, training=False)
    out.update({"fit/inputs/patches": patches, "fit/outputs/x": x.numpy(),
                "fit/outputs/latents": latents.numpy()})

    # FITAR: tokens [B, T, n] -> logits [B, T, n, vocab].
    fitar = transformers.FITAR(**SPECS["fitar"], name="fitar")
    tokens = rng.integers(0, SPECS["fitar"]["vocab_size"], (BATCH, t, n)).astype(np.int32)
    fitar(tokens, training=False)
    _randomise(fitar, rng, tf)
    logits = fitar(tokens, training=False)
    out.update({"fitar/inputs/tokens": tokens, "fitar/outputs/logits": logits.numpy()})

    # FITDenoiser: (patches, latents_prev), gamma [B], class one-hot [B, cond_dim]
    # -> (prediction patches, raw latents).
    denoiser = transformers.FITDenoiser(**SPECS["denoiser"], self_cond="latent",
                                        name="denoiser")
    gamma = np.asarray([0.05, 0.7], np.float32)
    cond = np.eye(COND_DIM, dtype=np.float32)[[1, 4]]
    prev = rng.normal(size=(BATCH, t, m, SMALL["latent_dim"])).astype(np.float32)
    denoiser((patches, prev), gamma, cond, training=False)
    _randomise(denoiser, rng, tf)
    pred, latents = denoiser((patches, prev), gamma, cond, training=False)
    out.update({"denoiser/inputs/patches": patches, "denoiser/inputs/gamma": gamma,
                "denoiser/inputs/cond": cond, "denoiser/inputs/latents_prev": prev,
                "denoiser/outputs/prediction": pred.numpy(),
                "denoiser/outputs/latents": latents.numpy()})

    # The option models.
    fit_options = transformers.FIT(**SPECS["fit_options"], name="fit")
    n_options = SPECS["fit_options"]["x_size"] // t
    patches4 = rng.normal(size=(BATCH, t, n_options, PATCH_DIM)).astype(np.float32)
    y = rng.normal(size=(BATCH, t, Y_TOKENS, Y_DIM)).astype(np.float32)
    fit_options(patches4, y, training=False)
    _randomise(fit_options, rng, tf)
    x, latents = fit_options(patches4, y, training=False)
    out.update({"fit_options/inputs/patches": patches4, "fit_options/inputs/y": y,
                "fit_options/outputs/x": x.numpy(), "fit_options/outputs/latents": latents.numpy()})

    fitar_options = transformers.FITAR(**SPECS["fitar_options"], name="fitar")
    fitar_options(tokens, training=False)
    _randomise(fitar_options, rng, tf)
    out.update({"fitar_options/inputs/tokens": tokens,
                "fitar_options/outputs/logits": fitar_options(tokens, training=False).numpy()})

    denoiser_options = transformers.FITDenoiser(**SPECS["denoiser_options"], self_cond="latent",
                                                name="denoiser")
    denoiser_options((patches, prev), gamma, cond, training=False)
    _randomise(denoiser_options, rng, tf)
    pred, latents = denoiser_options((patches, prev), gamma, cond, training=False)
    out.update({"denoiser_options/inputs/patches": patches,
                "denoiser_options/inputs/gamma": gamma, "denoiser_options/inputs/cond": cond,
                "denoiser_options/inputs/latents_prev": prev,
                "denoiser_options/outputs/prediction": pred.numpy(),
                "denoiser_options/outputs/latents": latents.numpy()})

    for kind, layer in (("fit", fit), ("fitar", fitar), ("denoiser", denoiser),
                        ("fit_options", fit_options), ("fitar_options", fitar_options),
                        ("denoiser_options", denoiser_options)):
        for name, value in _state(layer).items():
            out[f"{kind}/state/{name}"] = value
        spec = dict(SPECS[kind])
        if kind.startswith("denoiser"):
            spec.update(self_cond="latent", cond_dim=COND_DIM)
        if not kind.startswith("fitar"):
            spec["patch_dim"] = PATCH_DIM
        out[f"{kind}/spec"] = np.asarray(json.dumps(spec))
    # Initialisation statistics of the official Keras layers at the registered zoo sizes.
    for kind, (cls, size, call) in _registered_sizes(transformers).items():
        layer = cls(**size, name=kind)
        call(layer)
        for name, value in _state(layer).items():
            if re.search(r"(query|key|value|attention_output|dense\d|stem|cond_proj)/kernel$",
                         name):
                out[f"init/{kind}/{name.partition('/')[2]}"] = np.asarray(np.std(value))
        out[f"init/{kind}/spec"] = np.asarray(json.dumps(size))
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}: {len(out)} arrays")


if __name__ == "__main__":
    main()
