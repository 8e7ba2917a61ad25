"""configs/ssa.py through the real loop, and sample.py on the resulting checkpoint."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

from training_helpers import apply_changes
from zoo.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ssa_configs = importlib.import_module("configs.ssa")


def smoke(**changes):
    c = ssa_configs.get_config("smoke")
    return apply_changes(c, {"total_steps": 60, "checkpoint_every": 60, "eval_every": 60,
                             "log_every": 10, "logging.tensorboard": False, **changes})


@pytest.mark.parametrize("arg,expected", [
        ("smoke", dict(ssa_query_position=True, ssa_query_token=True, ssa_value=True,
                       ssa_weight_sharing=True)),
        ("variant=ablation,ssa=off", dict(ssa_query_position=False, ssa_query_token=False,
                                          ssa_value=False)),
        ("variant=ablation,ssa=position", dict(ssa_query_position=True,
                                               ssa_query_token=False, ssa_value=False)),
        ("gpt2_small,ssa=unshared", dict(ssa_weight_sharing=False, vocab_size=50257)),
        ("gpt2_medium", dict(max_seq_len=1024)),
])
def test_config_variants_set_the_switches(arg, expected):
    c = ssa_configs.get_config(arg)
    assert c.task == "language_modeling"
    for key, value in expected.items():
        assert c.model.overrides[key] == value, key
    assert c.model.overrides.vocab_size == c.lm.vocab_size
    assert c.model.overrides.max_seq_len >= c.lm.seq_len


@pytest.mark.parametrize("arg,sequence,strategy", [("long_context", 8, "ring"),
                                                   ("variant=long_context,sequence=4,cp=all_to_all",
                                                    4, "all_to_all")])
def test_long_context_variant_is_context_parallel(arg, sequence, strategy):
    from zoo.training import config as config_lib
    from zoo.training import mesh as mesh_lib
    c = ssa_configs.get_config(arg)
    assert c.lm.seq_len == c.model.overrides.max_seq_len == ssa_configs.LONG_CONTEXT
    sizes = dict(zip(c.mesh_axes, c.mesh_shape))
    assert sizes["sequence"] == sequence and sizes["data"] == -1
    assert ("activation_length", "sequence") in c.logical_axis_rules
    assert c.context_parallel.strategy == strategy
    assert c.lm.seq_len % mesh_lib.sequence_chunks(c) == 0
    config_lib.check_schema(c, config_lib._schema(c))


def test_ablation_arms_differ_only_in_the_ssa_switches():
    on, off = (ssa_configs.get_config(f"variant=ablation,ssa={arm}").to_dict()
               for arm in ("on", "off"))
    switch_keys = {k for k in on["model"]["overrides"] if k.startswith("ssa_")}
    for config in (on, off):
        for key in switch_keys:
            config["model"]["overrides"].pop(key)
    assert on == off


def test_bad_option_names_the_file_and_the_allowed_values():
    with pytest.raises(ValueError, match="configs/ssa.py ssa must be one of"):
        ssa_configs.get_config("smoke,ssa=maybe")


def test_smoke_trains_with_falling_loss_evaluates_and_samples(tmp_path):
    from zoo.training.evaluate import evaluate_checkpoint

    workdir = str(tmp_path / "run")
    trainer.train_and_evaluate(smoke(), workdir, profile_steps=None)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses  # ln 256 = 5.5 at init
    result = evaluate_checkpoint(smoke(), workdir, None)
    trained_eval = [r for r in records if "eval/loss" in r][-1]
    assert result["step"] == 60
    assert result["loss"] == pytest.approx(trained_eval["eval/loss"], rel=1e-5)
    assert result["bits_per_byte"] < 4.5  # 8 bits per byte for a uniform byte model

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [sys.executable, "sample.py", "--config", "configs/ssa.py:smoke", "--workdir",
           workdir, "--prompt", "def ", "--max_new_tokens", "24", "--top_k", "5",
           "--num_samples", "2", "--config.total_steps=60"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("----- sample") == 2
    assert os.path.exists(os.path.join(workdir, "samples_60.txt"))
    samples = open(os.path.join(workdir, "samples_60.txt")).read().split("\n\n=====\n\n")
    assert all(s.startswith("def ") for s in samples)

    bad = subprocess.run(cmd[:-7] + ["--prompt_ids", "1,x"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--prompt_ids='1,x' must be comma-separated" in bad.stderr
