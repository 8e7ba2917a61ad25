"""PNG grids of images, for the sampling and rendering CLIs (sample.py, render.py)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def image_grid(rows: Sequence[Sequence[np.ndarray]], gutter: int = 2) -> np.ndarray:
    """Rows of equally sized [H, W, 3] uint8 images -> one uint8 grid, white gutters."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(row) for row in rows)
    grid = np.full((len(rows) * (h + gutter), cols * (w + gutter), 3), 255, np.uint8)
    half = gutter // 2
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = i * (h + gutter) + half, j * (w + gutter) + half
            grid[top:top + h, left:left + w] = image
    return grid


def save_png(grid: np.ndarray, path: str, scale: int = 4) -> None:
    """Writes `grid` upscaled `scale` times (nearest neighbour: pixels stay visible)."""
    from PIL import Image
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                 Image.NEAREST).save(path)
