r"""HaloNet configs: a CPU smoke run on generated data, and ImageNet-1k runs for H0-H7.

The argument after the colon selects the variant, big_vision style (bare or as `variant=`),
and `data=` picks the ImageNet reader for the h* variants:

  python train.py --config configs/halonet.py:smoke --workdir /tmp/halonet_smoke
  python train.py --config configs/halonet.py:variant=h1 --workdir /runs/halonet_h1 \
      --config.data.path=/data/tensorflow_datasets
  python train.py --config configs/halonet.py:variant=h1,data=image_folder \
      --workdir /runs/halonet_h1 --config.data.path=/data/imagenet

Variants:
  smoke      a 3-stage, width 32-128 HaloNet (block 2, halo 1: 8x8, 4x4, 2x2 maps) on
             the generated 32x32, 10-class data: 100 steps, trains in well under a minute on a
             2-core CPU; checkpoints and evals every 50 steps.
  h0 ... h7  ImageNet-1k from scratch at the paper's resolution (256, 256, 256, 320, 384, 448,
             512 px; H7 at 640 px, not the paper's 600, which block 10 cannot tile: see
             zoo/halonet.py), crop-and-flip augmentation.

Recipe. What the HaloNet paper states and we use: the per-model image sizes above and
ImageNet-1k training from scratch. What we could NOT check in the paper text (its training
appendix was not available to us) and therefore set to standard ResNet-style values, marked
[unverified] below: SGD with Nesterov momentum 0.9, 350 epochs, batch 4096, learning rate
0.1 * batch / 256 with 5 warmup epochs and cosine decay to 0, weight decay 4e-5 (on weights
only), label smoothing 0.1 and stochastic depth. RandAugment and an EMA of the weights are
expressible now (`data.rand_augment`, `ema.decay`), but their settings for HaloNet are not in
the text we have, so they are left off rather than guessed.
"""
from __future__ import annotations

import ml_collections

from configs import common

VARIANTS = ("smoke", "h0", "h1", "h2", "h3", "h4", "h5", "h6", "h7")
DATA_SOURCES = ("tfds", "image_folder")

# Paper resolutions (H7: nearest size that block 10 can tile; zoo/halonet.py docstring).
IMAGE_SIZE = {"h0": 256, "h1": 256, "h2": 256, "h3": 320, "h4": 384, "h5": 448, "h6": 512,
              "h7": 640}

_IMAGENET_TRAIN_IMAGES = 1_281_167
_EPOCHS = 350  # [unverified]
_WARMUP_EPOCHS = 5  # [unverified]
_BATCH = 4096  # [unverified]
_BASE_LR_PER_256 = 0.1  # [unverified] linear scaling rule, lr = 0.1 * batch / 256
_WEIGHT_DECAY = 4e-5  # [unverified]
# [unverified] stochastic depth, growing with model size as is usual for such families.
_DROP_PATH = {"h0": 0.0, "h1": 0.0, "h2": 0.05, "h3": 0.1, "h4": 0.1, "h5": 0.15, "h6": 0.2,
              "h7": 0.2}


def parse_arg(arg: str | None) -> dict[str, str]:
    """Parses "smoke", "h1" or "variant=h1,data=image_folder" (big_vision style)."""
    return common.parse_arg(arg, file="configs/halonet.py",
                            defaults={"variant": "smoke", "data": "tfds"},
                            allowed={"variant": VARIANTS, "data": DATA_SOURCES})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = parse_arg(arg)
    if options["variant"] == "smoke":
        return _smoke()
    return _imagenet(options["variant"], options["data"])


def _smoke() -> ml_collections.ConfigDict:
    c = common.base_config()
    # halonet_h1 with every size argument overridden: H1's rv = rb = 1 width rule, scaled down.
    c.model.name = "halonet_h1"
    c.model.overrides = ml_collections.ConfigDict(dict(
            image_size=32, stem_width=16, base_widths=(32, 64, 128), depths=(1, 1, 1),
            block_size=2, halo_size=1, num_heads=4, num_classes=10))
    c.data.source = "generated"
    c.data.image_size = 32
    c.data.num_classes = 10
    c.data.augment = "flip"

    c.total_steps = 100
    c.batch_size = 64
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 2e-3
    c.optimizer.weight_decay = 0.05
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 10

    c.checkpoint_every = 50
    c.eval_every = 50
    c.eval.batch_size = 128
    c.log_every = 10
    return c


def _imagenet(variant: str, source: str) -> ml_collections.ConfigDict:
    c = common.base_config()
    size = IMAGE_SIZE[variant]
    c.model.name = f"halonet_{variant}"
    c.model.overrides = ml_collections.ConfigDict(dict(
            image_size=size, num_classes=1000, drop_path_rate=_DROP_PATH[variant]))

    common.imagenet_data(c, source, size)

    c.batch_size = _BATCH
    steps_per_epoch = _IMAGENET_TRAIN_IMAGES / _BATCH
    c.total_steps = int(_EPOCHS * steps_per_epoch)
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.learning_rate = _BASE_LR_PER_256 * _BATCH / 256
    c.optimizer.weight_decay = _WEIGHT_DECAY
    c.optimizer.grad_clip_norm = 0.0  # ResNet-style SGD recipes do not clip
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = int(_WARMUP_EPOCHS * steps_per_epoch)
    c.schedule.end_factor = 0.0
    c.label_smoothing = 0.1  # [unverified]

    c.precision.compute_dtype = "bfloat16"
    c.checkpoint_every = 2_000
    c.eval_every = 2_000
    c.eval.batch_size = 1024
    c.log_every = 100
    return c
