"""The fused halo-attention kernels (kernels_pallas/halo_pallas.py) against the reference.

On CPU the kernels run in the Pallas interpreter (`impl="interpret"`, and the TPU variant with
its own statistics layout through `tpu_halo_attention(interpret=True)`) and are lowered for
CUDA (Pallas -> Triton) and for TPU (Pallas -> Mosaic) to catch backend-only lowering errors;
the gpu-marked cases run the compiled kernel when a GPU is present. Inputs are fresh standard-normal draws (never zeros) on maps of
several blocks per side, so interior, edge and corner windows (which read the zero halo) all
occur. Tolerances: kernels.md (f32 1e-5 relative; bf16 1e-2).
"""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import halo, halo_pallas

TRITON_CALL = "__gpu$xla.gpu.triton"
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}

# (block, halo, map height/width, stride, dk, dv, scale_relative)
CASES = [
        pytest.param(8, 3, (16, 24), 1, 16, 16, False, id="b8h3-haloNet"),
        pytest.param(8, 2, (16, 16), 2, 16, 8, False, id="b8h2-strided-queries"),
        pytest.param(4, 1, (8, 12), 1, 12, 20, True, id="b4h1-odd-dims-scaled-rel"),
        pytest.param(4, 0, (8, 8), 1, 8, 8, False, id="b4h0-no-halo"),
        pytest.param(4, 5, (12, 8), 1, 16, 16, False, id="b4h5-halo-wider-than-block"),
]


def _inputs(block, halo_size, size, q_stride, dk, dv, dtype, seed=0):
    rng = np.random.default_rng(seed)
    height, width = size
    rows = 2 * (block + 2 * halo_size) - 1
    shapes = [(2, height // q_stride, width // q_stride, 2, dk), (2, height, width, 2, dk),
              (2, height, width, 2, dv), (rows, dk), (rows, dk)]
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def _relative_error(actual, expected) -> float:
    actual, expected = (np.asarray(x, np.float64) for x in (actual, expected))
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _check(impl, block, halo_size, size, stride, dk, dv, scale_relative, dtype):
    q_stride = halo.query_stride(block, stride)
    args = _inputs(block, halo_size, size, q_stride, dk, dv, dtype)
    options = dict(block=block, halo=halo_size, stride=stride, scale_relative=scale_relative)
    # The reference gets the same (rounded) inputs in f32: the kernel's error, not bf16's.
    reference_args = [a.astype(jnp.float32) for a in args]
    expected = halo.halo_attention(*reference_args, impl="xla", **options)
    out = halo.halo_attention(*args, impl=impl, **options)
    assert out.dtype == dtype and out.shape == expected.shape
    assert _relative_error(out, expected) < TOLERANCE[dtype]

    d_out = jnp.asarray(np.random.default_rng(1).standard_normal(expected.shape), dtype)

    def loss(impl_name, *arrays):
        result = halo.halo_attention(*arrays, impl=impl_name, **options)
        return jnp.sum(result.astype(jnp.float32) * d_out.astype(jnp.float32))

    grads = jax.grad(lambda *a: loss(impl, *a), argnums=range(5))(*args)
    expected_grads = jax.grad(lambda *a: loss("xla", *a), argnums=range(5))(*reference_args)
    for name, g, e in zip(("q", "k", "v", "rel_h", "rel_w"), grads, expected_grads):
        assert g.shape == e.shape, name
        assert _relative_error(g, e) < TOLERANCE[dtype], name


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("block, halo_size, size, stride, dk, dv, scale_relative", CASES)
def test_interpreted_kernel_matches_reference(block, halo_size, size, stride, dk, dv,
                                              scale_relative, dtype):
    _check("interpret", block, halo_size, size, stride, dk, dv, scale_relative, dtype)


def test_average_pooled_stride_runs_the_kernel_at_full_resolution():
    # avg_down: the kernel attends at full resolution, halo.py then pools 2x2 in XLA.
    args = _inputs(8, 1, (16, 16), 1, 16, 16, jnp.float32)
    pooled = halo.halo_attention(*args, block=8, halo=1, stride=2, avg_down=True,
                                 impl="interpret")
    expected = halo.halo_attention(*args, block=8, halo=1, stride=2, avg_down=True, impl="xla")
    assert pooled.shape == (2, 8, 8, 2, 16)
    assert _relative_error(pooled, expected) < 1e-5


def test_unsupported_configurations_are_named_and_auto_falls_back():
    assert not halo_pallas.supports(6, 1, 1)  # 6x6 blocks: not a power of two
    assert not halo_pallas.supports(8, 2, 4)  # 2x2 queries: below the 16-row dot tile
    assert halo_pallas.supports(8, 3, 1) and halo_pallas.supports(8, 2, 2)
    args = _inputs(6, 1, (12, 12), 1, 8, 8, jnp.float32)
    with pytest.raises(ValueError, match="block=6 is not a power of two"):
        halo.halo_attention(*args, block=6, halo=1, impl="interpret")


def _lowered_text(block, halo_size, size, q_stride, dk, dv, dtype, with_grad,
                  platform="cuda"):
    args = _inputs(block, halo_size, size, q_stride, dk, dv, dtype)
    options = dict(block=block, halo=halo_size, q_stride=q_stride, scale=dk ** -0.5,
                   scale_relative=False, interpret=False)
    kernel = (halo_pallas.gpu_halo_attention if platform == "cuda"
              else halo_pallas.tpu_halo_attention)

    def forward(*arrays):
        return kernel(*arrays, **options)

    def forward_backward(*arrays):
        return jax.grad(lambda *a: jnp.sum(forward(*a).astype(jnp.float32)),
                        argnums=range(5))(*arrays)

    fn = forward_backward if with_grad else forward
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("with_grad", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_lowers_for_cuda_at_halonet_h0_stage_shapes(dtype, with_grad):
    # HaloNet-H0 stage 1 at 256 px: 64x64 map, b=8, h=3, 4 heads of 16 channels (batch 2 here).
    text = _lowered_text(8, 3, (64, 64), 1, 16, 16, dtype, with_grad)
    kernels = ["halo_attention_fwd"] + (["halo_attention_dq", "halo_attention_dkv"]
                                        if with_grad else [])
    assert text.count(TRITON_CALL) == len(kernels)
    for name in kernels:
        assert name in text


def test_strided_query_kernel_with_wider_values_lowers_for_cuda():
    text = _lowered_text(8, 2, (32, 32), 2, 32, 48, jnp.float32, True)
    assert text.count(TRITON_CALL) == 3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_tpu_variant_interpreted_matches_reference(dtype):
    # The TPU variant differs in its statistics layout; same kernels, same tolerances.
    args = _inputs(8, 2, (16, 16), 2, 16, 24, dtype)
    reference_args = [a.astype(jnp.float32) for a in args]
    options = dict(block=8, halo=2, q_stride=2, scale=0.25, scale_relative=False)
    expected = halo.halo_attention_reference(*reference_args, block=8, halo=2, stride=2,
                                             scale=0.25)

    def loss(fn, *arrays):
        return jnp.sum(jnp.sin(fn(*arrays).astype(jnp.float32)))

    tpu = lambda *a: halo_pallas.tpu_halo_attention(*a, interpret=True, **options)  # noqa
    xla = lambda *a: halo.halo_attention_reference(  # noqa: E731
            *a, block=8, halo=2, stride=2, scale=0.25)
    assert _relative_error(tpu(*args), expected) < TOLERANCE[dtype]
    grads = jax.grad(lambda *a: loss(tpu, *a), argnums=range(5))(*args)
    expected_grads = jax.grad(lambda *a: loss(xla, *a), argnums=range(5))(*reference_args)
    for g, e in zip(grads, expected_grads):
        assert _relative_error(g, e) < TOLERANCE[dtype]


@pytest.mark.parametrize("with_grad", [False, True], ids=["fwd", "fwd+bwd"])
def test_kernels_lower_for_tpu_through_mosaic(with_grad):
    text = _lowered_text(8, 3, (64, 64), 1, 16, 16, jnp.float32, with_grad, platform="tpu")
    assert text.count("tpu_custom_call") == (3 if with_grad else 1)
    assert TRITON_CALL not in text


_WITHOUT_TRITON = """
import sys
sys.modules["jax.experimental.pallas.triton"] = None  # any import of it now fails
import jax, jax.numpy as jnp
from kernels_pallas import halo_pallas
args = [jnp.ones((2, 16, 16, 2, 16), jnp.float32)] * 3 + [jnp.ones((27, 16), jnp.float32)] * 2
fn = lambda *a: halo_pallas.tpu_halo_attention(*a, block=8, halo=3, q_stride=1, scale=0.25,
                                               scale_relative=False, interpret=False)
grad = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=range(5))
text = jax.jit(grad).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
assert text.count("tpu_custom_call") == 3
print("lowered without triton")
"""


def test_tpu_halo_lowering_never_imports_triton():
    # Triton's Pallas module is deprecated on TPU-only installs; the TPU path must not need it.
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], capture_output=True,
                            text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lowered without triton" in result.stdout


def test_mosaic_lowering_really_runs_on_this_machine(monkeypatch):
    # A 1-D per-query statistics block (the GPU layout) violates Mosaic's tiling rule; the
    # error proves the TPU lowering above was checked, not skipped.
    monkeypatch.setattr(halo_pallas._Static, "row_stat_shape",
                        property(lambda self: (self.query_block ** 2,)))
    args = _inputs(8, 3, (16, 16), 1, 16, 16, jnp.float32)
    options = dict(block=8, halo=3, q_stride=1, scale=0.25, scale_relative=False,
                   interpret=False)
    lower = jax.jit(lambda *a: halo_pallas.tpu_halo_attention(*a, **options)).trace(*args)
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        lower.lower(lowering_platforms=("tpu",))


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("block, halo_size, size, stride, dk, dv, scale_relative", CASES)
def test_compiled_kernel_matches_reference_on_gpu(block, halo_size, size, stride, dk, dv,
                                                  scale_relative, dtype):
    _check("pallas", block, halo_size, size, stride, dk, dv, scale_relative, dtype)
