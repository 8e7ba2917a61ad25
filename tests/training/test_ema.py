"""EMA of the weights (zoo/training/ema.py): the update rule, its place in the train state, bit-exact
resume with it, evaluation of the averaged weights, and switching it on for an existing run."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from training_helpers import goodput_figures, tiny_config
from zoo.training import checkpoint as ckpt_lib
from zoo.training import ema as ema_lib
from zoo.training import state as state_lib
from zoo.training import trainer
from zoo.training.config import validate_config
from zoo.training.errors import ConfigError
from zoo.training.evaluate import evaluate_checkpoint


def test_update_blends_floats_and_copies_integers():
    ema = {"w": jnp.full((3,), 1.0), "bf": jnp.full((2,), 1.0, jnp.bfloat16),
           "count": jnp.array(3, jnp.int32)}
    model = {"w": jnp.full((3,), 3.0), "bf": jnp.full((2,), 3.0, jnp.bfloat16),
             "count": jnp.array(7, jnp.int32)}
    out = ema_lib.update(ema, model, jnp.float32(0.75))
    np.testing.assert_allclose(out["w"], 1.5)
    assert out["bf"].dtype == jnp.bfloat16 and float(out["bf"][0]) == 1.5
    assert int(out["count"]) == 7


def test_decay_warmup_follows_timm():
    config = tiny_config(**{"ema.decay": 0.999, "ema.warmup": True})
    assert float(ema_lib.decay_at(config, 0)) == pytest.approx(0.1)
    assert float(ema_lib.decay_at(config, 90)) == pytest.approx(0.91)
    assert float(ema_lib.decay_at(config, 10 ** 6)) == pytest.approx(0.999)
    config.ema.warmup = False
    assert float(ema_lib.decay_at(config, 0)) == pytest.approx(0.999)


def test_bad_decay_is_a_config_error():
    with pytest.raises(ConfigError, match=r"config.ema.decay=1.5 is invalid; allowed: 0 \(off\)"):
        validate_config(tiny_config(**{"ema.decay": 1.5}), num_devices=8)


def _run(workdir, total_steps, ema_decay=0.5, **changes):
    config = tiny_config(**{"ema.decay": ema_decay, "total_steps": total_steps,
                            "checkpoint_every": 2, "eval_every": 0,
                            "async_checkpointing": False, **changes})
    trainer.train_and_evaluate(config, str(workdir), profile_steps=None)
    return config


def _restore(config, workdir, subtree, step=None):
    skeleton = state_lib.ModelSkeleton(config)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          skeleton.abstract_pure())
    return ckpt_lib.restore_model_only(os.path.join(workdir, "checkpoints"), target, step,
                                       subtree=subtree)[1]


def _last_train_record(workdir) -> dict:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "train/loss" in r][-1]


def test_ema_checkpoints_resumes_bit_exactly_and_is_evaluated(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    config = _run(straight, 4)
    _run(resumed, 2)
    _run(resumed, 4)
    ema_a, ema_b = _restore(config, straight, "ema"), _restore(config, resumed, "ema")
    model = _restore(config, straight, "model")
    for (path, a), b, m in zip(jax.tree_util.tree_leaves_with_path(ema_a),
                               jax.tree.leaves(ema_b), jax.tree.leaves(model)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    differs = [not np.array_equal(a, m) for a, m in zip(jax.tree.leaves(ema_a),
                                                         jax.tree.leaves(model))]
    assert sum(differs) > len(differs) // 2, "the average equals the model: no averaging"
    # Goodput of the last record (step 4): the straight run has saved step 2 (synchronously)
    # and found nothing to restore; the resumed run measured its own, real, restore.
    straight_goodput = goodput_figures(_last_train_record(straight))
    resumed_goodput = goodput_figures(_last_train_record(resumed))
    assert straight_goodput["checkpoint_save_s"] > 0
    assert (resumed_goodput["checkpoint_restore_s"]
            > straight_goodput["checkpoint_restore_s"]), (straight_goodput, resumed_goodput)
    result = evaluate_checkpoint(config, str(straight), None)
    assert result["step"] == 4 and "ema" in result
    assert set(result["ema"]) == set(result) - {"step", "ema"}


def test_ema_switched_on_for_a_run_without_it_starts_from_the_model(tmp_path, caplog):
    _run(tmp_path, 2, ema_decay=0.0)
    config = _run(tmp_path, 4, ema_decay=0.5)
    assert "has no EMA weights" in caplog.text
    ema, model = _restore(config, tmp_path, "ema"), _restore(config, tmp_path, "model")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ema))
    assert any(not np.array_equal(a, m) for a, m in zip(jax.tree.leaves(ema),
                                                         jax.tree.leaves(model)))
