"""Fine-tuning from a weight file (`config.init_from`, zoo/training/init_from.py) and the official
SSA fine-tuning recipe (configs/ssa.py:variant=gpt2_finetune) on a small random GPT-2 written
by Hugging Face transformers (tests/fixtures/gpt2_small_random.npz)."""
from __future__ import annotations

import os
import pathlib
import re

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx, traverse_util

from configs import common
from configs import ssa as ssa_config
from training_helpers import apply_changes
from zoo import convert, weight_files
from zoo.tasks import language_modeling as lm
from zoo.training import checkpoint as ckpt_lib
from zoo.training import init_from, optim
from zoo.training import state as state_lib
from zoo.training import trainer
from zoo.training.config import validate_config
from zoo.training.errors import ConfigError

FIXTURE = pathlib.Path(__file__).parent.parent / "fixtures" / "gpt2_small_random.npz"
# The fixture's GPT-2: vocab 100, 32 positions, width 32, 2 blocks; 4 heads (not recorded).
SIZE = dict(vocab_size=100, max_seq_len=32, width=32, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def gpt2_file(tmp_path_factory) -> str:
    data = np.load(FIXTURE)
    state = {k[len("state/"):]: data[k] for k in data if k.startswith("state/")}
    path = str(tmp_path_factory.mktemp("gpt2") / "model.safetensors")
    weight_files.save_safetensors(state, path)
    return path


def finetune_config(path: str, tune: str = "ssa", **changes) -> ml_collections.ConfigDict:
    c = ssa_config.get_config(f"variant=gpt2_finetune,tune={tune}")
    c.model.overrides = ml_collections.ConfigDict(SIZE)
    c.init_from.path = path
    c.init_from.overrides = ml_collections.ConfigDict(dict(num_heads=4))
    c.lm.vocab_size, c.lm.seq_len = 100, 32
    c.precision.compute_dtype = "float32"
    c.batch_size, c.eval.batch_size, c.eval.num_batches = 8, 8, 1
    c.total_steps, c.checkpoint_every, c.eval_every = 3, 3, 0
    c.async_checkpointing = False
    c.logging.progress_bar = c.logging.tensorboard = False
    return apply_changes(c, changes)


def _abstract_model(config) -> dict:
    return state_lib.ModelSkeleton(config).abstract_pure()


def test_converter_weights_are_loaded_and_its_own_initialisation_is_not(gpt2_file):
    config = finetune_config(gpt2_file)
    loaded = init_from.load(config, _abstract_model(config))
    reference = convert.from_gpt2(weight_files.load_state_dict(gpt2_file), num_heads=4)
    expected = {"/".join(map(str, path)): np.asarray(v.get_value())
                for path, v in nnx.to_flat_state(nnx.state(reference))}
    ssa_names = {n for n in expected if re.search(ssa_config.SSA_PARAMETERS, n)}
    assert ssa_names and not ssa_names & set(loaded)  # created by the converter, not the file
    assert set(loaded) == set(expected) - ssa_names
    for name, value in loaded.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_dont_load_mismatches_and_unknown_names(gpt2_file, tmp_path):
    config = finetune_config(gpt2_file, **{"init_from.dont_load": (r"^blocks/1/",)})
    loaded = init_from.load(config, _abstract_model(config))
    assert loaded and not any(name.startswith("blocks/1/") for name in loaded)

    wider = finetune_config(gpt2_file)
    wider.model.overrides.width = 64
    with pytest.raises(ValueError, match=r"28 variable\(s\) do not fit ssa_gpt2_small: "
                                         r"\['blocks/0/attn/proj/bias \(32,\) vs ours \(64,\)"):
        init_from.load(wider, _abstract_model(wider))

    ours = str(tmp_path / "ours.safetensors")  # source "zoo": names are our paths
    weight_files.save_safetensors({"blocks/0/attn/beta": np.float32(0.5),
                                   "blocks/0/attn/gamma": np.float32(1.0)}, ours)
    zoo_source = finetune_config(ours, **{"init_from.source": "zoo",
                                          "init_from.overrides": ml_collections.ConfigDict()})
    with pytest.raises(ValueError, match=r"1 variable\(s\) are not in ssa_gpt2_small: "
                                         r"\['blocks/0/attn/gamma'\]"):
        init_from.load(zoo_source, _abstract_model(zoo_source))
    zoo_source.init_from.dont_load = ("gamma",)
    assert float(init_from.load(zoo_source, _abstract_model(zoo_source))
                 ["blocks/0/attn/beta"]) == 0.5


@pytest.mark.parametrize("changes,match", [
        ({"init_from.source": "timm:gpt2"}, r"config.init_from.source='timm:gpt2' is invalid; "
                                            r"allowed: \[.*'hf:gpt2'"),
        ({"init_from.path": "/nonexistent/model.safetensors"}, "is not a file"),
        ({"init_from.path": "/tmp/model.h5"}, r"has suffix '.h5'; allowed: \['.safetensors'"),
        ({"init_from.path": ""}, r"config.init_from.source is set but config.init_from.path is "
                                 r"empty"),
        ({"init_from.dont_load": ("head[",)}, r"dont_load entry 'head\[' is not a valid regex"),
])
def test_bad_init_from_fields_are_config_errors(gpt2_file, changes, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(finetune_config(gpt2_file, **changes), num_devices=8)


def _trained(config, workdir) -> tuple[int, dict[str, np.ndarray]]:
    skeleton = state_lib.ModelSkeleton(config)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          skeleton.abstract_pure())
    step, model = ckpt_lib.restore_model_only(os.path.join(workdir, "checkpoints"), target,
                                              None, subtree="model")
    return step, {"/".join(map(str, k)): np.asarray(v)
                  for k, v in traverse_util.flatten_dict(model).items()}


def test_ssa_only_recipe_trains_beta_and_keeps_every_gpt2_weight(gpt2_file, tmp_path):
    """configs/ssa.py:variant=gpt2_finetune,tune=ssa through the real loop on 8 devices: the
    GPT-2 weights start from the file and stay bit-identical (frozen), the SSA parameters move.
    A restart resumes its checkpoint and does not read the weight file again."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 4000), ("val", 1000)):
        lm.write_token_file(str(data / f"{split}.bin"), rng.integers(0, 100, n))
    config = finetune_config(gpt2_file, **{"data.path": str(data)})
    workdir = str(tmp_path / "run")
    trainer.train_and_evaluate(config, workdir, profile_steps=None)

    step, trained = _trained(config, workdir)
    assert step == 3
    loaded = init_from.load(config, state_lib.ModelSkeleton(config).abstract_pure())
    for name, value in loaded.items():
        np.testing.assert_array_equal(trained[name], value, err_msg=f"{name} was not frozen")
    betas = [v for n, v in trained.items() if n.endswith("/beta")]
    assert len(betas) == 2 and all(abs(float(b) - 1.5) > 1e-6 for b in betas), betas

    # Resuming with a different file at the same path: the checkpoint wins.
    other = str(tmp_path / "other.safetensors")
    weight_files.save_safetensors({k: np.zeros_like(v) for k, v in
                                   weight_files.load_state_dict(gpt2_file).items()}, other)
    config.init_from.path, config.total_steps = other, 4
    trainer.train_and_evaluate(config, workdir, profile_steps=None)
    step, resumed = _trained(config, workdir)
    assert step == 4
    for name, value in loaded.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


@pytest.mark.parametrize("tune,rest", [("ssa", "transformer"), ("full", "default")])
def test_finetune_recipes_put_ssa_parameters_in_their_own_adam(gpt2_file, tune, rest):
    config = finetune_config(gpt2_file, tune=tune)
    config.model.overrides = ml_collections.ConfigDict(dict(SIZE))  # ssa=on: all temperatures
    params, _ = state_lib.ModelSkeleton(config).split(_abstract_model(config))
    labels = {"/".join(map(str, k)): v for k, v in
              traverse_util.flatten_dict(optim.param_labels(config, params)).items()}
    ssa = {n for n in labels if re.search(ssa_config.SSA_PARAMETERS, n)}
    assert len(ssa) == 10 and {labels[n] for n in ssa} == {"selective"}
    assert {labels[n] for n in set(labels) - ssa} == {rest}
    group = config.optimizer.groups.selective
    assert (group.name, group.learning_rate, group.weight_decay) == ("adamw", 1e-4, 0.0)
    assert config.optimizer.learning_rate == 3e-5 and config.optimizer.weight_decay == 0.01
    if tune == "ssa":
        assert config.optimizer.groups.transformer.freeze


def test_timm_swin_weights_with_a_new_head(tmp_path):
    """The README's example: timm Swin weights (a random timm model, tools/make_swin_fixture.py)
    into swin_t with another class count; the head is skipped by dont_load, or named."""
    data = np.load(FIXTURE.parent / "swin_small_random.npz")
    path = str(tmp_path / "swin_timm.npz")
    np.savez(path, **{k[len("state/"):]: data[k] for k in data.files if k.startswith("state/")})
    c = apply_changes(common.base_config(), {
            "model.name": "swin_t", "init_from.path": path,
            "init_from.source": "timm:swin_tiny_patch4_window7_224",
            "init_from.overrides": ml_collections.ConfigDict(dict(image_size=32))})
    c.model.overrides = ml_collections.ConfigDict(dict(
            image_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
            window_size=4, num_classes=5))
    with pytest.raises(ValueError, match=r"2 variable\(s\) do not fit swin_t: "
                                         r"\['head/bias \(10,\) vs ours \(5,\)"):
        init_from.load(c, _abstract_model(c))
    c.init_from.dont_load = (r"^head/",)
    loaded = init_from.load(c, _abstract_model(c))
    ours = traverse_util.flatten_dict(_abstract_model(c))
    assert set(loaded) == {"/".join(map(str, k)) for k in ours} - {"head/bias", "head/kernel"}
