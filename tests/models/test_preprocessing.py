"""`zoo.preprocess` and the cards' preprocessing: the eval transform of the image classifiers."""
import io
import json

import numpy as np
import pytest
from PIL import Image

import zoo
from zoo.training import image_ops


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    rng = np.random.default_rng(0)
    pixels = (rng.random((300, 400, 3)) * 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("images") / "photo.png"
    Image.fromarray(pixels).save(path)
    return path, pixels


def _by_hand(pixels, size, resample):
    """The documented recipe, written out: centre square of 0.875 of the shorter side (262 of
    300 rows, centred), resized to size, ImageNet mean/std on [0, 255]."""
    side = int(round(300 * 0.875))
    top, left = (300 - side) // 2, (400 - side) // 2
    resized = Image.fromarray(pixels).resize((size, size), resample,
                                             box=(left, top, left + side, top + side))
    return (np.asarray(resized, np.float32) - image_ops.IMAGENET_MEAN) / image_ops.IMAGENET_STD


def test_file_bytes_pil_and_array_give_the_documented_recipe(photo):
    path, pixels = photo
    card = zoo.model_card("swin_t")["preprocessing"]
    assert card["interpolation"] == "bicubic" and card["size"] == 224
    expected = _by_hand(pixels, 224, Image.BICUBIC)
    batch = zoo.preprocess("swin_t", [path, path.read_bytes(), Image.open(path), pixels])
    assert batch.shape == (4, 224, 224, 3) and batch.dtype == np.float32
    for image in batch:
        np.testing.assert_allclose(image, expected, rtol=0, atol=1e-5)
    # HaloNet's configs resize bilinearly, at the model's own size.
    assert zoo.model_card("halonet_h0")["preprocessing"]["interpolation"] == "bilinear"
    np.testing.assert_allclose(zoo.preprocess("halonet_h0", pixels)[0],
                               _by_hand(pixels, 256, Image.BILINEAR), atol=1e-5)


def test_a_model_brings_its_image_size_and_its_card_says_so(photo, tmp_path):
    _, pixels = photo
    model = zoo.create_model("vit_ti16", image_size=64, patch_size=16, depth=1, num_classes=3)
    assert zoo.preprocess(model, pixels).shape == (1, 64, 64, 3)
    zoo.save_pretrained(model, tmp_path / "vit")
    card = json.loads((tmp_path / "vit" / "config.json").read_text())
    assert card["preprocessing"]["size"] == 64
    assert card["preprocessing"]["resize"].endswith("64x64")
    assert zoo.model_card("ssa_gpt2_small")["preprocessing"] is None


def test_bad_input_is_named(photo, tmp_path):
    _, pixels = photo
    with pytest.raises(ValueError, match="'nvist' takes .* preprocess handles the image "
                                         "classifiers: .*swin_t"):
        zoo.preprocess("nvist", pixels)
    with pytest.raises(TypeError, match="image 1 is a int; expected a file path"):
        zoo.preprocess("swin_t", [pixels, 3])
    with pytest.raises(ValueError, match="image 0 is a float32 array; pass uint8"):
        zoo.preprocess("swin_t", pixels.astype(np.float32))
    with pytest.raises(FileNotFoundError, match="no image file at"):
        zoo.preprocess("swin_t", str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match="undecodable|cannot|image"):
        zoo.preprocess("swin_t", io.BytesIO(b"not an image").getvalue())
    with pytest.raises(ValueError, match="unknown model 'swin_x'"):
        zoo.preprocess("swin_x", pixels)
