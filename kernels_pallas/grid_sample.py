"""Bilinear sampling of feature maps at continuous coordinates, with PyTorch
`F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=...)` semantics,
channels-last: align_corners=True is what VSA's reference code uses, align_corners=False what
NViST's TensoRF renderer uses.

Conventions:
  * coords[..., 0] is x (along the width), coords[..., 1] is y (along the height), both
    normalised to [-1, 1]. align_corners=True: -1 and +1 are the centres of the first and
    last pixel, pixel i sits at -1 + 2 i / (size - 1); an axis of size 1 maps every coordinate
    to its single pixel (torch's unnormalisation multiplies by size - 1 = 0).
    align_corners=False: -1 and +1 are the outer edges of the map, pixel i sits at
    -1 + (2 i + 1) / size.
  * Zero padding: each of the four neighbours that falls outside the map contributes zero (its
    bilinear weight is dropped, the others keep theirs), so a point half a pixel outside the
    border gets half the border value and a point a full pixel outside gets 0.
  * Differentiable in `x` and `coords` (autodiff through the gathers and the bilinear weights;
    the floor is piecewise constant, as in torch).

This is the XLA implementation (four gathers per output point). No Pallas sample-and-attend
kernel exists yet: without a GPU to measure on, a fused kernel could not be shown to be faster
(issue 7 asks for one only if it is measurably so).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def grid_sample(x: jax.Array, coords: jax.Array, *, align_corners: bool = True) -> jax.Array:
    """x: [N, H, W, C]; coords: [N, *out, 2] (x, y in [-1, 1]) -> [N, *out, C] in x.dtype."""
    if x.ndim != 4:
        raise ValueError(f"grid_sample expects x of shape [N, H, W, C], got {x.shape}")
    if coords.ndim < 3 or coords.shape[-1] != 2 or coords.shape[0] != x.shape[0]:
        raise ValueError(f"grid_sample expects coords of shape [N={x.shape[0]}, ..., 2] "
                         f"(x, y), got {coords.shape}")
    n, height, width, channels = x.shape
    out_shape = coords.shape[1:-1]
    coords = coords.reshape(n, -1, 2).astype(jnp.float32)
    if align_corners:  # [-1, 1] -> [0, size - 1] pixel units
        px = (coords[..., 0] + 1.0) * (0.5 * (width - 1))
        py = (coords[..., 1] + 1.0) * (0.5 * (height - 1))
    else:  # [-1, 1] -> [-0.5, size - 0.5]
        px = ((coords[..., 0] + 1.0) * width - 1.0) * 0.5
        py = ((coords[..., 1] + 1.0) * height - 1.0) * 0.5
    x0 = jnp.floor(px)
    y0 = jnp.floor(py)
    wx1, wy1 = px - x0, py - y0
    wx0, wy0 = 1.0 - wx1, 1.0 - wy1
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    flat = x.reshape(n, height * width, channels)

    def corner(ix, iy, weight):
        inside = (ix >= 0) & (ix < width) & (iy >= 0) & (iy < height)
        index = jnp.clip(iy, 0, height - 1) * width + jnp.clip(ix, 0, width - 1)
        values = jnp.take_along_axis(flat, index[..., None], axis=1)
        return values.astype(jnp.float32) * jnp.where(inside, weight, 0.0)[..., None]

    out = (corner(x0, y0, wx0 * wy0) + corner(x0 + 1, y0, wx1 * wy0)
           + corner(x0, y0 + 1, wx0 * wy1) + corner(x0 + 1, y0 + 1, wx1 * wy1))
    return out.reshape(n, *out_shape, channels).astype(x.dtype)
