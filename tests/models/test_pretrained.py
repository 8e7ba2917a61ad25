"""zoo.save_pretrained / zoo.create_model(pretrained=...) / zoo.load (zoo/pretrained.py).

  * an artifact saved from a model sharded over the 8-device mesh reloads in a fresh
    single-device process with bit-identical logits;
  * a Hugging Face GPT-2 weights file (tests/fixtures/gpt2_small_random.npz, as .safetensors)
    goes through the registered converter and gives transformers' logits;
  * wrong files, another model's artifact, missing keys, wrong shapes and edited weights are
    one-line errors naming what is wrong;
  * zoo.load of a training run gives the checkpoint's weights (EMA when kept).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from zoo import weight_files

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures"
TINY_VIT = dict(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def _images(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 16, 16, 3)).astype(np.float32)


def test_artifact_saved_from_a_mesh_reloads_bit_identically_in_a_fresh_process(tmp_path):
    model = zoo.create_model("vit_ti16", rngs=nnx.Rngs(3), **TINY_VIT)
    # Logits on one device; the same weights, sharded over the mesh below, are what is saved.
    logits = np.asarray(model(jnp.asarray(_images()), train=False))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    state = nnx.state(model)
    sharded = jax.tree.map(
            lambda x: jax.device_put(x, jax.sharding.NamedSharding(
                    mesh, jax.sharding.PartitionSpec("data") if x.ndim and x.shape[0] % 8 == 0
                    else jax.sharding.PartitionSpec())), state)
    nnx.update(model, sharded)
    assert len(jax.tree.leaves(nnx.state(model))[0].sharding.device_set) == 8
    folder = zoo.save_pretrained(model, tmp_path / "vit_tiny", source="test")
    card = json.loads((tmp_path / "vit_tiny" / "config.json").read_text())
    assert card["name"] == "vit_ti16" and card["overrides"] == TINY_VIT
    assert card["params"] == zoo.count_params(model) and len(card["sha256"]) == 64
    np.save(tmp_path / "images.npy", _images())
    np.save(tmp_path / "logits.npy", logits)

    code = textwrap.dedent(f"""
        import jax, numpy as np, zoo
        assert jax.device_count() == 1
        model = zoo.create_model("vit_ti16", pretrained={folder!r})
        logits = np.asarray(model(np.load({str(tmp_path / 'images.npy')!r}), train=False))
        np.testing.assert_array_equal(logits, np.load({str(tmp_path / 'logits.npy')!r}))
        again = zoo.save_pretrained(model, {str(tmp_path / 'resaved')!r})
        print("ok")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    # The re-saved artifact holds the same bytes of weights.
    assert (json.loads((tmp_path / "resaved" / "config.json").read_text())["sha256"]
            == card["sha256"])


def test_a_hugging_face_weights_file_goes_through_the_converter(tmp_path):
    data = np.load(FIXTURES / "gpt2_small_random.npz")
    path = str(tmp_path / "model.safetensors")
    weight_files.save_safetensors({k[len("state/"):]: data[k] for k in data
                                   if k.startswith("state/")}, path)
    model = zoo.create_model("ssa_gpt2_small", pretrained=path, num_heads=4, ssa=False)
    logits = np.asarray(model(jnp.asarray(data["input_ids"])))
    np.testing.assert_allclose(logits, data["logits"], atol=1e-4, rtol=0)
    assert zoo.registry.origin(model)[0] == "ssa_gpt2_small"


@pytest.mark.parametrize("how", ["create_model", "convert"])
def test_a_converted_model_saves_the_architecture_its_weights_gave(tmp_path, how):
    """A small timm Swin is not swin_t with overrides: the card keeps the widths and depths
    the converter read, and the artifact rebuilds exactly that model (its own image size for
    zoo.preprocess too)."""
    data = np.load(FIXTURES / "swin_small_random.npz")
    state = {k[len("state/"):]: data[k] for k in data if k.startswith("state/")}
    if how == "create_model":
        path = str(tmp_path / "swin.safetensors")
        weight_files.save_safetensors(state, path)
        model = zoo.create_model("swin_t", pretrained=path, image_size=32)
    else:
        model = zoo.convert.from_timm("swin_tiny_patch4_window7_224", state, image_size=32)
    image = jnp.asarray(data["image"])
    folder = zoo.save_pretrained(model, tmp_path / "artifact")
    card = json.loads((tmp_path / "artifact" / "config.json").read_text())
    assert card["architecture"]["embed_dim"] == 16 and card["architecture"]["depths"] == [2, 2]
    assert card["overrides"] == {} and card["preprocessing"]["size"] == 32
    again = zoo.create_model("swin_t", pretrained=folder)
    np.testing.assert_array_equal(np.asarray(again(image)), np.asarray(model(image)))
    np.testing.assert_allclose(np.asarray(again(image)), data["logits"], atol=1e-4, rtol=1e-4)
    assert zoo.preprocess(again, np.zeros((40, 40, 3), np.uint8)).shape == (1, 32, 32, 3)
    # Saved again from the reloaded model, the card is the same.
    zoo.save_pretrained(again, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["architecture"] == \
        card["architecture"]


def _artifact(tmp_path) -> str:
    model = zoo.create_model("vit_ti16", **TINY_VIT)
    return zoo.save_pretrained(model, tmp_path / "artifact")


def test_bad_pretrained_inputs_are_clear_errors(tmp_path):
    folder = _artifact(tmp_path)
    weights = os.path.join(folder, "model.safetensors")
    with pytest.raises(ValueError, match=r"holds a 'vit_ti16' model, not 'swin_t'"):
        zoo.create_model("swin_t", pretrained=folder)
    with pytest.raises(ValueError, match=r"weights file of a zoo artifact; pass its folder"):
        zoo.create_model("vit_ti16", pretrained=weights)
    (tmp_path / "weights.h5").write_bytes(b"\x89HDF")
    with pytest.raises(ValueError, match=r"suffix '\.h5'; allowed"):
        zoo.create_model("ssa_gpt2_small", pretrained=str(tmp_path / "weights.h5"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zoo.create_model("vit_ti16", pretrained=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match=r"source='hf:gpt2' does not build vit_ti16"):
        zoo.create_model("vit_ti16", pretrained=str(tmp_path / "weights.h5"), source="hf:gpt2")
    with pytest.raises(ValueError, match=r"does not fit this model: 2 of another shape "
                                         r"\[\"head/bias \(5,\) vs the model's \(7,\)"):
        zoo.create_model("vit_ti16", pretrained=folder, num_classes=7)

    arrays, metadata = weight_files.read_safetensors(weights)
    del arrays["head/bias"]
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    weight_files.save_safetensors(arrays, str(damaged / "model.safetensors"), metadata=metadata)
    card = json.loads((pathlib.Path(folder) / "config.json").read_text())
    (damaged / "config.json").write_text(json.dumps({**card, "sha256": ""}))
    with pytest.raises(ValueError, match=r"missing 1 variable\(s\) \['head/bias'\]"):
        zoo.create_model("vit_ti16", pretrained=str(damaged))
    (damaged / "config.json").write_text(json.dumps(card))  # the original checksum
    with pytest.raises(ValueError, match="SHA-256 differs"):
        zoo.create_model("vit_ti16", pretrained=str(damaged))

    with pytest.raises(ValueError, match="not built by zoo.create_model"):
        zoo.save_pretrained(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), tmp_path / "linear")


def test_load_restores_a_training_run_and_its_ema(tmp_path):
    from training_helpers import tiny_config
    from zoo.training import trainer
    config = tiny_config(**{"ema.decay": 0.5, "total_steps": 2, "checkpoint_every": 2,
                            "eval_every": 0, "async_checkpointing": False})
    trainer.train_and_evaluate(config, str(tmp_path), profile_steps=None)
    run = zoo.load(str(tmp_path))
    assert run.step == 2 and run.config.model.name == "vit_ti16"
    plain = zoo.load(str(tmp_path), ema=False)
    ema_leaves = jax.tree.leaves(nnx.state(run.model, nnx.Param))
    model_leaves = jax.tree.leaves(nnx.state(plain.model, nnx.Param))
    assert any(not np.array_equal(a, b) for a, b in zip(ema_leaves, model_leaves))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), jnp.float32)
    assert run.model(images, train=False).shape == (2, 10)
    # The restored run saves as an artifact without naming it.
    folder = zoo.save_pretrained(run.model, tmp_path / "artifact")
    again = zoo.create_model("vit_ti16", pretrained=folder)
    np.testing.assert_array_equal(np.asarray(again(images, train=False)),
                                  np.asarray(run.model(images, train=False)))
    # The loaded models give eval.py's metrics (the raw model and its EMA).
    from zoo.training.evaluate import evaluate_checkpoint
    expected = evaluate_checkpoint(tiny_config(**{"ema.decay": 0.5}), str(tmp_path), None)
    assert plain.evaluate() == {k: v for k, v in expected.items() if k not in ("step", "ema")}
    assert run.evaluate() == expected["ema"]
    with pytest.raises(FileNotFoundError, match="is not the workdir of a train.py run"):
        zoo.load(str(tmp_path / "nowhere"))


def _converted(kind):
    """(registered name, a model converted from the fixture, its inputs) per converter."""
    def state(data, prefix):
        return {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}

    if kind == "halonet":
        data = np.load(FIXTURES / "halonet_h1_small.npz")
        meta = json.loads(str(data["meta_json"]))
        model = zoo.convert.from_timm("halonet_h1", state(data, "state/"),
                                      block_size=meta["block_size"], halo_size=meta["halo_size"],
                                      image_size=meta["image_size"])
        return "halonet_h1", model, (jnp.asarray(data["image_nhwc"]),)
    if kind == "vsa":
        data = np.load(FIXTURES / "vsa_small_random.npz")
        model = zoo.convert.from_qformer_vsa(
                state(data, "model/"), image_size=json.loads(str(data["model_spec"]))["img_size"])
        return "vsa_swin_t", model, (jnp.asarray(data["image"]),)
    if kind == "nvist":
        data = np.load(FIXTURES / "nvist_small_random.npz")
        spec = json.loads(str(data["spec"]))
        model = zoo.convert.from_nvist_official(
                state(data, "state/"), image_size=tuple(spec["image_size"]),
                encoder_heads=spec["encoder_heads"], decoder_heads=spec["decoder_heads"],
                num_samples=spec["num_samples"], near_far=tuple(spec["near_far"]))
        inputs = tuple(jnp.asarray(data[k]) for k in ("images", "camera_params", "rays_o",
                                                      "rays_d"))
        return "nvist", model, inputs
    data = np.load(FIXTURES / "gpt2_small_random.npz")
    model = zoo.convert.from_gpt2(state(data, "state/"), num_heads=4, ssa=True)
    return "ssa_gpt2_small", model, (jnp.asarray(data["input_ids"]),)


@pytest.mark.parametrize("kind", ["halonet", "vsa", "nvist", "gpt2"])
def test_every_converter_round_trips_through_an_artifact(tmp_path, kind):
    name, model, inputs = _converted(kind)
    folder = zoo.save_pretrained(model, tmp_path / kind)
    card = json.loads((tmp_path / kind / "config.json").read_text())
    assert card["name"] == name and card["architecture"]
    again = zoo.create_model(name, pretrained=folder)
    run = nnx.jit(lambda m, args: m(*args))
    jax.tree.map(np.testing.assert_array_equal, run(again, inputs), run(model, inputs))
