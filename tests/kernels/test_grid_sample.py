"""kernels_pallas.grid_sample: torch grid_sample(bilinear, zeros, align_corners=True) semantics."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.grid_sample import grid_sample


def loop_reference(x: np.ndarray, coords: np.ndarray, align_corners=True) -> np.ndarray:
    """Direct per-point bilinear interpolation in float64, written from the definition."""
    n, h, w, c = x.shape
    points = coords.reshape(n, -1, 2)
    out = np.zeros((n, points.shape[1], c))
    for b in range(n):
        for p, (cx, cy) in enumerate(points[b]):
            if align_corners:
                px, py = (cx + 1) / 2 * (w - 1), (cy + 1) / 2 * (h - 1)
            else:
                px, py = ((cx + 1) * w - 1) / 2, ((cy + 1) * h - 1) / 2
            x0, y0 = int(np.floor(px)), int(np.floor(py))
            for ix, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                for iy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                    if 0 <= ix < w and 0 <= iy < h:
                        out[b, p] += wx * wy * x[b, iy, ix]
    return out.reshape(n, *coords.shape[1:-1], c)


def test_hand_computed_points():
    # 1 image, 3 rows x 4 columns, value = 10 * row + column, 1 channel.
    x = (10.0 * np.arange(3)[:, None] + np.arange(4)[None, :])[None, :, :, None]
    pixel_x = lambda i: -1 + 2 * i / 3  # noqa: E731  (width 4)
    pixel_y = lambda j: -1 + 2 * j / 2  # noqa: E731  (height 3)
    cases = [
            ((pixel_x(2), pixel_y(1)), 12.0),  # exact pixel hit
            ((-1.0, -1.0), 0.0), ((1.0, 1.0), 23.0),  # corners (align_corners=True)
            (((pixel_x(1) + pixel_x(2)) / 2, pixel_y(0)), 1.5),  # midpoint along x
            ((pixel_x(0), (pixel_y(1) + pixel_y(2)) / 2), 15.0),  # midpoint along y
            # Half a pixel right of the last column: half its value, half zero padding.
            ((1.0 + 1 / 3, pixel_y(2)), 0.5 * 23.0),
            ((3.0, 0.0), 0.0), ((0.0, -2.5), 0.0),  # fully outside
    ]
    coords = np.array([c for c, _ in cases], np.float32)[None, :, None, :]
    out = np.asarray(grid_sample(jnp.asarray(x, jnp.float32), jnp.asarray(coords)))
    np.testing.assert_allclose(out[0, :, 0, 0], [v for _, v in cases], atol=1e-5)


def test_size_one_axes_sample_their_only_pixel():
    x = jnp.asarray([[[[2.0], [4.0]]]])  # H = 1, W = 2
    coords = jnp.asarray([[[[0.0, 0.7], [1.0, -0.3]]]])
    np.testing.assert_allclose(np.asarray(grid_sample(x, coords))[0, 0, :, 0], [3.0, 4.0],
                               atol=1e-6)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_random_points_match_the_loop_reference(dtype, atol):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    coords = rng.uniform(-1.4, 1.4, (2, 4, 6, 2)).astype(np.float32)  # ~30% partly outside
    out = grid_sample(jnp.asarray(x, dtype), jnp.asarray(coords))
    assert out.dtype == dtype and out.shape == (2, 4, 6, 3)
    np.testing.assert_allclose(np.asarray(out, np.float32), loop_reference(x, coords),
                               atol=atol)


def test_align_corners_false_pixel_centres_and_random_points():
    x = jnp.asarray([[[[1.0], [3.0], [5.0], [7.0]]]])  # H = 1, W = 4
    # Pixel centres at -1 + (2i + 1)/4; the outer edges +-1 are half outside (zero padding).
    coords = jnp.asarray([[[[-0.75, 0.0], [0.25, 0.0], [0.0, 0.0], [-1.0, 0.0], [1.0, 0.0]]]])
    out = np.asarray(grid_sample(x, coords, align_corners=False))[0, 0, :, 0]
    np.testing.assert_allclose(out, [1.0, 5.0, 4.0, 0.5, 3.5], atol=1e-6)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 3, 2)).astype(np.float32)
    coords = rng.uniform(-1.3, 1.3, (2, 5, 2)).astype(np.float32)[:, :, None, :]
    np.testing.assert_allclose(
            np.asarray(grid_sample(jnp.asarray(x), jnp.asarray(coords), align_corners=False)),
            loop_reference(x, coords, align_corners=False), atol=1e-5)


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 4, 5, 2)), jnp.float32)
    # Away from pixel lines (where the bilinear surface has kinks) and partly outside.
    coords = jnp.asarray(rng.uniform(-1.2, 1.2, (1, 3, 3, 2)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((1, 3, 3, 2)), jnp.float32)

    def loss(x, coords):
        return jnp.sum(grid_sample(x, coords) * weights)

    gx, gc = jax.grad(loss, argnums=(0, 1))(x, coords)
    eps = 1e-3
    for index in [(0, 1, 2, 0), (0, 3, 4, 1), (0, 0, 0, 1)]:
        bump = jnp.zeros_like(x).at[index].set(eps)
        fd = (loss(x + bump, coords) - loss(x - bump, coords)) / (2 * eps)
        np.testing.assert_allclose(float(gx[index]), float(fd), atol=2e-3)
    for index in [(0, 0, 0, 0), (0, 1, 2, 1), (0, 2, 1, 0)]:
        bump = jnp.zeros_like(coords).at[index].set(eps)
        fd = (loss(x, coords + bump) - loss(x, coords - bump)) / (2 * eps)
        np.testing.assert_allclose(float(gc[index]), float(fd), rtol=2e-2, atol=2e-3)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"x of shape \[N, H, W, C\]"):
        grid_sample(jnp.zeros((4, 4, 3)), jnp.zeros((1, 2, 2, 2)))
    with pytest.raises(ValueError, match="coords of shape"):
        grid_sample(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 2, 2, 3)))
