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
import os

import jax
from absl import logging
from jax.sharding import SingleDeviceSharding

from zoo.training import checkpoint as ckpt_lib
from zoo.training import config as config_lib
from zoo.training import ema as ema_lib
from zoo.training import mesh as mesh_lib
from zoo.training import pipeline
from zoo.training import state as state_lib
from zoo.training import step as step_lib
from zoo.training import tasks


def evaluate_checkpoint(config, workdir: str, step: int | None) -> dict:
    # --- devices: a mesh of the local devices over the first data axis --------------------
    num_devices = math.gcd(jax.local_device_count(), config.eval.batch_size)
    axes = tuple(config.mesh_axes)
    config.mesh_shape = tuple(num_devices if a == config.data_axes[0] else 1 for a in axes)
    config_lib.validate_config(config, num_devices=num_devices, num_processes=1,
                               training=False)
    mesh = mesh_lib.make_mesh(config, devices=jax.local_devices()[:num_devices])
    data_sharding = mesh_lib.batch_sharding(mesh, config.data_axes)

    # --- model variables only, restored onto this mesh -------------------------------------
    task = tasks.get_task(config)
    skeleton = state_lib.ModelSkeleton(config)
    model_shardings = mesh_lib.param_shardings(skeleton.abstract_state, mesh,
                                               config.logical_axis_rules)
    target = state_lib.with_shardings(skeleton.abstract_pure(), model_shardings)
    step, model_state = ckpt_lib.restore_model_only(os.path.join(workdir, "checkpoints"),
                                                    target, step)
    logging.info("restored the model of step %d onto %s", step, dict(mesh.shape))

    # --- one pass over the eval split -------------------------------------------------------
    eval_step = step_lib.make_eval_step(skeleton=skeleton, task=task, mesh=mesh,
                                        model_shardings=model_shardings,
                                        data_sharding=data_sharding,
                                        rules=mesh_lib.activation_rules(config),
                                        context_parallel=mesh_lib.context_parallel_options(
                                                config))
    batches = pipeline.make_eval_iterator(config, task, mesh, data_sharding)
    metrics = step_lib.run_eval(eval_step, model_state, batches, task)
    result = {"step": int(step), **metrics}
    if ema_lib.enabled(config):  # the run kept an average of the weights: evaluate it too
        _, ema_state = ckpt_lib.restore_model_only(os.path.join(workdir, "checkpoints"),
                                                   target, step, subtree="ema")
        batches = pipeline.make_eval_iterator(config, task, mesh, data_sharding)
        result["ema"] = step_lib.run_eval(eval_step, ema_state, batches, task)
    with open(os.path.join(workdir, f"eval_{step}.json"), "w") as f:
        json.dump(result, f)
    return result


def load_model(config, workdir: str, step: int | None):
    """(step, model) with the checkpoint's variables on the first local device (for sampling
    and rendering CLIs; `evaluate_checkpoint` restores onto a mesh instead)."""
    skeleton = state_lib.ModelSkeleton(config)
    device = SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          skeleton.abstract_pure())
    step, model_state = ckpt_lib.restore_model_only(os.path.join(workdir, "checkpoints"),
                                                    target, step)
    return step, skeleton.build(model_state)
