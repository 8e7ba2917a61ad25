"""Logical axis names shared by every zoo model: parameters and activations.

Every parameter is created with a tuple of *logical* axis names (one per array dimension, or
None for a dimension that is never sharded). The training config maps logical names to mesh
axes with `logical_axis_rules` (MaxText style), so a model never mentions the mesh. Names not
listed in the rules, and parameters without names, are replicated.

Flax 0.12 shards annotated variables eagerly at creation and then insists on a mesh being
active. The zoo builds models outside any mesh (tests, notebooks, `abstract=True` param
counts) and applies the rules itself when it jits the init, so eager sharding is switched off
here, once, for every model module that imports this file.

Activations have names of their own (`ACTIVATION_AXES`, MaxText's `activation_*`), because the
same width is split differently as a weight and as an activation: under FSDP the weight's
"embed" is split while the activation's batch is. Models call `constrain(x, TOKENS)` (or
`MAPS`, ...) at block boundaries. Inside the training step, or under `jax.set_mesh`, this
pins the activation's sharding to what the rules say (batch over the data axes, heads and MLP
hidden units over `tensor`). Outside a mesh it does nothing. The kernels use the same names for
their shard-mapped calls (kernels_pallas/sharding.py).
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax
from flax import nnx

from kernels_pallas.sharding import (  # noqa: F401  (re-exported for model files)
        ACTIVATION_AXES, BATCH, EMBED, HEADS, HEIGHT, KV, LENGTH, MLP, VOCAB, WIDTH, constrain)

flax.config.update("flax_always_shard_variable", False)

# One vocabulary for all models. Keep it small: a rule table should stay readable.
LOGICAL_AXES = {
    "embed": "model width (residual stream / channels of a token)",
    "mlp": "hidden width of a feed-forward block",
    "heads": "attention heads (fused heads*head_dim projections use 'heads' too)",
    "kv": "per-head key/value width",
    "vocab": "token vocabulary",
    "classes": "classifier outputs",
    "conv_in": "convolution input channels",
    "conv_out": "convolution output channels",
    "norm": "scale/bias vectors of normalisation layers",
    "pos": "rows of a position-embedding or relative-position table",
    "latents": "learned latent / query tokens",
}


def check_axes(axes: Sequence[str | None]) -> tuple[str | None, ...]:
    """Returns `axes` as a tuple after checking every name is in the shared vocabulary."""
    axes = tuple(axes)
    for name in axes:
        if name is not None and name not in LOGICAL_AXES:
            raise ValueError(
                f"logical axis {name!r} is not in the zoo vocabulary; allowed: "
                f"{sorted(LOGICAL_AXES)} or None")
    return axes


def with_axes(init: Callable, axes: Sequence[str | None]) -> Callable:
    """Wraps a flax initializer so the created Param carries logical axis names."""
    return nnx.with_partitioning(init, check_axes(axes))


# The activation layouts models use at block boundaries.
TOKENS = (BATCH, LENGTH, EMBED)  # [batch, tokens, width]
MAPS = (BATCH, HEIGHT, WIDTH, EMBED)  # [batch, height, width, channels] (NHWC)
QKV = (BATCH, LENGTH, HEADS, KV)  # [batch, tokens, heads, head_dim]
TOKEN_LOGITS = (BATCH, LENGTH, VOCAB)  # [batch, tokens, vocab]
