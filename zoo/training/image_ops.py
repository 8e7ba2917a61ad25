"""Image operations shared by the image tasks and the scripts: decoding, crops, ImageNet
normalisation and its inverse, uint8 conversion, and PNG grids.

Pipelines hand models ImageNet-normalised float32 pixels: (pixels - IMAGENET_MEAN) /
IMAGENET_STD, with pixels in [0, 255]. The diffusion task scales them back to [-1, 1], and the
scripts turn them back into uint8 images.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np

IMAGENET_MEAN = np.asarray((0.485, 0.456, 0.406), np.float32) * 255.0
IMAGENET_STD = np.asarray((0.229, 0.224, 0.225), np.float32) * 255.0
# Eval (and un-cropped train) images: the centre square covering this fraction of the shorter
# side, resized to image_size (the usual "resize to S/0.875, centre-crop S").
CENTER_CROP_FRACTION = 0.875
CROP_SCALE = (0.08, 1.0)  # random-resized-crop area fraction (Inception / timm default)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # random-resized-crop aspect ratio range


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 / [0, 255] pixels [..., W, 3] -> ImageNet-normalised float32.

    The same values as (x - mean) / std, computed on [..., W * 3] rows against the mean and
    std tiled W times: NumPy's inner loop then runs over a whole row instead of 3 channels,
    15x faster on a 224 px image (a per-image cost of every host's input pipeline)."""
    out = np.array(pixels, dtype=np.float32)  # a C-contiguous copy, also of a flipped view
    if out.ndim < 2 or out.shape[-1] != 3:
        return (out - IMAGENET_MEAN) / IMAGENET_STD
    width = out.shape[-2]
    rows = out.reshape(-1, width * 3)
    rows -= np.tile(IMAGENET_MEAN, width)
    rows /= np.tile(IMAGENET_STD, width)
    return out


def unnormalise(normalised) -> np.ndarray:
    """ImageNet-normalised pixels -> float [0, 1] (unclipped)."""
    return (np.asarray(normalised) * IMAGENET_STD + IMAGENET_MEAN) / 255.0


def unit_to_uint8(images) -> np.ndarray:
    """Float images in [0, 1] (clipped) -> uint8."""
    return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def signed_to_uint8(images) -> np.ndarray:
    """Float images in [-1, 1] (clipped) -> uint8, as diffusion samples are written."""
    return np.round((np.clip(np.asarray(images), -1, 1) + 1) * 127.5).astype(np.uint8)


def rgb_uint8(array: np.ndarray, origin: str) -> np.ndarray:
    """[H, W] or [H, W, 1|3|4] pixels -> uint8 [H, W, 3] (grey repeated, alpha dropped)."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{origin}: image array of shape {array.shape}; expected [H, W] or "
                         f"[H, W, 1|3|4]")
    array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]
    return np.ascontiguousarray(array.astype(np.uint8))


def decode_image(encoded: bytes, origin: str):
    """Encoded JPEG/PNG bytes -> RGB PIL image."""
    from PIL import Image  # imported where images are decoded: grain workers, not every user

    try:
        image = Image.open(io.BytesIO(encoded))
        image.load()
        # convert() copies even an RGB image: skip it for the common case.
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as error:  # noqa: BLE001  (PIL raises many types for bad files)
        raise ValueError(f"{origin}: cannot decode image ({len(encoded)} bytes): {error}"
                         ) from None


def center_box(height: int, width: int, fraction: float) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred square covering `fraction` of the short side."""
    side = max(1, int(round(min(height, width) * fraction)))
    top, left = (height - side) // 2, (width - side) // 2
    return left, top, left + side, top + side


def random_resized_box(height: int, width: int, rng: np.random.Generator
                       ) -> tuple[int, int, int, int]:
    """A crop of random area fraction in CROP_SCALE and aspect ratio in CROP_RATIO (log-uniform);
    after 10 misses, the largest centred crop whose ratio is in range."""
    area = height * width
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(log_low, log_high))
        crop_w = int(round(math.sqrt(target * ratio)))
        crop_h = int(round(math.sqrt(target / ratio)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return left, top, left + crop_w, top + crop_h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        crop_w, crop_h = width, int(round(width / CROP_RATIO[0]))
    elif ratio > CROP_RATIO[1]:
        crop_w, crop_h = int(round(height * CROP_RATIO[1])), height
    else:
        crop_w, crop_h = width, height
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return left, top, left + crop_w, top + crop_h


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

    from zoo import storage
    encoded = io.BytesIO()
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                 Image.NEAREST).save(encoded, format="PNG")
    storage.write_bytes(path, encoded.getvalue())  # a local file or a bucket object
