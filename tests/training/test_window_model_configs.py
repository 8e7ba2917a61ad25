"""configs/swin.py and configs/vsa.py: every variant validates; the smoke runs train with
falling loss and their checkpoints evaluate."""
from __future__ import annotations

import importlib
import json
import os

import pytest

from training_helpers import apply_changes
from zoo.training import classification, mixup
from zoo.training import config as config_lib, optim
from zoo.training import trainer

swin_configs = importlib.import_module("configs.swin")
vsa_configs = importlib.import_module("configs.vsa")
FILES = {"swin": swin_configs, "vsa": vsa_configs}


@pytest.mark.parametrize("file,arg", [
        ("swin", "smoke"), ("swin", "swin_t"), ("swin", "variant=swin_s,data=image_folder"),
        ("swin", "swin_b"), ("vsa", "smoke"), ("vsa", "vsa_swin_t,data=image_folder")])
def test_variants_validate(file, arg):
    c = FILES[file].get_config(arg)
    # validate_config would also insist that the ImageNet path exists: check the rest (an
    # abstract build of the model with the config's overrides, the optimizer section).
    if arg == "smoke":
        config_lib.validate_config(c, num_devices=8, num_processes=1)
    else:
        config_lib._check_model(c)
        optim.validate_optimizer_config(c)
    if arg != "smoke":
        assert c.model.overrides.image_size == 224 and c.label_smoothing == 0.1
        # The official Swin config's augmentation (AUG.*), checked field by field.
        assert c.data.augment == "crop_flip"
        assert c.data.rand_augment == "rand-m9-mstd0.5-inc1"
        assert (c.data.random_erasing.prob, c.data.random_erasing.mode) == (0.25, "pixel")
        assert (c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.mixup.switch_prob,
                c.mixup.mode) == (0.8, 1.0, 0.5, "batch")
        mixup.validate(c)
        classification.ImageData().check_data(c)


def test_bad_variant_names_the_file():
    with pytest.raises(ValueError, match="configs/swin.py variant must be one of"):
        swin_configs.get_config("swin_l")
    with pytest.raises(ValueError, match="configs/vsa.py variant must be one of"):
        vsa_configs.get_config("vsa_swin_s")


@pytest.mark.parametrize("file", ["swin", "vsa"])
def test_smoke_trains_and_evaluates(file, tmp_path):
    from zoo.training.evaluate import evaluate_checkpoint

    steps = 30
    changes = {"total_steps": steps, "checkpoint_every": steps, "eval_every": steps,
               "data.num_train_examples": 512, "data.num_eval_examples": 128,
               "logging.progress_bar": False, "logging.tensorboard": False}
    workdir = str(tmp_path)
    configs = FILES[file]
    trainer.train_and_evaluate(apply_changes(configs.get_config("smoke"), changes),
                                 workdir, profile_steps=None)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    assert losses[-1] < 0.75 * losses[0], losses
    result = evaluate_checkpoint(apply_changes(configs.get_config("smoke"), changes),
                                 workdir, None)
    assert result["step"] == steps and result["top1"] > 0.3
