r"""ViT configs: a CPU smoke run on generated data, and the DeiT ImageNet-1k recipe.

The argument after the colon selects the variant, big_vision style (bare or as `variant=`):

  python train.py --config configs/vit.py:smoke --workdir /tmp/vit_smoke
  python train.py --config configs/vit.py:variant=s16 --workdir /runs/vit_s16 \
      --config.data.path=/data/tensorflow_datasets

Variants:
  smoke            a 2-block, width-64 ViT (108k params, 8x8 patches of 4 pixels) on the
                   generated 32x32, 10-class data: 100 steps of batch 64, about 15 s on a
                   2-core CPU after compilation, with a clearly falling loss; checkpoints and
                   evals every 50 steps so `make demo` exercises both.
  ti16 s16 b16     ImageNet-1k from scratch with the DeiT recipe (Touvron et al. 2021,
  b32 l16          "Training data-efficient image transformers", hyper-parameter Table 9;
                   reference code facebookresearch/deit main.py): AdamW, lr 5e-4 * batch/512,
                   weight decay 0.05, batch 1024, 300 epochs, 5 warmup epochs, cosine decay to
                   1e-5, stochastic depth 0.1, label smoothing 0.1, random-resized crop and
                   flip, bicubic resampling (--train-interpolation bicubic, and the eval
                   resize), RandAugment "rand-m9-mstd0.5-inc1", random erasing 0.25 (pixel mode),
                   Mixup 0.8 / CutMix 1.0 (switch probability 0.5, per batch) and an EMA of
                   the weights with decay 0.99996 (main.py's defaults; colour jitter 0.3 is
                   listed there but timm drops it under RandAugment).
                   DeiT has no recipe for B/32 and L/16; they reuse the B/16 one.

Not applied: DeiT's repeated augmentation (RASampler: each image 3 times per batch on
different devices), which the data pipeline does not offer. [unverified] against a full
ImageNet run: none was made here.
"""
from __future__ import annotations

import ml_collections

from configs import common

VARIANTS = ("smoke", "ti16", "s16", "b16", "b32", "l16")

# facebookresearch/deit main.py defaults, Table 9 of the paper.
_IMAGENET_TRAIN_IMAGES = 1_281_167
_DEIT_EPOCHS = 300
_DEIT_WARMUP_EPOCHS = 5
_DEIT_BATCH = 1024
_DEIT_BASE_LR = 5e-4  # per 512 images: lr = 5e-4 * batch / 512
_DEIT_MIN_LR = 1e-5
_DEIT_DROP_PATH = 0.1
_DEIT_LABEL_SMOOTHING = 0.1


def parse_arg(arg: str | None) -> dict[str, str]:
    """Parses "smoke" or "variant=smoke" (comma-separated key=value, as big_vision does)."""
    return common.parse_arg(arg, file="configs/vit.py", defaults={"variant": "smoke"},
                            allowed={"variant": VARIANTS})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = parse_arg(arg)["variant"]
    return _smoke() if variant == "smoke" else _imagenet(variant)


def _smoke() -> ml_collections.ConfigDict:
    c = common.base_config()
    c.model.name = "vit_ti16"
    c.model.overrides = ml_collections.ConfigDict(dict(
            image_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10))
    c.data.source = "generated"
    c.data.image_size = 32
    c.data.num_classes = 10
    c.data.augment = "flip"

    c.total_steps = 100
    c.batch_size = 64
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.05
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 10

    c.checkpoint_every = 50
    c.eval_every = 50
    c.eval.batch_size = 128
    c.log_every = 10
    return c


def _imagenet(variant: str) -> ml_collections.ConfigDict:
    c = common.base_config()
    c.model.name = f"vit_{variant}"
    c.model.overrides = ml_collections.ConfigDict(dict(
            image_size=224, num_classes=1000, drop_path_rate=_DEIT_DROP_PATH))

    # TFDS's on-disk imagenet2012 (read without TensorFlow); point data.path at the data dir.
    common.imagenet_data(c, "tfds", 224)

    c.batch_size = _DEIT_BATCH
    steps_per_epoch = _IMAGENET_TRAIN_IMAGES / _DEIT_BATCH
    c.total_steps = int(_DEIT_EPOCHS * steps_per_epoch)
    c.label_smoothing = _DEIT_LABEL_SMOOTHING
    c.data.interpolation = "bicubic"
    c.data.rand_augment = "rand-m9-mstd0.5-inc1"
    c.data.random_erasing.prob = 0.25
    c.mixup.mixup_alpha = 0.8
    c.mixup.cutmix_alpha = 1.0
    c.ema.decay = 0.99996
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = _DEIT_BASE_LR * _DEIT_BATCH / 512
    c.optimizer.weight_decay = 0.05
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
    c.optimizer.grad_clip_norm = 0.0  # DeiT does not clip gradients
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = int(_DEIT_WARMUP_EPOCHS * steps_per_epoch)
    c.schedule.end_factor = _DEIT_MIN_LR / c.optimizer.learning_rate

    c.precision.compute_dtype = "bfloat16"  # DeiT trains with mixed precision (torch AMP)
    c.checkpoint_every = 5_000
    c.eval_every = 5_000
    c.eval.batch_size = 1024
    c.log_every = 100
    return c
