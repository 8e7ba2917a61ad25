"""Shared measurement for the bench/ scripts: compile once, time the compiled call, read the
compiler's memory estimate, and build a config's real train step ahead of time."""
from __future__ import annotations

import statistics
import time

import jax


def compile_and_time(fn, args, repeats: int) -> tuple[float, float | None]:
    """(median wall ms of `repeats` calls after a warm-up call, peak MiB or None).

    Peak = temp + output bytes from `compiled.memory_analysis()` (None where the backend
    reports nothing).
    """
    compiled = jax.jit(fn).lower(*args).compile()
    memory = compiled.memory_analysis()
    peak = None
    if memory is not None:
        peak = (memory.temp_size_in_bytes + memory.output_size_in_bytes) / 2**20
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, peak


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def compile_train_step(config):
    """The platform train step of `config` (model, task, optimizer and shardings as train.py
    builds them), compiled ahead of time on abstract inputs: nothing is allocated.

    Returns (compiled, parts) with parts = dict(skeleton, tx, shardings, data_sharding,
    batch_spec, params, kernel_calls) for callers that go on to run or inspect it.
    """
    from kernels_pallas import sharding
    from zoo.training import mesh as mesh_lib
    from zoo.training import optim as optim_lib
    from zoo.training import pipeline
    from zoo.training import state as state_lib
    from zoo.training import step as step_lib
    from zoo.training import tasks

    mesh = mesh_lib.make_mesh(config)
    skeleton = state_lib.ModelSkeleton(config)
    params, _ = skeleton.split(skeleton.abstract_pure())
    tx, schedule = optim_lib.make_optimizer(config, params)
    abstract = state_lib.abstract_train_state(skeleton, tx)
    shardings = state_lib.train_state_shardings(skeleton, abstract, mesh,
                                                config.logical_axis_rules)
    data_sharding = mesh_lib.batch_sharding(mesh, config.data_axes)
    task = tasks.get_task(config)
    step = step_lib.make_train_step(config=config, skeleton=skeleton, task=task, tx=tx,
                                    lr_schedule=schedule, mesh=mesh, state_shardings=shardings,
                                    data_sharding=data_sharding)
    spec = pipeline.batch_spec(config, task, train=True)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data_sharding)
             for k, v in spec.items()}
    with sharding.record_kernel_calls() as calls:
        compiled = step.lower(state_lib.with_shardings(abstract, shardings), batch).compile()
    return compiled, dict(skeleton=skeleton, tx=tx, shardings=shardings,
                          data_sharding=data_sharding, batch_spec=spec, params=params,
                          kernel_calls=calls)
