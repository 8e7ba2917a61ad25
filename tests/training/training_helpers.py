"""Shared pieces of the training tests: a tiny ViT config and deterministic synthetic batches.

The tiny model (width 32, one block, 16x16 images in 4x4 patches) keeps every compile to a few
seconds on a 2-core CPU while still exercising attention, MLP, norms, a class token and a head,
i.e. every logical axis the rules shard.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common

IMAGE_SIZE = 16
NUM_CLASSES = 10
TINY_OVERRIDES = dict(image_size=IMAGE_SIZE, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                      num_classes=NUM_CLASSES)


def apply_changes(config: ml_collections.ConfigDict, changes) -> ml_collections.ConfigDict:
    """Sets `changes` given as dotted keys ("data.augment": "none") on `config`; returns it."""
    for dotted, value in changes.items():
        target = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            target = target[key]
        target[leaf] = value
    return config


def tiny_config(**changes) -> ml_collections.ConfigDict:
    """base_config() with the tiny ViT on generated data; `changes` as dotted keys."""
    c = common.base_config()
    c.model.name = "vit_ti16"
    c.model.overrides = ml_collections.ConfigDict(dict(TINY_OVERRIDES))
    c.data.image_size = IMAGE_SIZE
    c.data.num_classes = NUM_CLASSES
    c.data.num_train_examples = 256
    c.data.num_eval_examples = 64
    c.batch_size = 16
    c.eval.batch_size = 16
    c.total_steps = 4
    c.schedule.warmup_steps = 1
    c.logging.progress_bar = False
    c.logging.tensorboard = False
    return apply_changes(c, changes)


def cli_overrides(**changes) -> list[str]:
    """`--config.x=y` flags turning configs/vit.py:smoke into the tiny run, plus `changes`."""
    flags = [f"--config.model.overrides.{k}={v}" for k, v in TINY_OVERRIDES.items()]
    base = {"data.image_size": IMAGE_SIZE, "data.num_train_examples": 256,
            "data.num_eval_examples": 64, "batch_size": 16, "eval.batch_size": 16,
            "schedule.warmup_steps": 2, "logging.progress_bar": False,
            "logging.tensorboard": False}
    base.update(changes)
    flags += [f"--config.{k}={v}" for k, v in base.items()]
    return flags


def synthetic_batch(step: int, batch_size: int = 16, *, with_mask: bool = False) -> dict:
    """A learnable batch (label-dependent mean) that depends only on `step`."""
    rng = np.random.default_rng(1000 + step)
    labels = rng.integers(0, NUM_CLASSES, size=batch_size).astype(np.int32)
    images = rng.normal(size=(batch_size, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    images += labels[:, None, None, None].astype(np.float32) / NUM_CLASSES
    batch = {"image": images, "label": labels}
    if with_mask:
        batch["mask"] = np.ones((batch_size,), np.float32)
    return batch


def put(batch: dict, sharding) -> dict:
    return {k: jax.device_put(jnp.asarray(v), sharding) for k, v in batch.items()}


def goodput_figures(record: dict) -> dict:
    """The `perf/goodput/...` figures of one train record of metrics.jsonl (the prefix dropped),
    after checking what holds for every record: all kinds present and non-negative, and the
    goodput plus the measured badput fractions at most 1 (they are disjoint spans of the wall
    clock), and with "other" (the rest) exactly 1."""
    import pytest

    from zoo.training import goodput

    figures = {k[len(goodput.PREFIX):]: v for k, v in record.items()
               if k.startswith(goodput.PREFIX)}
    kinds = (*goodput.KINDS, "other")
    expected = {"wall_s", "step_s", "fraction"} | {f"{kind}_{unit}" for kind in kinds
                                                   for unit in ("s", "fraction")}
    assert set(figures) == expected, sorted(figures)
    assert all(v >= 0 for v in figures.values()), figures
    measured = [figures["fraction"]] + [figures[f"{kind}_fraction"] for kind in goodput.KINDS]
    assert sum(measured) <= 1 + 1e-6, figures
    assert sum(measured) + figures["other_fraction"] == pytest.approx(1.0, abs=1e-6), figures
    assert 0 < figures["fraction"] < 1 and figures["compile_s"] > 0, figures
    return figures
