"""Mixup/CutMix (zoo/training/mixup.py) against timm's semantics: label arithmetic, box areas,
modes, the probabilities of each op, validation, and a deterministic train step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from training_helpers import tiny_config
from zoo.training import mixup
from zoo.training.config import validate_config
from zoo.training.errors import ConfigError

C = 10


def _config(**changes):
    c = common.base_config().mixup
    for key, value in changes.items():
        c[key] = value
    return c


def _batch(batch=8, side=16, seed=0):
    images = jax.random.normal(jax.random.key(seed), (batch, side, side, 3))
    labels = jnp.arange(batch, dtype=jnp.int32) % C
    return images, labels


def test_mixup_blends_images_and_targets_with_one_lambda():
    images, labels = _batch()
    mixed, soft, lam = mixup.mix_batch(_config(mixup_alpha=0.8), jax.random.key(1), images,
                                       labels, C, 0.1)
    assert np.allclose(lam, lam[0]) and 0 < float(lam[0]) < 1
    lam0 = float(lam[0])
    np.testing.assert_allclose(mixed, lam0 * images + (1 - lam0) * images[::-1], rtol=1e-6)
    on, off = 1 - 0.1 + 0.01, 0.01
    one = jax.nn.one_hot(labels, C) * (on - off) + off
    np.testing.assert_allclose(soft, lam0 * one + (1 - lam0) * one[::-1], rtol=1e-6)
    np.testing.assert_allclose(np.sum(soft, axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("minmax", [(), (0.2, 0.8)])
def test_cutmix_lambda_is_the_unpasted_area(minmax):
    images, labels = _batch(batch=64)
    mixed, soft, lam = mixup.mix_batch(_config(cutmix_alpha=1.0, mode="elem",
                                               cutmix_minmax=minmax),
                                       jax.random.key(2), images, labels, C, 0.0)
    from_partner = np.mean(np.all(np.asarray(mixed) == np.asarray(images[::-1]), axis=-1) &
                           ~np.all(np.asarray(images) == np.asarray(images[::-1]), axis=-1),
                           axis=(1, 2))
    np.testing.assert_allclose(1 - np.asarray(lam), from_partner, atol=1e-6)
    unchanged = np.all(np.asarray(mixed) == np.asarray(images), axis=-1).mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(lam), unchanged, atol=1e-6)
    assert len(set(np.round(np.asarray(lam), 4))) > 10  # per-example boxes
    np.testing.assert_allclose(np.asarray(soft)[np.arange(64), np.asarray(labels)],
                               np.where(np.asarray(labels) == np.asarray(labels[::-1]), 1.0,
                                        np.asarray(lam)), atol=1e-6)


def test_pair_mode_shares_each_draw_between_partners():
    images, labels = _batch()
    _, _, lam = mixup.mix_batch(_config(mixup_alpha=1.0, mode="pair"), jax.random.key(3),
                                images, labels, C, 0.0)
    np.testing.assert_allclose(lam, lam[::-1])
    assert len(set(np.round(np.asarray(lam), 5))) == 4


def test_probabilities_of_each_op_match_the_config():
    """elem mode over 4096 examples: P(mixed) = prob, P(cutmix | mixed) = switch_prob, and
    Mixup's lambda ~ Beta(a, a) (mean 1/2, variance 1 / (4 (2a + 1)))."""
    n = 4096
    images = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None, None],
                              (n, 8, 8, 1))
    labels = jnp.zeros((n,), jnp.int32)
    c = _config(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6, switch_prob=0.25, mode="elem")
    mixed, _, lam = mixup.mix_batch(c, jax.random.key(4), images, labels, C, 0.0)
    mixed, images, lam = np.asarray(mixed), np.asarray(images), np.asarray(lam)
    untouched = np.all(mixed == images, axis=(1, 2, 3))
    partner = images[::-1]
    # CutMix pixels are either the image's or its partner's; Mixup pixels are neither.
    cut = ~untouched & np.all((mixed == images) | (mixed == partner), axis=(1, 2, 3))
    blended = ~untouched & ~cut
    assert abs(1 - untouched.mean() - 0.6) < 0.03
    assert abs(cut.sum() / (~untouched).sum() - 0.25) < 0.03
    a = 0.8
    assert abs(lam[blended].mean() - 0.5) < 0.03
    assert abs(lam[blended].var() - 1 / (4 * (2 * a + 1))) < 0.01


@pytest.mark.parametrize("changes,message", [
        ({"mixup.mixup_alpha": -1.0}, "config.mixup.mixup_alpha=-1.0 is invalid"),
        ({"mixup.switch_prob": 1.5}, "config.mixup.switch_prob=1.5 is invalid"),
        ({"mixup.mode": "row"}, "config.mixup.mode='row' is invalid"),
        ({"mixup.cutmix_minmax": (0.5, 0.2)}, "config.mixup.cutmix_minmax=(0.5, 0.2)"),
])
def test_bad_mixup_settings_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(tiny_config(**changes), num_devices=8)


def test_classification_loss_with_mixup_is_deterministic_in_the_step_key():
    """The task mixes with the step's `sample` stream: the same key gives the same loss (what
    bit-exact resume needs), another key another mix."""
    from flax import nnx

    import zoo
    from training_helpers import synthetic_batch
    from zoo.training import tasks

    config = tiny_config(**{"mixup.mixup_alpha": 0.8, "mixup.cutmix_alpha": 1.0,
                            "mixup.mode": "elem", "label_smoothing": 0.1})
    task = tasks.get_task(config)
    model = zoo.create_model(config.model.name, rngs=nnx.Rngs(0),
                             **config.model.overrides.to_dict())
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(0, 16).items()}

    def loss(seed):
        rngs = nnx.Rngs(dropout=seed, sample=seed + 1)
        return float(task.loss_and_metrics(model, batch, rngs, train=True)[0])

    plain = float(task.loss_and_metrics(model, batch, None, train=False)[0])
    assert loss(3) == loss(3) and loss(3) != loss(5)
    assert np.isfinite(loss(3)) and loss(3) != plain
