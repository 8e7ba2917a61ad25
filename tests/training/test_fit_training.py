"""configs/fit.py: all three FIT heads train through the real loop with falling loss; the
denoiser's checkpoint samples a PNG grid through sample.py."""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys

import pytest

from training_helpers import apply_changes
from zoo.training import config as config_lib, optim
from zoo.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
fit_configs = importlib.import_module("configs.fit")


@pytest.mark.parametrize("arg", ["encoder", "variant=encoder,data=image_folder", "ar",
                                 "denoiser"])
def test_full_variants_build(arg):
    c = fit_configs.get_config(arg)
    config_lib._check_model(c)  # abstract build with the overrides (no data needed)
    optim.validate_optimizer_config(c)


@pytest.mark.parametrize("variant,drop", [("encoder_smoke", 0.5), ("ar_smoke", 0.3),
                                          ("denoiser_smoke", 0.3)])
def test_smoke_variant_trains_with_falling_loss(variant, drop, tmp_path):

    config = apply_changes(fit_configs.get_config(variant), {
            "total_steps": 40, "checkpoint_every": 40, "eval_every": 40,
            "logging.progress_bar": False, "logging.tensorboard": False})
    config_lib.validate_config(config, num_devices=1)
    workdir = str(tmp_path)
    trainer.train_and_evaluate(config, workdir, profile_steps=None)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    # The LM's first logged loss (step 10) has already left ln(256) = 5.55, the uniform start.
    start = math.log(256) if variant == "ar_smoke" else losses[0]
    assert losses[-1] < (1 - drop) * start, losses
    assert any("eval/loss" in r for r in records)
    if variant != "denoiser_smoke":
        return
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    done = subprocess.run(
            [sys.executable, "sample.py", "--config", "configs/fit.py:denoiser_smoke",
             "--workdir", workdir, "--num_samples", "4", "--steps", "4",
             "--config.total_steps=40"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from PIL import Image
    grid = Image.open(os.path.join(workdir, "samples_40.png"))
    assert grid.size == (4 * 4 * 18, 4 * 18)  # 4 images of 16 px + 2 px gutters, x4 upscale
