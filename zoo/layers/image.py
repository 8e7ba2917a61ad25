"""Image layers: patch embedding, torch-convention convolutions and BatchNorm, and the fixed
2-D sine-cosine position codes."""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.axes import with_axes
from zoo.layers.checks import canonical_dtype, check_positive_int, int_pair
from zoo.layers.dense import Initializer, dropout, gathered

def torch_uniform(fan_in: int) -> Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default Conv2d bias init (kept by timm's
    ViT) and, for a depth-wise conv, its weight init too."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


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
        self.image_size = int_pair(image_size, "image_size")
        self.patch_size = int_pair(patch_size, "patch_size")
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


def average_pool_head(maps: jax.Array, head: nnx.Module | None, dropout_rate: float, *,
                      pre_logits: bool, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """timm's CNN-style classifier: global average pool of [B, H, W, C] maps (in float32),
    dropout, then `head` (pooled features when `pre_logits` or there is no head)."""
    pooled = jnp.mean(maps.astype(jnp.float32), axis=(1, 2)).astype(maps.dtype)
    pooled = dropout(pooled, dropout_rate, train=train, rngs=rngs)
    if pre_logits or head is None:
        return pooled
    return head(pooled)


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


# ---------------------------------------------------------------------------------------------
# Torch-convention convolution and BatchNorm (timm's ResNet-family layers, NHWC).
# ---------------------------------------------------------------------------------------------

CONV_AXES = (None, None, "conv_in", "conv_out")
# timm's ResNet/ByobNet conv init: N(0, 2 / fan_out) with fan_out = k * k * out (He, fan-out),
# not truncated.
HE_FAN_OUT_INIT: Initializer = nnx.initializers.variance_scaling(2.0, "fan_out",
                                                                 "normal")


def _filled(fill: float) -> Initializer:
    # A host-side constant: a device_put, no XLA program to compile per shape (eagerly, each
    # jnp.full of a new shape would compile one).
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.asarray(np.full(shape, fill, np.float32), dtype=dtype)

    return init


class Conv2d(nnx.Module):
    """k x k convolution on NHWC maps, kernel [k, k, in, out], with torch's symmetric
    (k - 1) // 2 padding, so strided convs sample the same pixels as timm's.

    A torch weight [out, in, kh, kw] loads as `weight.transpose(2, 3, 1, 0)`. The kernel is
    gathered over FSDP before use (see `gathered`), its tensor-parallel split kept.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 *, use_bias: bool = False, kernel_init: Initializer = HE_FAN_OUT_INIT,
                 axes: Sequence[str | None] = CONV_AXES, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        in_channels = check_positive_int(in_channels, "in_channels")
        out_channels = check_positive_int(out_channels, "out_channels")
        kernel_size = check_positive_int(kernel_size, "kernel_size")
        self.kernel = nnx.Param(with_axes(kernel_init, axes)(
                rngs.params(), (kernel_size, kernel_size, in_channels, out_channels),
                param_dtype))
        self.bias = (nnx.Param(with_axes(_filled(0.0), tuple(axes)[-1:])(
                None, (out_channels,), param_dtype)) if use_bias else None)
        pad = (kernel_size - 1) // 2
        self.padding = ((pad, pad), (pad, pad))
        self.stride = check_positive_int(stride, "stride")
        self.dtype = canonical_dtype(dtype)
        self.axes = tuple(axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Gathered explicitly: otherwise XLA may split the conv by output channels over fsdp
        # and all-gather the batch-split map instead.
        y = jax.lax.conv_general_dilated(
                x.astype(self.dtype), gathered(self.kernel[...].astype(self.dtype), self.axes),
                window_strides=(self.stride, self.stride), padding=self.padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class BatchNorm(nnx.Module):
    """BatchNorm over the channel (last) axis with torch's `BatchNorm2d` semantics.

    eps 1e-5; running statistics move 10% towards each training batch (torch momentum 0.1),
    and the running variance takes the unbiased batch variance, as torch does, so statistics
    trained here and in timm evolve identically. Statistics are computed in float32 and the
    output is cast to `dtype`. Running mean/var are `nnx.BatchStat` state. (`nnx.BatchNorm`
    differs in the running variance.)
    """

    def __init__(self, features: int, *, zero_scale: bool = False, momentum: float = 0.1,
                 eps: float = 1e-5, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        features = check_positive_int(features, "features")
        self.scale = nnx.Param(with_axes(_filled(0.0 if zero_scale else 1.0), ("norm",))(
                None, (features,), param_dtype))
        self.bias = nnx.Param(with_axes(_filled(0.0), ("norm",))(None, (features,),
                                                                  param_dtype))
        self.mean = nnx.BatchStat(_filled(0.0)(None, (features,)))
        self.var = nnx.BatchStat(_filled(1.0)(None, (features,)))
        self.momentum, self.eps, self.dtype = momentum, eps, canonical_dtype(dtype)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if train:
            reduce = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axis=reduce)
            var = jnp.mean(jnp.square(x32 - mean), axis=reduce)
            count = x.size // x.shape[-1]
            unbiased = var * (count / max(count - 1, 1))
            self.mean[...] = (1 - self.momentum) * self.mean[...] + self.momentum * mean
            self.var[...] = (1 - self.momentum) * self.var[...] + self.momentum * unbiased
        else:
            mean, var = self.mean[...], self.var[...]
        scale = self.scale[...].astype(jnp.float32) * jax.lax.rsqrt(var + self.eps)
        y = (x32 - mean) * scale + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class ConvBN(nnx.Module):
    """Convolution without bias, BatchNorm, optional ReLU (timm's ConvNormAct)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 *, act: bool = True, zero_init_scale: bool = False,
                 kernel_init: Initializer = HE_FAN_OUT_INIT,
                 axes: Sequence[str | None] = CONV_AXES, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv2d(in_channels, out_channels, kernel_size, stride,
                           kernel_init=kernel_init, axes=axes, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
        self.bn = BatchNorm(out_channels, zero_scale=zero_init_scale, dtype=dtype,
                            param_dtype=param_dtype)
        self.act = act

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = self.bn(self.conv(x), train=train)
        return jax.nn.relu(x) if self.act else x
