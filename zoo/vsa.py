r"""VSA: varied-size window attention (Zhang et al., ECCV 2022), and Swin-T with VSA.

"VSA: Learning Varied-Size Window Attention in Vision Transformers", arXiv:2204.08446. Reference
code for Swin-T + VSA: ViTAE-Transformer/QFormer `models/swin/swin_transformer_vsa.py`
(`VSAAttention`, `SwinTransformerBlock`, `SwinTransformerVSA`); parameter names follow it so
its checkpoints map one to one (`zoo.convert.from_qformer_vsa`).

`VSAAttention` ([B, H, W, C] -> [B, H, W, C]), per head h and default window w (ws x ws):
  1. qkv = Linear(C, 3C) per pixel (QFormer applies its Linear as a 1x1 conv), channels
     [q all heads | k all heads | v all heads], head-major inside each; q, k, v are zero-padded
     bottom/right to multiples of ws *after* the projection (as the reference: padded pixels
     are 0, not the bias).
  2. Window regression: avg-pool(x zero-padded, ws, stride ws) -> LeakyReLU(0.01) -> 1x1 conv
     (`transform`, C -> heads * 4), channel (h, j) = h * 4 + j with j = [offset_x, offset_y,
     scale_x, scale_y]. Zero-initialised (QFormer's `_reset_parameters`), so at init every
     target window is the default window and VSA equals window attention with RPB.
  3. Sampling coordinates, normalised [-1, 1] with align_corners=True over the padded map
     (Hp x Wp; pixel i at -1 + 2 i / (size - 1)), channel 0 = x, 1 = y:
        centre_x(w) = mean of the window's pixel x coordinates   (avg-pool of linspace)
        base_x(i)   = 2 i / (Wp - 1) - mean_i(2 i / (Wp - 1)),    i = 0 .. ws-1
        x(h, w, i)  = centre_x(w) + (1 + scale_x(h, w)) * base_x(i) + offset_x(h, w) / (Wp / ws)
     and likewise for y with Hp. So scale is relative to the default window size and one unit
     of offset moves the window by half the map width divided by the number of windows, i.e.
     by half a window (Wp / ws windows span 2 normalised units).
  4. k and v of head h are sampled at its ws x ws points per window with
     `kernels_pallas.grid_sample` (bilinear, zero padding, align_corners=True), in window
     raster order; q stays in the default window.
  5. softmax(q k^T / sqrt(head_dim) + RPB) v through `kernels_pallas.attention`, with Swin's
     relative position bias table ((2ws-1)^2, heads) indexed by the *grid index* of the query
     and of the sampled key (not by the sampled position) - as the reference (rpe="v1").
  6. Crop the padding, output projection Linear(C, C).
No shifted windows (the reference comments its shift code out); QFormer's optional gradient
"rectifier" for out-of-range coordinates defaults to off (coords_lambda=0) and is not ported.

`VSABlock` (QFormer's Swin block): x = x + DWConv(x) (position encoding: depth-wise
(ws//2*2+1)^2 conv with bias, PyTorch default init), x = x + DropPath(VSA(LN(x))),
x = x + DropPath(MLP(LN(x))); LN eps 1e-5, exact GELU. The VSA window is the configured
window_size even for maps smaller than it (padding, as the reference), not Swin's clamp.

`vsa_swin_t`: the Swin-T skeleton of zoo/swin.py with this block: 28,288,354 (Swin-T) +
220,800 (position convs) + 270,120 (regressors) = 28,779,274 parameters.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels_pallas
from kernels_pallas import sharding
from kernels_pallas.grid_sample import grid_sample
from zoo import axes, layers, swin, windows
from zoo.axes import with_axes
from zoo.registry import register_variant, variant_builder

LEAKY_SLOPE = 0.01  # torch nn.LeakyReLU default, as in the reference regressor


def window_geometry(padded_height: int, padded_width: int, window: int):
    """(centre_x [nw], centre_y [nh], base_x [ws], base_y [ws]) in normalised coordinates."""
    def axis(size):
        pixels = np.linspace(-1.0, 1.0, size)
        centres = pixels.reshape(size // window, window).mean(axis=1)
        base = np.arange(window) * 2.0 / max(size - 1, 1)
        return centres.astype(np.float32), (base - base.mean()).astype(np.float32)

    centre_x, base_x = axis(padded_width)
    centre_y, base_y = axis(padded_height)
    return centre_x, centre_y, base_x, base_y


def sampling_coords(regression: jax.Array, padded_height: int, padded_width: int,
                    window: int) -> jax.Array:
    """regression [B, nh, nw, heads, 4] (offset_x, offset_y, scale_x, scale_y) ->
    coords [B, heads, nh * nw, ws * ws, 2] (x, y): each window's sampling points in raster order.
    """
    centre_x, centre_y, base_x, base_y = window_geometry(padded_height, padded_width, window)
    nh, nw = padded_height // window, padded_width // window
    r = jnp.moveaxis(regression.astype(jnp.float32), 3, 1)  # [B, heads, nh, nw, 4]
    offset_x, offset_y = r[..., 0] / nw, r[..., 1] / nh
    scale_x, scale_y = 1.0 + r[..., 2], 1.0 + r[..., 3]
    # [B, heads, nh, nw, ws(y), ws(x)]
    xs = (centre_x[None, None, None, :, None, None]
          + scale_x[..., None, None] * base_x[None, None, None, None, None, :]
          + offset_x[..., None, None])
    ys = (centre_y[None, None, :, None, None, None]
          + scale_y[..., None, None] * base_y[None, None, None, None, :, None]
          + offset_y[..., None, None])
    xs, ys = jnp.broadcast_arrays(xs, ys)
    coords = jnp.stack([xs, ys], axis=-1)
    batch, heads = coords.shape[:2]
    return coords.reshape(batch, heads, nh * nw, window * window, 2)


def window_corners(coords: jax.Array, padded_height: int, padded_width: int,
                   window: int) -> jax.Array:
    """coords [B, heads, nW, ws * ws, 2] (normalised, from `sampling_coords`) -> the four corner
    points [B, heads, nW, 4, 2] (top-left, top-right, bottom-right, bottom-left), (x, y) in
    pixels of the padded map: -1 and 1 are the centres of its first and last pixels."""
    last = window * window - 1
    corners = coords[:, :, :, jnp.array([0, window - 1, last, last - window + 1])]
    size = jnp.array([padded_width - 1, padded_height - 1], jnp.float32)
    return (corners.astype(jnp.float32) + 1.0) * 0.5 * size


# Logical names of the sampled maps [B, Hp, Wp, heads, hd] and of the sampling points / samples
# [B, heads, windows, points, 2 | hd] (kernels_pallas/sharding.py).
_SAMPLED_MAPS = (axes.BATCH, None, None, axes.HEADS, None)
_SAMPLING_POINTS = (axes.BATCH, axes.HEADS, None, None, None)


class VSAAttention(nnx.Module):
    """Varied-size window attention on [B, H, W, C] maps (module docstring for the maths).

    Parameters (QFormer names): `qkv`, `proj`, `transform` (the regressor's 1x1 conv, kernel
    (C, heads, 4)), `relative_position_bias_table` ((2ws-1)^2, heads).

    Inspection (`zoo.capture_attention`) sows:
      `window_corners` [B, heads, nh * nw, 4, 2] float32: each regressed window's sampling
          corners (top-left, top-right, bottom-right, bottom-left) as (x, y) in pixels of this
          layer's zero-padded [Hp, Wp] map (pixel centres at 0 .. Wp-1), windows in raster order;
      `attention_weights` [B * nh * nw, heads, ws**2, ws**2]: from each default window's queries
          to its sampled keys.
    """

    capture_attention = False

    def __init__(self, dim: int, num_heads: int, window_size: int, *, qkv_bias: bool = True,
                 attn_impl: str = "auto", proj_drop: float = 0.0, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        dim = layers.check_positive_int(dim, "dim")
        num_heads = layers.check_positive_int(num_heads, "num_heads")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if attn_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(f"attn_impl must be one of {layers.ATTENTION_IMPLS}, got "
                             f"{attn_impl!r}")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.window_size = layers.check_positive_int(window_size, "window_size")
        self.attn_impl = attn_impl
        self.proj_drop = layers.check_rate(proj_drop, "proj_drop")
        self.dtype = layers.canonical_dtype(dtype)
        param_dtype = layers.canonical_dtype(param_dtype, "param_dtype")
        common = dict(dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = layers.Linear(dim, (3, dim), axes=("embed", None, "heads"),
                                 use_bias=qkv_bias, **common)
        self.proj = layers.Linear(dim, dim, axes=("heads", "embed"), **common)
        zeros = nnx.initializers.zeros
        self.transform = layers.Linear(dim, (num_heads, 4), axes=("embed", "heads", None),
                                       kernel_init=zeros, bias_init=zeros, **common)
        table_rows = (2 * self.window_size - 1) ** 2
        self.relative_position_bias_table = nnx.Param(
                with_axes(layers.DEFAULT_KERNEL_INIT, ("pos", "heads"))(
                        rngs.params(), (table_rows, num_heads), param_dtype))

    def relative_position_bias(self) -> jax.Array:
        index = windows.relative_position_index(self.window_size)
        bias = self.relative_position_bias_table[...][index.reshape(-1)]
        return jnp.transpose(bias.reshape(*index.shape, -1), (2, 0, 1))[None].astype(self.dtype)

    def regress(self, x_padded: jax.Array) -> jax.Array:
        """Zero-padded map [B, Hp, Wp, C] -> [B, nh, nw, heads, 4] window parameters."""
        ws = self.window_size
        b, hp, wp, c = x_padded.shape
        pooled = x_padded.astype(jnp.float32).reshape(b, hp // ws, ws, wp // ws, ws, c)
        pooled = jax.nn.leaky_relu(pooled.mean(axis=(2, 4)), LEAKY_SLOPE)
        return self.transform(pooled.astype(self.dtype))

    def __call__(self, x: jax.Array, *, train: bool = False,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"VSAAttention expects [B, H, W, {self.dim}], got shape {x.shape}")
        ws, heads, hd = self.window_size, self.num_heads, self.head_dim
        b, h, w, _ = x.shape
        pad = ((0, 0), (0, (-h) % ws), (0, (-w) % ws), (0, 0))
        hp, wp = h + pad[1][1], w + pad[2][1]
        nh, nw = hp // ws, wp // ws
        qkv = jnp.pad(self.qkv(x), pad + ((0, 0),))  # [B, Hp, Wp, 3, C]
        qkv = qkv.reshape(b, hp, wp, 3, heads, hd)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]

        coords = sampling_coords(self.regress(jnp.pad(x, pad)), hp, wp, ws)

        def sample_shard(t, points):  # [b, Hp, Wp, h, hd], [b, h, nW, N, 2] -> [b, h, nW, N, hd]
            b_local, h_local = t.shape[0], t.shape[3]
            per_head = jnp.moveaxis(t, 3, 1).reshape(b_local * h_local, hp, wp, hd)
            picked = grid_sample(per_head, points.reshape(b_local * h_local, nh * nw,
                                                          ws * ws, 2))
            return picked.reshape(b_local, h_local, nh * nw, ws * ws, hd)

        def sample(t):  # [B, Hp, Wp, heads, hd] -> [B * nW, N, heads, hd]
            # Per shard under a mesh: batch and heads split as the attention that follows
            # splits them. Folded into one [B * heads] axis, XLA's gather cannot keep that
            # split and all-gathers the keys/values over `tensor` (measured).
            picked = sharding.per_shard(sample_shard, (t, coords),
                                        (_SAMPLED_MAPS, _SAMPLING_POINTS), _SAMPLING_POINTS,
                                        what="VSA sampling")
            return jnp.moveaxis(picked, 1, 3).reshape(b * nh * nw, ws * ws, heads, hd)

        q_windows = windows.window_partition(q.reshape(b, hp, wp, heads * hd), ws)
        q_windows = q_windows.reshape(-1, ws * ws, heads, hd)
        k_windows = sample(k)
        if layers.capturing(self):
            self.sow(nnx.Intermediate, "window_corners", window_corners(coords, hp, wp, ws))
            self.sow(nnx.Intermediate, "attention_weights", kernels_pallas.attention_weights(
                    q_windows, k_windows, self.relative_position_bias()))
        out = kernels_pallas.attention(q_windows, k_windows, sample(v),
                                       self.relative_position_bias(), impl=self.attn_impl)
        out = windows.window_reverse(out.reshape(-1, ws * ws, heads * hd), ws, hp, wp)
        out = self.proj(out[:, :h, :w])
        return axes.constrain(layers.dropout(out, self.proj_drop, train=train, rngs=rngs),
                              axes.MAPS)


class DepthwiseConv(nnx.Module):
    """k x k depth-wise conv with bias, 'same' padding, on [B, H, W, C] (QFormer `pos`)."""

    def __init__(self, dim: int, kernel_size: int, *, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        init = layers.torch_uniform(kernel_size * kernel_size)  # fan_in = 1 channel * k * k
        self.kernel = nnx.Param(with_axes(init, (None, None, None, "conv_out"))(
                rngs.params(), (kernel_size, kernel_size, 1, dim), param_dtype))
        self.bias = nnx.Param(with_axes(init, ("conv_out",))(rngs.params(), (dim,),
                                                              param_dtype))
        self.dim, self.dtype = dim, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # Per batch shard (shard_map), the kernel whole on every device. XLA's SPMD partitioner
        # mishandles grouped convolutions: with the batch split it all-gathers the whole map
        # (openxla/xla#47945), and on a mesh with a further, replicated axis (data x tensor) it
        # returns the kernel gradient multiplied by that axis's size (measured with jax 0.10.2,
        # Shardy and GSPMD alike; tests/models/test_vsa.py).
        def conv(maps, kernel):
            return jax.lax.conv_general_dilated(
                    maps, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                    feature_group_count=self.dim)

        y = sharding.per_shard(conv, (x.astype(self.dtype), self.kernel[...].astype(self.dtype)),
                               (axes.MAPS, None), axes.MAPS, what="DepthwiseConv")
        return y + self.bias[...].astype(self.dtype)


class VSABlock(nnx.Module):
    """QFormer's Swin+VSA block; built by `SwinTransformer(block_factory=VSABlock)`.

    Takes the block-factory arguments of `zoo.swin.SwinTransformer`; `shift_size` is accepted
    and ignored (VSA replaces shifted windows).
    """

    def __init__(self, *, dim: int, num_heads: int, window_size: int,
                 shift_size: int | Sequence[int] = 0, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path: float = 0.0,
                 input_resolution: Sequence[int] = (), dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, attn_impl: str = "auto", rngs: nnx.Rngs):
        del shift_size
        window_size = layers.check_positive_int(window_size, "window_size")
        common = dict(dtype=layers.canonical_dtype(dtype),
                      param_dtype=layers.canonical_dtype(param_dtype, "param_dtype"))
        self.input_resolution = tuple(int(r) for r in input_resolution)
        self.pos = DepthwiseConv(dim, window_size // 2 * 2 + 1, rngs=rngs, **common)
        self.norm1 = layers.LayerNorm(dim, eps=swin.SWIN_NORM_EPS, **common)
        self.attn = VSAAttention(dim, num_heads, window_size, qkv_bias=qkv_bias,
                                 attn_impl=attn_impl, rngs=rngs, **common)
        self.norm2 = layers.LayerNorm(dim, eps=swin.SWIN_NORM_EPS, **common)
        self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), rngs=rngs, **common)
        self.drop_path = layers.DropPath(drop_path)

    def __call__(self, x: jax.Array, *, train: bool = False,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        if self.input_resolution and tuple(x.shape[1:3]) != self.input_resolution:
            raise ValueError(f"VSABlock expects [B, {self.input_resolution[0]}, "
                             f"{self.input_resolution[1]}, C], got shape {x.shape}")
        x = x + self.pos(x)
        x = x + self.drop_path(self.attn(self.norm1(x), train=train, rngs=rngs), train=train,
                               rngs=rngs)
        x = x + self.drop_path(self.mlp(self.norm2(x), train=train, rngs=rngs), train=train,
                               rngs=rngs)
        return axes.constrain(x, axes.MAPS)


# A Swin skeleton of any geometry (zoo.swin.SwinTransformer arguments) with VSA blocks; the
# QFormer converter builds checkpoints' own sizes through it.
vsa_swin = variant_builder("vsa_swin", swin.SwinTransformer, fixed=dict(block_factory=VSABlock))
MODEL_ARGS = vsa_swin.arguments


def _overhead(embed_dim: int, depths: Sequence[int], num_heads: Sequence[int],
              window: int = 7) -> int:
    """Parameters VSA adds to Swin: per block a depth-wise conv and the regressor conv."""
    k = window // 2 * 2 + 1
    total = 0
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        dim = embed_dim * 2 ** i
        total += depth * ((k * k + 1) * dim + (dim + 1) * 4 * heads)
    return total


_SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_PAPER = ("Zhang, Xu, Zhang, Tao 2022, VSA: Learning Varied-Size Window Attention in Vision "
          "Transformers (ECCV), arXiv:2204.08446")
_REFERENCE = ("ViTAE-Transformer/QFormer models/swin/swin_transformer_vsa.py (Swin-T + VSA); "
              "ViTAE-Transformer/ViTAE-VSA vsa.py")
_INPUT = {"image": ((224, 224, 3), "float32")}
_TINY = dict(image_size=56, embed_dim=16, depths=(2, 1), num_heads=(2, 4), num_classes=10)
_TINY_INPUT = {"image": ((56, 56, 3), "float32")}


vsa_swin_t = register_variant(
        "vsa_swin_t", swin.SwinTransformer, _SWIN_T, fixed=dict(block_factory=VSABlock),
        weights={"qformer:swin_tiny_vsa": "zoo.converters.vsa:vsa_from_qformer"},
        paper=_PAPER, reference=_REFERENCE, default_input=_INPUT,
        config="configs/vsa.py:vsa_swin_t",
        eval_interpolation="bicubic", tiny=_TINY, tiny_input=_TINY_INPUT,
        paper_params=28.78, paper_params_tolerance=0.01,
        notes=f"Swin-T + VSA in every block (no shifted windows): 28,288,354 (Swin-T) + "
              f"{_overhead(**_SWIN_T):,} (position convs and window regressors). The "
              f"paper's table value is unverified here; 28.78M is the count of the "
              f"official QFormer module.")
