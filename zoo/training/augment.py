"""Host-side image augmentation with timm's semantics: RandAugment, colour jitter and random
erasing.

Both run in the grain workers, inside `ClassificationExample`, with the example's own
`np.random.Generator` (seeded by (seed, epoch, example index)), so a resumed run and any number
of hosts see the same augmented images. timm draws from Python's and NumPy's global RNGs
instead; the distributions are the same, the sequences are not. Each op at a given magnitude
is the same PIL call as timm's (`timm/data/auto_augment.py`), which
tests/training/test_augment.py checks against arrays produced by timm.

RandAugment (`rand_augment="rand-m9-mstd0.5-inc1"`, timm's config string): `n` ops (default 2)
drawn uniformly with replacement from timm's 15-op list (`inc1`: the "increasing" variants,
whose strength grows with the magnitude); each applied with probability `p` (default 0.5) at
magnitude `m` (of 10) plus Gaussian noise of std `mstd` (`mstd` inf: uniform in [0, m]),
clipped to [0, 10] (`mmax` changes the top). Geometric ops fill with the dataset mean
(`img_mean`) and resample with `config.data.interpolation` (with "random", bilinear or bicubic
at random per op, as timm); translations move by up to 45% of the side.

Colour jitter (`color_jitter=s`, torchvision's ColorJitter(s, s, s) as timm builds it): brightness,
contrast and saturation factors uniform in [max(0, 1 - s), 1 + s], applied in random order
(ImageEnhance Brightness / Contrast / Color, torchvision's PIL path). timm skips it when
RandAugment is on; the config rejects that combination instead of ignoring a field.

One deliberate difference: PosterizeIncreasing at magnitude 10 keeps 0 bits, which Pillow >= 10
rejects (timm 1.0.31 then raises); here it gives the all-zero image older Pillow gave.

Random erasing (timm `RandomErasing`, after normalisation): with probability `prob`, `count`
rectangles of 2%-33% of the area (aspect 0.3-3.3, log-uniform) are replaced by per-pixel normal
noise (mode "pixel"), per-channel noise ("rand") or zeros ("const"); 10 tries each.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

LEVEL_DENOM = 10.0
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                  "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                  "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                  "TranslateXRel", "TranslateYRel")
ORIGINAL_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
                "TranslateXRel", "TranslateYRel")
ERASING_MODES = ("pixel", "rand", "const")


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm RandAugment string (picklable: it travels to grain's workers)."""
    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_DENOM
    increasing: bool = False

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else ORIGINAL_OPS


def parse_rand_augment(text: str) -> RandAugmentSpec:
    """timm's "rand-m9-n2-mstd0.5-inc1-p0.5-mmax10" grammar; ValueError naming the part."""
    parts = text.split("-")
    if parts[0] != "rand":
        raise ValueError(f"config.data.rand_augment={text!r} is invalid; allowed: '' (off) or a "
                         f"timm RandAugment string such as 'rand-m9-mstd0.5-inc1'")
    fields = {}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)([0-9.]+|inf)", part)
        if not match:
            raise ValueError(f"config.data.rand_augment={text!r}: unknown part {part!r}; "
                             f"allowed: m<magnitude>, n<ops>, p<prob>, mstd<std>, mmax<max>, "
                             f"inc<0|1>")
        fields[match.group(1)] = float(match.group(2))
    spec = RandAugmentSpec(
            magnitude=fields.get("m", 10.0), num_layers=int(fields.get("n", 2)),
            prob=fields.get("p", 0.5), magnitude_std=fields.get("mstd", 0.0),
            magnitude_max=fields.get("mmax", LEVEL_DENOM), increasing=bool(fields.get("inc", 0)))
    if spec.magnitude_std > 100:  # timm: mstd above 100 means uniform sampling in [0, m]
        spec = dataclasses.replace(spec, magnitude_std=math.inf)
    if spec.num_layers < 1 or not 0.0 <= spec.prob <= 1.0 or spec.magnitude < 0:
        raise ValueError(f"config.data.rand_augment={text!r}: n must be >= 1, p in [0, 1], m "
                         f">= 0")
    return spec


# ---------------------------------------------------------------------------------------------
# The ops (PIL image in, PIL image out), as timm defines them.


def _affine(image, matrix, fill, resample):
    from PIL import Image
    return image.transform(image.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def apply_op(image, name: str, level: float, *, fill, resample):
    """`name` at argument `level` (the op's own units: degrees, factor, bits, pixels...)."""
    from PIL import ImageEnhance, ImageOps

    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Invert":
        return ImageOps.invert(image)
    if name == "Rotate":
        return image.rotate(level, resample=resample, fillcolor=fill)
    if name in ("Posterize", "PosterizeIncreasing"):
        if level >= 8:
            return image
        if level <= 0:
            # Keeping 0 bits (PosterizeIncreasing at magnitude 10) zeroes the image, as older
            # Pillow did; Pillow >= 10 rejects bits=0.
            return image.point(lambda _: 0)
        return ImageOps.posterize(image, int(level))
    if name in ("Solarize", "SolarizeIncreasing"):
        return ImageOps.solarize(image, level)
    if name == "SolarizeAdd":
        lut = [min(255, i + int(level)) if i < 128 else i for i in range(256)]
        return image.point(lut * len(image.getbands()))
    enhancers = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
                 "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
    base = name.replace("Increasing", "")
    if base in enhancers:
        return enhancers[base](image).enhance(level)
    if name == "ShearX":
        return _affine(image, (1, level, 0, 0, 1, 0), fill, resample)
    if name == "ShearY":
        return _affine(image, (1, 0, 0, level, 1, 0), fill, resample)
    if name == "TranslateXRel":
        return _affine(image, (1, 0, level * image.size[0], 0, 1, 0), fill, resample)
    if name == "TranslateYRel":
        return _affine(image, (1, 0, 0, 0, 1, level * image.size[1]), fill, resample)
    raise ValueError(f"unknown RandAugment op {name!r}")


def op_level(name: str, magnitude: float, negate: bool) -> float:
    """timm's level-to-argument mapping at `magnitude` (of 10); `negate` is its coin flip for
    the signed ops."""
    m = magnitude / LEVEL_DENOM
    sign = -1.0 if negate else 1.0
    if name == "Rotate":
        return sign * m * 30.0
    if name in ("ShearX", "ShearY"):
        return sign * m * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * m * 0.45
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return m * 1.8 + 0.1
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                "SharpnessIncreasing"):
        return max(0.1, 1.0 + sign * m * 0.9)
    if name == "Posterize":
        return int(m * 4)
    if name == "PosterizeIncreasing":
        return 4 - int(m * 4)
    if name == "Solarize":
        return min(256, int(m * 256))
    if name == "SolarizeIncreasing":
        return 256 - min(256, int(m * 256))
    if name == "SolarizeAdd":
        return min(128, int(m * 110))
    return 0.0  # AutoContrast, Equalize, Invert take no argument


def rand_augment(image, spec: RandAugmentSpec, rng: np.random.Generator, fill,
                 resample=None):
    """timm's RandAugment.__call__ on a PIL image, drawing from `rng`. Geometric ops resample
    with `resample` (a PIL filter), or bilinear/bicubic at random per op when None (timm's
    "random" train interpolation; a fixed one is passed to the ops as timm's hparams)."""
    from PIL import Image

    for name in rng.choice(spec.ops, spec.num_layers, replace=True):
        if spec.prob < 1.0 and rng.random() > spec.prob:
            continue
        magnitude = spec.magnitude
        if spec.magnitude_std == math.inf:
            magnitude = rng.uniform(0.0, magnitude)
        elif spec.magnitude_std > 0:
            magnitude = rng.normal(magnitude, spec.magnitude_std)
        magnitude = max(0.0, min(magnitude, spec.magnitude_max))
        negate = rng.random() > 0.5
        op_resample = resample
        if op_resample is None:
            op_resample = Image.BILINEAR if rng.random() < 0.5 else Image.BICUBIC
        image = apply_op(image, str(name), op_level(str(name), magnitude, negate), fill=fill,
                         resample=op_resample)
    return image


def color_jitter(image, strength: float, rng: np.random.Generator):
    """torchvision ColorJitter(strength, strength, strength) on a PIL image."""
    from PIL import ImageEnhance

    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    factors = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, size=3)
    for index in rng.permutation(3):
        image = enhancers[index](image).enhance(float(factors[index]))
    return image


def random_erase(pixels: np.ndarray, rng: np.random.Generator, *, prob: float, mode: str,
                 min_count: int, max_count: int, min_area: float = 0.02,
                 max_area: float = 1 / 3, min_aspect: float = 0.3) -> np.ndarray:
    """timm's RandomErasing on a normalised HWC float image (returns a new array)."""
    if rng.random() > prob:
        return pixels
    pixels = np.array(pixels, copy=True)
    height, width, channels = pixels.shape
    area = height * width
    count = min_count if min_count == max_count else int(rng.integers(min_count, max_count + 1))
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(count):
        for _attempt in range(10):
            target = rng.uniform(min_area, max_area) * area / count
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                if mode == "pixel":
                    patch = rng.standard_normal((h, w, channels))
                elif mode == "rand":
                    patch = np.broadcast_to(rng.standard_normal((1, 1, channels)),
                                            (h, w, channels))
                else:
                    patch = np.zeros((h, w, channels))
                pixels[top:top + h, left:left + w] = patch.astype(pixels.dtype)
                break
    return pixels
