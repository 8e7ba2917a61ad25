r"""VSA-Swin configs: a CPU smoke run and the paper's ImageNet-1k Swin-T + VSA run.

  python train.py --config configs/vsa.py:smoke --workdir /tmp/vsa_smoke
  python train.py --config configs/vsa.py:vsa_swin_t --workdir /runs/vsa_swin_t \
      --config.data.path=/data/tensorflow_datasets

Variants:
  smoke       the smoke model of configs/swin.py (2 stages, width 32-64, patch 2, window 4 on
              the generated 32x32 data) with VSA blocks instead of (shifted) window attention:
              the same data, steps and optimiser as the Swin smoke run, for comparison.
  vsa_swin_t  ImageNet-1k, 224 px. VSA's paper trains Swin-T + VSA with Swin's recipe (AdamW
              lr 1e-3 at batch 1024, weight decay 0.05, 300 epochs, 20 warmup, cosine, label
              smoothing 0.1, stochastic depth 0.2, RandAugment rand-m9-mstd0.5-inc1, random
              erasing 0.25, Mixup 0.8 / CutMix 1.0, bicubic resampling); configs/swin.py
              documents it.
`data=image_folder` reads ImageNet from <path>/train and <path>/val instead of TFDS.
"""
from __future__ import annotations

import ml_collections

from configs import common
from configs import swin as swin_configs

VARIANTS = ("smoke", "vsa_swin_t")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = common.parse_arg(arg, file="configs/vsa.py",
                               defaults={"variant": "smoke", "data": "tfds"},
                               allowed={"variant": VARIANTS,
                                        "data": swin_configs.DATA_SOURCES})
    if options["variant"] == "smoke":
        return swin_configs.smoke_config("vsa_swin_t")
    return swin_configs.imagenet_config("vsa_swin_t", options["data"])
