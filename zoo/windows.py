"""Window geometry shared by Swin (zoo/swin.py) and VSA (zoo/vsa.py): cutting NHWC maps into
non-overlapping windows and back, the relative-position index of a window, and the regions of a
cyclically shifted map (timm `swin_transformer.py` semantics; see zoo/swin.py's docstring).
"""
from __future__ import annotations

import numbers
from typing import Sequence

import jax
import numpy as np

from zoo import layers


def window_partition(x: jax.Array, window: int | Sequence[int]) -> jax.Array:
    """[B, H, W, C] -> [B * nW, wh * ww, C]: windows in raster order, batch-major.

    H and W must be multiples of the window sides.
    """
    wh, ww = layers.int_pair(window, "window")
    if x.ndim != 4:
        raise ValueError(f"window_partition expects [B, H, W, C], got shape {x.shape}")
    batch, height, width, channels = x.shape
    if height % wh or width % ww:
        raise ValueError(f"feature map {height}x{width} is not divisible by the window "
                         f"{wh}x{ww}")
    x = x.reshape(batch, height // wh, wh, width // ww, ww, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, channels)


def window_reverse(windows: jax.Array, window: int | Sequence[int], height: int,
                   width: int) -> jax.Array:
    """Inverse of `window_partition`: [B * nW, wh * ww, C] -> [B, height, width, C]."""
    wh, ww = layers.int_pair(window, "window")
    if height % wh or width % ww:
        raise ValueError(f"feature map {height}x{width} is not divisible by the window "
                         f"{wh}x{ww}")
    per_image = (height // wh) * (width // ww)
    if windows.ndim != 3 or windows.shape[1] != wh * ww or windows.shape[0] % per_image:
        raise ValueError(f"window_reverse expects [B * {per_image}, {wh * ww}, C], got shape "
                         f"{windows.shape}")
    channels = windows.shape[-1]
    x = windows.reshape(-1, height // wh, width // ww, wh, ww, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def relative_position_index(window: int | Sequence[int]) -> np.ndarray:
    """Swin's [N, N] index (N = wh * ww) into the ((2wh-1)*(2ww-1), heads) bias table.

    Entry (i, j) encodes the offset of token i from token j (row offset major), as timm's
    `get_relative_position_index`.
    """
    wh, ww = layers.int_pair(window, "window")
    rows, cols = np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    delta_rows = rows[:, None] - rows[None, :] + (wh - 1)
    delta_cols = cols[:, None] - cols[None, :] + (ww - 1)
    return (delta_rows * (2 * ww - 1) + delta_cols).astype(np.int32)


def shift_region_labels(height: int, width: int, window: int | Sequence[int],
                        shift: int | Sequence[int]) -> np.ndarray:
    """[nW, wh * ww] int32: for each window of the shifted map, each token's pre-shift region.

    timm labels the (up to) 3 x 3 regions of the map that a cyclic shift by -shift brings
    together; two tokens of a window may attend to each other only with equal labels.
    """
    wh, ww = layers.int_pair(window, "window")
    sh, sw = (shift, shift) if isinstance(shift, numbers.Integral) else tuple(shift)
    labels = np.zeros((height, width), np.int32)
    row_bands = (slice(0, height - wh), slice(height - wh, height - sh), slice(height - sh, None))
    col_bands = (slice(0, width - ww), slice(width - ww, width - sw), slice(width - sw, None))
    label = 0
    for row_band in row_bands:
        for col_band in col_bands:
            labels[row_band, col_band] = label
            label += 1
    windows = labels.reshape(height // wh, wh, width // ww, ww).transpose(0, 2, 1, 3)
    return windows.reshape(-1, wh * ww)


def shift_attention_mask(height: int, width: int, window: int | Sequence[int],
                         shift: int | Sequence[int], masked_value: float = -100.0
                         ) -> np.ndarray:
    """timm's additive SW-MSA mask [nW, N, N] (0 within a region, `masked_value` across)."""
    labels = shift_region_labels(height, width, window, shift)
    same = labels[:, :, None] == labels[:, None, :]
    return np.where(same, 0.0, masked_value).astype(np.float32)


def clamp_window_and_shift(input_resolution: Sequence[int], window_size: int | Sequence[int],
                           shift_size: int | Sequence[int]
                           ) -> tuple[tuple[int, int], tuple[int, int]]:
    """timm's rule: a map side <= the window becomes the window and is not shifted."""
    wh, ww = layers.int_pair(window_size, "window_size")
    if isinstance(shift_size, numbers.Integral):
        shift_size = (shift_size, shift_size)
    window = tuple(r if r <= w else w for r, w in zip(input_resolution, (wh, ww)))
    shift = tuple(0 if r <= w else int(s)
                  for r, w, s in zip(input_resolution, window, shift_size))
    return window, shift
