"""Tasks: what a model is trained to do, separate from the loop that trains it.

A task owns the loss, the training metrics, the evaluation metrics (exact over a padded eval set
through the batch "mask") and the shapes of the model inputs. The loop only calls the methods of
`Task`, so language modelling, novel-view synthesis or diffusion plug in as another
`@register_task` class, in this file or in a module listed in `_TASK_MODULES`, without touching
train.py.

Eval metrics are computed as per-batch sums (weighted by the mask) and divided once at the end,
so the result does not depend on the batch size or on padding.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.training.config import ConfigError

_TASKS: dict[str, type["Task"]] = {}

# Modules that register further tasks (imported on first lookup, as the model registry does).
_TASK_MODULES: tuple[str, ...] = ("zoo.training.lm", "zoo.training.diffusion_task",
                                   "zoo.training.multiview", "zoo.training.mae_task")


def register_task(name: str) -> Callable[[type["Task"]], type["Task"]]:
    """Class decorator registering a `Task` subclass under `name` (the value of config.task)."""

    def decorator(cls):
        if name in _TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        _TASKS[name] = cls
        cls.name = name
        return cls

    return decorator


@functools.lru_cache(maxsize=None)
def _import_task_modules() -> None:
    import importlib
    for module in _TASK_MODULES:
        importlib.import_module(module)


def list_tasks() -> list[str]:
    _import_task_modules()
    return sorted(_TASKS)


def get_task(config) -> "Task":
    """The task named by `config.task`, configured from `config`."""
    _import_task_modules()
    if config.task not in _TASKS:
        raise ConfigError(f"config.task={config.task!r} is not a registered task; allowed: "
                          f"{sorted(_TASKS)}")
    return _TASKS[config.task](config)


class Task:
    """Interface between the loop and what is being learned.

    Batches are dicts of arrays; `model` follows the zoo calling convention
    `model(x, *, train, rngs)`. Methods that take a model run inside `jax.jit`.
    """

    name: str = ""

    def __init__(self, config):
        self.config = config

    def check_config(self, config) -> None:
        """Raises ConfigError for settings this task cannot train with."""

    def input_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of the model inputs (for the model summary)."""
        raise NotImplementedError

    def loss_and_metrics(self, model: nnx.Module, batch: Mapping[str, jax.Array],
                         rngs: nnx.Rngs | None, train: bool
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean float32 loss over the batch and scalar training metrics."""
        raise NotImplementedError

    def eval_sums(self, model: nnx.Module, batch: Mapping[str, jax.Array]
                  ) -> dict[str, jax.Array]:
        """Mask-weighted sums over one eval batch; must include "count" (sum of the mask)."""
        raise NotImplementedError

    def finalize_eval(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Metrics from the sums accumulated over the whole eval set."""
        raise NotImplementedError


def _cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                   label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy in float32 (bf16 log-softmax destabilises training)."""
    logits = logits.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


@register_task("classification")
class ClassificationTask(Task):
    """Image classification: {"image": f32 [B,S,S,3], "label": int32 [B]} -> logits [B,C].

    Training loss is label-smoothed cross-entropy (config.label_smoothing); eval reports the
    plain cross-entropy, top-1 and top-5 accuracy.
    """

    def __init__(self, config):
        super().__init__(config)
        self.num_classes = int(config.data.num_classes)
        self.image_size = int(config.data.image_size)
        self.label_smoothing = float(config.label_smoothing)
        self.top_k = min(5, self.num_classes)

    def check_config(self, config) -> None:
        overrides = config.model.overrides
        if "num_classes" in overrides and overrides.num_classes != config.data.num_classes:
            raise ConfigError(
                f"config.model.overrides.num_classes={overrides.num_classes!r} must equal "
                f"config.data.num_classes={config.data.num_classes!r} for classification")
        if "image_size" in overrides and overrides.image_size != config.data.image_size:
            raise ConfigError(
                f"config.model.overrides.image_size={overrides.image_size!r} must equal "
                f"config.data.image_size={config.data.image_size!r} (the images the data "
                f"pipeline produces)")
        if not 0.0 <= config.label_smoothing < 1.0:
            raise ConfigError(f"config.label_smoothing={config.label_smoothing!r} must be in "
                              f"[0, 1)")

    def input_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        side = self.image_size
        return {"image": jax.ShapeDtypeStruct((batch_size, side, side, 3), jnp.float32)}

    def loss_and_metrics(self, model, batch, rngs, train):
        logits = model(batch["image"], train=train, rngs=rngs)
        labels = batch["label"]
        loss = jnp.mean(_cross_entropy(logits, labels, self.num_classes, self.label_smoothing))
        accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
        return loss, {"accuracy": accuracy}

    def eval_sums(self, model, batch):
        logits = model(batch["image"], train=False).astype(jnp.float32)
        labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
        _, top = jax.lax.top_k(logits, self.top_k)
        in_top_k = jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
        correct = (top[:, 0] == labels).astype(jnp.float32)
        return {
                "count": jnp.sum(mask),
                "loss": jnp.sum(mask * _cross_entropy(logits, labels, self.num_classes)),
                "top1": jnp.sum(mask * correct),
                f"top{self.top_k}": jnp.sum(mask * in_top_k),
        }

    def finalize_eval(self, sums: Mapping[str, float]) -> dict[str, Any]:
        count = sums["count"]
        if count <= 0:
            raise ValueError("the eval split produced no examples (sum of masks is 0)")
        metrics: dict[str, Any] = {k: v / count for k, v in sums.items() if k != "count"}
        metrics["count"] = int(round(count))
        return metrics
