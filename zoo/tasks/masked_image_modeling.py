"""Masked-image modelling: the "masked_image_modeling" task (MAE, zoo/mae.py), as NViST
fine-tunes its encoder on the multi-view images before training the whole model.

Data: the classification pipeline's images (any classification source; ImageNet-normalised
pixels are the reconstruction targets, as in the reference's MAE stage). Loss: the model's
`loss(images, rng)` (MSE over the masked patches; the mask is drawn from the step's "sample" rng
stream). Eval: the same loss with a fixed mask per batch (deterministic across evals).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from zoo.training.classification import ImageData
from zoo.training.errors import ConfigError
from zoo.training.tasks import Task, register_task

TASK = "masked_image_modeling"


@register_task(TASK)
class MaskedImageModelingTask(ImageData, Task):
    """{"image", "label"} batches -> the MAE reconstruction loss (labels unused)."""

    def __init__(self, config):
        super().__init__(config)
        self.height = int(config.data.image_size)
        self.width = int(config.data.image_width) or self.height

    def check_config(self, config) -> None:
        if self.width != self.height:
            raise ConfigError(f"config.data.image_width={config.data.image_width!r}: the "
                              f"classification sources give square images; leave it 0")
        size = config.model.overrides.get("image_size")
        if size is not None and tuple(size) != (self.height, self.width):
            raise ConfigError(f"config.model.overrides.image_size={tuple(size)} must equal "
                              f"the data's (image_size, image_width) = "
                              f"{(self.height, self.width)}")

    def input_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {"images": jax.ShapeDtypeStruct((batch_size, self.height, self.width, 3),
                                               jnp.float32)}

    def loss_and_metrics(self, model, batch, rngs, train):
        key = rngs.sample() if rngs is not None else jax.random.key(0)
        return model.loss(batch["image"], key, train=train, rngs=rngs), {}

    def eval_sums(self, model, batch):
        pred, mask = model(batch["image"], rng=jax.random.key(0))
        target = model.patchify(batch["image"].astype(jnp.float32))
        per_example = (jnp.sum(jnp.mean(jnp.square(pred - target), -1) * mask, -1)
                       / jnp.maximum(jnp.sum(mask, -1), 1.0))
        m = batch["mask"].astype(jnp.float32)
        return {"count": jnp.sum(m), "loss": jnp.sum(m * per_example)}

    def finalize_eval(self, sums: Mapping[str, float]) -> dict[str, Any]:
        if sums["count"] <= 0:
            raise ValueError("the eval split produced no examples (sum of masks is 0)")
        return {"loss": sums["loss"] / sums["count"], "count": int(round(sums["count"]))}

