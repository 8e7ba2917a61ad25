"""Fast eager initialisation for `zoo.create_model`, bit-identical to plain eager jax.

Why: built eagerly, a model's initialisers compile one small XLA program per distinct parameter
shape (a truncated normal, then the multiply by its standard deviation). On a 2-core CPU that is
~150 compilations and 7-10 s for a Swin-T, against 0.6 s for timm's torch init. One `jit` over the
whole builder is no better: XLA then compiles one large program for as long.

How: with jax's partitionable threefry (the default since jax 0.5), element i of
`random.truncated_normal / normal / uniform(key, shape)` depends only on the key and on i, so the
draw for any shape is a prefix of the draw for a longer flat shape. Inside `host_random()`:
  - those three functions draw a flat size bucket (powers of four), compiled once per bucket,
    bounds and dtype, and shared by every model of the process;
  - the prefix comes back as a host (numpy) array, so that the initialisers' `* stddev` runs in
    numpy (IEEE float multiply, the same bits as XLA's) instead of compiling per shape;
  - `to_device(model)` then puts every host array on the default device (no compilation).
Anything else (a traced key, an explicit sharding, array bounds) goes to jax unchanged.
`tests/models/test_fast_init.py` checks every registered model bit for bit against plain eager.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading

import jax
import jax._src.random as _jax_random_impl
import jax.numpy as jnp
import numpy as np
from flax import nnx

_KINDS = ("truncated_normal", "normal", "uniform")
_ORIGINAL = {kind: getattr(jax.random, kind) for kind in _KINDS}
_LOCK = threading.RLock()
_MIN_BUCKET_LOG2 = 12
# Larger draws stay on the device: there the random draw itself, not the compilation, is the
# cost, and the host round trip (numpy multiply, copy back) would add to it. Their few shapes
# (embeddings, the widest projections) repeat across layers, so they compile rarely.
_MAX_HOST_DRAW = 1 << 21


def _bucket(n: int) -> int:
    """The flat size drawn for n elements. Small draws share few programs (powers of four, at
    least 4096, where compilation dominates); large ones waste at most 1/8 of the draw (sixteen
    steps per octave above 2**20, where the threefry and erfinv work dominates)."""
    log2 = max(_MIN_BUCKET_LOG2, (n - 1).bit_length())
    if log2 <= 20:
        return 1 << (log2 + log2 % 2)
    step = 1 << (log2 - 4)
    return -(-n // step) * step


@functools.lru_cache(maxsize=None)
def _draw_program(kind: str, size: int, dtype: np.dtype, bounds: tuple):
    if kind == "truncated_normal":
        return jax.jit(lambda key: _ORIGINAL[kind](key, *bounds, (size,), dtype))
    if kind == "normal":
        return jax.jit(lambda key: _ORIGINAL[kind](key, (size,), dtype))
    return jax.jit(lambda key: _ORIGINAL[kind](key, (size,), dtype, *bounds))


class _HostArray(np.ndarray):
    """A drawn prefix on the host (or a scaled one). Multiplying it by a scalar (the initialisers' standard
    deviation: a Python number or a concrete 0-d jax array) stays in numpy: an IEEE float
    multiply gives the same bits as XLA's. Every other arithmetic operator goes to jax as it would
    without `host_random`: XLA may compute `x / c` as `x * (1 / c)`, which numpy does not."""

    def _scale(self, other):
        if isinstance(other, jax.Array) and other.ndim == 0 and not isinstance(
                other, jax.core.Tracer):
            return np.multiply(self.view(np.ndarray), np.asarray(other)).view(_HostArray)
        if _is_scalar(other) or (isinstance(other, np.generic) and other.ndim == 0):
            return np.multiply(self.view(np.ndarray), other).view(_HostArray)
        return jnp.asarray(self.view(np.ndarray)) * other

    __mul__ = __rmul__ = _scale

    def _jax(self):
        return jnp.asarray(self.view(np.ndarray))

    def __truediv__(self, other):
        return self._jax() / other

    def __rtruediv__(self, other):
        return other / self._jax()

    def __add__(self, other):
        return self._jax() + other

    def __radd__(self, other):
        return other + self._jax()

    def __sub__(self, other):
        return self._jax() - other

    def __rsub__(self, other):
        return other - self._jax()

    def __neg__(self):
        return -self._jax()


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _host_draw(kind: str, key, shape, dtype, bounds: tuple, out_sharding):
    dtype = jnp.dtype(float if dtype is None else dtype)
    if (out_sharding is not None or shape is None or isinstance(key, jax.core.Tracer)
            or not all(_is_scalar(b) for b in bounds)
            or not all(isinstance(d, (int, np.integer)) for d in shape)
            or not jnp.issubdtype(dtype, jnp.floating)
            or not isinstance(key, jax.Array) or key.shape != ()
            or not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)):
        return None
    shape = tuple(int(d) for d in shape)
    count = math.prod(shape)
    if count == 0 or count > _MAX_HOST_DRAW:
        return None
    flat = _draw_program(kind, _bucket(count), dtype, tuple(float(b) for b in bounds))(key)
    return np.asarray(flat)[:count].reshape(shape).view(_HostArray)


def _truncated_normal(key, lower, upper, shape=None, dtype=None, *, out_sharding=None):
    drawn = _host_draw("truncated_normal", key, shape, dtype, (lower, upper), out_sharding)
    if drawn is None:
        return _ORIGINAL["truncated_normal"](key, lower, upper, shape, dtype,
                                             out_sharding=out_sharding)
    return drawn


def _normal(key, shape=(), dtype=None, *, out_sharding=None):
    drawn = _host_draw("normal", key, shape, dtype, (), out_sharding)
    if drawn is None:
        return _ORIGINAL["normal"](key, shape, dtype, out_sharding=out_sharding)
    return drawn


def _uniform(key, shape=(), dtype=None, minval=0.0, maxval=1.0, *, out_sharding=None):
    drawn = _host_draw("uniform", key, shape, dtype, (minval, maxval), out_sharding)
    if drawn is None:
        return _ORIGINAL["uniform"](key, shape, dtype, minval, maxval, out_sharding=out_sharding)
    return drawn


_PATCHES = {"truncated_normal": _truncated_normal, "normal": _normal, "uniform": _uniform}


@contextlib.contextmanager
def host_random():
    """Within the block, concrete-key draws of the three distributions come back as host arrays
    from bucketed programs (see the module docstring). Initialisers look the functions up on
    `jax._src.random` (jax.nn.initializers) or `jax.random` (user code): both are patched, under
    a lock, and restored on exit."""
    with _LOCK:
        saved = [(module, kind, getattr(module, kind))
                 for module in (jax.random, _jax_random_impl) for kind in _KINDS]
        try:
            for module, kind, _ in saved:
                setattr(module, kind, _PATCHES[kind])
            yield
        finally:
            for module, kind, original in saved:
                setattr(module, kind, original)


def to_device(model: nnx.Module) -> nnx.Module:
    """Puts every host (numpy) array among `model`'s variables on the default device."""
    state = nnx.state(model)
    moved = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, state)
    nnx.update(model, moved)
    return model
