"""Input preprocessing of the image classifiers, exactly as their eval pipeline does it.

`zoo.preprocess(name_or_model, images)` turns image files (or bytes, PIL images, uint8 arrays)
into the float32 [N, S, S, 3] batch the model takes, so that "image file -> top-5 classes" is
three lines:

    model = zoo.create_model("swin_t", pretrained="swin_tiny.safetensors")
    x = zoo.preprocess(model, "cat.jpg")
    top5 = jax.lax.top_k(jax.nn.softmax(model(x)), 5)

It runs the eval half of `zoo.training.classification.ClassificationExample`, the transform
`eval.py` applies: the centre square covering 0.875 of the shorter side, resized to S with the
model's eval interpolation, then ImageNet mean/std on [0, 255] pixels. `describe(name)` is the
same recipe as data (the "preprocessing" entry of `zoo.model_card`). Checkpoints converted from
timm were trained with timm's preprocessing, which for some models differs (e.g. ViT AugReg's
mean/std of 0.5 and crop 0.9); use timm's `resolve_data_config` for those.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from zoo import registry
from zoo.training import image_ops

_ALLOWED = ("a file path, encoded image bytes, a PIL image or a uint8 array [H, W] / [H, W, 3|4]"
            ", or a list of these")


def describe(name: str) -> dict[str, Any] | None:
    """The eval preprocessing of registered image classifier `name` (None for other models)."""
    entry = registry._entry(name)
    if set(entry.default_input) != {"image"}:
        return None
    (height, width, channels), _ = entry.default_input["image"]
    if height != width or channels != 3:
        return None
    fraction = image_ops.CENTER_CROP_FRACTION
    return {
            "input": "image",
            "size": height,
            "resize": (f"centre square covering {fraction} of the shorter side, resized to "
                       f"{height}x{height}"),
            "crop_fraction": fraction,
            "interpolation": entry.eval_interpolation,
            "mean": [round(float(m), 4) for m in image_ops.IMAGENET_MEAN],
            "std": [round(float(s), 4) for s in image_ops.IMAGENET_STD],
            "pixel_range": [0, 255],
            "layout": "[batch, height, width, 3] float32",
    }


def _classifier(model_or_name) -> tuple[str, dict]:
    if isinstance(model_or_name, str):
        return model_or_name, {}
    found = registry.origin(model_or_name)
    if found is None:
        raise ValueError(f"preprocess: a {type(model_or_name).__name__} that was not built by "
                         "zoo.create_model; pass the registered model name instead")
    name, overrides = found
    # A converted model's image size is among its constructor arguments.
    return name, {**overrides, **(registry.architecture(model_or_name) or {})}


def _raw_image(image, index: int) -> tuple[Any, str]:
    """(what ClassificationExample reads: encoded bytes or a uint8 array, origin)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"preprocess: no image file at {path!r}")
        with open(path, "rb") as f:
            return f.read(), path
    if isinstance(image, (bytes, bytearray)):
        return bytes(image), f"image {index} (bytes)"
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image; PIL is not imported
        return np.asarray(image.convert("RGB")), f"image {index} (PIL)"
    if isinstance(image, np.ndarray) or hasattr(image, "__array__"):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise ValueError(f"preprocess: image {index} is a {array.dtype} array; pass uint8 "
                             "pixels in [0, 255] (as decoded from a file)")
        return array, f"image {index} (array)"
    raise TypeError(f"preprocess: image {index} is a {type(image).__name__}; expected "
                    f"{_ALLOWED}")


def preprocess(model_or_name, images, *, image_size: int | None = None) -> np.ndarray:
    """Images -> the float32 [N, S, S, 3] batch that `model_or_name` takes (module docstring).

    Args:
        model_or_name: a registered image classifier's name, or a model `zoo.create_model` built
            (its `image_size` override is then used).
        images: one image or a list; each is a path, encoded bytes, a PIL image or a uint8 array.
        image_size: output side S; default the model's.
    """
    from zoo.training.classification import ClassificationExample

    name, overrides = _classifier(model_or_name)
    recipe = describe(name)
    if recipe is None:
        takes = sorted(registry._entry(name).default_input)
        raise ValueError(f"preprocess: {name!r} takes {takes}, not one image; preprocess "
                         f"handles the image classifiers: "
                         f"{[n for n in registry.list_models() if describe(n)]}")
    size = image_size or overrides.get("image_size") or recipe["size"]
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"preprocess: image_size must be a positive int, got {size!r}")
    transform = ClassificationExample(image_size=int(size), num_classes=1, augment="none",
                                      center_fraction=recipe["crop_fraction"],
                                      interpolation=recipe["interpolation"])
    batch = list(images) if isinstance(images, (list, tuple)) else [images]
    if not batch:
        raise ValueError("preprocess: an empty list of images")
    out = []
    for index, image in enumerate(batch):
        raw, origin = _raw_image(image, index)
        out.append(transform({"image": raw, "label": 0, "origin": origin}, None)["image"])
    return np.stack(out)
