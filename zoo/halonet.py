"""HaloNet H0-H7 (Vaswani et al., CVPR 2021, "Scaling Local Self-Attention for Parameter
Efficient Visual Backbones", arXiv:2103.12731): a ResNet whose 3x3 convolutions are replaced by
blocked local self-attention with a halo (`kernels_pallas.halo`).

There is no official code. Layer structure, names and initialisation follow timm's
`halonet_h1` (`timm/models/byoanet.py`, blocks from `byobnet.py:SelfAttnBlock`, attention from
`timm/layers/halo_attn.py:HaloAttn`), so that timm weights map one to one
(`zoo.convert.from_timm("halonet_h1", state_dict)`):

  stem      7x7/2 conv (64) - BN - ReLU - 3x3/2 max-pool (pad 1)
  stage i   depths[i] blocks, stride 1 for stage 0 and 2 for the others (first block only):
              shortcut: identity, or 1x1 conv (strided) - BN when the shape changes
              conv1    1x1 conv in -> mid, BN, ReLU
              attn     halo attention, mid -> value width (see "Attention conventions")
              post     BN, ReLU (on the value width)
              conv3    1x1 conv value -> out, BN (scale zero-initialised: `zero_init_last`)
              out      ReLU(drop_path(branch) + shortcut)
  final     optional 1x1 conv to `final_features` (df) - BN - ReLU
  head      global average pool - dropout - linear

Attention conventions (timm `HaloAttn`, all reproduced here):
  * q = 1x1 conv (mid -> heads*dk), kv = 1x1 conv (mid -> heads*(dk+dv)), both without bias;
    the q conv is strided (applied to x[::s, ::s]) when the block splits evenly by the stride,
    otherwise attention runs at full resolution and is followed by 2x2 average pooling.
  * Channel layout is head-major: q channel h*dk + c is head h; the kv channels are
    *per-head interleaved*: h*(dk+dv) + [0, dk) are head h's keys, the next dv its values (not
    "all keys, then all values"). The attention output channel h*dv + c is head h.
  * Relative logits q.rel_h[dy] + q.rel_w[dx] (tables (2*win-1) x dk, shared across heads) are
    added to scale * q.k and NOT scaled; the zero-padded halo outside the image is NOT masked.
  * No output projection inside attention: post-BN-ReLU and conv3 play that role.

Width mapping (the paper's rv, rb; base widths (64, 128, 256, 512) per stage): conv1 reduces
to mid = base (which is also the query/key width), attention values and the post-attention BN
have base*rv channels, and block outputs have base*rb channels. This reading reproduces all
eight published parameter counts within 0.4% (H0 5.50M, H1 8.10M, H2 9.40M, H3 11.84M,
H4 19.10M, H5 30.72M, H6 43.46M, H7 67.43M). The other published reading (early timm
`halo_cfg`: the whole bottleneck is base*rv wide) gives 71M/109M/200M for H5-H7, far from the
paper, so it is not used. For H1 (rv = rb = 1) both readings are timm's `halonet_h1`
(8,100,056 parameters, matched exactly). Heads: 8 in every stage (as timm; a per-stage tuple
is accepted, the paper's value is not stated in the text we could check).

Image sizes: every stage's feature map must split into block x block tiles, i.e. the image
side must be a multiple of 2^(stages+1) * block (32 * block for four stages). This holds at
the paper's resolutions for H0-H6. H7's published 600 px (b = 10) cannot be tiled (600/32 is
not an integer; the paper does not say how it pads), so `halonet_h7` defaults to 640 px, the
nearest larger valid size.

Initialisation is timm's (section "Initialisation" below); BatchNorm follows torch exactly,
running statistics included. The only layout difference from timm is NHWC (timm is NCHW):
conv weights [out, in, kh, kw] load as [kh, kw, in, out], with no channel permutation.
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas import halo as halo_ops
from zoo import axes, layers
from zoo.axes import with_axes
from zoo.registry import model_arguments, register_variant

# The attention's 1x1 convs are Megatron-style under tensor parallelism: q/kv split their output
# channels by head (column parallel), conv3 its input channels (row parallel, one all-reduce).
HEADS_OUT_AXES = (None, None, "conv_in", "heads")
HEADS_IN_AXES = (None, None, "heads", "conv_out")
STEM_STRIDE = 4  # 7x7/2 conv, then 3x3/2 max-pool
# Halo attention operands [B, H, W, heads, head_dim]: batch and heads split under a mesh.
_HEAD_MAPS = (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.HEADS, axes.KV)
BASE_WIDTHS = (64, 128, 256, 512)


def make_divisible(value: float, divisor: int = 8) -> int:
    """timm's channel rounding: nearest multiple of `divisor`, never more than 10% below."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


# ---------------------------------------------------------------------------------------------
# Initialisation (timm's ByobNet): convs N(0, 2 / fan_out) (He, fan-out, not truncated:
# `layers.HE_FAN_OUT_INIT`), the classifier N(0, 0.01^2), BN scale 1 (0 for each block's last
# BN), bias 0; HaloAttn: q and kv std fan_in^-0.5, relative tables std dk^-0.5 (timm's
# trunc_normal_ cuts at +-2 absolute, many standard deviations away: untruncated in practice).
# ---------------------------------------------------------------------------------------------

_QKV_INIT = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
_HEAD_INIT = nnx.initializers.normal(0.01)


class HaloAttention(nnx.Module):
    """timm's `HaloAttn` on NHWC maps: q and kv 1x1 convs, then `kernels_pallas.halo_attention`.

    Args:
        dim: input width, also the query/key width (heads * dk).
        value_dim: value/output width (heads * dv).
        num_heads, block_size, halo_size, stride: see `kernels_pallas.halo`.
        qkv_bias: biases on the q and kv convs (timm default False).
        avg_down: down-sample by average pooling even when the block splits by the stride.
        scale_relative: scale the relative logits too (timm's `scale_pos_embed`).
        attn_impl: `halo_attention` implementation.

    Inspection (`zoo.capture_attention`): sows `attention_weights`, each query's softmax over its
    block's neighbourhood, [B, blocks_h, blocks_w, heads, query_block**2, window**2]
    (`kernels_pallas.halo.halo_attention_weights`).
    """

    capture_attention = False

    def __init__(self, dim: int, *, value_dim: int, num_heads: int, block_size: int,
                 halo_size: int, stride: int = 1, qkv_bias: bool = False,
                 avg_down: bool = False, scale_relative: bool = False,
                 attn_impl: str = "auto", dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.value_head_dim = value_dim // num_heads
        self.block_size, self.halo_size, self.stride = block_size, halo_size, stride
        self.avg_down, self.scale_relative, self.attn_impl = avg_down, scale_relative, attn_impl
        self.scale = self.head_dim ** -0.5
        self.dtype = dtype
        common = dict(use_bias=qkv_bias, kernel_init=_QKV_INIT, axes=HEADS_OUT_AXES,
                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # A strided 1x1 conv == the 1x1 conv of x[::s, ::s]: timm's strided query projection.
        self.q = layers.Conv2d(dim, dim, 1, halo_ops.query_stride(block_size, stride, avg_down),
                               **common)
        # Per-head interleaved [k_h | v_h] output channels (timm's layout).
        self.kv = layers.Conv2d(dim, dim + value_dim, 1, **common)
        rows = 2 * (block_size + 2 * halo_size) - 1
        rel_init = with_axes(nnx.initializers.normal(self.head_dim ** -0.5), ("pos", "kv"))
        self.height_rel = nnx.Param(rel_init(rngs.params(), (rows, self.head_dim), param_dtype))
        self.width_rel = nnx.Param(rel_init(rngs.params(), (rows, self.head_dim), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, _ = x.shape
        q = self.q(x)
        q = q.reshape(*q.shape[:3], self.num_heads, self.head_dim)
        # Per-head interleaved [k_h | v_h] channels (timm's layout), split after the reshape.
        kv = self.kv(x).reshape(batch, height, width, self.num_heads,
                                self.head_dim + self.value_head_dim)
        k, v = kv[..., :self.head_dim], kv[..., self.head_dim:]
        q, k, v = (axes.constrain(t, _HEAD_MAPS) for t in (q, k, v))
        if layers.capturing(self):
            self.sow(nnx.Intermediate, "attention_weights", halo_ops.halo_attention_weights(
                    q, k, self.height_rel[...].astype(self.dtype),
                    self.width_rel[...].astype(self.dtype), block=self.block_size,
                    halo=self.halo_size, stride=self.stride, scale=self.scale,
                    scale_relative=self.scale_relative, avg_down=self.avg_down))
        out = halo_ops.halo_attention(
                q, k, v, self.height_rel[...].astype(self.dtype),
                self.width_rel[...].astype(self.dtype), block=self.block_size,
                halo=self.halo_size, stride=self.stride, scale=self.scale,
                scale_relative=self.scale_relative, avg_down=self.avg_down,
                impl=self.attn_impl)
        return out.reshape(*out.shape[:3], self.num_heads * self.value_head_dim)


class HaloBlock(nnx.Module):
    """Bottleneck with halo attention in place of the 3x3 conv (timm's SelfAttnBlock)."""

    def __init__(self, in_channels: int, out_channels: int, *, mid_channels: int,
                 value_channels: int, stride: int, num_heads: int, block_size: int,
                 halo_size: int, qkv_bias: bool, avg_down: bool, scale_relative: bool,
                 zero_init_last: bool, drop_path_rate: float, attn_impl: str, dtype: Any,
                 param_dtype: Any, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype)
        self.shortcut = (layers.ConvBN(in_channels, out_channels, 1, stride, act=False,
                                       rngs=rngs, **common)
                         if in_channels != out_channels or stride != 1 else None)
        self.conv1 = layers.ConvBN(in_channels, mid_channels, 1, rngs=rngs, **common)
        self.attn = HaloAttention(mid_channels, value_dim=value_channels, num_heads=num_heads,
                                  block_size=block_size, halo_size=halo_size, stride=stride,
                                  qkv_bias=qkv_bias, avg_down=avg_down,
                                  scale_relative=scale_relative, attn_impl=attn_impl,
                                  rngs=rngs, **common)
        self.post_attn = layers.BatchNorm(value_channels, **common)
        self.conv3 = layers.ConvBN(value_channels, out_channels, 1, act=False,
                                   zero_init_scale=zero_init_last, axes=HEADS_IN_AXES,
                                   rngs=rngs, **common)
        self.drop_path = layers.DropPath(drop_path_rate)

    def __call__(self, x: jax.Array, *, train: bool = False,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        shortcut = x if self.shortcut is None else self.shortcut(x, train=train)
        y = self.conv1(x, train=train)
        y = jax.nn.relu(self.post_attn(self.attn(y), train=train))
        y = self.drop_path(self.conv3(y, train=train), train=train, rngs=rngs)
        return axes.constrain(jax.nn.relu(y + shortcut), axes.MAPS)


def valid_image_multiple(*, block_size: int, num_stages: int) -> int:
    """Image sides must be multiples of this: total stride times the block size.

    Sufficient for every stage: the last stage's map (image / total stride) splits into blocks,
    and each earlier map is a power-of-two multiple of it.
    """
    return STEM_STRIDE * 2 ** (num_stages - 1) * block_size


class HaloNet(nnx.Module):
    """HaloNet classifier on NHWC images (see the module docstring for structure/conventions).

    Args:
        image_size: int or (height, width) the model is built for; each side must be a
            multiple of `valid_image_multiple(...)` (32 * block_size for four stages).
            Parameters do not depend on it; inputs of any valid size are accepted.
        depths: blocks per stage.
        stage_widths: block output channels per stage (base * rb).
        mid_widths: 1x1-reduced width per stage, also the query/key width (base).
        value_widths: attention value/output width per stage (base * rv).
        block_size, halo_size: halo attention block b and halo h (all stages).
        num_heads: attention heads, one int or one per stage.
        stem_width: stem channels.
        final_features: width of the final 1x1 conv (the paper's df); 0 = none.
        num_classes: classifier outputs; 0 = no head (`__call__` returns pooled features).
        in_chans: image channels.
        qkv_bias, avg_down, scale_relative: attention options (`HaloAttention`).
        zero_init_last: zero-init the scale of each block's last BN (timm default).
        drop_path_rate: stochastic depth, rising linearly over all blocks to this rate.
        head_dropout_rate: dropout before the classifier.
        attn_impl: `kernels_pallas.halo.halo_attention` implementation.
        dtype: compute dtype; param_dtype: storage dtype.
    """

    def __init__(self, *, image_size: int | Sequence[int] = 256,
                 depths: Sequence[int] = (3, 3, 10, 3),
                 stage_widths: Sequence[int] = BASE_WIDTHS,
                 mid_widths: Sequence[int] = BASE_WIDTHS,
                 value_widths: Sequence[int] = BASE_WIDTHS, block_size: int = 8,
                 halo_size: int = 3, num_heads: int | Sequence[int] = 8,
                 stem_width: int = 64, final_features: int = 0,
                 num_classes: int = 1000, in_chans: int = 3, qkv_bias: bool = False,
                 avg_down: bool = False, scale_relative: bool = False,
                 zero_init_last: bool = True, drop_path_rate: float = 0.0,
                 head_dropout_rate: float = 0.0, attn_impl: str = "auto",
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        # Everything is checked before the first parameter is created.
        depths = layers.int_tuple("depths", depths)
        num_stages = len(depths)
        stage_widths = layers.int_tuple("stage_widths", stage_widths, num_stages)
        mid_widths = layers.int_tuple("mid_widths", mid_widths, num_stages)
        value_widths = layers.int_tuple("value_widths", value_widths, num_stages)
        heads = layers.int_tuple("num_heads", num_heads, num_stages)
        block_size = layers.check_positive_int(block_size, "block_size")
        if isinstance(halo_size, bool) or not isinstance(halo_size, numbers.Integral) or \
                halo_size < 0:
            raise ValueError(f"halo_size must be an integer >= 0, got {halo_size!r}")
        for i, (mid, value, h) in enumerate(zip(mid_widths, value_widths, heads)):
            if mid % h or value % h:
                raise ValueError(f"stage {i}: mid width {mid} and value width {value} must "
                                 f"be divisible by num_heads={h}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0 = no head), got "
                             f"{num_classes!r}")
        if isinstance(final_features, bool) or not isinstance(final_features, int) or \
                final_features < 0:
            raise ValueError(f"final_features must be an integer >= 0 (0 = no final conv), "
                             f"got {final_features!r}")
        stem_width = layers.check_positive_int(stem_width, "stem_width")
        in_chans = layers.check_positive_int(in_chans, "in_chans")
        drop_path_rate = layers.check_rate(drop_path_rate, "drop_path_rate")
        self.head_dropout_rate = layers.check_rate(head_dropout_rate, "head_dropout_rate")
        if attn_impl not in halo_ops.HALO_IMPLS:
            raise ValueError(f"attn_impl must be one of {halo_ops.HALO_IMPLS}, got "
                             f"{attn_impl!r}")
        self.image_multiple = valid_image_multiple(block_size=block_size,
                                                   num_stages=num_stages)
        self.image_size = layers.int_pair(image_size, "image_size")
        self._check_image_size(self.image_size, "image_size")
        self.dtype = layers.canonical_dtype(dtype)
        param_dtype = layers.canonical_dtype(param_dtype, "param_dtype")
        common = dict(dtype=self.dtype, param_dtype=param_dtype)
        self.in_chans = in_chans
        self.num_classes = num_classes

        self.stem = layers.ConvBN(in_chans, stem_width, 7, 2, rngs=rngs, **common)
        total_blocks = sum(depths)
        stages, in_channels, index = [], stem_width, 0
        for i, depth in enumerate(depths):
            blocks = []
            for j in range(depth):
                blocks.append(HaloBlock(
                        in_channels, stage_widths[i], mid_channels=mid_widths[i],
                        value_channels=value_widths[i], stride=2 if i > 0 and j == 0 else 1,
                        num_heads=heads[i], block_size=block_size, halo_size=halo_size,
                        qkv_bias=qkv_bias, avg_down=avg_down, scale_relative=scale_relative,
                        zero_init_last=zero_init_last,
                        drop_path_rate=drop_path_rate * index / max(total_blocks - 1, 1),
                        attn_impl=attn_impl, rngs=rngs, **common))
                in_channels, index = stage_widths[i], index + 1
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.num_features = final_features or in_channels
        self.final_conv = (layers.ConvBN(in_channels, final_features, 1, rngs=rngs, **common)
                           if final_features else None)
        self.head = (layers.Linear(self.num_features, num_classes, axes=("embed", "classes"),
                                   kernel_init=_HEAD_INIT, dtype=self.dtype,
                                   param_dtype=param_dtype, rngs=rngs)
                     if num_classes else None)

    def _check_image_size(self, hw: tuple[int, int], name: str) -> None:
        multiple = self.image_multiple
        if hw[0] % multiple or hw[1] % multiple:
            low = max(multiple, hw[0] // multiple * multiple)
            raise ValueError(
                    f"{name} must have height and width that are multiples of {multiple} "
                    f"(total stride x block_size, so that every stage's feature map splits "
                    f"into halo blocks), got {hw[0]}x{hw[1]}; nearest valid sides: {low}, "
                    f"{low + multiple}")

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4 or x.shape[-1] != self.in_chans:
            raise ValueError(f"HaloNet expects NHWC images [batch, height, width, "
                             f"{self.in_chans}], got shape {tuple(x.shape)}")
        self._check_image_size(tuple(x.shape[1:3]), "input image")

    def _stem(self, x: jax.Array, train: bool) -> jax.Array:
        x = axes.constrain(self.stem(x.astype(self.dtype), train=train), axes.MAPS)
        # -inf padding, as torch's MaxPool2d(3, 2, padding=1).
        return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    def _stage_indices(self, indices) -> list[int]:
        return layers.select_indices(indices, len(self.stages), "stage")

    def forward_intermediates(self, x: jax.Array, *, indices: int | Sequence[int] | None = None,
                              train: bool = False, rngs: nnx.Rngs | None = None
                              ) -> tuple[jax.Array, list[jax.Array]]:
        """Stage outputs, timm-style.

        Args:
            indices: None = every stage; an int n = the last n stages; a sequence = those stage
                indices (negative counts from the end).

        Returns:
            (the `forward_features` map, list of [B, H_i, W_i, stage_widths[i]] stage outputs,
            before the final conv).
        """
        self._check_input(x)
        wanted = self._stage_indices(indices)
        x = self._stem(x, train)
        maps = []
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = block(x, train=train, rngs=rngs)
            if i in wanted:
                maps.append(x)
        if self.final_conv is not None:
            x = self.final_conv(x, train=train)
        return x, maps

    def forward_features(self, x: jax.Array, *, train: bool = False,
                         rngs: nnx.Rngs | None = None) -> jax.Array:
        """Images [B, H, W, C] -> map [B, H/s, W/s, num_features], s = 2^(stages+1)."""
        self._check_input(x)
        x = self._stem(x, train)
        for stage in self.stages:
            for block in stage:
                x = block(x, train=train, rngs=rngs)
        if self.final_conv is not None:
            x = self.final_conv(x, train=train)
        return x

    def forward_head(self, x: jax.Array, *, pre_logits: bool = False, train: bool = False,
                     rngs: nnx.Rngs | None = None) -> jax.Array:
        """Feature map -> logits [B, num_classes] (pooled features if pre_logits/no head)."""
        return layers.average_pool_head(x, self.head, self.head_dropout_rate,
                                        pre_logits=pre_logits, train=train, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.forward_head(self.forward_features(x, train=train, rngs=rngs),
                                 train=train, rngs=rngs)


# ---------------------------------------------------------------------------------------------
# Registered variants: the paper's H0-H7 table (b, h, rv, rb, stage depths, df, image size).
# ---------------------------------------------------------------------------------------------

VARIANTS: dict[str, dict[str, Any]] = {
        "h0": dict(block_size=8, halo_size=3, rv=1.0, rb=0.5, depths=(3, 3, 7, 3),
                   final_features=0, image_size=256),
        "h1": dict(block_size=8, halo_size=3, rv=1.0, rb=1.0, depths=(3, 3, 10, 3),
                   final_features=0, image_size=256),
        "h2": dict(block_size=8, halo_size=3, rv=1.0, rb=1.25, depths=(3, 3, 11, 3),
                   final_features=0, image_size=256),
        "h3": dict(block_size=10, halo_size=3, rv=1.0, rb=1.5, depths=(3, 3, 12, 3),
                   final_features=1024, image_size=320),
        "h4": dict(block_size=12, halo_size=2, rv=1.0, rb=3.0, depths=(3, 3, 12, 3),
                   final_features=1280, image_size=384),
        "h5": dict(block_size=14, halo_size=2, rv=2.5, rb=2.0, depths=(3, 3, 23, 3),
                   final_features=1536, image_size=448),
        "h6": dict(block_size=8, halo_size=4, rv=3.0, rb=2.75, depths=(3, 3, 24, 3),
                   final_features=1536, image_size=512),
        # Paper: 600 px, which b = 10 cannot tile (module docstring); 640 is the nearest.
        "h7": dict(block_size=10, halo_size=3, rv=4.0, rb=3.5, depths=(3, 3, 26, 3),
                   final_features=2048, image_size=640),
}
PAPER_PARAMS = {"h0": 5.5, "h1": 8.1, "h2": 9.4, "h3": 11.8, "h4": 19.1, "h5": 30.7,
                "h6": 43.4, "h7": 67.4}
PAPER_TOP1 = {"h0": 77.9, "h1": 79.9, "h2": 80.4, "h3": 81.9, "h4": 83.3, "h5": 84.0,
              "h6": 84.4, "h7": 84.9}

MODEL_ARGS = model_arguments(HaloNet)
# Widths are given through the paper's multipliers, never directly, so the two cannot clash.
_WIDTH_ARGS = ("stage_widths", "mid_widths", "value_widths")
_MULTIPLIER_ARGS = ("rv", "rb", "base_widths")


def stage_widths_from_multipliers(rv: float, rb: float,
                                  base_widths: Sequence[int] = BASE_WIDTHS) -> dict[str, tuple]:
    """The paper's rv/rb multipliers as per-stage widths (module docstring, "Width mapping")."""
    for name, value in (("rv", rv), ("rb", rb)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    base = layers.int_tuple("base_widths", base_widths)
    return dict(stage_widths=tuple(make_divisible(b * rb) for b in base),
                mid_widths=tuple(make_divisible(b) for b in base),
                value_widths=tuple(make_divisible(b * rv) for b in base))


def _widths_from_multipliers(args: dict) -> dict:
    """Builder arguments with rv/rb/base_widths replaced by HaloNet's per-stage widths."""
    args = dict(args)
    base_widths = args.pop("base_widths", BASE_WIDTHS)
    if isinstance(base_widths, (tuple, list)) and isinstance(args["depths"], (tuple, list)) \
            and len(base_widths) != len(args["depths"]):
        raise ValueError(f"base_widths {tuple(base_widths)} and depths {tuple(args['depths'])} "
                         f"must have one entry per stage each")
    widths = stage_widths_from_multipliers(args.pop("rv"), args.pop("rb"), base_widths)
    return {**args, **widths}


_PAPER = ("Vaswani, Ramachandran, Srinivas, Parmar, Hechtman, Shlens 2021, Scaling Local "
          "Self-Attention for Parameter Efficient Visual Backbones (CVPR), arXiv:2103.12731")
_REFERENCE = ("timm timm/layers/halo_attn.py (HaloAttn) and timm/models/byoanet.py "
              "(halonet_h1); no official code")
# CPU-sized: two narrow one-block stages (one plain, one strided block); block, halo, rv and
# the final conv stay the paper's so each variant's tiling and value width are still exercised.
# rb is 1 for all: H0-H2 then share one tiny program (b=8, h=3, rv=1), which the mesh test runs
# once for the three. Most of its test time is XLA compiling the attention gradient.
_TINY = dict(base_widths=(8, 16), depths=(1, 1), stem_width=8, num_heads=2, num_classes=10,
             rb=1.0)


def _register(variant: str):
    spec = VARIANTS[variant]
    size = spec["image_size"]
    notes = (f"b={spec['block_size']}, h={spec['halo_size']}, rv={spec['rv']}, "
             f"rb={spec['rb']}, depths={spec['depths']}, df={spec['final_features'] or '-'}, "
             f"{size}px; paper: {PAPER_PARAMS[variant]}M params, ImageNet top-1 "
             f"{PAPER_TOP1[variant]}.")
    if variant == "h1":
        notes += " Identical to timm halonet_h1 (8,100,056 params); loads its weights."
    if variant == "h7":
        notes += " The paper's 600 px cannot be tiled by b=10; defaults to 640 px."

    return register_variant(
            f"halonet_{variant}", HaloNet, VARIANTS[variant], extra=_MULTIPLIER_ARGS,
            exclude=_WIDTH_ARGS, prepare=_widths_from_multipliers, paper=_PAPER,
            reference=_REFERENCE, default_input={"image": ((size, size, 3), "float32")},
            config=f"configs/halonet.py:{variant}",
            # timm's halonet_h1 layout, any widths/depths (read from the arrays).
            weights=({"timm:halonet_h1": "zoo.converters.halonet:halonet_from_timm"}
                     if variant == "h1" else {}),
            # Two tiny stages (total stride 8) need maps divisible by the block size.
            tiny=dict(_TINY, image_size=8 * spec["block_size"]),
            tiny_input={"image": ((8 * spec["block_size"],) * 2 + (3,), "float32")},
            paper_params=PAPER_PARAMS[variant], paper_params_tolerance=0.015, notes=notes)


halonet_h0 = _register("h0")
halonet_h1 = _register("h1")
halonet_h2 = _register("h2")
halonet_h3 = _register("h3")
halonet_h4 = _register("h4")
halonet_h5 = _register("h5")
halonet_h6 = _register("h6")
halonet_h7 = _register("h7")
