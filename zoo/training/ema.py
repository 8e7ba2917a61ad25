"""Exponential moving average of the model's variables (`config.ema`), as timm's ModelEmaV3.

    ema <- d * ema + (1 - d) * model            after every optimizer step
    d    = ema.decay, or min(ema.decay, (1 + step) / (10 + step)) with ema.warmup

The average covers every floating-point variable of the model, BatchNorm statistics included
(timm averages the whole state dict); integer variables are copied. It lives in the train state
as `state["ema"]`, a pure dict shaped and sharded like `state["model"]`, so it is checkpointed
and restored with the rest and costs one extra copy of the variables per device shard. The
loop evaluates both the model and its average (`eval_ema/...` metrics); eval.py does the same
(`"ema"` in its result).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def enabled(config) -> bool:
    return float(config.ema.decay) > 0.0


def validate(config) -> None:
    """ValueError naming the field for an unusable `config.ema`."""
    decay = float(config.ema.decay)
    if not (math.isfinite(decay) and 0.0 <= decay < 1.0):
        raise ValueError(f"config.ema.decay={config.ema.decay!r} is invalid; allowed: 0 (off) "
                         f"or a number in (0, 1), e.g. 0.9998 (timm)")


def decay_at(config, step):
    """The decay applied after update number `step` (0-based; a traced int is fine)."""
    decay = jnp.float32(config.ema.decay)
    if config.ema.warmup:
        step = jnp.asarray(step, jnp.float32)
        decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return decay


def update(ema: dict, model: dict, decay) -> dict:
    """One EMA step over matching pure-dict trees."""
    def blend(average, value):
        if not jnp.issubdtype(value.dtype, jnp.floating):
            return value
        mixed = (decay * average.astype(jnp.float32)
                 + (1.0 - decay) * value.astype(jnp.float32))
        return mixed.astype(average.dtype)

    return jax.tree.map(blend, ema, model)
