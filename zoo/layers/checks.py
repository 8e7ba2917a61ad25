"""Argument checks shared by every model: each fails with one line naming the argument, the
value and what is allowed, before anything is built."""
from __future__ import annotations

import numbers
from typing import Any

import jax.numpy as jnp
import numpy as np

_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def canonical_dtype(dtype: Any, name: str = "dtype") -> jnp.dtype:
    """Returns `dtype` (a jnp dtype or one of the strings float32/bfloat16/float16) as a dtype."""
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name} must be one of {_DTYPE_NAMES} or a jnp floating dtype, "
                             f"got {dtype!r}")
        return jnp.dtype(dtype)
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"{name} must be one of {_DTYPE_NAMES} or a jnp floating dtype, "
                         f"got {dtype!r}")
    return resolved


def check_rate(rate: float, name: str) -> float:
    """Validates a dropout-style probability in [0, 1)."""
    if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {rate!r}")
    return float(rate)


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def int_tuple(name: str, value, length: int | None = None, minimum: int = 1) -> tuple:
    """`value` as a tuple of ints >= `minimum` (one per stage, `length` of them when given; a
    single int is then repeated)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and length:
        value = (value,) * length
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or not value:
        raise ValueError(f"{name} must be a non-empty sequence of integers >= {minimum}, got "
                         f"{value!r}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral) or item < minimum:
            raise ValueError(f"{name} must be a sequence of integers >= {minimum}, got "
                             f"{value!r}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} must have one entry per stage ({length}), got {value!r}")
    return tuple(int(v) for v in value)


def select_indices(indices, count: int, what: str) -> list[int]:
    """timm's `forward_intermediates` indices: None = all `count` blocks/stages, an int n =
    the last n, a sequence = those (negative counts from the end)."""
    if indices is None:
        return list(range(count))
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 1 <= indices <= count:
            raise ValueError(f"indices as an int takes the last n {what}s, n in [1, {count}], "
                             f"got {indices}")
        return list(range(count - indices, count))
    wanted = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count:
            raise ValueError(f"indices must be {what} indices in [-{count}, {count}), got "
                             f"{list(indices)!r}")
        wanted.append(i % count)
    return wanted


def int_pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
        return check_positive_int(value[0], name), check_positive_int(value[1], name)
    size = check_positive_int(value, name)
    return size, size
