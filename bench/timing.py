"""Shared measurement for the bench/ scripts: compile once, time the compiled call, and read
the compiler's memory estimate."""
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
