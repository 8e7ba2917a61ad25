"""Tasks: what a model is trained to do, separate from the loop that trains it.

A task owns both halves of what differs between projects:
  * the learning half: loss, training metrics, evaluation metrics (exact over a padded eval set
    through the batch "mask") and the shapes of the model inputs;
  * the data half: which `config.data.source` values it reads, how it opens a split
    (random access to raw examples), how an example becomes arrays (a picklable preparer that
    grain may run in worker processes), and the per-example shapes of a batch;
  * its own config subtree: the fields only it reads live in `config.<config_key>` (schema and
    defaults from `default_config()`), which `configs.common.base_config(task)` adds, so the
    shared `config.data` holds only what every task may read.
The loop (zoo/training/trainer.py) and the input pipeline (zoo/training/pipeline.py) call only
the methods of `Task`. A new task is a `@register_task` class in a new module of zoo/tasks/
(found there on the first lookup), with its data beside it; classification lives in the
platform (zoo/training/classification.py).

Eval metrics are computed as per-batch sums (weighted by the mask) and divided once at the end,
so the result does not depend on the batch size or on padding.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx

from zoo.training.errors import ConfigError

_TASKS: dict[str, type["Task"]] = {}

# The platform's own task module; every module of the zoo.tasks package registers one more.
# They are imported on first lookup, so importing zoo.training imports no project.
_PLATFORM_TASK_MODULES: tuple[str, ...] = ("zoo.training.classification",)
_PROJECT_PACKAGE = "zoo.tasks"


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
    package = importlib.import_module(_PROJECT_PACKAGE)
    projects = sorted(f"{_PROJECT_PACKAGE}.{m.name}"
                      for m in pkgutil.iter_modules(package.__path__) if not m.ispkg)
    for module in _PLATFORM_TASK_MODULES + tuple(projects):
        importlib.import_module(module)  # a broken project fails here, loudly, by name


def list_tasks() -> list[str]:
    _import_task_modules()
    return sorted(_TASKS)


def task_class(name: str) -> type["Task"]:
    """The registered class of task `name`."""
    _import_task_modules()
    if name not in _TASKS:
        raise ConfigError(f"config.task={name!r} is not a registered task; allowed: "
                          f"{sorted(_TASKS)}")
    return _TASKS[name]


def get_task(config) -> "Task":
    """The task named by `config.task`, configured from `config`."""
    return task_class(config.task)(config)


class Task:
    """Interface between the loop, the input pipeline and what is being learned.

    Batches are dicts of arrays; `model` follows the zoo calling convention
    `model(x, *, train, rngs)`. Methods that take a model run inside `jax.jit`; the data methods
    run on the host, in the main process or in grain workers.
    """

    name: str = ""
    # The config.data.source values this task's data half reads.
    sources: tuple[str, ...] = ()
    # The options `write_samples` takes (the sampling CLIs pass these flags); () = no samples.
    sample_options: tuple[str, ...] = ()
    # The name of this task's own config subtree (config.<config_key>), whose schema and
    # defaults are `default_config()`; None = the task reads only the shared fields.
    config_key: str | None = None

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict | None:
        """The fields of config.<config_key> with their defaults (documented inline, like
        zoo/training/schema.py), or None for a task without a subtree."""
        return None

    def __init__(self, config):
        self.config = config

    # --- the learning half -------------------------------------------------------------------

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

    def check_sample_options(self, **options) -> None:
        """Raises ValueError for sampling options `write_samples` cannot use (called before the
        checkpoint is restored)."""

    def write_samples(self, model: nnx.Module, workdir: str, step: int,
                      **options) -> dict[str, Any]:
        """Samples or renders from `model` into files in `workdir` whose names carry `step`;
        returns a summary (paths, scores; text samples under "texts"). For the sampling
        command lines, and for periodic evaluators during training."""
        raise NotImplementedError(f"task {self.name!r} writes no samples")

    # --- the data half -----------------------------------------------------------------------

    def check_data(self, config) -> None:
        """Raises ValueError (naming the config field) for data settings this task cannot
        read; the pipeline has checked `config.data.source` against `sources` already."""

    def open_split(self, config, split: str) -> Any:
        """Random-access source (len + getitem) of the raw examples of `split`."""
        raise NotImplementedError

    def make_preparer(self, config) -> Callable[[Mapping[str, Any], Any],
                                                 dict[str, np.ndarray]]:
        """A picklable callable (raw example, numpy Generator or None at eval) -> dict of
        numpy arrays, one per batch key, with the shapes of `example_spec`."""
        raise NotImplementedError

    def example_spec(self, config) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Batch key -> (per-example shape, numpy dtype)."""
        raise NotImplementedError
