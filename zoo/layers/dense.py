"""Token-wise layers: Linear (logical-axis kernels of any output rank), LayerNorm with float32
statistics, dropout and drop-path from call-time rngs, the transformer MLP, and the FSDP
gather helper for weights used outside a matmul."""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from zoo import axes
from zoo.axes import with_axes
from zoo.layers.checks import canonical_dtype, check_positive_int, check_rate

Initializer = Callable[..., jax.Array]

# timm's ViT init for Linear layers (see module docstring for the truncation detail).
DEFAULT_KERNEL_INIT: Initializer = nnx.initializers.truncated_normal(stddev=0.02)
ZEROS_INIT: Initializer = nnx.initializers.zeros_init()
ONES_INIT: Initializer = nnx.initializers.ones_init()


def _flattened_init(init: Initializer) -> Initializer:
    """Makes a 2-D initializer fill a kernel of shape (in, *out).

    Fan-based initializers (lecun, xavier) read fan-in/fan-out from the last two dimensions; a
    fused kernel such as (embed, 3, heads*head_dim) would give them the wrong fans. Drawing a
    (in, prod(out)) matrix and reshaping keeps the fans of the equivalent dense layer.
    """

    def flat(key, shape, dtype=jnp.float32):
        return init(key, (shape[0], math.prod(shape[1:])), dtype).reshape(shape)

    return flat


class Linear(nnx.Module):
    """y = x @ kernel + bias over the last axis of x, with logical axis names on both params.

    `out_features` may be a tuple: the kernel is then (in, *out) and the output gains those
    trailing dimensions. Fused projections use this, e.g. a qkv kernel (embed, 3, heads*head_dim)
    keeps q, k and v apart so a tensor-parallel split of the last axis splits each of them by
    heads instead of cutting across q|k|v. A torch `nn.Linear` weight W [out, in] loads as
    `W.T.reshape(in, *out)`.

    Args:
        in_features: size of the last input axis.
        out_features: int or tuple of output sizes.
        axes: logical names, one for the input axis followed by one per output axis.
        use_bias: add a bias of shape `out_features` (named by the output axes).
        kernel_init: called with the 2-D shape (in, prod(out)); see `_flattened_init`.
    """

    def __init__(self, in_features: int, out_features: int | Sequence[int], *,
                 axes: Sequence[str | None], use_bias: bool = True,
                 kernel_init: Initializer = DEFAULT_KERNEL_INIT,
                 bias_init: Initializer = ZEROS_INIT, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        out_shape = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        axes = tuple(axes)
        if len(axes) != 1 + len(out_shape):
            raise ValueError(f"axes must name the input axis and each of the {len(out_shape)} "
                             f"output axes, got {axes!r}")
        self.in_features = check_positive_int(in_features, "in_features")
        self.out_shape = tuple(check_positive_int(n, "out_features") for n in out_shape)
        self.dtype = canonical_dtype(dtype)
        param_dtype = canonical_dtype(param_dtype, "param_dtype")
        self.kernel = nnx.Param(with_axes(_flattened_init(kernel_init), axes)(
                rngs.params(), (self.in_features, *self.out_shape), param_dtype))
        self.bias = (nnx.Param(with_axes(bias_init, axes[1:])(
                rngs.params(), self.out_shape, param_dtype)) if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects inputs with last axis {self.in_features}, got "
                             f"shape {x.shape}")
        # Contract with the kernel in its stored (in, *out) shape: flattening a fused
        # (embed, 3, heads) kernel to (embed, 3*heads) would make its tensor-parallel split
        # non-contiguous, and XLA would all-gather the whole kernel to every device.
        y = jax.lax.dot_general(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                (((x.ndim - 1,), (0,)), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


XAVIER_INIT: Initializer = nnx.initializers.xavier_uniform()


def xavier_linear(in_features: int, out_features: int | Sequence[int],
                  axes: Sequence[str | None] = ("embed", "mlp"), *, dtype: Any,
                  param_dtype: Any, rngs: nnx.Rngs) -> Linear:
    """A Linear with Xavier/Glorot-uniform kernel and zero bias (the init of FIT's pix2seq
    Dense layers and NViST's timm-style blocks)."""
    return Linear(in_features, out_features, axes=axes, kernel_init=XAVIER_INIT, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis; statistics in float32, output in `dtype`.

    `eps` defaults to 1e-6 (timm ViT, big_vision, FIT, NViST); PyTorch's own default is 1e-5,
    so ports of models built on a bare `nn.LayerNorm` must pass eps=1e-5.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-6, use_scale: bool = True,
                 use_bias: bool = True, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init; accepted so every layer is built the same way
        if not isinstance(eps, (int, float)) or eps <= 0:
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        self.num_features = check_positive_int(num_features, "num_features")
        self.eps = float(eps)
        self.dtype = canonical_dtype(dtype)
        param_dtype = canonical_dtype(param_dtype, "param_dtype")
        shape = (self.num_features,)
        self.scale = (nnx.Param(with_axes(ONES_INIT, ("norm",))(None, shape, param_dtype))
                      if use_scale else None)
        self.bias = (nnx.Param(with_axes(ZEROS_INIT, ("norm",))(None, shape, param_dtype))
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"LayerNorm expects last axis {self.num_features}, got shape "
                             f"{x.shape}")
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def dropout(x: jax.Array, rate: float, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """Inverted dropout drawing its key from `rngs.dropout()`; identity unless training."""
    if not train or rate == 0.0:
        return x
    if rngs is None:
        raise ValueError(f"dropout with rate {rate} in training needs `rngs` (an nnx.Rngs "
                         "with a 'dropout' stream) passed at call time")
    keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def drop_path(x: jax.Array, rate: float, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """Stochastic depth: zeroes a whole residual branch per example (axis 0), rescaling the rest.

    Huang et al. 2016 as used by DeiT/timm: the branch output is kept with probability 1 - rate
    and divided by 1 - rate, so its expectation is unchanged.
    """
    if not train or rate == 0.0:
        return x
    if rngs is None:
        raise ValueError(f"drop_path with rate {rate} in training needs `rngs` (an nnx.Rngs "
                         "with a 'dropout' stream) passed at call time")
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Dropout(nnx.Module):
    """Module form of `dropout` (holds only the rate)."""

    def __init__(self, rate: float = 0.0):
        self.rate = check_rate(rate, "dropout rate")

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        return dropout(x, self.rate, train=train, rngs=rngs)


class DropPath(nnx.Module):
    """Module form of `drop_path` (holds only the rate)."""

    def __init__(self, rate: float = 0.0):
        self.rate = check_rate(rate, "drop_path rate")

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        return drop_path(x, self.rate, train=train, rngs=rngs)


class Mlp(nnx.Module):
    """Transformer feed-forward block: fc1 -> GELU -> dropout -> fc2 -> dropout (timm layout;
    `output_dropout=False` drops the second dropout, as pix2seq's FeedForwardLayer has none).

    `approximate_gelu` picks the GELU flavour, which papers disagree on: PyTorch `nn.GELU` and
    TF `gelu` default to the exact erf form (timm, FIT, NViST), Flax's `nn.gelu` defaults to the
    tanh approximation (some JAX codebases). Default here: exact, as in timm.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 *, approximate_gelu: bool = False, use_bias: bool = True, drop: float = 0.0,
                 output_dropout: bool = True,
                 kernel_init: Initializer = DEFAULT_KERNEL_INIT, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        out_features = in_features if out_features is None else out_features
        self.approximate_gelu = bool(approximate_gelu)
        self.drop = check_rate(drop, "drop")
        self.output_dropout = bool(output_dropout)
        self.fc1 = Linear(in_features, hidden_features, axes=("embed", "mlp"), use_bias=use_bias,
                          kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)
        self.fc2 = Linear(hidden_features, out_features, axes=("mlp", "embed"),
                          use_bias=use_bias, kernel_init=kernel_init, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        h = jax.nn.gelu(self.fc1(x), approximate=self.approximate_gelu)
        h = dropout(constrain_channels_last(h, axes.MLP), self.drop, train=train, rngs=rngs)
        out = self.fc2(h)
        if self.output_dropout:
            out = dropout(out, self.drop, train=train, rngs=rngs)
        return constrain_channels_last(out, axes.EMBED)


# Parameter names that stay split while a weight is used (tensor parallelism), as the
# activation names their rules use; every other name (FSDP's "embed", ...) is gathered.
_COMPUTE_NAMES = {"heads": axes.HEADS, "mlp": axes.MLP, "vocab": axes.VOCAB}


def gathered(weight: jax.Array, param_axes: Sequence[str | None] | None = None) -> jax.Array:
    """`weight` gathered over the FSDP axes before use, its tensor-parallel split kept.

    FSDP keeps weights split and gathers them where they are used. XLA does that by itself
    before a matmul. Before a `take`, a convolution or an add that broadcasts over the batch,
    it may instead re-split the batch-split activations to match the weight (all-gathering
    token ids or whole activations), so the gather is made explicit. `param_axes` are the
    weight's logical names (None: all dimensions gathered). Outside a mesh: the identity.
    """
    names = param_axes if param_axes is not None else (None,) * weight.ndim
    return axes.constrain(weight, tuple(_COMPUTE_NAMES.get(n) for n in names))


def constrain_channels_last(x: jax.Array, channels: str) -> jax.Array:
    """Constrains [batch, ..., channels] (tokens or maps): batch split over the data axes,
    the last axis by the `channels` rule, the axes between them whole."""
    return axes.constrain(x, (axes.BATCH,) + (axes.LENGTH,) * (x.ndim - 2) + (channels,))
