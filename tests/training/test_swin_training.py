"""configs/swin.py: every variant validates; the smoke run trains with falling loss and its
checkpoint evaluates."""
from __future__ import annotations

import importlib
import json
import os

import pytest

from training_helpers import apply_changes
from zoo.training import config as config_lib, optim

swin_configs = importlib.import_module("configs.swin")


@pytest.mark.parametrize("arg", ["smoke", "swin_t", "variant=swin_s,data=image_folder",
                                 "swin_b"])
def test_variants_validate(arg):
    c = swin_configs.get_config(arg)
    # validate_config would also insist that the ImageNet path exists: check the rest (an
    # abstract build of the model with the config's overrides, the optimizer section).
    if arg == "smoke":
        config_lib.validate_config(c, num_devices=8, num_processes=1)
    else:
        config_lib._check_model(c)
        optim.validate_optimizer_config(c)
    if arg != "smoke":
        assert c.model.overrides.image_size == 224 and c.label_smoothing == 0.1


def test_bad_variant_names_the_file():
    with pytest.raises(ValueError, match="configs/swin.py variant must be one of"):
        swin_configs.get_config("swin_l")


def test_smoke_trains_and_evaluates(tmp_path):
    import train as train_cli
    from zoo.training.evaluate import evaluate_checkpoint

    changes = {"total_steps": 30, "checkpoint_every": 30, "eval_every": 30,
               "data.num_train_examples": 512, "data.num_eval_examples": 128,
               "logging.progress_bar": False, "logging.tensorboard": False}
    workdir = str(tmp_path)
    train_cli.train_and_evaluate(apply_changes(swin_configs.get_config("smoke"), changes),
                                 workdir, profile_steps=None)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses
    result = evaluate_checkpoint(apply_changes(swin_configs.get_config("smoke"), changes),
                                 workdir, None)
    assert result["step"] == 30 and result["top1"] > 0.3
