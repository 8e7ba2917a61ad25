"""Evaluation of a train.py checkpoint on the eval split (the body of eval.py, importable
from tests and notebooks without eval.py's command-line flags).

Only the model's variables are read (no optimizer state), onto a mesh of the local devices
that puts all of them on the batch (the first data axis): the number used is the largest that
divides config.eval.batch_size. A run trained on a pod slice can be evaluated on one GPU or a
laptop CPU. Single-process only.
"""
from __future__ import annotations

import json
import math

import jax
import ml_collections
from absl import logging
from jax.sharding import SingleDeviceSharding

from zoo import storage
from zoo.training import checkpoint as ckpt_lib
from zoo.training import config as config_lib
from zoo.training import ema as ema_lib
from zoo.training import mesh as mesh_lib
from zoo.training import pipeline, sources
from zoo.training import state as state_lib
from zoo.training import step as step_lib
from zoo.training import tasks


def _eval_mesh(config):
    """(config with an eval mesh of the local devices over the first data axis, the mesh).
    The number of devices is the largest that divides config.eval.batch_size."""
    config = ml_collections.ConfigDict(config.to_dict())
    num_devices = math.gcd(jax.local_device_count(), config.eval.batch_size)
    axes = tuple(config.mesh_axes)
    config.mesh_shape = tuple(num_devices if a == config.data_axes[0] else 1 for a in axes)
    config_lib.validate_config(config, num_devices=num_devices, num_processes=1,
                               training=False)
    return config, mesh_lib.make_mesh(config, devices=jax.local_devices()[:num_devices])


class _EvalPass:
    """One pass over the eval split for model states laid out on the eval mesh."""

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        self.task = tasks.get_task(config)
        self.skeleton = state_lib.ModelSkeleton(config)
        self.data_sharding = mesh_lib.batch_sharding(mesh, config.data_axes)
        self.model_shardings = mesh_lib.param_shardings(self.skeleton.abstract_state, mesh,
                                                        config.logical_axis_rules)
        self.eval_step = step_lib.make_eval_step(
                skeleton=self.skeleton, task=self.task, mesh=mesh,
                model_shardings=self.model_shardings, data_sharding=self.data_sharding,
                rules=mesh_lib.activation_rules(config),
                context_parallel=mesh_lib.context_parallel_options(config))

    def target(self):
        return state_lib.with_shardings(self.skeleton.abstract_pure(), self.model_shardings)

    def __call__(self, model_state) -> dict:
        batches = pipeline.make_eval_iterator(self.config, self.task, self.mesh,
                                              self.data_sharding)
        return step_lib.run_eval(self.eval_step, model_state, batches, self.task)


def evaluate_checkpoint(config, workdir: str, step: int | None) -> dict:
    sources.set_listing_cache(workdir)  # the run's listings of bucket data folders
    config, mesh = _eval_mesh(config)
    evaluate = _EvalPass(config, mesh)
    # --- model variables only, restored onto this mesh -------------------------------------
    target = evaluate.target()
    step, model_state = ckpt_lib.restore_model_only(storage.join(workdir, "checkpoints"),
                                                    target, step)
    logging.info("restored the model of step %d onto %s", step, dict(mesh.shape))
    result = {"step": int(step), **evaluate(model_state)}
    if ema_lib.enabled(config):  # the run kept an average of the weights: evaluate it too
        _, ema_state = ckpt_lib.restore_model_only(storage.join(workdir, "checkpoints"),
                                                   target, step, subtree="ema")
        result["ema"] = evaluate(ema_state)
    if jax.process_index() == 0:
        storage.write_text(storage.join(workdir, f"eval_{step}.json"), json.dumps(result))
    return result


def evaluate_model(config, model) -> dict:
    """The eval metrics of `model` (a module of config.model.name) on config.data.eval_split,
    computed exactly as evaluate_checkpoint does (same eval mesh, step and batches)."""
    config, mesh = _eval_mesh(config)
    evaluate = _EvalPass(config, mesh)
    state = jax.device_put(evaluate.skeleton.state_of(model), evaluate.model_shardings)
    return evaluate(state)


def load_model(config, workdir: str, step: int | None):
    """(step, model) with the checkpoint's variables on the first local device (for sampling
    and rendering CLIs; `evaluate_checkpoint` restores onto a mesh instead)."""
    skeleton = state_lib.ModelSkeleton(config)
    device = SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          skeleton.abstract_pure())
    step, model_state = ckpt_lib.restore_model_only(storage.join(workdir, "checkpoints"),
                                                    target, step)
    return step, skeleton.build(model_state)
