"""Writes the timm-parity fixture for augmentation: tests/fixtures/timm_augment.npz.

For a fixed 40x30 RGB test card, every RandAugment op of timm's two op lists is applied through
timm's own op functions (`timm.data.auto_augment.NAME_TO_OP`) at the argument timm's level
function gives for magnitude 9 (signed ops: both signs; geometric ops: bilinear and bicubic),
with timm's ImageNet fill (124, 116, 104). It also records the level functions at several
magnitudes (with the sign coin fixed) and timm's Mixup target arithmetic
(`timm.data.mixup.mixup_target`). `tests/training/test_augment.py` compares
zoo/training/augment.py and zoo/training/mixup.py with it.

Needs torch and timm, which the project does not depend on; run it from a separate venv:

  /tmp/timmenv/bin/python tools/make_augment_fixture.py
"""
from __future__ import annotations

import argparse
import pathlib
import random

import numpy as np
import PIL
import timm
import torch
from PIL import Image
from timm.data import auto_augment as aa
from timm.data.mixup import mixup_target

FILL = (124, 116, 104)
MAGNITUDES = (0.0, 3.3, 9.0, 10.0)
OPS = sorted(set(aa._RAND_TRANSFORMS) | set(aa._RAND_INCREASING_TRANSFORMS))
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
HPARAMS = dict(translate_const=int(224 * 0.45), img_mean=FILL)


def test_card() -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 40, 3)).astype(np.uint8)
    pixels[5:25, 8:32] //= 2  # some structure for equalize / autocontrast / sharpness
    return Image.fromarray(pixels)


def level(name: str, magnitude: float, negate: bool):
    """timm's level_fn output with its sign coin forced (random.random() > 0.5 negates)."""
    fn = aa.LEVEL_TO_ARG[name]
    if fn is None:
        return ()
    original = random.random
    random.random = (lambda: 0.9) if negate else (lambda: 0.1)
    try:
        return fn(magnitude, HPARAMS)
    finally:
        random.random = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1]
                                             / "tests/fixtures/timm_augment.npz"))
    args = parser.parse_args()
    image = test_card()
    arrays = {"image": np.asarray(image)}
    for name in OPS:
        for negate in (False, True):
            for magnitude in MAGNITUDES:
                value = level(name, magnitude, negate)
                arrays[f"level/{name}/{magnitude}/{int(negate)}"] = np.asarray(
                        value[0] if value else 0.0, np.float64)
            args_ = level(name, 9.0, negate)  # magnitude 9: posterize keeps >= 1 bit
            resamples = ((Image.BILINEAR, "bilinear"), (Image.BICUBIC, "bicubic"))
            for resample, label in (resamples if name in GEOMETRIC else resamples[:1]):
                out = aa.NAME_TO_OP[name](image, *args_, fillcolor=FILL, resample=resample)
                arrays[f"op/{name}/{int(negate)}/{label}"] = np.asarray(out)
    labels = torch.arange(8) % 5
    for lam in (1.0, 0.3):
        arrays[f"mixup_target/{lam}"] = mixup_target(labels, 5, lam=lam,
                                                     smoothing=0.1).numpy()
    arrays["versions"] = np.asarray(f"timm {timm.__version__}, Pillow {PIL.__version__}, "
                                    f"torch {torch.__version__}")
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {len(arrays)} arrays")


if __name__ == "__main__":
    main()
