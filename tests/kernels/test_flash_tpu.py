"""The Mosaic-TPU flash kernel (kernels_pallas/flash_tpu.py) on a CPU-only machine.

Numerics: the kernel runs in the Pallas interpreter (`interpret=True`; jax 0.10.2 discharges the
TPU scratch buffers and scalar prefetch into XLA loops) and is compared, forward and gradients
of q, k, v and bias, with the f32 reference on the same (rounded) inputs. Each case is one jit of
forward + VJP, compiled with light XLA optimisation: compile time, not run time, dominates.

Lowering: fwd and fwd+bwd of the main configurations are cross-lowered for TPU
(`lowering_platforms=("tpu",)`), which runs the Pallas -> Mosaic lowering (not the Mosaic
compiler, which lives in libtpu). Block skipping is checked by brute force on the block
predicates and by NaN-poisoning blocks that must never be read.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import flash_tpu
from kernels_pallas.reference import (attention_reference, merge_blocks, reference_backward,
                                      reference_forward)

# Bounds on relative L2 error vs the f32 reference. f16 is computed in f32 on TPU, so only the
# final rounding remains.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
# Absolute bound for gradients that vanish in exact arithmetic (a bias constant along a softmax
# row has zero gradient), where both sides are rounding noise and rel-L2 means nothing.
ZERO_GRAD_FLOOR = 1e-5
# Fewer XLA CPU passes: about 35% less compile time for the interpreted kernels.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


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
    bias: tuple | None = None  # 4-D, each dim full or 1 (the dispatcher's normal form)
    causal: bool = False
    q_lengths: tuple | None = None
    kv_lengths: tuple | None = None
    segments: tuple | None = None  # (q boundaries, kv boundaries): ids step up at each
    logits: str = "softmax"
    sigmoid_bias: float | None = None
    block_q: int | None = None
    block_k: int | None = None


CASES = [
        # No mask at all: only the mask-free body runs.
        Case("plain_single_block", tq=32, tk=32, head_dim=64),
        # 5 x 3 blocks, padded keys, causal skipping; bias broadcast over batch (full tiles).
        Case("self_causal_multiblock", batch=1, tq=300, tk=300, head_dim=64, causal=True,
             bias=(1, 2, 300, 300), block_q=64, block_k=128),
        # Example 0 has no queries, example 2 no keys; bias broadcast over heads and queries
        # (reduced in the dK/dV kernel); odd head dims, Dv != D.
        Case("cross_lengths_zero", batch=3, tq=37, tk=200, head_dim=40, value_dim=24,
             q_lengths=(0, 29, 37), kv_lengths=(200, 131, 0), bias=(3, 1, 1, 200),
             block_q=16),
        Case("causal_tq_gt_tk", tq=150, tk=130, causal=True, bias=(1, 2, 150, 130),
             block_q=32, block_k=128),
        # Segments across a kv block boundary; bias broadcast over keys (row sums in dQ; its
        # exact softmax gradient is zero).
        Case("segments_cross_row_bias", tq=70, tk=260, head_dim=33,
             segments=((30, 50), (100, 140)), q_lengths=(70, 41), bias=(2, 2, 70, 1),
             block_q=16, block_k=128),
        Case("sigmoid_scalar_bias", tq=45, tk=140, logits="sigmoid", sigmoid_bias=-4.9,
             kv_lengths=(140, 77), bias=(1, 1, 1, 1)),
        Case("sigmoid_masks", tq=40, tk=52, logits="sigmoid", causal=True,
             kv_lengths=(52, 9), segments=((15,), (30,)), sigmoid_bias=-2.0,
             bias=(2, 2, 40, 1)),
        Case("bf16_causal_bias", tq=160, tk=160, head_dim=64, dtype=jnp.bfloat16, causal=True,
             bias=(1, 2, 160, 160), block_q=32),
        Case("bf16_sigmoid", tq=64, tk=64, dtype=jnp.bfloat16, logits="sigmoid", causal=True,
             sigmoid_bias=-4.2, bias=(1, 2, 64, 64), kv_lengths=(64, 50)),
        Case("f16_lengths", tq=50, tk=50, head_dim=64, dtype=jnp.float16, bias=(1, 2, 50, 50),
             kv_lengths=(50, 31)),
]


def _segment_ids(batch, seq, boundaries):
    ids = np.searchsorted(np.asarray(boundaries), np.arange(seq), side="right")
    return jnp.asarray(np.broadcast_to(ids, (batch, seq)), jnp.int32)


def make_inputs(case: Case, seed: int = 0):
    """(q, k, v, bias) random normals, d_out, and the integer/option arguments."""
    # NumPy draws: jax.random would compile a sampler per shape, seconds on a busy CPU.
    rng = np.random.default_rng(seed)

    def normal(shape, dtype):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    value_dim = case.value_dim or case.head_dim
    q = normal((case.batch, case.tq, case.heads, case.head_dim), case.dtype)
    k = normal((case.batch, case.tk, case.heads, case.head_dim), case.dtype)
    v = normal((case.batch, case.tk, case.heads, value_dim), case.dtype)
    bias = None if case.bias is None else normal(case.bias, case.dtype)
    d_out = normal((case.batch, case.tq, case.heads, value_dim), jnp.float32)
    lengths = dict(q_lengths=None if case.q_lengths is None
                   else jnp.asarray(case.q_lengths, jnp.int32),
                   kv_lengths=None if case.kv_lengths is None
                   else jnp.asarray(case.kv_lengths, jnp.int32),
                   q_segment_ids=None, kv_segment_ids=None)
    if case.segments is not None:
        lengths["q_segment_ids"] = _segment_ids(case.batch, case.tq, case.segments[0])
        lengths["kv_segment_ids"] = _segment_ids(case.batch, case.tk, case.segments[1])
    sigmoid_bias = case.sigmoid_bias
    if case.logits == "sigmoid" and sigmoid_bias is None:
        sigmoid_bias = -float(np.log(case.tk))
    options = dict(causal=case.causal, scale=float(case.head_dim ** -0.5), logits=case.logits,
                   sigmoid_bias=sigmoid_bias)
    return (q, k, v, bias), d_out, lengths, options


def _kernel_fn(case: Case, lengths, options, interpret=True):
    def fn(q, k, v, bias):
        return flash_tpu.tpu_attention(
                q, k, v, bias, lengths["q_lengths"], lengths["kv_lengths"],
                lengths["q_segment_ids"], lengths["kv_segment_ids"], block_q=case.block_q,
                block_k=case.block_k, interpret=interpret, **options)
    return fn


def _reference_fn(lengths, options):
    def fn(q, k, v, bias):
        return attention_reference(q, k, v, bias, **lengths, **options)
    return fn


def _compiled_value_and_grads(fn, arrays, d_out, compiler_options=None):
    """Compiled (*arrays) -> (grads, out): gradients of sum(out * d_out) w.r.t. every non-None
    array, and the output, in one executable."""
    argnums = tuple(i for i, a in enumerate(arrays) if a is not None)

    def loss(*args):
        out = fn(*args)
        return jnp.sum(out.astype(jnp.float32) * d_out), out

    step = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))
    return step.lower(*arrays).compile(compiler_options=compiler_options)


def _value_and_grads(fn, arrays, d_out, compiler_options=None):
    grads, out = _compiled_value_and_grads(fn, arrays, d_out, compiler_options)(*arrays)
    return out, grads


def _compare(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x)), "non-finite values"
    diff = x - ref
    rel_l2 = float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30))
    return rel_l2, float(np.max(np.abs(diff)))


def errors(case: Case, seed: int = 0):
    """[(what, rel-L2, max-abs)] of the interpreted kernel vs the f32 reference."""
    arrays, d_out, lengths, options = make_inputs(case, seed)
    out, grads = _value_and_grads(_kernel_fn(case, lengths, options), arrays, d_out,
                                  FAST_COMPILE)
    upcast = tuple(None if a is None else a.astype(jnp.float32) for a in arrays)
    ref_out, ref_grads = _value_and_grads(_reference_fn(lengths, options), upcast, d_out)
    assert out.dtype == case.dtype and out.shape == ref_out.shape
    names = [n for n, a in zip(("dq", "dk", "dv", "dbias"), arrays) if a is not None]
    result = [("out", *_compare(out, ref_out))]
    for name, grad, ref_grad, primal in zip(names, grads, ref_grads, arrays):
        assert grad.shape == primal.shape and grad.dtype == primal.dtype, name
        result.append((name, *_compare(grad, ref_grad)))
    return result


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_interpret_matches_reference(case):
    tolerance = TOLERANCE[case.dtype]
    for what, rel_l2, max_abs in errors(case):
        message = f"{case.name} {what}: rel-L2 {rel_l2:.2e}, max-abs {max_abs:.2e}"
        row_bias_softmax = (what == "dbias" and case.logits == "softmax"
                            and case.bias[3] == 1)
        if row_bias_softmax:
            assert max_abs < ZERO_GRAD_FLOOR, message
        else:
            assert rel_l2 < tolerance, message


def test_fully_masked_rows_and_skipped_blocks():
    """Rows without keys give exact zeros and zero gradients. Whole blocks past the lengths
    hold NaN here: they are skipped (and not fetched), so no 0 * NaN product leaks out, as it
    would if such a block were multiplied in and masked afterwards."""
    case = Case("poison", batch=3, tq=64, tk=256, q_lengths=(64, 32, 0),
                kv_lengths=(128, 256, 200), bias=(3, 2, 64, 256), block_q=32, block_k=128)
    arrays, d_out, lengths, options = make_inputs(case, seed=3)
    q, k, v, bias = arrays
    # Whole blocks past the lengths: keys 128.. of example 0, queries 32.. of example 1.
    poisoned = (q.at[1, 32:].set(jnp.nan), k.at[0, 128:].set(jnp.nan),
                v.at[0, 128:].set(jnp.nan), bias.at[0, :, :, 128:].set(jnp.nan))
    out, grads = _value_and_grads(_kernel_fn(case, lengths, options), poisoned, d_out,
                                  FAST_COMPILE)
    ref_out, ref_grads = _value_and_grads(_reference_fn(lengths, options), arrays, d_out)
    for got, want in zip((out, *grads), (ref_out, *ref_grads)):
        rel_l2, _ = _compare(got, want)
        assert rel_l2 < 1e-5
    out, (dq, dk, dv, dbias) = (np.asarray(out), [np.asarray(g) for g in grads])
    assert np.all(out[2] == 0) and np.all(out[1, 32:] == 0) and np.any(out[1, :32] != 0)
    assert np.all(dq[2] == 0) and np.all(dq[1, 32:] == 0)
    assert np.all(dk[0, 128:] == 0) and np.all(dv[0, 128:] == 0) and np.all(dk[2] == 0)
    assert np.all(dbias[0, :, :, 128:] == 0) and np.all(dbias[2] == 0)


def test_deterministic():
    """Two runs of forward and backward are bitwise equal (no atomics, fixed loop order)."""
    case = Case("det", tq=50, tk=140, bias=(1, 2, 50, 140), causal=True, block_q=16)
    arrays, d_out, lengths, options = make_inputs(case, seed=5)
    compiled = _compiled_value_and_grads(_kernel_fn(case, lengths, options), arrays, d_out,
                                         FAST_COMPILE)
    first, second = compiled(*arrays), compiled(*arrays)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_tpu_interpret_mode_forward():
    """The TPU interpreter (pltpu.InterpretParams: simulated VMEM, DMAs and semaphores) runs
    the forward kernel too and agrees with the reference."""
    case = Case("tpu_interpret", batch=1, heads=1, tq=24, tk=150, causal=True,
                kv_lengths=(140,), bias=(1, 1, 24, 150), block_q=16)
    arrays, _, lengths, options = make_inputs(case, seed=7)
    out = _kernel_fn(case, lengths, options, interpret=pltpu.InterpretParams())(*arrays)
    rel_l2, _ = _compare(out, _reference_fn(lengths, options)(*arrays))
    assert rel_l2 < 1e-5


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("segments", [False, True])
def test_block_predicates_match_brute_force(causal, segments):
    """Skipped pairs hold no valid entry, mask-free pairs hold only valid entries, and the
    clamped index maps fetch every block that runs (on plain integers, no kernel)."""
    rng = np.random.default_rng(0)
    tq, tk = 128, 384
    for bq, bk in [(16, 128), (128, 128)]:
        config = flash_tpu._Config(
                causal=causal, scale=1.0, logits="softmax", sigmoid_bias=0.0, batch=1, heads=1,
                block_q=bq, block_k=bk, num_q_blocks=tq // bq, num_k_blocks=tk // bk,
                head_dim=128, value_dim=128, bias_shape=None, segments=segments,
                mask_q_lengths=True, mask_kv_lengths=True, interpret=True)
        for _ in range(8):
            q_len, kv_len = int(rng.integers(0, tq + 1)), int(rng.integers(0, tk + 1))
            i, j = np.arange(tq)[:, None], np.arange(tk)[None, :]
            valid = (i < q_len) & (j < kv_len) & ((j <= i) if causal else True)
            blocks = valid.reshape(tq // bq, bq, tk // bk, bk)
            any_valid, all_valid = blocks.any(axis=(1, 3)), blocks.all(axis=(1, 3))
            for qb in range(tq // bq):
                last = int(flash_tpu._last_k_block(config, jnp.int32(qb), jnp.int32(kv_len)))
                for kb in range(tk // bk):
                    run, partial = flash_tpu._block_flags(
                            config, jnp.int32(qb), jnp.int32(kb), jnp.int32(q_len),
                            jnp.int32(kv_len))
                    assert bool(run) == any_valid[qb, kb]
                    if partial is not None and not bool(partial):
                        assert all_valid[qb, kb]
                    assert segments or partial is not None
                    if bool(run):
                        assert kb <= last
                        assert int(flash_tpu._clamped_q_block(
                                config, jnp.int32(qb), jnp.int32(kb), jnp.int32(q_len))) == qb


def test_block_size_errors():
    q = jnp.zeros((1, 300, 1, 16), jnp.float32)
    arguments = (q, q, q, None, None, None, None, None)
    options = dict(causal=False, scale=1.0, logits="softmax", sigmoid_bias=None)
    with pytest.raises(ValueError, match="block_k must be a multiple of 128.*got block_k=64"):
        flash_tpu.tpu_attention(*arguments, block_q=None, block_k=64, **options)
    with pytest.raises(ValueError, match="block_q must be a multiple of 8.*got block_q=4"):
        flash_tpu.tpu_attention(*arguments, block_q=4, block_k=None, **options)
    q16 = q.astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="block_q must be a multiple of 16.*got block_q=8"):
        flash_tpu.tpu_attention(q16, q16, q16, *arguments[3:], block_q=8, block_k=None,
                                **options)


def test_dispatcher_arguments():
    """The dispatcher's normal form (a 2-D bias made 4-D, default blocks) runs unchanged."""
    from kernels_pallas.api import normalise_arguments

    case = Case("dispatch", tq=30, tk=140, causal=True, kv_lengths=(140, 60))
    (q, k, v, _), _, lengths, options = make_inputs(case, seed=11)
    bias = jnp.asarray(np.random.default_rng(12).standard_normal((30, 140), np.float32))
    arrays, normal = normalise_arguments(
            q, k, v, bias, causal=True, scale=None, q_lengths=None,
            kv_lengths=lengths["kv_lengths"], q_segment_ids=None, kv_segment_ids=None,
            logits="softmax", sigmoid_bias=None, impl="pallas", block_q=None, block_k=None)
    out = flash_tpu.tpu_attention(*arrays, interpret=True, **normal)
    want = attention_reference(q, k, v, bias, causal=True, kv_lengths=lengths["kv_lengths"])
    assert _compare(out, want)[0] < 1e-5


# ------------------------------------------------------------------------------------------------
# Key blocks: tpu_attention_forward / tpu_attention_backward, what context parallelism composes.

KEY_BLOCK_SPLIT = 16
# Example 1: 17 queries, 13 keys (none in the second key block); segments make some rows keyless
# (queries 10.. of example 1, and under causality queries 10-19 of both examples).
KEY_BLOCK_CASES = [
        Case("softmax_f32", tq=24, tk=40, causal=True, q_lengths=(24, 17), kv_lengths=(40, 13),
             segments=((10,), (20,)), bias=(1, 2, 24, 40), block_q=16),
        Case("softmax_bf16", tq=24, tk=40, dtype=jnp.bfloat16, causal=True,
             q_lengths=(24, 17), kv_lengths=(40, 13), segments=((10,), (20,)),
             bias=(2, 2, 24, 40), block_q=16),
        Case("sigmoid_f32", tq=24, tk=40, logits="sigmoid", causal=True, q_lengths=(24, 17),
             kv_lengths=(40, 13), segments=((10,), (20,)), bias=(2, 1, 1, 40), block_q=16),
]


def _key_block(arrays, lengths, lo, hi):
    """The 8 positional arguments of attention over keys [lo, hi) only."""
    q, k, v, bias = arrays
    if bias is not None and bias.shape[3] > 1:
        bias = bias[..., lo:hi]
    kv_len, kv_seg = lengths["kv_lengths"], lengths["kv_segment_ids"]
    if kv_len is not None:
        kv_len = jnp.clip(kv_len - lo, 0, hi - lo)
    if kv_seg is not None:
        kv_seg = kv_seg[:, lo:hi]
    return (q, k[:, lo:hi], v[:, lo:hi], bias, lengths["q_lengths"], kv_len,
            lengths["q_segment_ids"], kv_seg)


def _compare_lse(lse, ref_lse, tolerance):
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    assert lse.dtype == np.float32 and lse.shape == ref_lse.shape
    assert np.array_equal(lse == -np.inf, ref_lse == -np.inf), "rows without keys differ"
    finite = np.isfinite(ref_lse)
    assert np.any(~finite) and _compare(lse[finite], ref_lse[finite])[0] < tolerance


@pytest.mark.parametrize("case", KEY_BLOCK_CASES, ids=lambda c: c.name)
def test_key_block_forward_backward_match_reference(case):
    """The key-block pair follows reference_forward / reference_backward. (1) On the whole key
    range (causal) the forward gives tpu_attention's output bit for bit and the reference's
    out and lse (-inf for keyless rows). (2) Keys split in two blocks (not causal: a causal
    mask is top-left aligned, so it would not hold for the second block): the forwards merged
    by merge_blocks give the whole attention, and the two backwards, each given the merged
    out and lse, add up to the gradients of the whole attention, as a ring relies on."""
    arrays, d_out, lengths, options = make_inputs(case, seed=13)
    blocks = dict(block_q=case.block_q, block_k=case.block_k, interpret=True)
    split_options = dict(options, causal=False)
    ranges = [(0, KEY_BLOCK_SPLIT), (KEY_BLOCK_SPLIT, case.tk)]
    softmax = case.logits == "softmax"

    def kernels(q, k, v, bias, d_out):
        whole_args = (q, k, v, bias, *lengths.values())
        whole = flash_tpu.tpu_attention_forward(*whole_args, **options, **blocks)
        plain = flash_tpu.tpu_attention(*whole_args, **options, **blocks)
        per_block = [_key_block((q, k, v, bias), lengths, lo, hi) for lo, hi in ranges]
        parts = [flash_tpu.tpu_attention_forward(*a, **split_options, **blocks)
                 for a in per_block]
        if softmax:
            out, lse = merge_blocks(*parts[0], *parts[1])
        else:
            out, lse = sum(p[0].astype(jnp.float32) for p in parts), None
        grads = [flash_tpu.tpu_attention_backward(*a, out if softmax else None, lse, d_out,
                                                  **split_options, **blocks)
                 for a in per_block]
        return whole, plain, (out, lse), grads

    compiled = jax.jit(kernels).lower(*arrays, d_out).compile(compiler_options=FAST_COMPILE)
    (out_w, lse_w), plain, (out, lse), grads = compiled(*arrays, d_out)
    tolerance = TOLERANCE[case.dtype]
    upcast = tuple(None if a is None else a.astype(jnp.float32) for a in arrays)

    # (1) The whole key range.
    ref_out, ref_lse = reference_forward(*upcast, *lengths.values(), **options)
    assert out_w.dtype == case.dtype and np.array_equal(np.asarray(out_w), np.asarray(plain))
    assert _compare(out_w, ref_out)[0] < tolerance
    if softmax:
        _compare_lse(lse_w, ref_lse, tolerance)
    else:
        assert lse_w is None and ref_lse is None

    # (2) Two key blocks, merged; their gradients summed (dq) or concatenated (keys).
    ref_fn = _reference_fn(lengths, split_options)
    ref_out, vjp = jax.vjp(ref_fn, *upcast)
    ref_grads = vjp(d_out)
    assert _compare(out, ref_out)[0] < tolerance
    if softmax:
        _compare_lse(lse, reference_forward(*upcast, *lengths.values(), **split_options)[1],
                     tolerance)
    for block_grads in grads:
        for got, primal in zip(block_grads, arrays):
            assert (got is None) == (primal is None)
            assert got is None or got.dtype == primal.dtype
    (dq_a, dk_a, dv_a, dbias_a), (dq_b, dk_b, dv_b, dbias_b) = grads
    summed = (dq_a.astype(jnp.float32) + dq_b.astype(jnp.float32),
              jnp.concatenate([dk_a, dk_b], axis=1), jnp.concatenate([dv_a, dv_b], axis=1),
              jnp.concatenate([dbias_a, dbias_b], axis=3))
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), summed, ref_grads):
        assert got.shape == want.shape, name
        rel_l2 = _compare(got, want)[0]
        assert rel_l2 < tolerance, f"{case.name} {name}: rel-L2 {rel_l2:.2e}"
    # A block's share alone is reference_backward's (same merged out and lse); the second block
    # has no key at all in example 1.
    ref_block = reference_backward(*_key_block(upcast, lengths, *ranges[1]), out, lse, d_out,
                                   **split_options)
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads[1], ref_block):
        rel_l2 = _compare(got, want)[0]
        assert rel_l2 < tolerance, f"{case.name} second block {name}: rel-L2 {rel_l2:.2e}"


# ------------------------------------------------------------------------------------------------
# Cross-lowering for TPU.

LOWERING_CASES = [
        Case("causal_bias_segments_lengths", tq=200, tk=300, head_dim=64, causal=True,
             bias=(1, 2, 200, 300), kv_lengths=(300, 10), segments=((90,), (120,))),
        Case("bf16_causal_bias", tq=256, tk=256, head_dim=128, dtype=jnp.bfloat16, causal=True,
             bias=(2, 2, 256, 256), q_lengths=(256, 100)),
        Case("sigmoid_query_broadcast_bias", tq=100, tk=260, head_dim=80, logits="sigmoid",
             bias=(2, 1, 1, 260)),
        Case("bf16_sigmoid_row_bias", tq=128, tk=512, head_dim=64, value_dim=32,
             dtype=jnp.bfloat16, logits="sigmoid", causal=True, bias=(1, 2, 128, 1)),
        Case("f16_plain", tq=512, tk=512, head_dim=64, dtype=jnp.float16, block_q=256,
             block_k=256),
]


def _lower_for_tpu(case: Case, with_backward: bool) -> str:
    arrays, d_out, lengths, options = make_inputs(case)
    fn = _kernel_fn(case, lengths, options, interpret=False)
    specs = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]

    def forward_backward(q, k, v, bias):
        out, vjp = jax.vjp(fn, q, k, v, bias)
        return out, vjp(jnp.ones_like(out))

    target = forward_backward if with_backward else fn
    lowered = jax.jit(target).trace(*specs).lower(lowering_platforms=("tpu",))
    return lowered.as_text()


@pytest.mark.parametrize("with_backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case", LOWERING_CASES, ids=lambda c: c.name)
def test_lowers_for_tpu(case, with_backward):
    text = _lower_for_tpu(case, with_backward)
    # One Mosaic kernel for the forward, plus the dK/dV and dQ kernels for the backward, and
    # the dbias kernel for a bias full over (Tq, Tk) but broadcast over batch or heads.
    bias = case.bias
    own_dbias = (with_backward and bias is not None and bias[2] > 1 and bias[3] > 1
                 and ((bias[0] == 1 and case.batch > 1) or (bias[1] == 1 and case.heads > 1)))
    names = ["flash_tpu_forward"] + (["flash_tpu_dkv", "flash_tpu_dq"] if with_backward
                                     else []) + (["flash_tpu_dbias"] if own_dbias else [])
    assert text.count("tpu_custom_call") == len(names)
    for name in names:
        assert name in text


def test_key_block_functions_lower_for_tpu():
    """tpu_attention_forward and tpu_attention_backward (given an f32 merged output, as a ring
    passes it, with bf16 inputs) lower for TPU: the forward kernel, dK/dV, dQ and, for this
    bias broadcast over batch, the dbias kernel."""
    case = Case("key_block_lowering", tq=200, tk=300, head_dim=64, dtype=jnp.bfloat16,
                causal=True, bias=(1, 2, 200, 300), kv_lengths=(300, 10),
                segments=((90,), (120,)))
    arrays, d_out, lengths, options = make_inputs(case)
    blocks = dict(block_q=None, block_k=None, interpret=False)

    def forward_backward(q, k, v, bias, d_out):
        args = (q, k, v, bias, *lengths.values())
        out, lse = flash_tpu.tpu_attention_forward(*args, **options, **blocks)
        grads = flash_tpu.tpu_attention_backward(*args, out.astype(jnp.float32), lse, d_out,
                                                 **options, **blocks)
        return out, lse, grads

    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (*arrays, d_out)]
    text = jax.jit(forward_backward).trace(*specs).lower(lowering_platforms=("tpu",)).as_text()
    names = ["flash_tpu_forward", "flash_tpu_dkv", "flash_tpu_dq", "flash_tpu_dbias"]
    assert text.count("tpu_custom_call") == len(names)
    for name in names:
        assert name in text


@pytest.mark.parametrize("bias", [(1, 3, 256, 384), (4, 1, 256, 384), (1, 1, 256, 384)],
                         ids=["heads", "batch", "both"])
def test_broadcast_bias_gradient_never_materialises_batch_by_heads(bias):
    """A bias full over (Tq, Tk) but broadcast over batch/heads: no [B, H, Tq, Tk] array in
    the TPU program (the lowered module lists every intermediate's type), and the gradient
    leaves the kernel in the bias's own shape."""
    case = Case("broadcast_bias", batch=4, heads=3, tq=256, tk=384, head_dim=64,
                dtype=jnp.bfloat16, bias=bias, causal=True)
    text = _lower_for_tpu(case, with_backward=True)
    assert "flash_tpu_dbias" in text
    assert "tensor<4x3x256x384xf32>" not in text and "tensor<4x3x256x384xbf16>" not in text
    own_shape = "x".join(map(str, bias))
    assert f"tensor<{own_shape}xf32>" in text


def test_tpu_lowering_runs_mosaic_checks_on_cpu():
    """Cross-lowering is not a no-op on a CPU-only install: Mosaic's block-shape check fires."""
    def copy_kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    def bad_blocks(x):
        spec = pl.BlockSpec((8, 100), lambda i: (0, i))  # 100 lanes: not a multiple of 128
        return pl.pallas_call(copy_kernel, grid=(3,), in_specs=[spec], out_specs=spec,
                              out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

    spec = jax.ShapeDtypeStruct((8, 300), jnp.float32)
    with pytest.raises(Exception, match="128"):
        jax.jit(bad_blocks).trace(spec).lower(lowering_platforms=("tpu",))


def test_log_sum_exp_residual_is_one_lane(capsys):
    """The softmax statistics kept for the backward are [B, H, Tq, 1] f32, not the kernel's
    lane-replicated [B, H, Tq, 128] output (128x the memory at long sequences)."""
    from jax.ad_checkpoint import print_saved_residuals
    q = jnp.ones((2, 1024, 4, 64), jnp.bfloat16)

    def fn(q, k, v):
        return flash_tpu.tpu_attention(q, k, v, None, None, None, None, None, causal=True,
                                       scale=0.125, logits="softmax", sigmoid_bias=None,
                                       block_q=None, block_k=None, interpret=True)

    print_saved_residuals(fn, q, q, q)
    saved = capsys.readouterr().out
    assert "f32[2,4,1024,1]" in saved and "f32[2,4,1024,128]" not in saved
    assert flash_tpu._block_sizes(4096, 4096, None, None, 16) == (512, 512)
    assert flash_tpu._block_sizes(300, 200, None, None, 16) == (304, 208)  # one block each
