r"""FIT configs: encoder (classification), ar (language modelling), denoiser (pixel diffusion).

  python train.py --config configs/fit.py:encoder_smoke --workdir /tmp/fit_enc
  python train.py --config configs/fit.py:ar_smoke --workdir /tmp/fit_ar
  python train.py --config configs/fit.py:denoiser_smoke --workdir /tmp/fit_dn
  python sample.py --config configs/fit.py:denoiser_smoke --workdir /tmp/fit_dn   # PNG grid

Variants (`variant=` or bare):
  encoder_smoke   FIT encoder on the generated 32 px, 10-class images: patch 4 -> 64 patches in
                  4 sub-image groups of 16, 4 latents per group, spec '(1)2(1)'; ~100 steps.
  ar_smoke        FIT-AR on the embedded byte-level corpus: 64-byte context in 4 groups of 16,
                  4 latents per group, spec '(1)2(1)' (language_modeling task, as configs/ssa.py).
  denoiser_smoke  FIT denoiser on the generated images at 16 px: patch 2 -> 4 sub-images of
                  16 patches, 8 latents per group, spec '(1)2(1)'; image_diffusion task,
                  class-conditional (as pix2seq's FIT denoiser).
  encoder         fit_encoder_b on ImageNet-1k at 256 px (`data=image_folder` or TFDS).
  ar              fit_ar_small, byte level, context 1024, on token files (`data.path`).
  denoiser        fit_denoiser_64 on 64x64 images from an image folder (e.g. ImageNet-64),
                  class-conditional on the 1000 labels.
The FIT paper's training recipes are not in the released code (papers.md §1.7): the full
variants use AdamW with cosine decay and warmup, [unverified] against the paper. The denoiser's
batch/lr follow the RIN ImageNet-64 config in the same repo (batch 1024, lr 2e-3; RIN uses
LAMB, we use AdamW with its lr) [context, not FIT's].
"""
from __future__ import annotations

import ml_collections

from configs import common

VARIANTS = ("encoder_smoke", "ar_smoke", "denoiser_smoke", "encoder", "ar", "denoiser")
DATA_SOURCES = ("tfds", "image_folder")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = common.parse_arg(arg, file="configs/fit.py",
                               defaults={"variant": "encoder_smoke", "data": "tfds"},
                               allowed={"variant": VARIANTS, "data": DATA_SOURCES})
    return globals()[f"_{options['variant']}"](options["data"])


def _smoke_common(c):
    c.total_steps = 100
    c.batch_size = 32
    c.optimizer.learning_rate = 2e-3
    c.optimizer.weight_decay = 0.05
    c.schedule.warmup_steps = 10
    c.checkpoint_every = 50
    c.eval_every = 50
    c.eval.batch_size = 64
    c.eval.num_batches = 4
    c.log_every = 10
    return c


_SMOKE_TRUNK = dict(layer_spec="(1)2(1)", latents_per_group=4, x_dim=32, latent_dim=64,
                    x_heads=2, latent_heads=4)


def _encoder_smoke(_):
    c = _smoke_common(common.base_config())
    c.model.name = "fit_encoder_b"
    c.model.overrides = ml_collections.ConfigDict(dict(
            image_size=32, patch_size=4, num_classes=10, num_groups=4, **_SMOKE_TRUNK))
    c.data.source = "generated"
    c.data.image_size = 32
    c.data.num_classes = 10
    return c


def _ar_smoke(_):
    c = _smoke_common(common.base_config("language_modeling"))
    c.model.name = "fit_ar_small"
    c.model.overrides = ml_collections.ConfigDict(dict(
            vocab_size=256, seq_len=64, num_groups=4, **{**_SMOKE_TRUNK, "x_dim": 64}))
    c.data.source = "embedded_text"
    c.lm.vocab_size = 256
    c.lm.seq_len = 64
    c.optimizer.learning_rate = 3e-3
    c.logging.progress_bar = False
    return c


def _denoiser_smoke(_):
    c = _smoke_common(common.base_config("image_diffusion"))
    c.model.name = "fit_denoiser_64"
    # Class-conditional, as pix2seq's FIT denoiser (cond_proj, conditional='class').
    c.model.overrides = ml_collections.ConfigDict(dict(
            image_size=16, patch_size=2, num_groups=4, cond_dim=10,
            **{**_SMOKE_TRUNK, "latents_per_group": 8}))
    c.data.source = "generated"
    c.data.image_size = 16
    c.data.num_classes = 10
    c.data.augment = "flip"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.0
    c.total_steps = 150
    return c


def _encoder(source):
    c = common.imagenet_data(common.base_config(), source, 256)
    c.model.name = "fit_encoder_b"
    c.model.overrides = ml_collections.ConfigDict(dict(image_size=256, num_classes=1000,
                                                       drop_path_rate=0.1))
    c.label_smoothing = 0.1
    c.batch_size = 1024
    c.total_steps = 300 * 1_281_167 // 1024
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.05
    c.schedule.warmup_steps = 10_000
    c.precision.compute_dtype = "bfloat16"
    c.checkpoint_every = c.eval_every = 5000
    return c


def _ar(_):
    c = common.base_config("language_modeling")
    c.model.name = "fit_ar_small"
    c.model.overrides = ml_collections.ConfigDict(dict(vocab_size=256, seq_len=1024))
    c.data.source = "token_files"
    c.data.path = "/data/bytes"
    c.lm.token_dtype = "uint16"
    c.lm.vocab_size = 256
    c.lm.seq_len = 1024
    c.lm.bytes_per_token = 1.0
    c.batch_size = 256
    c.total_steps = 200_000
    c.optimizer.learning_rate = 6e-4
    c.optimizer.weight_decay = 0.1
    c.optimizer.b2 = 0.95
    c.schedule.warmup_steps = 2000
    c.precision.compute_dtype = "bfloat16"
    c.checkpoint_every = c.eval_every = 2000
    c.eval.num_batches = 100
    return c


def _denoiser(source):
    c = common.imagenet_data(common.base_config("image_diffusion"), "image_folder", 64)
    c.model.name = "fit_denoiser_64"
    c.model.overrides = ml_collections.ConfigDict(dict(image_size=64, cond_dim=1000))
    c.data.path = "/data/imagenet64"
    c.data.augment = "flip"
    c.batch_size = 1024
    c.total_steps = 150_000
    c.optimizer.learning_rate = 2e-3
    c.optimizer.weight_decay = 0.0
    c.schedule.warmup_steps = 10_000
    c.precision.compute_dtype = "bfloat16"
    c.checkpoint_every = c.eval_every = 5000
    del source
    return c
