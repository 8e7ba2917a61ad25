"""Config validation: every mistake a run config can make is reported as one line before any
device work or compilation starts.

The schema is `zoo.training.schema.base_config(config.task)`: the shared fields plus the subtree
of the config's task (`config.lm`, `config.views`, ...; an unregistered task is reported
first). A key it does not have is a typo (a subtree of another task included), a value of
another type is a mistake (the only free-form subtree is `model.overrides`, which the model
builder checks). After the schema come the values, then their fit to the devices at hand
(mesh shape, batch divisibility), then the model (built abstractly, so a patch size that does
not divide the image fails here) and the data paths.
"""
from __future__ import annotations

import math
from typing import Any

import ml_collections
from flax import nnx

import zoo
from kernels_pallas import context_parallel
from kernels_pallas.api import IMPLS
from kernels_pallas.sharding import ACTIVATION_AXES
from zoo.axes import LOGICAL_AXES
from zoo.training import ema, init_from, mixup, optim, pipeline, schema, tasks
from zoo.training.errors import ConfigError
from zoo.training.mesh import resolve_mesh_shape

COMPUTE_DTYPES = ("float32", "bfloat16")
PARAM_DTYPES = ("float32", "bfloat16")
_FREE_FORM = ("model.overrides", "optimizer.groups", "init_from.overrides")


def _fail(path: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config.{path}={value!r} is invalid; allowed: {allowed}")


def _type_ok(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return True


def check_schema(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
                 prefix: str = "") -> None:
    """Unknown keys, missing keys and wrong types, recursively against `reference`."""
    for key in config.keys():
        path = prefix + key
        if key not in reference:
            owners = [] if prefix else [name for name in tasks.list_tasks()
                                        if tasks.task_class(name).config_key == key]
            owner = (f" (the subtree of task {owners[0]!r}; config.task="
                     f"{config.get('task')!r})") if owners else ""
            raise ConfigError(f"config.{path} is not a known config field{owner}; allowed keys "
                              f"here: {sorted(reference.keys())}")
        default, value = reference[key], config[key]
        if path in _FREE_FORM:
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                _fail(path, value, "a ConfigDict of builder keyword arguments")
            continue
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                _fail(path, value, f"a ConfigDict with keys {sorted(default.keys())}")
            check_schema(value, default, path + ".")
        elif not _type_ok(default, value):
            kind = "tuple" if isinstance(default, (tuple, list)) else type(default).__name__
            raise ConfigError(f"config.{path}={value!r} has type {type(value).__name__}; "
                              f"expected {kind} (like the default {default!r})")
    missing = sorted(set(reference.keys()) - set(config.keys()))
    if missing:
        raise ConfigError(f"config.{prefix}{missing[0]} is missing (the schema in "
                          f"zoo/training/schema.py requires it)")


def _get(config, path: str) -> Any:
    for key in path.split("."):
        config = config[key]
    return config


def _check_values(c) -> None:
    for path in ("total_steps", "batch_size", "grad_accum_steps", "checkpoint_every",
                 "keep_checkpoints", "log_every", "eval.batch_size"):
        value = _get(c, path)
        if value < 1:
            _fail(path, value, "an integer >= 1")
    for path, value in (("eval_every", c.eval_every), ("eval.num_batches", c.eval.num_batches),
                        ("seed", c.seed), ("data.worker_count", c.data.worker_count)):
        if value < 0:
            _fail(path, value, "an integer >= 0")
    if c.precision.compute_dtype not in COMPUTE_DTYPES:
        _fail("precision.compute_dtype", c.precision.compute_dtype, f"one of {COMPUTE_DTYPES}")
    if c.precision.param_dtype not in PARAM_DTYPES:
        _fail("precision.param_dtype", c.precision.param_dtype, f"one of {PARAM_DTYPES}")
    for key in ("dtype", "param_dtype"):
        if key in c.model.overrides:
            raise ConfigError(f"config.model.overrides.{key} is set by the loop; use "
                              f"config.precision.{'compute_dtype' if key == 'dtype' else key}")
    if "attn_impl" in c.model.overrides:
        raise ConfigError("config.model.overrides.attn_impl is set by the loop; use "
                          "config.model.attn_impl")
    if c.model.attn_impl not in IMPLS:
        _fail("model.attn_impl", c.model.attn_impl, f"one of {IMPLS}")
    if not c.model.name:
        _fail("model.name", c.model.name, "a registered model name (zoo.list_models())")
    profile = tuple(c.logging.profile_steps)
    if profile and (len(profile) != 2 or not all(isinstance(s, int) for s in profile)
                    or not 1 <= profile[0] <= profile[1]):
        _fail("logging.profile_steps", profile, "() or (first, last) with 1 <= first <= last")


def _check_mesh(c, num_devices: int) -> tuple[int, ...]:
    axes, shape = tuple(c.mesh_axes), tuple(c.mesh_shape)
    if not axes or not all(isinstance(a, str) and a for a in axes) or len(set(axes)) != len(axes):
        _fail("mesh_axes", axes, "a tuple of distinct non-empty axis names")
    if len(shape) != len(axes) or not all(isinstance(s, int) and (s >= 1 or s == -1)
                                          for s in shape) or shape.count(-1) > 1:
        _fail("mesh_shape", shape, f"{len(axes)} positive integers matching mesh_axes={axes}, "
                                   f"at most one of them -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape and num_devices % known:
        _fail("mesh_shape", shape, f"fixed sizes whose product ({known}) divides the "
                                   f"{num_devices} available devices")
    if -1 not in shape and known != num_devices:
        _fail("mesh_shape", shape, f"a shape whose product equals the {num_devices} available "
                                   f"devices (or use one -1)")
    resolved = resolve_mesh_shape(shape, num_devices)
    data_axes = tuple(c.data_axes)
    unknown = [a for a in data_axes if a not in axes]
    if not data_axes or unknown:
        _fail("data_axes", data_axes, f"a non-empty tuple of mesh axes from {axes}")
    names = sorted(LOGICAL_AXES) + sorted(ACTIVATION_AXES)
    for rule in c.logical_axis_rules:
        if (not isinstance(rule, (tuple, list)) or len(rule) != 2
                or not isinstance(rule[0], str)):
            _fail("logical_axis_rules", rule, "(logical name, mesh axis | tuple of axes | None)")
        if rule[0] not in names:  # a typo would silently leave its dimension unsplit
            raise ConfigError(f"config.logical_axis_rules entry {tuple(rule)!r} names logical "
                              f"axis {rule[0]!r}; allowed: {names}")
        target = rule[1]
        targets = () if target is None else (target,) if isinstance(target, str) else target
        if not isinstance(targets, (tuple, list)) or any(t not in axes for t in targets):
            raise ConfigError(f"config.logical_axis_rules entry {tuple(rule)!r} names mesh "
                              f"axis {target!r}; allowed: None or axes of mesh_axes={axes}")
    _check_sequence_axis(c, dict(zip(axes, resolved)))
    return resolved


def _check_sequence_axis(c, sizes: dict[str, int]) -> None:
    cp = c.context_parallel
    if cp.strategy not in context_parallel.STRATEGIES:
        _fail("context_parallel.strategy", cp.strategy,
              f"one of {context_parallel.STRATEGIES}")
    if not isinstance(cp.load_balance, bool):
        _fail("context_parallel.load_balance", cp.load_balance, "True or False")
    if sizes.get("sequence", 1) == 1:
        return
    if "sequence" in c.data_axes:
        _fail("data_axes", tuple(c.data_axes), "data-parallel axes without 'sequence' (the "
                                               "sequence axis splits tokens, not examples)")
    length_rules = [rule for rule in c.logical_axis_rules if rule[0] == "activation_length"]
    target = length_rules[0][1] if length_rules else None
    targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    if "sequence" not in targets:
        raise ConfigError(
                f"config.mesh_shape gives the 'sequence' axis {sizes['sequence']} devices, but "
                f"no logical_axis_rules entry maps 'activation_length' to it (first rule: "
                f"{length_rules[0] if length_rules else None}), so those devices would repeat "
                f"the same work; add ('activation_length', 'sequence') before other "
                f"activation_length rules (configs.common.with_context_parallelism does)")


def _check_batch(c, mesh_shape: tuple[int, ...], num_processes: int, *,
                 training: bool) -> None:
    sizes = dict(zip(c.mesh_axes, mesh_shape))
    shards = math.prod(sizes[a] for a in c.data_axes)
    micro = shards * c.grad_accum_steps
    if training and c.batch_size % micro:
        raise ConfigError(
                f"config.batch_size={c.batch_size} must be divisible by the data-parallel size "
                f"({shards} = product of data_axes {tuple(c.data_axes)} sizes) times "
                f"grad_accum_steps ({c.grad_accum_steps}) = {micro}")
    if training and c.batch_size % num_processes:
        _fail("batch_size", c.batch_size, f"a multiple of the {num_processes} processes")
    if c.eval.batch_size % math.lcm(shards, num_processes):
        _fail("eval.batch_size", c.eval.batch_size,
              f"a multiple of the data-parallel size {shards} and of the {num_processes} "
              f"processes")


def model_kwargs(config) -> dict[str, Any]:
    """Builder keyword arguments: the config's overrides plus the precision settings."""
    overrides = config.model.overrides
    kwargs = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
    kwargs["dtype"] = config.precision.compute_dtype
    kwargs["param_dtype"] = config.precision.param_dtype
    kwargs["attn_impl"] = config.model.attn_impl
    return kwargs


def _check_model(c) -> None:
    if c.model.name not in zoo.list_models():
        _fail("model.name", c.model.name, f"one of {zoo.list_models()}")
    kwargs = model_kwargs(c)
    try:
        nnx.eval_shape(lambda: zoo.create_model(c.model.name, rngs=nnx.Rngs(0), **kwargs))
    except (ValueError, TypeError) as e:
        detail = " ".join(str(e).split())
        raise ConfigError(f"config.model: {c.model.name} with overrides "
                          f"{dict(c.model.overrides)} cannot be built: {detail}") from None


def _schema(config) -> ml_collections.ConfigDict:
    """The schema of `config`'s task: `schema.base_config(config.task)`. An unregistered task
    is a ConfigError here; a missing or non-string task falls back to the default schema, which
    check_schema then reports as missing or of the wrong type."""
    task = config.get("task")
    if not isinstance(task, str):
        return schema.base_config()
    tasks.task_class(task)  # the one-line "is not a registered task" error
    return schema.base_config(task)


def validate_config(config, *, num_devices: int, num_processes: int = 1,
                    training: bool = True) -> tuple[int, ...]:
    """Raises ConfigError for the first problem found; returns the resolved mesh shape.

    `training=False` (eval.py) skips the train-batch divisibility checks, which concern the
    mesh the run was trained on, not the devices evaluating it.
    """
    check_schema(config, _schema(config))
    _check_values(config)
    mesh_shape = _check_mesh(config, num_devices)
    _check_batch(config, mesh_shape, num_processes, training=training)

    task = tasks.get_task(config)
    task.check_config(config)
    _check_model(config)

    try:
        optim.validate_optimizer_config(config)
        ema.validate(config)
        init_from.validate(config)
        mixup.validate(config)
        pipeline.validate_data_config(config, task, process_count=num_processes)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(" ".join(str(e).split())) from None
    return mesh_shape
