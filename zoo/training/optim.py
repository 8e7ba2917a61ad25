"""The optimizer and learning-rate schedule named by a config (`optimizer.*`, `schedule.*`).

    clip_by_global_norm(grad_clip_norm)            when grad_clip_norm > 0
      -> adamw | lamb | sgd(momentum, nesterov)    weight decay masked (below)
    learning rate: linear warmup, then cosine | linear | constant down to end_factor * peak

Weight decay skips parameters with ndim <= 1 (biases, norm scales) and parameters whose
'/'-joined path (e.g. "blocks/0/attn/qkv/kernel") matches a regex of `optimizer.no_decay`
(position embeddings, class tokens, lookup tables): decaying those pulls them towards zero for
no regularisation benefit. The mask is computed from whatever tree optax is given at run time
(pure dicts or nnx.State), so it always has that tree's structure.

Gradient accumulation is the train step's job (it averages micro-batch gradients before one
update), so step counts and the schedule mean the same thing for every grad_accum_steps.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

OPTIMIZERS = ("adamw", "lamb", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_variable(node) -> bool:
    return isinstance(node, nnx.Variable)


def param_path(key_path) -> str:
    """'/'-joined names of a jax key path ("blocks/0/attn/qkv/kernel"); the trailing "value"
    attribute of an nnx Variable is dropped so pure dicts and nnx.State give the same path."""
    names = [_key_name(k) for k in key_path]
    if names and names[-1] == "value" and isinstance(key_path[-1], jax.tree_util.GetAttrKey):
        names = names[:-1]
    return "/".join(names)


def _compile_patterns(patterns: Sequence[str]) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as error:
            raise ValueError(f"config.optimizer.no_decay entry {pattern!r} is not a valid regex: "
                             f"{error}") from None
    return compiled


def weight_decay_mask(params: Any, no_decay: Sequence[str]) -> Any:
    """Tree of bools like `params` (True = decayed). Leaves may be arrays, ShapeDtypeStructs or
    nnx Variables; the mask has a bool where `params` has a Variable."""
    patterns = _compile_patterns(no_decay)

    def decide(key_path, leaf) -> bool:
        shape = getattr(leaf, "shape", None)
        if shape is None or len(shape) <= 1:
            return False
        path = param_path(key_path)
        return not any(p.search(path) for p in patterns)

    return jax.tree_util.tree_map_with_path(decide, params, is_leaf=_is_variable)


def make_schedule(config) -> Callable[[Any], jax.Array]:
    """lr(step) for step = number of updates already applied (0 for the first update).

    Warmup: peak * (step + 1) / warmup_steps for step < warmup_steps, so the first update is
    not wasted at lr 0 and update `warmup_steps` runs at the peak. Then cosine or linear decay
    from the peak (at step warmup_steps) to end_factor * peak (at step total_steps), held
    afterwards; "constant" stays at the peak (end_factor unused).
    """
    s, peak = config.schedule, float(config.optimizer.learning_rate)
    if s.name not in SCHEDULES:
        raise ValueError(f"config.schedule.name={s.name!r} is invalid; allowed: {SCHEDULES}")
    total, warmup, end_factor = int(config.total_steps), int(s.warmup_steps), float(s.end_factor)
    if total < 1:
        raise ValueError(f"config.total_steps={total!r} is invalid; allowed: an integer >= 1")
    if not 0 <= warmup <= total:
        raise ValueError(f"config.schedule.warmup_steps={warmup!r} is invalid; allowed: 0 <= "
                         f"warmup_steps <= total_steps={total}")
    if not (math.isfinite(end_factor) and end_factor >= 0):
        raise ValueError(f"config.schedule.end_factor={end_factor!r} is invalid; allowed: a "
                         f"finite number >= 0")
    end = end_factor * peak
    decay_steps = max(1, total - warmup)
    name = s.name

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if name == "cosine":
            decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif name == "linear":
            decayed = peak + (end - peak) * progress
        else:
            decayed = jnp.full_like(progress, peak)
        if warmup == 0:
            return decayed
        return jnp.where(step < warmup, peak * (step + 1.0) / warmup, decayed)

    return schedule


def _check_range(field: str, value: float, low: float, high: float, *, high_open: bool = True,
                 low_open: bool = False) -> None:
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (math.isfinite(value) and ok_low and ok_high):
        interval = (("(" if low_open else "[") + f"{low}, {high}" + (")" if high_open else "]"))
        raise ValueError(f"config.optimizer.{field}={value!r} is invalid; allowed: a number in "
                         f"{interval}")


def validate_optimizer_config(config) -> None:
    """Raises ValueError naming the field for any optimizer/schedule setting make_optimizer
    cannot use (call it during config validation, before building the model)."""
    o = config.optimizer
    if o.name not in OPTIMIZERS:
        raise ValueError(f"config.optimizer.name={o.name!r} is invalid; allowed: {OPTIMIZERS}")
    _check_range("learning_rate", float(o.learning_rate), 0.0, math.inf, low_open=True)
    _check_range("weight_decay", float(o.weight_decay), 0.0, math.inf)
    _check_range("grad_clip_norm", float(o.grad_clip_norm), 0.0, math.inf)
    if o.name in ("adamw", "lamb"):
        _check_range("b1", float(o.b1), 0.0, 1.0)
        _check_range("b2", float(o.b2), 0.0, 1.0)
        _check_range("eps", float(o.eps), 0.0, math.inf, low_open=True)
    else:
        _check_range("momentum", float(o.momentum), 0.0, 1.0)
        if o.nesterov and not o.momentum:
            raise ValueError("config.optimizer.nesterov=True needs config.optimizer.momentum > 0")
    _compile_patterns(o.no_decay)
    make_schedule(config)


def make_optimizer(config, params) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
    """(optax transformation, learning-rate schedule) for config.optimizer / config.schedule.

    `params`: the trainable parameters (pure dict or nnx.State; arrays or ShapeDtypeStructs).
    Decoupled weight decay for adamw and lamb (optax: the decay is scaled by the learning
    rate); for sgd it is L2 added to the gradient before momentum.
    """
    validate_optimizer_config(config)
    o = config.optimizer
    schedule = make_schedule(config)
    no_decay = tuple(o.no_decay)
    decay_mask = weight_decay_mask(params, no_decay)
    if not any(jax.tree.leaves(decay_mask)) and float(o.weight_decay) > 0:
        # Not an error (a model of only vectors is legal), but worth knowing about.
        from absl import logging
        logging.warning("optimizer.weight_decay=%s applies to no parameter (all are 1-D or "
                        "match optimizer.no_decay=%s)", o.weight_decay, no_decay)

    def mask(tree):
        return weight_decay_mask(tree, no_decay)

    weight_decay = float(o.weight_decay)
    if o.name == "adamw":
        optimizer = optax.adamw(schedule, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                                weight_decay=weight_decay, mask=mask)
    elif o.name == "lamb":
        optimizer = optax.lamb(schedule, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                               weight_decay=weight_decay, mask=mask)
    else:
        sgd = optax.sgd(schedule, momentum=float(o.momentum) or None, nesterov=bool(o.nesterov))
        optimizer = (optax.chain(optax.add_decayed_weights(weight_decay, mask), sgd)
                     if weight_decay else sgd)
    if float(o.grad_clip_norm) > 0:
        optimizer = optax.chain(optax.clip_by_global_norm(float(o.grad_clip_norm)), optimizer)
    return optimizer, schedule
