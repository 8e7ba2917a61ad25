"""The jitted train and eval steps.

One train step is one optimizer update: with `grad_accum_steps = k` the global batch is cut into
k micro-batches inside the step (a `lax.scan`), their gradients averaged, and the update applied
once, so step counts, the learning-rate schedule and the logged metrics mean the same thing for
every k. Gradients are taken with respect to trainable parameters only; other model state (e.g.
BatchNorm statistics) is threaded through the micro-batches and returned.

Randomness comes from `fold_in(seed key, step)` passed at call time as two rng streams:
"dropout" for the model's stochastic layers (dropout, drop-path) and "sample" for what the task
draws (diffusion noise, MAE masks). Nothing random lives in the state, and a resumed run draws
the same numbers.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kernels_pallas import sharding
from zoo.training import ema as ema_lib
from zoo.training import mesh as mesh_lib
from zoo.training.state import ModelSkeleton
from zoo.training.tasks import Task

# Separates the dropout stream from the parameter-init stream of the same seed.
_DROPOUT_STREAM = 1
# Within a step: the "sample" stream (what a task draws: diffusion times and noise, MAE masks,
# ray jitter) apart from the "dropout" stream the model's stochastic layers draw.
_SAMPLE_STREAM = 1


def _split_microbatches(batch: dict, k: int, mesh: Mesh, data_axes) -> dict:
    """[B, ...] -> [k, B/k, ...] where micro-batch i holds rows i, i+k, i+2k, ...

    Interleaving (rather than contiguous chunks) keeps every micro-batch spread evenly over the
    data shards: each device's contiguous block of rows contributes to all k micro-batches.
    """
    sharding = NamedSharding(mesh, PartitionSpec(None, tuple(data_axes)))

    def split(x):
        x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
        return jax.lax.with_sharding_constraint(jnp.swapaxes(x, 0, 1), sharding)

    return jax.tree.map(split, batch)


def make_train_step(*, config, skeleton: ModelSkeleton, task: Task,
                    tx: optax.GradientTransformation, lr_schedule: Callable[[Any], Any],
                    mesh: Mesh, state_shardings, data_sharding: NamedSharding):
    """The jitted `(state, batch) -> (state, metrics)`; the input state is donated."""
    k = int(config.grad_accum_steps)
    rules = mesh_lib.activation_rules(config)
    context_parallel = mesh_lib.context_parallel_options(config)
    base_key = jax.random.fold_in(jax.random.key(config.seed), _DROPOUT_STREAM)

    def micro_step(params, rest, batch, key):
        def loss_fn(p):
            model = skeleton.build(skeleton.join(p, rest))
            rngs = nnx.Rngs(dropout=key, sample=jax.random.fold_in(key, _SAMPLE_STREAM))
            loss, metrics = task.loss_and_metrics(model, batch, rngs, train=True)
            _, new_rest = skeleton.split(skeleton.state_of(model))
            return loss, (metrics, new_rest)

        (loss, (metrics, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, new_rest, {"loss": loss, **metrics}

    def train_step(state, batch):
        # Read while tracing: kernels run shard-mapped over `mesh` and activations are
        # constrained by the rules (kernels_pallas/sharding.py).
        with sharding.activation_sharding(mesh, rules, **context_parallel):
            return _train_step(state, batch)

    def _train_step(state, batch):
        step = state["step"]
        params, rest = skeleton.split(state["model"])
        step_key = jax.random.fold_in(base_key, step)
        if k == 1:
            grads, rest, metrics = micro_step(params, rest, batch, step_key)
        else:
            micro = _split_microbatches(batch, k, mesh, config.data_axes)

            def body(carry, xs):
                grad_sum, rest = carry
                micro_batch, index = xs
                grads, rest, metrics = micro_step(params, rest, micro_batch,
                                                  jax.random.fold_in(step_key, index))
                return (jax.tree.map(jnp.add, grad_sum, grads), rest), metrics

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grad_sum, rest), stacked = jax.lax.scan(body, (zeros, rest),
                                                     (micro, jnp.arange(k)))
            grads = jax.tree.map(lambda g: g / k, grad_sum)
            metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), stacked)
        updates, opt_state = tx.update(grads, state["optimizer"], params)
        params = optax.apply_updates(params, updates)
        metrics.update(lr=jnp.asarray(lr_schedule(step), jnp.float32),
                       grad_norm=optax.tree.norm(grads),
                       param_norm=optax.tree.norm(params))
        new_state = {"model": skeleton.join(params, rest), "optimizer": opt_state,
                     "step": step + 1}
        if "ema" in state:
            new_state["ema"] = ema_lib.update(state["ema"], new_state["model"],
                                              ema_lib.decay_at(config, step))
        return new_state, metrics

    return jax.jit(train_step, in_shardings=(state_shardings, data_sharding),
                   out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
                   donate_argnums=0)


def make_eval_step(*, skeleton: ModelSkeleton, task: Task, mesh: Mesh, model_shardings,
                   data_sharding: NamedSharding, rules, context_parallel: dict | None = None):
    """The jitted `(model_state, batch) -> mask-weighted metric sums` (replicated scalars);
    `rules`: `mesh.activation_rules(config)`, how activations and kernels are split;
    `context_parallel`: `mesh.context_parallel_options(config)` (default: ring)."""

    def eval_step(model_state, batch):
        with sharding.activation_sharding(mesh, rules, **(context_parallel or {})):
            return task.eval_sums(skeleton.build(model_state), batch)

    return jax.jit(eval_step, in_shardings=(model_shardings, data_sharding),
                   out_shardings=mesh_lib.replicated(mesh))


def run_eval(eval_step, model_state, batches, task: Task) -> dict[str, Any]:
    """Sums the eval step over a finite iterator of batches (in float64 on the host, so the
    result does not depend on how the set was cut into batches) and finalises the metrics."""
    totals: dict[str, float] = {}
    for batch in batches:
        sums = jax.device_get(eval_step(model_state, batch))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    if not totals:
        raise ValueError("the eval iterator yielded no batches")
    return task.finalize_eval(totals)
