"""Building blocks shared by every zoo model: linear layers, norms, MLP, attention, drop-path,
patch embedding and fixed position embeddings.

Why one file: the paper models (ViT, FIT, SSA, NViST, Swin/VSA) differ in how they wire these
pieces, not in the pieces, so parameter layout, initialisation and mixed-precision handling are
decided once here and every model inherits them.

Conventions (all layers):
  * Every `nnx.Param` is created through `zoo.axes.with_axes`, so it carries one logical axis
    name (or None) per dimension; the training config maps those names to mesh axes.
  * `dtype` is the compute dtype (inputs and weights are cast to it before a matmul),
    `param_dtype` the storage dtype (float32 by default). Norm statistics are always computed in
    float32 and the result cast back to `dtype`, because bf16 mean/variance loses the small
    differences a LayerNorm exists to amplify.
  * Default initialisation follows timm's ViT ("timm" mode): Linear kernels truncated normal with
    std 0.02, biases zero, norm scales one. JAX's truncated normal cuts at +-2 std and rescales to
    keep std 0.02; timm cuts at +-2 absolute, which at std 0.02 never triggers. Both therefore
    draw from (practically) the same distribution.
  * Stochastic layers (dropout, drop-path) draw their randomness from the `rngs` passed at call
    time (stream "dropout"); nothing random is stored in model state. With `train=False` or a
    zero rate they are the identity and need no rngs.
  * Attention goes through `kernels_pallas.attention`, the single attention entry point.
  * Activations are constrained by logical name (`zoo.axes.constrain`): attention q/k/v as
    [batch, length, heads, kv], the MLP hidden layer as [batch, ..., mlp], the outputs of both
    as [batch, ..., embed]. Under a mesh the batch is then split over the data axes and heads and
    hidden units over `tensor` at every layer, whatever the model around them does; outside
    a mesh these calls do nothing.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels_pallas
import kernels_pallas.api
from zoo import axes
from zoo.axes import with_axes

Initializer = Callable[..., jax.Array]

# timm's ViT init for Linear layers (see module docstring for the truncation detail).
DEFAULT_KERNEL_INIT: Initializer = nnx.initializers.truncated_normal(stddev=0.02)
ZEROS_INIT: Initializer = nnx.initializers.zeros_init()
ONES_INIT: Initializer = nnx.initializers.ones_init()

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
    """Transformer feed-forward block: fc1 -> GELU -> dropout -> fc2 -> dropout (timm layout).

    `approximate_gelu` picks the GELU flavour, which papers disagree on: PyTorch `nn.GELU` and
    TF `gelu` default to the exact erf form (timm, FIT, NViST), Flax's `nn.gelu` defaults to the
    tanh approximation (some JAX codebases). Default here: exact, as in timm.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 *, approximate_gelu: bool = False, use_bias: bool = True, drop: float = 0.0,
                 kernel_init: Initializer = DEFAULT_KERNEL_INIT, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        out_features = in_features if out_features is None else out_features
        self.approximate_gelu = bool(approximate_gelu)
        self.drop = check_rate(drop, "drop")
        self.fc1 = Linear(in_features, hidden_features, axes=("embed", "mlp"), use_bias=use_bias,
                          kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)
        self.fc2 = Linear(hidden_features, out_features, axes=("mlp", "embed"),
                          use_bias=use_bias, kernel_init=kernel_init, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        h = jax.nn.gelu(self.fc1(x), approximate=self.approximate_gelu)
        h = dropout(constrain_channels_last(h, axes.MLP), self.drop, train=train, rngs=rngs)
        out = dropout(self.fc2(h), self.drop, train=train, rngs=rngs)
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


ATTENTION_LOGITS = ("softmax", "sigmoid")
ATTENTION_IMPLS = kernels_pallas.api.IMPLS


class Attention(nnx.Module):
    """Multi-head self- or cross-attention around `kernels_pallas.attention`.

    Projections (timm names, so timm state dicts map by transposes/reshapes):
      * self-attention, fused:    `qkv`  kernel (dim, 3, heads*head_dim)  [timm `attn.qkv`]
      * cross-attention, fused:   `q` (dim, heads*head_dim) and `kv` (kv_dim, 2, heads*head_dim)
      * unfused (either kind):    `q`, `k`, `v`
      * output:                   `proj` (heads*head_dim, dim)
    The heads*head_dim axis is laid out head-major ([heads, head_dim] flattened), as in timm.
    Optional q/k norm (Dehghani et al. 2023; recommended for sigmoid attention) is a LayerNorm
    over head_dim shared by all heads, applied before the dot product.

    Args:
        dim: width of the query stream (and of the output).
        num_heads: number of heads.
        head_dim: per-head width; default dim // num_heads (dim must then divide evenly).
        cross_attention: keys/values come from a `context` argument instead of `x`.
        kv_dim: width of `context` (cross-attention only); default dim.
        fused_qkv: one projection for q,k,v (self) or k,v (cross) instead of separate ones.
        qkv_bias, out_bias: biases on the input / output projections.
        qk_norm: LayerNorm q and k per head; `norm_eps` is its epsilon.
        logits: "softmax" or "sigmoid" (Ramapuram et al. 2024: sigmoid(s + sigmoid_bias)).
        sigmoid_bias: the sigmoid offset; None = the kernel's default -log(num_keys).
        scale: logit scale; None = 1/sqrt(head_dim).
        attn_impl: passed to `kernels_pallas.attention(impl=...)` ("auto" picks per backend).
        proj_drop: dropout on the output projection. (Dropout on attention probabilities is not
            offered: fused kernels never materialise them.)
    """

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None,
                 cross_attention: bool = False, kv_dim: int | None = None,
                 fused_qkv: bool = True, qkv_bias: bool = True, out_bias: bool = True,
                 qk_norm: bool = False, norm_eps: float = 1e-6, logits: str = "softmax",
                 sigmoid_bias: float | None = None, scale: float | None = None,
                 attn_impl: str = "auto", proj_drop: float = 0.0,
                 kernel_init: Initializer = DEFAULT_KERNEL_INIT, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        dim = check_positive_int(dim, "dim")
        num_heads = check_positive_int(num_heads, "num_heads")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) "
                                 "when head_dim is not given")
            head_dim = dim // num_heads
        head_dim = check_positive_int(head_dim, "head_dim")
        if logits not in ATTENTION_LOGITS:
            raise ValueError(f"logits must be one of {ATTENTION_LOGITS}, got {logits!r}")
        if kv_dim is not None and not cross_attention:
            raise ValueError(f"kv_dim={kv_dim!r} is only meaningful with cross_attention=True")
        if attn_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTENTION_IMPLS}, got "
                             f"{attn_impl!r}")
        if sigmoid_bias is not None and logits != "sigmoid":
            raise ValueError(f"sigmoid_bias={sigmoid_bias!r} is only used with "
                             f"logits='sigmoid', got logits={logits!r}")
        kv_dim = dim if kv_dim is None else check_positive_int(kv_dim, "kv_dim")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.cross_attention = bool(cross_attention)
        self.fused_qkv = bool(fused_qkv)
        self.logits = logits
        self.sigmoid_bias = None if sigmoid_bias is None else float(sigmoid_bias)
        self.scale = None if scale is None else float(scale)
        self.attn_impl = attn_impl
        self.proj_drop = check_rate(proj_drop, "proj_drop")
        inner = num_heads * head_dim

        def proj(in_features, out_features, axes, use_bias):
            return Linear(in_features, out_features, axes=axes, use_bias=use_bias,
                          kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

        if self.fused_qkv and not self.cross_attention:
            self.qkv = proj(dim, (3, inner), ("embed", None, "heads"), qkv_bias)
        elif self.fused_qkv:
            self.q = proj(dim, inner, ("embed", "heads"), qkv_bias)
            self.kv = proj(kv_dim, (2, inner), ("embed", None, "heads"), qkv_bias)
        else:
            self.q = proj(dim, inner, ("embed", "heads"), qkv_bias)
            self.k = proj(kv_dim, inner, ("embed", "heads"), qkv_bias)
            self.v = proj(kv_dim, inner, ("embed", "heads"), qkv_bias)
        if qk_norm:
            self.q_norm = LayerNorm(head_dim, eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = LayerNorm(head_dim, eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None
        self.proj = proj(inner, dim, ("heads", "embed"), out_bias)

    def _project(self, x, context):
        if self.fused_qkv and not self.cross_attention:
            qkv = self.qkv(x)
            return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        if self.fused_qkv:
            kv = self.kv(context)
            return self.q(x), kv[..., 0, :], kv[..., 1, :]
        return self.q(x), self.k(context), self.v(context)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, bias=None,
                 causal: bool = False, q_lengths=None, kv_lengths=None, q_segment_ids=None,
                 kv_segment_ids=None, train: bool = False,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """x: [batch, q_len, dim]; context: [batch, kv_len, kv_dim] (cross-attention only).

        bias, causal, lengths and segment ids are passed to `kernels_pallas.attention` unchanged
        (see kernels_pallas/reference.py for their semantics).
        """
        if x.ndim != 3:
            raise ValueError(f"Attention expects x of shape [batch, tokens, dim], got {x.shape}")
        if self.cross_attention and context is None:
            raise ValueError("a cross-attention layer needs `context` (the key/value tokens)")
        if not self.cross_attention and context is not None:
            raise ValueError("`context` was given to a self-attention layer; build it with "
                             "cross_attention=True to attend to other tokens")
        if context is None:
            context = x
        elif context.ndim != 3 or context.shape[0] != x.shape[0]:
            raise ValueError(f"context must be [batch, tokens, kv_dim] with the batch of x "
                             f"{x.shape}, got {context.shape}")
        q, k, v = self._project(x, context)
        split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, self.head_dim)  # noqa: E731
        q, k, v = (axes.constrain(split(t), axes.QKV) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = kernels_pallas.attention(
                q, k, v, bias, causal=causal, scale=self.scale, q_lengths=q_lengths,
                kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                kv_segment_ids=kv_segment_ids, logits=self.logits,
                sigmoid_bias=self.sigmoid_bias, impl=self.attn_impl)
        out = self.proj(out.reshape(*out.shape[:2], self.num_heads * self.head_dim))
        return axes.constrain(dropout(out, self.proj_drop, train=train, rngs=rngs), axes.TOKENS)


def torch_uniform(fan_in: int) -> Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default Conv2d bias init (kept by timm's
    ViT) and, for a depth-wise conv, its weight init too."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
        return check_positive_int(value[0], name), check_positive_int(value[1], name)
    size = check_positive_int(value, name)
    return size, size


class PatchEmbed(nnx.Module):
    """Non-overlapping patch embedding: a stride-p p x p convolution computed as one matmul.

    Input [B, H, W, C] (NHWC), output the token grid [B, H/p, W/p, embed_dim]. The kernel is
    stored as (p, p, C, embed_dim) = (row-in-patch, col-in-patch, channel, out), so a timm/torch
    conv weight `proj.weight` [embed_dim, C, p, p] loads with `weight.transpose(2, 3, 1, 0)`
    (and `proj.bias` as is). Init is PyTorch's Conv2d default, which timm's ViT keeps:
    kernel and bias U(+-1/sqrt(p*p*C)).
    """

    def __init__(self, image_size: int | Sequence[int], patch_size: int | Sequence[int],
                 in_chans: int, embed_dim: int, *, use_bias: bool = True,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.image_size = _pair(image_size, "image_size")
        self.patch_size = _pair(patch_size, "patch_size")
        for side, size, patch in zip(("height", "width"), self.image_size, self.patch_size):
            if size % patch:
                raise ValueError(f"image_size {side} {size} is not divisible by patch_size "
                                 f"{patch}; allowed: multiples of the patch size")
        self.grid_size = (self.image_size[0] // self.patch_size[0],
                          self.image_size[1] // self.patch_size[1])
        self.in_chans = check_positive_int(in_chans, "in_chans")
        self.embed_dim = check_positive_int(embed_dim, "embed_dim")
        self.dtype = canonical_dtype(dtype)
        param_dtype = canonical_dtype(param_dtype, "param_dtype")
        ph, pw = self.patch_size
        fan_in = ph * pw * self.in_chans
        kernel_init = nnx.initializers.variance_scaling(
                1.0 / 3.0, "fan_in", "uniform", in_axis=(0, 1, 2), out_axis=3)
        self.kernel = nnx.Param(with_axes(kernel_init, (None, None, "conv_in", "embed"))(
                rngs.params(), (ph, pw, self.in_chans, self.embed_dim), param_dtype))
        self.bias = (nnx.Param(with_axes(torch_uniform(fan_in), ("embed",))(
                rngs.params(), (self.embed_dim,), param_dtype)) if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        expected = (*self.image_size, self.in_chans)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"PatchEmbed expects images [batch, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}] (NHWC), got shape {x.shape}")
        (gh, gw), (ph, pw) = self.grid_size, self.patch_size
        patches = x.astype(self.dtype).reshape(x.shape[0], gh, ph, gw, pw, self.in_chans)
        y = jnp.einsum("bhiwjc,ijcd->bhwd", patches, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def sincos_2d(grid_height: int, grid_width: int, dim: int, *, mae_frequencies: bool = False,
              offset: float = 0.0, cls_token: bool = False,
              temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sine-cosine position code, [(1 +) grid_height * grid_width, dim] float32.

    Rows are in raster order (row-major over the grid). A quarter of the channels each holds
    sin(x*w), cos(x*w), sin(y*w), cos(y*w) (x = column, y = row, each + `offset`), so `dim`
    must be a multiple of 4. The frequencies differ between the two references:
      * default (MoCo v3 / big_vision): w = temperature**(-k / (dim/4 - 1)), k = 0..dim/4-1;
      * `mae_frequencies` (MAE, NViST): w = temperature**(-k / (dim/4)).
    `cls_token` prepends a zero row (MAE's class token). A NumPy constant, computed at trace
    time, not model state.
    """
    grid_height = check_positive_int(grid_height, "grid_height")
    grid_width = check_positive_int(grid_width, "grid_width")
    dim = check_positive_int(dim, "dim")
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for a 2-D sin-cos embedding, got {dim}")
    quarter = dim // 4
    # A single frequency (dim == 4) has no spread to interpolate over; use w = 1.
    exponent = np.arange(quarter, dtype=np.float64) / (
            quarter if mae_frequencies else max(quarter - 1, 1))
    omega = 1.0 / (temperature ** exponent)
    rows, cols = np.meshgrid(np.arange(grid_height) + offset, np.arange(grid_width) + offset,
                             indexing="ij")
    angle_x = cols.reshape(-1, 1) * omega[None]
    angle_y = rows.reshape(-1, 1) * omega[None]
    table = np.concatenate([np.sin(angle_x), np.cos(angle_x), np.sin(angle_y), np.cos(angle_y)],
                           axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return table.astype(np.float32)
