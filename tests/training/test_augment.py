"""Host-side augmentation (zoo/training/augment.py) against timm's definitions: the RandAugment
string grammar, each op's level at a magnitude, the ops' geometry, the draw probabilities, and
random erasing's areas and probability."""
from __future__ import annotations

import collections
import pathlib

import numpy as np
import pytest
from PIL import Image

from zoo.training import augment


def test_parse_timm_strings():
    spec = augment.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (spec.magnitude, spec.magnitude_std, spec.num_layers, spec.prob) == (9, 0.5, 2, 0.5)
    assert spec.ops == augment.INCREASING_OPS and len(spec.ops) == 15
    spec = augment.parse_rand_augment("rand-m7-n3-p0.8-mstdinf-mmax12")
    assert (spec.magnitude, spec.num_layers, spec.prob, spec.magnitude_max) == (7, 3, 0.8, 12)
    assert spec.magnitude_std == float("inf") and not spec.increasing
    assert augment.parse_rand_augment("rand-mstd101").magnitude_std == float("inf")
    for bad, message in (("augmix-m5", "a timm RandAugment string"),
                         ("rand-m9-x3", "unknown part 'x3'"), ("rand-n0", "n must be >= 1")):
        with pytest.raises(ValueError, match=message):
            augment.parse_rand_augment(bad)


@pytest.mark.parametrize("name,negate,expected", [
        ("Rotate", False, 27.0), ("Rotate", True, -27.0), ("ShearX", True, -0.27),
        ("TranslateXRel", False, 0.405), ("Color", False, 1.72),
        ("ColorIncreasing", False, 1.81), ("ContrastIncreasing", True, 0.19),
        ("Posterize", False, 3), ("PosterizeIncreasing", False, 1), ("Solarize", False, 230),
        ("SolarizeIncreasing", False, 26), ("SolarizeAdd", False, 99), ("Equalize", False, 0),
])
def test_levels_at_magnitude_9_follow_timm(name, negate, expected):
    assert augment.op_level(name, 9.0, negate) == pytest.approx(expected)


def _pattern(side=8):
    pixels = np.zeros((side, side, 3), np.uint8)
    pixels[:, :, 0] = np.arange(side)[None, :] * 30
    pixels[:, :, 1] = np.arange(side)[:, None] * 30
    return Image.fromarray(pixels)


def test_geometric_ops_move_pixels_as_pil_affine_and_fill_with_the_mean():
    image, fill = _pattern(), (124, 116, 104)
    out = np.asarray(augment.apply_op(image, "TranslateXRel", 0.25, fill=fill,
                                      resample=Image.BILINEAR))
    src = np.asarray(image)
    np.testing.assert_array_equal(out[:, :6], src[:, 2:])  # content moves left by 2 pixels
    assert (out[:, 6:] == fill).all()
    out = np.asarray(augment.apply_op(image, "TranslateYRel", -0.25, fill=fill,
                                      resample=Image.BILINEAR))
    np.testing.assert_array_equal(out[2:], src[:6])
    rotated = np.asarray(augment.apply_op(image, "Rotate", 90.0, fill=fill,
                                          resample=Image.BILINEAR))
    np.testing.assert_array_equal(rotated, np.rot90(src))


def test_pixel_ops():
    image = _pattern()
    src = np.asarray(image).astype(int)
    kwargs = dict(fill=(0, 0, 0), resample=Image.BILINEAR)
    np.testing.assert_array_equal(np.asarray(augment.apply_op(image, "Invert", 0, **kwargs)),
                                  255 - src)
    solar = np.asarray(augment.apply_op(image, "SolarizeAdd", 99, **kwargs)).astype(int)
    np.testing.assert_array_equal(solar, np.where(src < 128, np.minimum(255, src + 99), src))
    np.testing.assert_array_equal(
            np.asarray(augment.apply_op(image, "PosterizeIncreasing", 0, **kwargs)), 0)
    np.testing.assert_array_equal(
            np.asarray(augment.apply_op(image, "Posterize", 2, **kwargs)), src & 0b11000000)


def test_rand_augment_draws_ops_uniformly_with_probability_p_and_noisy_magnitude(monkeypatch):
    calls = []
    monkeypatch.setattr(augment, "apply_op",
                        lambda image, name, level, **kw: calls.append((name, level)) or image)
    spec = augment.parse_rand_augment("rand-m9-mstd0.5-inc1")
    rng = np.random.default_rng(0)
    image = _pattern()
    trials = 6000
    for _ in range(trials):
        augment.rand_augment(image, spec, rng, (0, 0, 0))
    assert abs(len(calls) / (2 * trials) - 0.5) < 0.02  # each of the 2 ops applied w.p. 0.5
    counts = collections.Counter(name for name, _ in calls)
    assert set(counts) == set(augment.INCREASING_OPS)
    assert max(abs(c / len(calls) - 1 / 15) for c in counts.values()) < 0.015
    rotations = np.array([level for name, level in calls if name == "Rotate"])
    magnitudes = np.abs(rotations) / 3.0
    assert abs((rotations > 0).mean() - 0.5) < 0.06
    assert abs(magnitudes.mean() - 9.0) < 0.1 and abs(magnitudes.std() - 0.5) < 0.1
    assert magnitudes.max() <= 10.0


def test_random_erasing_probability_and_area():
    rng = np.random.default_rng(1)
    pixels = np.full((32, 32, 3), 7.0, np.float32)
    erased_fraction = []
    for _ in range(2000):
        out = augment.random_erase(pixels, rng, prob=0.25, mode="pixel", min_count=1,
                                   max_count=1)
        erased_fraction.append(np.mean(np.any(out != 7.0, axis=-1)))
    erased_fraction = np.array(erased_fraction)
    hit = erased_fraction > 0
    assert abs(hit.mean() - 0.25) < 0.03
    # One rectangle of 2% to 1/3 of the area (rounding of its sides aside).
    assert erased_fraction[hit].min() > 0.01 and erased_fraction[hit].max() < 0.4
    out = augment.random_erase(pixels, np.random.default_rng(2), prob=1.0, mode="const",
                               min_count=2, max_count=2)
    assert (out == 0).any() and set(np.unique(out)) <= {0.0, 7.0}


FIXTURE = np.load(pathlib.Path(__file__).resolve().parents[1] / "fixtures/timm_augment.npz")
FIXTURE_OPS = sorted({key.split("/")[1] for key in FIXTURE.files if key.startswith("op/")})


def test_fixture_covers_both_timm_op_lists():
    assert set(FIXTURE_OPS) == set(augment.ORIGINAL_OPS) | set(augment.INCREASING_OPS)


@pytest.mark.parametrize("name", FIXTURE_OPS)
def test_ops_and_levels_equal_timm(name):
    """Each op at magnitude 9 (both signs; bilinear and bicubic for geometric ops) equals the
    image timm produced (tools/make_augment_fixture.py; same Pillow major version), and the
    level at magnitudes 0, 3.3, 9 and 10 equals timm's level function."""
    image = Image.fromarray(FIXTURE["image"])
    for negate in (False, True):
        for magnitude in (0.0, 3.3, 9.0, 10.0):
            want = float(FIXTURE[f"level/{name}/{magnitude}/{int(negate)}"])
            assert augment.op_level(name, magnitude, negate) == pytest.approx(want), magnitude
        for label, resample in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
            key = f"op/{name}/{int(negate)}/{label}"
            if key not in FIXTURE.files:
                continue
            got = augment.apply_op(image, name, augment.op_level(name, 9.0, negate),
                                   fill=(124, 116, 104), resample=resample)
            np.testing.assert_array_equal(np.asarray(got), FIXTURE[key], err_msg=key)


def test_mixup_targets_equal_timm():
    import jax.numpy as jnp

    from zoo.training import mixup

    labels = jnp.arange(8) % 5
    for lam in (1.0, 0.3):
        one = mixup.smooth_one_hot(labels, 5, 0.1)
        ours = lam * one + (1 - lam) * one[::-1]
        np.testing.assert_allclose(ours, FIXTURE[f"mixup_target/{lam}"], rtol=1e-6, atol=1e-7)


def test_color_jitter_factors_and_order():
    """Each of brightness, contrast, saturation once, factors in [1 - s, 1 + s]: on a grey
    image only brightness changes pixels, so its factor is read back from the mean."""
    grey = Image.fromarray(np.full((4, 4, 3), 100, np.uint8))
    rng = np.random.default_rng(3)
    means = [np.asarray(augment.color_jitter(grey, 0.4, rng)).mean() / 100 for _ in range(500)]
    assert 0.6 - 0.02 <= min(means) and max(means) <= 1.4 + 0.02
    assert abs(np.mean(means) - 1.0) < 0.03 and np.std(means) > 0.15


@pytest.mark.parametrize("changes,message", [
        ({"data.color_jitter": 0.4, "data.rand_augment": "rand-m9-mstd0.5-inc1"},
         "timm drops colour jitter under RandAugment"),
        ({"data.rand_augment": "rand-m9-q1"}, "unknown part 'q1'"),
        ({"data.random_erasing.mode": "blur"}, "config.data.random_erasing.mode='blur'"),
        ({"data.random_erasing.prob": 2.0}, "config.data.random_erasing.prob=2.0"),
        ({"data.interpolation": "lanczos"},
         r"config.data.interpolation='lanczos' is invalid; allowed: one of \('bilinear', "
         r"'bicubic', 'random'\)"),
])
def test_bad_augmentation_settings_are_config_errors(changes, message):
    from training_helpers import tiny_config
    from zoo.training.config import validate_config
    from zoo.training.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        validate_config(tiny_config(**changes), num_devices=8)


def _example(interpolation, augment="crop_flip", **kw):
    from zoo.training.classification import ClassificationExample
    return ClassificationExample(image_size=16, num_classes=10, augment=augment,
                                 center_fraction=0.875, interpolation=interpolation, **kw)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_crop_and_eval_resize_use_the_configured_interpolation(interpolation):
    from zoo.training import image_ops
    rng_pixels = np.random.default_rng(3)
    image = rng_pixels.integers(0, 256, (40, 30, 3)).astype(np.uint8)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    raw = {"image": image, "label": 1}

    out = _example(interpolation)(raw, np.random.default_rng(7))["image"]
    rng = np.random.default_rng(7)  # replay the example's draws: the box, then the flip coin
    box = image_ops.random_resized_box(40, 30, rng)
    expected = Image.fromarray(image).resize((16, 16), resample, box=box)
    if rng.random() < 0.5:
        expected = expected.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    np.testing.assert_array_equal(out, image_ops.normalise(np.asarray(expected)))

    evaluated = _example(interpolation)(raw, None)["image"]
    expected = Image.fromarray(image).resize((16, 16), resample,
                                             box=image_ops.center_box(40, 30, 0.875))
    np.testing.assert_array_equal(evaluated, image_ops.normalise(np.asarray(expected)))


def test_random_interpolation_mixes_per_image_and_rand_augment_follows_a_fixed_one(
        monkeypatch):
    seen = []
    original_resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, resample=None, **kw: (
            seen.append(resample) or original_resize(self, size, resample, **kw)))
    image = {"image": np.random.default_rng(0).integers(0, 256, (40, 30, 3)).astype(np.uint8),
             "label": 0}
    for seed in range(200):
        _example("random")(image, np.random.default_rng(seed))
    share = seen.count(Image.BICUBIC) / len(seen)
    assert set(seen) == {Image.BILINEAR, Image.BICUBIC} and abs(share - 0.5) < 0.12
    seen.clear()
    _example("random")(image, None)  # eval: bilinear, as timm
    assert seen == [Image.BILINEAR]

    filters = []
    monkeypatch.setattr(augment, "apply_op", lambda image, name, level, fill, resample: (
            filters.append(resample) or image))
    spec = augment.parse_rand_augment("rand-m9-n4-p1.0-inc1")
    for seed in range(50):
        _example("bicubic", rand_augment=spec)(image, np.random.default_rng(seed))
    assert set(filters) == {Image.BICUBIC}
