"""bench/attention.py checks correctness before it times: its check must pass a right
implementation and catch a wrong one (tiny shapes, CPU)."""
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp

from kernels_pallas import attention

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "attention.py")
_spec = importlib.util.spec_from_file_location("bench_attention", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


def test_correctness_check_passes_ours_and_catches_a_wrong_scale():
    shape = bench.Shape("tiny", 2, 24, 40, 3, 16, causal=True, bias="heads")
    small = bench.check_shape(shape)
    assert (small.batch, small.heads, small.tq, small.tk) == (1, 2, 24, 40)
    ours = bench.attention_fn("ours", shape, "xla")
    errors = dict(bench.check_one("ours", ours, shape, jnp.bfloat16))
    assert set(errors) == {"out", "dq", "dk", "dv", "dbias"}
    assert max(errors.values()) < bench.TOLERANCE["bfloat16"]

    def wrong(q, k, v, bias):  # a kernel with a mis-folded scale
        return attention(q, k, v, bias, causal=True, scale=0.5, impl="xla")

    errors = dict(bench.check_one("ours", wrong, shape, jnp.bfloat16))
    assert errors["out"] > 10 * bench.TOLERANCE["bfloat16"]


def test_check_shape_caps_long_sequences():
    big = bench.Shape("fa", 1, 16384, 16384, 16, 128, causal=True)
    small = bench.check_shape(big)
    assert (small.tq, small.tk, small.heads, small.head_dim, small.causal) == (
            bench.CHECK_MAX_TOKENS, bench.CHECK_MAX_TOKENS, 2, 128, True)
    assert jax.default_backend() == "cpu"
