"""Pixel diffusion: the "image_diffusion" task (FIT denoiser, zoo/diffusion.py).

Data: the classification pipeline's images (generated, image folders, ArrayRecord, TFDS; the
same `config.data` fields), un-normalised back to pixels and scaled to [-1, 1]. Labels are
used only by class-conditional denoisers (model `cond_dim` = data.num_classes: one-hot).

Training loss: eps-prediction MSE with latent self-conditioning (zoo.diffusion.denoising_loss)
under pix2seq's cosine schedule (`SCHEDULE`); the denoiser sees the noise level gamma(t), and a
first pass over `SELF_COND_RATE` of the batch gives those examples their latents (pix2seq's
`add_self_cond_hidden`); t and the noise come from the step's "sample" rng stream.
Eval: the same loss, self-conditioned the same way (pix2seq evaluates its loss with
self-conditioning), at fixed, evenly spaced times and fixed noise (deterministic, so eval
numbers are comparable across steps and runs), overall and for the low-noise (t < 0.5) and
high-noise halves.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from zoo import diffusion, storage
from zoo.training import image_ops
from zoo.training.classification import ImageData
from zoo.training.errors import ConfigError
from zoo.training.tasks import Task, register_task

TASK = "image_diffusion"
SCHEDULE = "cosine"
SELF_COND_RATE = 0.5
# NumPy, not jnp: a jnp constant here would start the JAX backend at import time, before a
# multi-host run's jax.distributed.initialize.
_MEAN = (image_ops.IMAGENET_MEAN / 255.0).astype(np.float32)
_STD = (image_ops.IMAGENET_STD / 255.0).astype(np.float32)


def to_unit_range(normalised: jax.Array) -> jax.Array:
    """Pipeline images (ImageNet-normalised) -> pixels in [-1, 1]."""
    return jnp.clip(normalised * _STD + _MEAN, 0.0, 1.0) * 2.0 - 1.0


@register_task(TASK)
class ImageDiffusionTask(ImageData, Task):
    """{"image", "label"} batches -> eps-prediction loss of a denoiser (module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        self.image_size = int(config.data.image_size)
        self.num_classes = int(config.data.num_classes)
        self.conditional = int(config.model.overrides.get("cond_dim", 0)) > 0

    def check_config(self, config) -> None:
        overrides = config.model.overrides
        if "image_size" in overrides and overrides.image_size != config.data.image_size:
            raise ConfigError(f"config.model.overrides.image_size={overrides.image_size!r} must "
                              f"equal config.data.image_size={config.data.image_size!r}")
        cond = overrides.get("cond_dim", 0)
        if cond not in (0, config.data.num_classes):
            raise ConfigError(f"config.model.overrides.cond_dim={cond!r} must be 0 "
                              f"(unconditional) or config.data.num_classes="
                              f"{config.data.num_classes} (class-conditional, one-hot labels)")

    def input_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        side = self.image_size
        spec = {"images": jax.ShapeDtypeStruct((batch_size, side, side, 3), jnp.float32),
                "gamma": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}
        if self.conditional:  # one-hot labels, the denoiser's third argument
            spec["cond"] = jax.ShapeDtypeStruct((batch_size, self.num_classes), jnp.float32)
        return spec

    # --- samples: a PNG grid from pure noise (sample.py) ------------------------------------

    sample_options = ("num_samples", "steps", "sampler", "seed")

    def check_sample_options(self, *, num_samples: int = 1, steps: int = 100,
                             sampler: str = "ddim", **_) -> None:
        if num_samples < 1:
            raise ValueError(f"--num_samples={num_samples} must be >= 1")
        if steps < 1:
            raise ValueError(f"--steps={steps} must be >= 1")
        if sampler not in diffusion.SAMPLERS:
            raise ValueError(f"--sampler={sampler!r} is invalid; allowed: {diffusion.SAMPLERS}")

    def write_samples(self, model, workdir: str, step: int, *, num_samples: int = 1,
                      steps: int = 100, sampler: str = "ddim", seed: int = 0) -> dict[str, Any]:
        """`num_samples` images from pure noise (`zoo.diffusion.sample`), 4 per row, in
        <workdir>/samples_<step>.png; class-conditional models cycle through the labels."""
        self.check_sample_options(num_samples=num_samples, steps=steps, sampler=sampler)
        cond = None
        if getattr(model, "cond_dim", 0):
            labels = np.arange(num_samples) % model.cond_dim
            cond = jax.nn.one_hot(labels, model.cond_dim)
        logging.info("sampling %d images from the model of step %d (%s, %d steps)",
                     num_samples, step, sampler, steps)
        images = diffusion.sample(model, jax.random.key(seed), num_samples, steps=steps,
                                  sampler=sampler, cond=cond)
        pixels = image_ops.signed_to_uint8(images)
        per_row = 4
        path = storage.join(workdir, f"samples_{step}.png")
        image_ops.save_png(image_ops.image_grid(
                [list(pixels[i:i + per_row]) for i in range(0, len(pixels), per_row)]), path)
        return {"step": step, "path": path}

    def _cond(self, batch):
        if not self.conditional:
            return None
        return jax.nn.one_hot(batch["label"], self.num_classes, dtype=jnp.float32)

    def loss_and_metrics(self, model, batch, rngs, train):
        # t, noise and the self-conditioning coin: a key from the step's "sample" stream.
        key = rngs.sample() if rngs is not None else jax.random.key(0)
        loss, _ = diffusion.denoising_loss(model, to_unit_range(batch["image"]), key,
                                           cond=self._cond(batch), schedule=SCHEDULE,
                                           self_cond_rate=SELF_COND_RATE, train=train,
                                           rngs=rngs)
        return loss, {}

    def eval_sums(self, model, batch):
        x0 = to_unit_range(batch["image"])
        b = x0.shape[0]
        t = (jnp.arange(b, dtype=jnp.float32) + 0.5) / b
        noise = jax.random.normal(jax.random.key(0), x0.shape, jnp.float32)
        x_t = diffusion.add_noise(x0, t, noise, SCHEDULE)
        # As pix2seq's eval loss: the noise level in, and half the batch self-conditioned.
        eps = diffusion.self_conditioned_eps(model, x_t, diffusion.gamma(t, SCHEDULE),
                                             cond=self._cond(batch),
                                             self_cond_rate=SELF_COND_RATE)
        per_example = jnp.mean(jnp.square(eps.astype(jnp.float32) - noise), axis=(1, 2, 3))
        mask = batch["mask"].astype(jnp.float32)
        low = (t < 0.5).astype(jnp.float32) * mask
        return {"count": jnp.sum(mask), "loss": jnp.sum(mask * per_example),
                "low_noise_count": jnp.sum(low), "low_noise_loss": jnp.sum(low * per_example),
                "high_noise_loss": jnp.sum((mask - low) * per_example)}

    def finalize_eval(self, sums: Mapping[str, float]) -> dict[str, Any]:
        if sums["count"] <= 0:
            raise ValueError("the eval split produced no examples (sum of masks is 0)")
        high = sums["count"] - sums["low_noise_count"]
        return {"loss": sums["loss"] / sums["count"],
                "loss_t_below_0.5": sums["low_noise_loss"] / max(sums["low_noise_count"], 1),
                "loss_t_above_0.5": sums["high_noise_loss"] / max(high, 1),
                "count": int(round(sums["count"]))}

