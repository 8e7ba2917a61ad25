"""Image classification: the platform's own task, and the image data half other image tasks
reuse (diffusion and masked-image modelling train on the same sources).

Batch: {"image": float32 [B, S, S, 3] ImageNet-normalised, "label": int32 [B]}; model(image)
-> logits [B, num_classes]. The sources are zoo/training/sources.py's (generated, image
folders, ArrayRecord, TFDS); preparation decodes, crops, flips and normalises
(`ClassificationExample`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from zoo.training import augment as augment_lib
from zoo.training import image_ops, mixup
from zoo.training import sources as image_sources
from zoo.training.errors import ConfigError
from zoo.training.tasks import Task, register_task

AUGMENTS = ("none", "flip", "crop_flip")
# Resampling of the crop resize and of RandAugment's geometric ops, with timm's meanings:
# "random" draws bilinear or bicubic per train image (and per RandAugment op), eval resizes
# bilinear; Swin and DeiT train and evaluate with "bicubic".
INTERPOLATIONS = ("bilinear", "bicubic", "random")
# timm's fill for geometric RandAugment ops: the ImageNet mean in [0, 255], rounded.
AUGMENT_FILL = tuple(int(round(float(x))) for x in image_ops.IMAGENET_MEAN)
CENTER_CROP_FRACTION = image_ops.CENTER_CROP_FRACTION


@dataclasses.dataclass(frozen=True)
class ClassificationExample:
    """raw {"image", "label"} -> {"image": float32 [S, S, 3] normalised, "label": int32}.

    Train (an RNG given): "crop_flip" takes a random-resized crop, "flip" and "crop_flip" mirror
    half the images, then RandAugment and (after normalisation) random erasing run when
    configured (zoo/training/augment.py, timm's order). Otherwise the centre square covering
    `center_fraction` of the shorter side is resized to S (identity for generated images,
    which are already S x S). Resizes and RandAugment's geometric ops resample with
    `interpolation` (INTERPOLATIONS).
    Picklable: it is shipped to grain's worker processes.
    """
    image_size: int
    num_classes: int
    augment: str
    center_fraction: float
    rand_augment: augment_lib.RandAugmentSpec | None = None
    color_jitter: float = 0.0
    erasing: tuple = ()  # (prob, mode, min_count, max_count) of random erasing, or ()
    interpolation: str = "bilinear"  # one of INTERPOLATIONS

    def __call__(self, raw: Mapping[str, Any], rng: np.random.Generator | None
                 ) -> dict[str, np.ndarray]:
        from PIL import Image  # in grain's workers; importing zoo needs no PIL

        origin = str(raw.get("origin", "example"))
        label = int(raw["label"])
        if not 0 <= label < self.num_classes:
            raise ValueError(f"{origin}: label {label} is outside [0, config.data.num_classes="
                             f"{self.num_classes})")
        side = self.image_size
        array, image = None, None
        if isinstance(raw["image"], np.ndarray):
            array = image_ops.rgb_uint8(raw["image"], origin)
            height, width = array.shape[:2]
        else:
            image = image_ops.decode_image(raw["image"], origin)
            width, height = image.size
        if rng is not None and self.augment == "crop_flip":
            box = image_ops.random_resized_box(height, width, rng)
        else:
            box = image_ops.center_box(height, width, self.center_fraction)
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}.get(
                self.interpolation)
        if resample is None:  # "random": per train image, as timm's RandomResizedCrop
            resample = (Image.BILINEAR if rng is None or rng.random() < 0.5
                        else Image.BICUBIC)
        # The image stays a PIL image through resize, flip and colour ops and becomes an array
        # once (a contiguous one, which normalises faster than a flipped view).
        pil = image
        if box != (0, 0, side, side) or (height, width) != (side, side):
            pil = (image if image is not None else Image.fromarray(array)).resize(
                    (side, side), resample, box=box)
        flip = (rng is not None and self.augment in ("flip", "crop_flip")
                and rng.random() < 0.5)
        recolour = rng is not None and (self.rand_augment is not None or self.color_jitter > 0)
        if pil is None and recolour:
            pil = Image.fromarray(array)
        if pil is None:  # an array already at the output size
            pixels = array[:, ::-1] if flip else array
        else:
            if flip:
                pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if rng is not None and self.rand_augment is not None:
                pil = augment_lib.rand_augment(
                        pil, self.rand_augment, rng, AUGMENT_FILL,
                        resample=None if self.interpolation == "random" else resample)
            elif rng is not None and self.color_jitter > 0:
                pil = augment_lib.color_jitter(pil, self.color_jitter, rng)
            pixels = np.asarray(pil)
        normalised = image_ops.normalise(pixels)
        if rng is not None and self.erasing:
            prob, mode, min_count, max_count = self.erasing
            normalised = augment_lib.random_erase(normalised, rng, prob=prob, mode=mode,
                                                  min_count=min_count, max_count=max_count)
        return {"image": normalised, "label": np.int32(label)}


class ImageData:
    """The data half of image tasks: classification sources and `ClassificationExample`."""

    sources = image_sources.SOURCES

    def check_data(self, config) -> None:
        d = config.data
        if d.augment not in AUGMENTS:
            raise ValueError(f"config.data.augment={d.augment!r} is invalid; allowed: "
                             f"{AUGMENTS}")
        if d.image_size < 1:
            raise ValueError(f"config.data.image_size={d.image_size!r} is invalid; allowed: "
                             f"an integer >= 1")
        if d.num_classes < 1:
            raise ValueError(f"config.data.num_classes={d.num_classes!r} is invalid; allowed: "
                             f"an integer >= 1")
        if d.interpolation not in INTERPOLATIONS:
            raise ValueError(f"config.data.interpolation={d.interpolation!r} is invalid; "
                             f"allowed: one of {INTERPOLATIONS}")
        if d.rand_augment:
            augment_lib.parse_rand_augment(d.rand_augment)
        if not 0.0 <= d.color_jitter <= 1.0:
            raise ValueError(f"config.data.color_jitter={d.color_jitter!r} is invalid; "
                             f"allowed: a strength in [0, 1] (0 = off)")
        if d.color_jitter > 0 and d.rand_augment:
            raise ValueError(f"config.data.color_jitter={d.color_jitter!r} with "
                             f"data.rand_augment={d.rand_augment!r}: timm drops colour jitter "
                             f"under RandAugment; set color_jitter=0.0")
        e = d.random_erasing
        if not 0.0 <= e.prob <= 1.0:
            raise ValueError(f"config.data.random_erasing.prob={e.prob!r} is invalid; allowed: "
                             f"a probability in [0, 1]")
        if e.mode not in augment_lib.ERASING_MODES:
            raise ValueError(f"config.data.random_erasing.mode={e.mode!r} is invalid; allowed: "
                             f"one of {augment_lib.ERASING_MODES}")
        if not 1 <= e.min_count <= e.max_count:
            raise ValueError(f"config.data.random_erasing: min_count={e.min_count!r} and "
                             f"max_count={e.max_count!r} must satisfy 1 <= min_count <= "
                             f"max_count")

    def open_split(self, config, split: str):
        return image_sources.open_source(config, split)

    def make_preparer(self, config) -> ClassificationExample:
        generated = config.data.source == "generated"
        d = config.data
        erasing = d.random_erasing
        return ClassificationExample(
                image_size=int(d.image_size), num_classes=int(d.num_classes),
                augment=str(d.augment),
                center_fraction=1.0 if generated else CENTER_CROP_FRACTION,
                rand_augment=(augment_lib.parse_rand_augment(d.rand_augment)
                              if d.rand_augment else None),
                color_jitter=float(d.color_jitter),
                erasing=((float(erasing.prob), str(erasing.mode), int(erasing.min_count),
                          int(erasing.max_count)) if erasing.prob > 0 else ()),
                interpolation=str(d.interpolation))

    def example_spec(self, config) -> dict[str, tuple[tuple[int, ...], Any]]:
        side = int(config.data.image_size)
        return {"image": ((side, side, 3), np.float32), "label": ((), np.int32)}


def _soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example cross-entropy against soft targets [B, C], in float32 (bf16 log-softmax
    destabilises training)."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def _cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                   label_smoothing: float = 0.0) -> jax.Array:
    """Per-example (label-smoothed) cross-entropy of integer labels."""
    return _soft_cross_entropy(logits, mixup.smooth_one_hot(labels, num_classes,
                                                            label_smoothing))


@register_task("classification")
class ClassificationTask(ImageData, Task):
    """Image classification: {"image": f32 [B,S,S,3], "label": int32 [B]} -> logits [B,C].

    Training loss is label-smoothed cross-entropy (config.label_smoothing), on Mixup/CutMix
    batches and soft targets when config.mixup enables them (zoo/training/mixup.py); eval
    reports the plain cross-entropy, top-1 and top-5 accuracy.
    """

    def __init__(self, config):
        super().__init__(config)
        self.num_classes = int(config.data.num_classes)
        self.image_size = int(config.data.image_size)
        self.label_smoothing = float(config.label_smoothing)
        self.top_k = min(5, self.num_classes)
        self.mixup = config.mixup if mixup.enabled(config.mixup) else None

    def check_config(self, config) -> None:
        overrides = config.model.overrides
        if "num_classes" in overrides and overrides.num_classes != config.data.num_classes:
            raise ConfigError(
                f"config.model.overrides.num_classes={overrides.num_classes!r} must equal "
                f"config.data.num_classes={config.data.num_classes!r} for classification")
        if "image_size" in overrides and overrides.image_size != config.data.image_size:
            raise ConfigError(
                f"config.model.overrides.image_size={overrides.image_size!r} must equal "
                f"config.data.image_size={config.data.image_size!r} (the images the data "
                f"pipeline produces)")
        if not 0.0 <= config.label_smoothing < 1.0:
            raise ConfigError(f"config.label_smoothing={config.label_smoothing!r} must be in "
                              f"[0, 1)")

    def input_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        side = self.image_size
        return {"image": jax.ShapeDtypeStruct((batch_size, side, side, 3), jnp.float32)}

    def loss_and_metrics(self, model, batch, rngs, train):
        images, labels = batch["image"], batch["label"]
        if train and self.mixup is not None:
            # Mixup/CutMix on the global batch, keyed by (seed, step, micro-batch).
            images, targets, _ = mixup.mix_batch(self.mixup, rngs.sample(), images, labels,
                                                 self.num_classes, self.label_smoothing)
        else:
            targets = mixup.smooth_one_hot(labels, self.num_classes,
                                           self.label_smoothing if train else 0.0)
        logits = model(images, train=train, rngs=rngs)
        loss = jnp.mean(_soft_cross_entropy(logits, targets))
        # With mixup, accuracy counts the dominant (unmixed) label's class.
        accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
        return loss, {"accuracy": accuracy}

    def eval_sums(self, model, batch):
        logits = model(batch["image"], train=False).astype(jnp.float32)
        labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
        _, top = jax.lax.top_k(logits, self.top_k)
        in_top_k = jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
        correct = (top[:, 0] == labels).astype(jnp.float32)
        return {
                "count": jnp.sum(mask),
                "loss": jnp.sum(mask * _cross_entropy(logits, labels, self.num_classes)),
                "top1": jnp.sum(mask * correct),
                f"top{self.top_k}": jnp.sum(mask * in_top_k),
        }

    def finalize_eval(self, sums: Mapping[str, float]) -> dict[str, Any]:
        count = sums["count"]
        if count <= 0:
            raise ValueError("the eval split produced no examples (sum of masks is 0)")
        metrics: dict[str, Any] = {k: v / count for k, v in sums.items() if k != "count"}
        metrics["count"] = int(round(count))
        return metrics
