"""Swin Transformer (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using
Shifted Windows", ICCV 2021), with timm's `swin_transformer.py` (>= 0.9 layout) as the
reference semantics, so timm weights load by transposes and logits agree.

Why this file also exports building blocks: VSA-Swin (zoo/vsa.py) keeps Swin's skeleton and
swaps the block, so `SwinTransformer(block_factory=...)`, `PatchEmbed` and `PatchMerging` are a
public, stable interface. The window geometry (partition/reverse, relative position index,
shift regions) is in zoo/windows.py.

Conventions:
  * Feature maps are NHWC, [B, H, W, C], between blocks (timm >= 0.9 too); images are NHWC.
  * Stages: stage 0 has no downsampling; stage i > 0 starts with `PatchMerging` (timm >= 0.9
    puts the merge at the start of the next stage, the original code at the end of the
    previous one - same computation, different key names).
  * Windows: a feature map is cut into non-overlapping window x window tiles in raster order,
    batch-major (`window_partition`). timm's rule for small maps: a side no longer than the
    window becomes the window and is never shifted. Each (clamped) window must divide the map:
    timm would zero-pad the map instead; here that is a ValueError at build time.
  * Shifted windows (odd blocks): cyclic shift by -window//2, attention restricted to tokens of
    the same pre-shift region, shift back. timm adds -100 to the logits of other regions; here
    the regions go to `kernels_pallas.attention` as segment ids (a [B*nW, window^2] int array
    instead of a [nW, window^2, window^2] float mask, and the kernel skips nothing it should
    not), i.e. -inf. exp(-100) ~ 4e-44 underflows to 0 in float32, so both give the same
    probabilities (the tests check timm's logits).
  * The relative position bias ((2*wh-1)*(2*ww-1), heads), trunc-normal std 0.02, is gathered
    into a [1, heads, N, N] bias that the kernel broadcasts over windows; its gradient comes
    back with that shape.
  * LayerNorm eps 1e-5 (timm's bare nn.LayerNorm), exact GELU, linear drop-path schedule over
    all blocks, global average pool after the final LayerNorm, linear head.
  * Init as timm: Linear trunc-normal 0.02 / zero bias, patch conv PyTorch default.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo import axes, layers
from zoo.axes import with_axes
from zoo.registry import model_arguments, register_variant
from zoo.windows import (clamp_window_and_shift, relative_position_index, shift_region_labels,
                         window_partition, window_reverse)

SWIN_NORM_EPS = 1e-5  # timm Swin uses torch's nn.LayerNorm default


class PatchEmbed(nnx.Module):
    """Patch stem: stride-p p x p conv (`proj`, timm `patch_embed.proj`) + LayerNorm (`norm`).

    [B, H, W, in_chans] -> [B, H/p, W/p, embed_dim].
    """

    def __init__(self, image_size: int | Sequence[int], patch_size: int, in_chans: int,
                 embed_dim: int, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.proj = layers.PatchEmbed(image_size, patch_size, in_chans, embed_dim, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)
        self.norm = layers.LayerNorm(embed_dim, eps=SWIN_NORM_EPS, dtype=dtype,
                                     param_dtype=param_dtype)
        self.grid_size = self.proj.grid_size

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.proj(x))


class PatchMerging(nnx.Module):
    """2x2 neighbour concat -> LayerNorm(4C) -> Linear(4C, out_dim, no bias) (timm names
    `downsample.norm`, `downsample.reduction`).

    Channel order of the concat follows timm >= 0.9 (and the original Swin): for the 2x2 block
    the sources are (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1), each C wide.
    """

    def __init__(self, dim: int, out_dim: int | None = None, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.dim = layers.check_positive_int(dim, "dim")
        self.out_dim = 2 * self.dim if out_dim is None else layers.check_positive_int(
                out_dim, "out_dim")
        self.norm = layers.LayerNorm(4 * self.dim, eps=SWIN_NORM_EPS, dtype=dtype,
                                     param_dtype=param_dtype)
        self.reduction = layers.Linear(4 * self.dim, self.out_dim, axes=(None, "embed"),
                                       use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                       rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        if channels != self.dim or height % 2 or width % 2:
            raise ValueError(f"PatchMerging expects [B, even H, even W, {self.dim}], got "
                             f"shape {x.shape}")
        x = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
        # (row-in-pair, col-in-pair) -> (col, row) so the flattened order is timm's x0..x3.
        x = x.transpose(0, 1, 3, 4, 2, 5).reshape(batch, height // 2, width // 2, 4 * channels)
        return self.reduction(self.norm(x))


class WindowAttention(layers.Attention):
    """Multi-head self-attention inside windows with Swin's relative position bias.

    Parameters (timm names): `qkv`, `proj` (see `zoo.layers.Attention`) and
    `relative_position_bias_table` ((2wh-1)*(2ww-1), heads).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int | Sequence[int], *,
                 qkv_bias: bool = True, attn_impl: str = "auto", proj_drop: float = 0.0,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_impl=attn_impl,
                         proj_drop=proj_drop, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.window_size = layers.int_pair(window_size, "window_size")
        wh, ww = self.window_size
        table_rows = (2 * wh - 1) * (2 * ww - 1)
        self.relative_position_bias_table = nnx.Param(
                with_axes(layers.DEFAULT_KERNEL_INIT, ("pos", "heads"))(
                        rngs.params(), (table_rows, num_heads),
                        layers.canonical_dtype(param_dtype, "param_dtype")))
        self.dtype = layers.canonical_dtype(dtype)

    def relative_position_bias(self) -> jax.Array:
        """[1, heads, N, N] bias (N = window area), in the compute dtype."""
        index = relative_position_index(self.window_size)
        table = self.relative_position_bias_table[...]
        bias = table[index.reshape(-1)].reshape(*index.shape, -1)
        return jnp.transpose(bias, (2, 0, 1))[None].astype(self.dtype)

    def __call__(self, x: jax.Array, *, region_labels: jax.Array | np.ndarray | None = None,
                 train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
        """x: [B * nW, N, C] windows; region_labels: None or int [nW, N] (shifted windows:
        tokens attend only to tokens with the same label)."""
        q_segments = kv_segments = None
        if region_labels is not None:
            labels = jnp.asarray(region_labels, jnp.int32)
            if labels.ndim != 2 or labels.shape[1] != x.shape[1] or x.shape[0] % labels.shape[0]:
                raise ValueError(f"region_labels must be [nW, {x.shape[1]}] with nW dividing "
                                 f"the window batch {x.shape[0]}, got {labels.shape}")
            q_segments = kv_segments = jnp.tile(labels, (x.shape[0] // labels.shape[0], 1))
        return super().__call__(x, bias=self.relative_position_bias(),
                                q_segment_ids=q_segments, kv_segment_ids=kv_segments,
                                train=train, rngs=rngs)


class SwinBlock(nnx.Module):
    """x + DropPath(SW-MSA(LN(x))), then x + DropPath(Mlp(LN(x))), on [B, H, W, C] maps.

    `window_size`/`shift_size` are the configured values; timm's clamp for small maps
    (`clamp_window_and_shift`) is applied here, so the block knows its effective geometry.
    """

    def __init__(self, *, dim: int, num_heads: int, window_size: int | Sequence[int],
                 shift_size: int | Sequence[int], mlp_ratio: float, qkv_bias: bool,
                 drop_path: float, input_resolution: Sequence[int], dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, attn_impl: str = "auto", rngs: nnx.Rngs):
        self.input_resolution = tuple(int(r) for r in input_resolution)
        self.window_size, self.shift_size = clamp_window_and_shift(
                self.input_resolution, window_size, shift_size)
        for side, size, window in zip(("height", "width"), self.input_resolution,
                                      self.window_size):
            if size % window:
                raise ValueError(f"feature map {side} {size} is not divisible by the window "
                                 f"{window}; choose image_size so every stage's map is a "
                                 f"multiple of window_size (e.g. patch * 2**(stages-1) * window)")
        for shift, window in zip(self.shift_size, self.window_size):
            if not 0 <= shift < window:
                raise ValueError(f"shift_size must be in [0, window) = [0, {window}), got "
                                 f"{shift}")
        common = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layers.LayerNorm(dim, eps=SWIN_NORM_EPS, **common)
        self.attn = WindowAttention(dim, num_heads, self.window_size, qkv_bias=qkv_bias,
                                    attn_impl=attn_impl, rngs=rngs, **common)
        self.norm2 = layers.LayerNorm(dim, eps=SWIN_NORM_EPS, **common)
        self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), rngs=rngs, **common)
        self.drop_path = layers.DropPath(drop_path)

    def _attention(self, x, *, train, rngs):
        height, width = self.input_resolution
        shifted = any(self.shift_size)
        labels = None
        if shifted:
            x = jnp.roll(x, (-self.shift_size[0], -self.shift_size[1]), axis=(1, 2))
            # A trace-time NumPy constant (tiny: nW x N ints), not model state.
            labels = shift_region_labels(height, width, self.window_size, self.shift_size)
        windows = window_partition(x, self.window_size)
        windows = self.attn(windows, region_labels=labels, train=train, rngs=rngs)
        x = window_reverse(windows, self.window_size, height, width)
        if shifted:
            x = jnp.roll(x, self.shift_size, axis=(1, 2))
        return x

    def __call__(self, x: jax.Array, *, train: bool = False,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        if x.ndim != 4 or tuple(x.shape[1:3]) != self.input_resolution:
            raise ValueError(f"SwinBlock expects [B, {self.input_resolution[0]}, "
                             f"{self.input_resolution[1]}, C], got shape {x.shape}")
        x = x + self.drop_path(self._attention(self.norm1(x), train=train, rngs=rngs),
                               train=train, rngs=rngs)
        x = x + self.drop_path(self.mlp(self.norm2(x), train=train, rngs=rngs),
                               train=train, rngs=rngs)
        return axes.constrain(x, axes.MAPS)


BlockFactory = Callable[..., nnx.Module]


class SwinStage(nnx.Module):
    """Optional `downsample` (PatchMerging) followed by `blocks` at one resolution."""

    def __init__(self, *, in_dim: int, dim: int, depth: int, num_heads: int, downsample: bool,
                 input_resolution: Sequence[int], window_size: int, mlp_ratio: float,
                 qkv_bias: bool, drop_path_rates: Sequence[float], attn_impl: str,
                 block_factory: BlockFactory, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype)
        self.downsample = (PatchMerging(in_dim, dim, rngs=rngs, **common) if downsample
                           else None)
        self.blocks = nnx.List([
                block_factory(dim=dim, num_heads=num_heads, window_size=window_size,
                              shift_size=0 if i % 2 == 0 else window_size // 2,
                              mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rate,
                              input_resolution=tuple(input_resolution), attn_impl=attn_impl,
                              rngs=rngs, **common)
                for i, rate in enumerate(drop_path_rates)])

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x, train=train, rngs=rngs)
        return x


class SwinTransformer(nnx.Module):
    """Swin classifier on NHWC images.

    Args:
        image_size: int or (height, width). Every stage's map must be divisible by its
            (clamped) window: for patch 4, 4 stages, window 7 that is multiples of 224.
        patch_size, in_chans: stem.
        num_classes: classifier outputs; 0 = no head (`__call__` returns pooled features).
        embed_dim: width of stage 0; stage i has embed_dim * 2**i.
        depths, num_heads: blocks and heads per stage (same length).
        window_size: attention window side; odd blocks shift by window_size // 2.
        mlp_ratio, qkv_bias: block options.
        drop_rate: dropout on the pooled features before the head (timm's drop_rate).
        drop_path_rate: stochastic depth, linear from 0 to this over all blocks (timm).
        attn_impl: `kernels_pallas.attention` implementation.
        dtype, param_dtype: compute and storage dtypes.
        block_factory: None = `SwinBlock`; otherwise called as `block_factory(*, dim,
            num_heads, window_size, shift_size, mlp_ratio, qkv_bias, drop_path,
            input_resolution, dtype, param_dtype, attn_impl, rngs)` and must return a module
            called as `block(x [B, H, W, C], *, train, rngs) -> [B, H, W, C]`.
            `window_size`/`shift_size` are the configured (unclamped) values.
    """

    def __init__(self, *, image_size: int | Sequence[int] = 224, patch_size: int = 4,
                 in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, attn_impl: str = "auto",
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 block_factory: BlockFactory | None = None, rngs: nnx.Rngs):
        depths = layers.int_tuple("depths", depths)
        num_heads = layers.int_tuple("num_heads", num_heads)
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} must have one entry "
                             f"per stage")
        if (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
                or num_classes < 0):
            raise ValueError(f"num_classes must be an integer >= 0 (0 = no head), got "
                             f"{num_classes!r}")
        if not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        if attn_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(f"attn_impl must be one of {layers.ATTENTION_IMPLS}, got "
                             f"{attn_impl!r}")
        if block_factory is not None and not callable(block_factory):
            raise ValueError(f"block_factory must be None or callable, got {block_factory!r}")
        embed_dim = layers.check_positive_int(embed_dim, "embed_dim")
        window_size = layers.check_positive_int(window_size, "window_size")
        patch_size = layers.check_positive_int(patch_size, "patch_size")
        drop_path_rate = layers.check_rate(drop_path_rate, "drop_path_rate")
        self.drop_rate = layers.check_rate(drop_rate, "drop_rate")
        height, width = layers.int_pair(image_size, "image_size")
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        for dim, heads in zip(dims, num_heads):
            if dim % heads:
                raise ValueError(f"stage width {dim} is not divisible by num_heads {heads} "
                                 f"(embed_dim={embed_dim}, num_heads={num_heads})")
        # Checked before any parameter exists: the stem, every merge and every window tiling.
        reduction = patch_size * 2 ** (len(depths) - 1)
        resolutions = []
        for i in range(len(depths)):
            step = patch_size * 2 ** i
            if height % step or width % step:
                raise ValueError(f"image_size {(height, width)} must be divisible by "
                                 f"patch_size * 2**(stages-1) = {reduction}")
            resolutions.append((height // step, width // step))
        for res in resolutions:
            window, _ = clamp_window_and_shift(res, window_size, 0)
            if res[0] % window[0] or res[1] % window[1]:
                raise ValueError(f"image_size {(height, width)} gives a {res[0]}x{res[1]} "
                                 f"stage map not divisible by window_size {window_size}; "
                                 f"use a multiple of {reduction * window_size} (timm pads "
                                 f"instead, which is not supported here)")
        self.dtype = layers.canonical_dtype(dtype)
        param_dtype = layers.canonical_dtype(param_dtype, "param_dtype")
        common = dict(dtype=self.dtype, param_dtype=param_dtype)
        self.num_classes = int(num_classes)
        self.num_features = dims[-1]
        self.stage_resolutions = tuple(resolutions)
        self.stage_dims = tuple(dims)

        self.patch_embed = PatchEmbed((height, width), patch_size, in_chans, embed_dim,
                                      rngs=rngs, **common)
        rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
        factory = SwinBlock if block_factory is None else block_factory
        stages, start = [], 0
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            stages.append(SwinStage(
                    in_dim=dims[max(i - 1, 0)], dim=dims[i], depth=depth, num_heads=heads,
                    downsample=i > 0, input_resolution=resolutions[i], window_size=window_size,
                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                    drop_path_rates=rates[start:start + depth], attn_impl=attn_impl,
                    block_factory=factory, rngs=rngs, **common))
            start += depth
        self.layers = nnx.List(stages)
        self.norm = layers.LayerNorm(self.num_features, eps=SWIN_NORM_EPS, **common)
        self.head = (layers.Linear(self.num_features, self.num_classes,
                                   axes=("embed", "classes"), rngs=rngs, **common)
                     if self.num_classes else None)

    def forward_features(self, x: jax.Array, *, train: bool = False,
                         rngs: nnx.Rngs | None = None) -> jax.Array:
        """Images [B, H, W, C] -> final normalised map [B, H/32, W/32, num_features]."""
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x, train=train, rngs=rngs)
        return self.norm(x)

    def forward_head(self, x: jax.Array, *, pre_logits: bool = False, train: bool = False,
                     rngs: nnx.Rngs | None = None) -> jax.Array:
        """Map from `forward_features` -> logits [B, num_classes] (or pooled features)."""
        return layers.average_pool_head(x, self.head, self.drop_rate, pre_logits=pre_logits,
                                        train=train, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.forward_head(self.forward_features(x, train=train, rngs=rngs),
                                 train=train, rngs=rngs)

    def forward_intermediates(self, x: jax.Array, *, indices: int | Sequence[int] | None = None,
                              norm: bool = False, train: bool = False,
                              rngs: nnx.Rngs | None = None
                              ) -> tuple[jax.Array, list[jax.Array]]:
        """Stage outputs, timm-style.

        Args:
            indices: None = every stage; an int n = the last n stages; a sequence = those stage
                indices (negative counts from the end).
            norm: pass the last stage's map through the final LayerNorm (the other stages have
                no norm of their own in Swin).

        Returns:
            (final map as `forward_features` returns it, [stage output maps [B, h, w, C]]).
        """
        wanted = layers.select_indices(indices, len(self.layers), "stage")
        last = len(self.layers) - 1
        maps = []
        x = self.patch_embed(x)
        for i, stage in enumerate(self.layers):
            x = stage(x, train=train, rngs=rngs)
            if i in wanted:
                maps.append(x)
        features = self.norm(x)
        if norm and last in wanted:
            maps[-1] = features
        return features, maps


# ---------------------------------------------------------------------------------------------
# Registered variants (Swin paper Table 1 / timm swin_{tiny,small,base}_patch4_window7_224).
# ---------------------------------------------------------------------------------------------

_VARIANTS: dict[str, dict[str, Any]] = {
        "t": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
        "s": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
        "b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}
MODEL_ARGS = model_arguments(SwinTransformer)


_PAPER = ("Liu et al. 2021, Swin Transformer: Hierarchical Vision Transformer using Shifted "
          "Windows (ICCV), arXiv:2103.14030")
_REFERENCE = "timm timm/models/swin_transformer.py (>= 0.9 layout); microsoft/Swin-Transformer"
_INPUT = {"image": ((224, 224, 3), "float32")}
# CPU-sized: 56 px -> 14x14 map (two 7x7 windows a side, so stage 0 has a shifted block), then
# a 7x7 map (window clamps to the map, no shift).
_TINY = dict(image_size=56, embed_dim=16, depths=(2, 1), num_heads=(2, 4), num_classes=10)
_TINY_INPUT = {"image": ((56, 56, 3), "float32")}


swin_t = register_variant(
        "swin_t", SwinTransformer, _VARIANTS["t"],
        weights={"timm:swin_tiny_patch4_window7_224": "zoo.converters.swin:swin_from_timm"},
        paper=_PAPER, reference=_REFERENCE, default_input=_INPUT,
        config="configs/swin.py:swin_t",
        eval_interpolation="bicubic", tiny=_TINY, tiny_input=_TINY_INPUT,
        paper_params=28.29, paper_params_tolerance=0.005,
        notes="Swin-T (C=96, depths 2-2-6-2, heads 3-6-12-24, window 7); 28,288,354 "
              "params = timm swin_tiny_patch4_window7_224 (paper: 28M).")


swin_s = register_variant(
        "swin_s", SwinTransformer, _VARIANTS["s"],
        paper=_PAPER, reference=_REFERENCE, default_input=_INPUT,
        config="configs/swin.py:swin_s",
        eval_interpolation="bicubic", tiny=_TINY, tiny_input=_TINY_INPUT,
        paper_params=49.61, paper_params_tolerance=0.005,
        notes="Swin-S (C=96, depths 2-2-18-2); 49,606,258 params = timm "
              "swin_small_patch4_window7_224 (paper: 50M).")


swin_b = register_variant(
        "swin_b", SwinTransformer, _VARIANTS["b"],
        paper=_PAPER, reference=_REFERENCE, default_input=_INPUT,
        config="configs/swin.py:swin_b",
        eval_interpolation="bicubic", tiny=_TINY, tiny_input=_TINY_INPUT,
        paper_params=87.77, paper_params_tolerance=0.005,
        notes="Swin-B (C=128, depths 2-2-18-2, heads 4-8-16-32); 87,768,224 params = "
              "timm swin_base_patch4_window7_224 (paper: 88M).")
