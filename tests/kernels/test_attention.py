"""The Pallas attention kernel against the pure-jnp reference: forward and gradients.

CPU runs the GPU (Triton-style) kernel in the Pallas interpreter (impl="interpret"); the same
cases run the compiled kernel (impl="pallas") when a GPU is present (marked `gpu`). Inputs are
fresh random normals; low-precision kernels are compared with the f32 reference evaluated on the
same (rounded) inputs, by relative L2 error and max-abs error.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import attention, attention_reference
from kernels_pallas import flash_triton

# rel-L2 bounds; interpret-mode measurements are in docs/kernels.md.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 3e-3}
HAS_GPU = jax.default_backend() == "gpu"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int = 2
    tq: int = 40
    tk: int = 40
    heads: int = 2
    head_dim: int = 32
    value_dim: int | None = None
    dtype: type = jnp.float32
    bias: tuple | None = None  # bias shape, any shape broadcastable to [B, H, Tq, Tk]
    causal: bool = False
    q_lengths: tuple | None = None
    kv_lengths: tuple | None = None
    segments: tuple | None = None  # (q boundaries, kv boundaries): ids step up at each
    logits: str = "softmax"
    sigmoid_bias: float | None = None
    block_q: int | None = None
    block_k: int | None = None


CASES = [
        Case("self_multiblock", tq=64, tk=64, head_dim=64, block_q=32, block_k=16),
        Case("cross_causal_d48", tq=40, tk=70, head_dim=48, causal=True),
        Case("causal_tq_gt_tk", tq=70, tk=33, causal=True, bias=(1, 2, 70, 33)),
        # Example 0 has no queries, example 2 no keys: both give all-zero rows.
        Case("lengths_with_zero", batch=3, tq=37, tk=50, q_lengths=(0, 29, 37),
             kv_lengths=(50, 31, 0), bias=(3, 1, 1, 50)),
        Case("lengths_causal_blocks", tq=100, tk=90, q_lengths=(100, 45), kv_lengths=(17, 90),
             causal=True, block_q=16, block_k=32),
        Case("segments_rpb", tq=48, tk=48, segments=((20, 33), (20, 33)), bias=(1, 2, 48, 48)),
        Case("segments_cross", tq=30, tk=44, segments=((11,), (25,)), q_lengths=(30, 21)),
        # Packed sequences over several 16-token tiles: tiles with disjoint id ranges are
        # skipped in every pass (fwd, dQ, dK/dV, dbias).
        Case("segments_packed_tiles", tq=80, tk=80, segments=((23, 50), (23, 50)),
             bias=(1, 2, 80, 80), causal=True, block_q=16, block_k=16),
        # A full bias takes its gradient from the dQ pass: skipped tiles (causal, lengths,
        # disjoint segments) must come out as zeros.
        Case("full_bias_packed_lengths", tq=80, tk=72, segments=((23, 50), (23, 50)),
             q_lengths=(80, 61), kv_lengths=(72, 40), bias=(2, 2, 80, 72), causal=True,
             block_q=16, block_k=16),
        Case("full_bias_causal_lengths", tq=100, tk=90, q_lengths=(100, 45),
             kv_lengths=(17, 90), causal=True, bias=(2, 2, 100, 90), block_q=16, block_k=32),
        Case("bias_2d_causal", tq=33, tk=33, head_dim=72, bias=(33, 33), causal=True),
        Case("full_bias_dv", tq=24, tk=56, head_dim=72, value_dim=40, bias=(2, 2, 24, 56)),
        Case("swin_window", batch=4, tq=49, tk=49, heads=3, bias=(1, 3, 49, 49)),
        Case("sigmoid", tq=45, tk=60, logits="sigmoid", bias=(45, 60)),
        Case("sigmoid_masks", tq=40, tk=52, logits="sigmoid", causal=True, kv_lengths=(52, 9),
             segments=((15,), (30,)), sigmoid_bias=-2.0, bias=(2, 2, 40, 1)),
        Case("bf16_causal_bias", tq=96, tk=96, head_dim=64, dtype=jnp.bfloat16, causal=True,
             bias=(1, 2, 96, 96)),
        Case("bf16_cross_lengths", tq=50, tk=130, head_dim=48, dtype=jnp.bfloat16,
             kv_lengths=(130, 77), bias=(2, 1, 1, 130)),
        Case("f16", tq=50, tk=50, head_dim=64, dtype=jnp.float16, bias=(1, 2, 50, 50),
             kv_lengths=(50, 31)),
]


def _segment_ids(batch, seq, boundaries):
    ids = np.searchsorted(np.asarray(boundaries), np.arange(seq), side="right")
    return jnp.asarray(np.broadcast_to(ids, (batch, seq)), jnp.int32)


def make_inputs(case: Case, seed: int = 0):
    """Random arrays plus keyword arguments for `attention`; d_out for a VJP."""
    keys = jax.random.split(jax.random.key(seed), 5)
    value_dim = case.value_dim or case.head_dim
    q = jax.random.normal(keys[0], (case.batch, case.tq, case.heads, case.head_dim), case.dtype)
    k = jax.random.normal(keys[1], (case.batch, case.tk, case.heads, case.head_dim), case.dtype)
    v = jax.random.normal(keys[2], (case.batch, case.tk, case.heads, value_dim), case.dtype)
    bias = None if case.bias is None else jax.random.normal(keys[3], case.bias, jnp.float32)
    d_out = jax.random.normal(keys[4], (case.batch, case.tq, case.heads, value_dim), jnp.float32)
    kwargs = dict(causal=case.causal, logits=case.logits, sigmoid_bias=case.sigmoid_bias)
    if case.q_lengths is not None:
        kwargs["q_lengths"] = jnp.asarray(case.q_lengths, jnp.int32)
    if case.kv_lengths is not None:
        kwargs["kv_lengths"] = jnp.asarray(case.kv_lengths, jnp.int32)
    if case.segments is not None:
        kwargs["q_segment_ids"] = _segment_ids(case.batch, case.tq, case.segments[0])
        kwargs["kv_segment_ids"] = _segment_ids(case.batch, case.tk, case.segments[1])
    return (q, k, v, bias), d_out, kwargs


def _value_and_grads(fn, arrays, d_out):
    """Output and gradients of sum(out * d_out) w.r.t. q, k, v (and bias when given)."""
    argnums = tuple(i for i, a in enumerate(arrays) if a is not None)

    def loss(*args):
        out = fn(*args)
        return jnp.sum(out.astype(jnp.float32) * d_out), out

    grads, out = jax.grad(loss, argnums=argnums, has_aux=True)(*arrays)
    return out, grads


def errors(case: Case, impl: str, seed: int = 0):
    """[(what, rel-L2, max-abs)] of the kernel vs the f32 reference, fwd and each gradient."""
    arrays, d_out, kwargs = make_inputs(case, seed)
    blocks = dict(block_q=case.block_q, block_k=case.block_k)
    kernel = jax.jit(lambda *a: attention(*a, impl=impl, **blocks, **kwargs))
    reference = jax.jit(lambda *a: attention_reference(*a, **kwargs))
    out, grads = _value_and_grads(kernel, arrays, d_out)
    upcast = tuple(None if a is None else a.astype(jnp.float32) for a in arrays)
    ref_out, ref_grads = _value_and_grads(reference, upcast, d_out)
    assert out.dtype == case.dtype and out.shape == ref_out.shape
    names = [n for n, a in zip(("dq", "dk", "dv", "dbias"), arrays) if a is not None]
    result = [("out", *_compare(out, ref_out))]
    for name, grad, ref_grad, primal in zip(names, grads, ref_grads, arrays):
        assert grad.shape == primal.shape and grad.dtype == primal.dtype, name
        result.append((name, *_compare(grad, ref_grad)))
    return result


def _compare(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x)), "non-finite values"
    diff = x - ref
    rel_l2 = float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30))
    return rel_l2, float(np.max(np.abs(diff)))


def _check(case, impl):
    tolerance = TOLERANCE[case.dtype]
    for what, rel_l2, max_abs in errors(case, impl):
        assert rel_l2 < tolerance, f"{case.name} {what}: rel-L2 {rel_l2:.2e}, max-abs {max_abs:.2e}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_interpret_matches_reference(case):
    _check(case, "interpret")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gpu_matches_reference(case):
    _check(case, "pallas")


def test_fully_masked_rows_are_zero_with_zero_finite_grads():
    """q rows beyond q_lengths, and rows whose every key is masked, give 0 and 0-gradient."""
    case = Case("masked", tq=40, tk=40, q_lengths=(0, 25), kv_lengths=(40, 0),
                bias=(2, 2, 40, 40))
    arrays, d_out, kwargs = make_inputs(case, seed=3)
    out, grads = _value_and_grads(
            jax.jit(lambda *a: attention(*a, impl="interpret", **kwargs)), arrays, d_out)
    out = np.asarray(out)
    assert np.all(out[0] == 0) and np.all(out[1, 25:] == 0) and np.all(out[1, :25] == 0)
    for grad in grads:
        assert np.all(np.isfinite(np.asarray(grad)))
        assert np.all(np.asarray(grad) == 0)
    # Causal with q_lengths: partially masked batch still has non-zero rows.
    kwargs["kv_lengths"] = jnp.asarray([40, 12], jnp.int32)
    out = attention(*arrays, impl="interpret", **kwargs)
    assert np.all(np.asarray(out)[1, :25] != 0) and np.all(np.asarray(out)[1, 25:] == 0)


def test_deterministic():
    """Two runs of forward and backward are bitwise equal (no atomics in the kernel)."""
    case = Case("det", tq=50, tk=70, bias=(1, 2, 50, 70), causal=True)
    arrays, d_out, kwargs = make_inputs(case, seed=5)
    fn = jax.jit(lambda *a: attention(*a, impl="interpret", **kwargs))
    first = _value_and_grads(fn, arrays, d_out)
    second = _value_and_grads(fn, arrays, d_out)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_auto_is_xla_on_cpu():
    case = Case("auto", tq=20, tk=20)
    arrays, _, kwargs = make_inputs(case)
    out_auto = attention(*arrays, impl="auto", **kwargs)
    out_xla = attention(*arrays, impl="xla", **kwargs)
    if jax.default_backend() == "cpu":
        assert np.array_equal(np.asarray(out_auto), np.asarray(out_xla))
        with pytest.raises(ValueError, match="impl='pallas' needs a GPU or TPU"):
            attention(*arrays, impl="pallas", **kwargs)


def test_random_configurations():
    """Property test: seeded random mixes of every option (few: compile time dominates)."""
    rng = np.random.default_rng(1234)
    for trial in range(3):
        batch, heads = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        tq, tk = int(rng.integers(1, 90)), int(rng.integers(1, 90))
        head_dim = int(rng.choice([16, 24, 32, 48]))
        value_dim = int(rng.choice([head_dim, 8, 40]))
        bias_choices = [None, (tq, tk), (1, heads, tq, tk), (batch, 1, 1, tk),
                        (batch, heads, tq, tk), (heads, 1, tk)]
        bias = bias_choices[int(rng.integers(len(bias_choices)))]
        segmented = bool(rng.integers(2)) and tq > 2 and tk > 2
        case = Case(
                f"random{trial}", batch=batch, tq=tq, tk=tk, heads=heads, head_dim=head_dim,
                value_dim=value_dim, bias=bias, causal=bool(rng.integers(2)),
                logits=str(rng.choice(["softmax", "sigmoid"])),
                q_lengths=tuple(int(x) for x in rng.integers(0, tq + 1, batch))
                if rng.integers(2) else None,
                kv_lengths=tuple(int(x) for x in rng.integers(0, tk + 1, batch))
                if rng.integers(2) else None,
                segments=((tq // 2,), (tk // 3,)) if segmented else None,
                block_q=int(rng.choice([16, 32, 64])), block_k=int(rng.choice([16, 32, 64])))
        for what, rel_l2, max_abs in errors(case, "interpret", seed=trial):
            # Absolute floor: a fully masked case has an all-zero reference.
            assert rel_l2 < 1e-5 or max_abs < 1e-6, f"{case} {what}: {rel_l2:.2e} {max_abs:.2e}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("segments", [False, True])
def test_loop_phases_cover_exactly_the_visible_blocks(causal, segments):
    """Skipped blocks hold no valid pair; unmasked-phase blocks hold only valid pairs.

    Brute force over block positions and lengths for the forward/dQ (key loop) and dK/dV
    (query loop) bounds, on plain jnp scalars (no kernel)."""
    static = flash_triton._Static(
            causal=causal, scale=1.0, logits="softmax", sigmoid_bias=0.0, head_dim=16,
            value_dim=16, block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16,
            has_segments=segments, interpret=True)
    rng = np.random.default_rng(0)
    for bq, bk in [(16, 32), (32, 16), (16, 16)]:
        tq, tk = 4 * 32, 3 * 32
        for _ in range(25):
            q_len, kv_len = int(rng.integers(0, tq + 1)), int(rng.integers(0, tk + 1))
            i, j = np.arange(tq)[:, None], np.arange(tk)[None, :]
            valid = (i < q_len) & (j < kv_len) & ((j <= i) if causal else True)
            block_valid = valid.reshape(tq // bq, bq, tk // bk, bk)
            any_valid = block_valid.any(axis=(1, 3))
            all_valid = block_valid.all(axis=(1, 3)) & (not segments)
            for qb in range(tq // bq):
                n = int(flash_triton._key_blocks_for(static, qb * bq, bq, bk, q_len, kv_len))
                u = int(flash_triton._unmasked_key_blocks(static, qb * bq, bq, bk, q_len,
                                                          kv_len, n))
                assert not any_valid[qb, n:].any() and 0 <= u <= n
                assert all_valid[qb, :u].all()
            for kb in range(tk // bk):
                first, end = flash_triton._query_block_range(static, kb * bk, bq, q_len, kv_len)
                lo, hi = flash_triton._unmasked_query_blocks(static, kb * bk, bq, bk, q_len,
                                                             kv_len, first, end)
                first, end, lo, hi = int(first), int(end), int(lo), int(hi)
                assert not any_valid[:first, kb].any() and not any_valid[end:, kb].any()
                assert first <= lo <= hi <= end
                assert all_valid[lo:hi, kb].all()


def test_triton_launch_parameters_are_exposed_and_checked():
    static = flash_triton._Static(
            causal=False, scale=1.0, logits="softmax", sigmoid_bias=0.0, head_dim=128,
            value_dim=128, block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16,
            has_segments=False, interpret=True)
    default = static.compiler_params()
    assert (default.num_warps, default.num_stages) == (8, 2)
    tuned = dataclasses.replace(static, num_warps=2, num_stages=4).compiler_params()
    assert (tuned.num_warps, tuned.num_stages) == (2, 4)
    q = jnp.ones((1, 16, 1, 16), jnp.float32)
    args = (q, q, q, None, None, None, None, None)
    options = dict(causal=False, scale=0.25, logits="softmax", sigmoid_bias=None, block_q=None,
                   block_k=None, interpret=True)
    with pytest.raises(ValueError, match="num_warps must be None or a positive integer power"):
        flash_triton.gpu_attention(*args, num_warps=3, **options)
    with pytest.raises(ValueError, match="num_stages must be None or a positive integer"):
        flash_triton.gpu_attention(*args, num_stages=0, **options)
    out = flash_triton.gpu_attention(*args, num_warps=2, num_stages=3, **options)
    np.testing.assert_allclose(np.asarray(out), np.ones((1, 16, 1, 16)), rtol=1e-6)
