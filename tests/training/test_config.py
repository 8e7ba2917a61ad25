"""Config validation: each kind of mistake is one ConfigError line naming the field, the value
and what is allowed, raised before anything is compiled."""
from __future__ import annotations

import importlib

import ml_collections
import pytest

from configs import common
from training_helpers import tiny_config
from zoo.training import tasks
from zoo.training.config import ConfigError, validate_config

ssa_configs = importlib.import_module("configs.ssa")
nvist_configs = importlib.import_module("configs.nvist")


def _error(config, num_devices=8, num_processes=1) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(config, num_devices=num_devices, num_processes=num_processes)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_the_tiny_config_is_valid():
    assert validate_config(tiny_config(), num_devices=8) == (8, 1, 1)
    assert validate_config(tiny_config(mesh_shape=(2, -1, 2)), num_devices=8) == (2, 2, 2)


def test_unknown_key_is_named():
    config = tiny_config()
    config.data.imgae_size = 32  # typo
    message = _error(config)
    assert "config.data.imgae_size is not a known config field" in message
    assert "image_size" in message  # the allowed keys are listed


def test_unknown_top_level_key():
    config = tiny_config()
    config.learning_rate = 0.1
    assert "config.learning_rate is not a known config field" in _error(config)


def test_wrong_type_is_named():
    config = tiny_config()
    with config.ignore_type():  # as a config file building its own ConfigDict could
        config.batch_size = "64"
    assert "config.batch_size='64' has type str; expected int" in _error(config)


def test_bool_is_not_an_int():
    config = tiny_config()
    with config.ignore_type():
        config.total_steps = True
    assert "config.total_steps=True has type bool; expected int" in _error(config)


def test_model_overrides_are_free_form():
    config = tiny_config()
    config.model.overrides.drop_path_rate = 0.1
    assert validate_config(config, num_devices=8) == (8, 1, 1)


def test_batch_not_divisible_by_data_axes():
    message = _error(tiny_config(batch_size=12, mesh_shape=(8, 1, 1)))
    assert "config.batch_size=12 must be divisible by the data-parallel size (8" in message


def test_batch_not_divisible_by_grad_accum():
    message = _error(tiny_config(batch_size=16, grad_accum_steps=3, mesh_shape=(2, 1, 4)))
    assert "config.batch_size=16" in message and "grad_accum_steps (3)" in message


def test_mesh_larger_than_the_devices():
    message = _error(tiny_config(mesh_shape=(16, 1, 1)))
    assert "config.mesh_shape=(16, 1, 1) is invalid" in message and "8 available" in message


def test_mesh_shape_not_matching_the_device_count():
    message = _error(tiny_config(mesh_shape=(2, 2, 1)))
    assert "config.mesh_shape=(2, 2, 1) is invalid" in message


def test_mesh_with_fixed_sizes_not_dividing_the_devices():
    assert "config.mesh_shape=(3, -1, 1)" in _error(tiny_config(mesh_shape=(3, -1, 1)))


def test_data_axis_not_in_the_mesh():
    message = _error(tiny_config(data_axes=("batch",)))
    assert "config.data_axes=('batch',) is invalid" in message


def test_rule_naming_an_unknown_mesh_axis():
    config = tiny_config(logical_axis_rules=(("embed", "model"),))
    assert "names mesh axis 'model'" in _error(config)


def test_rule_naming_an_unknown_logical_axis():
    config = tiny_config(logical_axis_rules=(("activation_haeds", "tensor"),))
    message = _error(config)
    assert "names logical axis 'activation_haeds'" in message and "activation_heads" in message


def test_attn_impl_is_checked_and_not_taken_from_overrides():
    assert "config.model.attn_impl='fast' is invalid" in _error(
            tiny_config(**{"model.attn_impl": "fast"}))
    config = tiny_config()
    config.model.overrides.attn_impl = "xla"
    assert "use config.model.attn_impl" in _error(config)


def test_image_size_incompatible_with_the_model():
    config = tiny_config()
    config.model.overrides.image_size = 18
    config.data.image_size = 18  # 18 is not divisible by the 4-pixel patches
    message = _error(config)
    assert message.startswith("config.model: vit_ti16 with overrides")
    assert "18" in message


def test_model_overrides_disagreeing_with_the_data():
    config = tiny_config()
    config.data.image_size = 32
    message = _error(config)
    assert "config.model.overrides.image_size=16 must equal config.data.image_size=32" in message


def test_unknown_model_name():
    assert "config.model.name='vit_nope' is invalid" in _error(tiny_config(**{
            "model.name": "vit_nope"}))


def test_unknown_task():
    assert "config.task='segmentation' is not a registered task" in _error(tiny_config(
            task="segmentation"))


def test_bad_compute_dtype():
    message = _error(tiny_config(**{"precision.compute_dtype": "float8"}))
    assert "config.precision.compute_dtype='float8' is invalid" in message


def test_missing_data_path():
    config = tiny_config(**{"data.source": "image_folder", "data.path": "/nonexistent/images"})
    message = _error(config)
    assert "data.path" in message and "/nonexistent/images" in message


def test_schema_rejects_a_replaced_subtree():
    config = tiny_config()
    with config.unlocked():
        config.eval = ml_collections.ConfigDict({"batch_size": 16})
    assert "config.eval.num_batches is missing" in _error(config)


# --- a task's own config subtree (Task.config_key / Task.default_config) --------------------------

def test_a_task_subtree_is_in_the_configs_of_its_task_only():
    lm_config = common.base_config("language_modeling")
    assert lm_config.task == "language_modeling"
    assert lm_config.lm.to_dict() == tasks.task_class("language_modeling").default_config(
            ).to_dict()
    assert lm_config.lm.seq_len == 256 and "views" not in lm_config
    for task in ("classification", "image_diffusion", "masked_image_modeling"):
        config = common.base_config(task)
        assert config.task == task and "lm" not in config and "views" not in config
    assert "lm" not in common.base_config()  # the default task is classification
    assert "views" in common.base_config("novel_view_synthesis")
    for field in ("seq_len", "vocab_size", "token_dtype", "bytes_per_token", "views_per_scene",
                  "num_scenes", "target_views", "rays_per_view"):
        assert field not in common.base_config().data  # no task-only field is shared
    with pytest.raises(ConfigError, match="config.task='segmentation' is not a registered"):
        common.base_config("segmentation")


def test_a_wrong_type_in_the_task_subtree_is_named():
    config = ssa_configs.get_config("smoke")
    with config.ignore_type():
        config.lm.seq_len = "64"
    assert "config.lm.seq_len='64' has type str; expected int" in _error(config)


def test_a_subtree_of_another_task_is_an_unknown_field():
    config = tiny_config()
    config.lm = common.base_config("language_modeling").lm
    message = _error(config)
    assert "config.lm is not a known config field" in message
    assert "'language_modeling'" in message  # it says whose subtree it is


def test_a_missing_task_subtree_is_named():
    config = nvist_configs.get_config("smoke")
    del config["views"]
    assert "config.views is missing" in _error(config)


def test_an_unregistered_task_is_reported_before_the_schema():
    config = tiny_config(task="segmentation")
    config.lm = common.base_config("language_modeling").lm  # the schema would reject this
    assert "config.task='segmentation' is not a registered task" in _error(config)
    config = tiny_config()
    with config.ignore_type():
        config.task = 3
    assert "config.task=3 has type int; expected str" in _error(config)
