"""Context parallelism: attention over a sequence that is split over a mesh axis.

`kernels_pallas.attention` comes here when the rules in force split the sequence (the logical
name `activation_length`, normally onto a `sequence` mesh axis) of both the queries and the
keys of a call. The functions below run *inside* `jax.shard_map`: every array is a device's
local chunk, and the sequence is laid out contiguously, device i holding chunk i of N.

Two strategies, chosen by `config.context_parallel.strategy`:

* **ring** (Liu et al. 2023, "Ring Attention"): each device keeps its queries and passes its
  key/value chunk around the ring with `ppermute`; after N steps every query chunk has met every
  key chunk. Each step attends the local queries to the chunk in hand with a key-block kernel
  (`*_forward`, which also returns the rows' log-sum-exp) and merges the result with the
  online-softmax rule (`reference.merge_blocks`). Sigmoid logits need no statistics: block
  outputs add. The custom VJP sends the key/value chunks around the ring again, with their dK/dV
  accumulators travelling beside them; each step's backward kernel (`*_backward`) takes the
  *merged* output and log-sum-exp saved by the forward, so the gradients of the blocks add up.
  Memory per device is O(T/N): the forward saves only the local chunks, never the chunks it
  was passed.
  - Causal attention is load-balanced ("zigzag", as in Brandon et al. 2023 / ring-flash-attn):
    the sequence is cut into 2N half-chunks and device i works on half-chunks i and 2N-1-i, so
    every device has the same amount of unmasked work at every step (contiguous chunks would
    leave device 0 idle after step 0 while device N-1 works N steps). The contiguous chunks are
    exchanged into that layout with two `ppermute`s per operand on entry (q, k, v, segment ids)
    and the output back on exit. That exchange moves as much data as one ring step; MaxText
    instead reorders the token sequence once in the input pipeline, which needs every model to
    carry explicit positions.
  - Pairs of (query, key) half-chunks are classified per step (`_pair_kind`): keys wholly
    before the queries run the kernel without a causal mask, the diagonal pair runs it
    causally, and pairs wholly after are skipped. The layout fixes most kinds for every device
    at trace time (a skipped pair is never traced); the rest depend on the device and run
    under `lax.cond`, so a masked pair costs no kernel call.
  - Padding lengths and segment ids are global; a pair sees lengths shifted by its chunks'
    offsets, and the key segment ids travel with the keys.
* **all_to_all** (DeepSpeed-Ulysses, Jacobs et al. 2023): an all-to-all turns the
  sequence-split q/k/v into head-split ones over the whole sequence, the ordinary kernel runs
  on its share of heads, and a second all-to-all turns the output back. Its communication per
  device is O(T/N) per call independent of N-step latency, but the (local) head count must be
  divisible by the sequence axis size.

Which to pick: all_to_all moves each of q, k, v and the output once per call, and runs one
full-length kernel, so it is the faster choice while heads divide the axis and the whole
sequence of one head's q/k/v fits on a device. Ring works for any head count and never holds
more than two key/value chunks, so it is the choice for very long sequences, few heads (GQA/MQA)
or sequence axes larger than the head count; its N steps overlap communication with compute
where XLA schedules the `ppermute` ahead of the step's kernel.

A bias is supported when it is broadcast over both sequence dimensions ([B|1, H|1, 1, 1]:
per-head or per-example scalars); a bias along the sequence would have to be materialised for
every pair of chunks and is a clear error instead.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.reference import chunk_causal_bias, merge_blocks

STRATEGIES = ("ring", "all_to_all")
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class RingSpec:
    """Static description of one ring attention call (a custom-VJP nondiff argument)."""
    axis: Any  # mesh axis name, or tuple of names, that splits the sequence
    size: int  # number of devices on it
    zigzag: bool  # load-balanced causal layout (two half-chunks per device)
    causal: bool
    logits: str
    forward: Callable  # key-block forward (reference.reference_forward contract)
    backward: Callable  # key-block backward
    options: tuple  # the remaining static kernel options, as sorted (name, value) pairs
    causal_chunk: int | None = None  # block-causal granularity (api's causal_chunk)

    @property
    def kwargs(self) -> dict:
        return dict(self.options, causal=self.causal, logits=self.logits)


def check_call(strategy: str, *, axis_size: int, seq_q: int, seq_k: int, local_heads: int,
               causal: bool, load_balance: bool, bias_shape, causal_chunk=None) -> None:
    """Clear errors, raised while tracing (before compilation), for calls a strategy cannot
    take."""
    if strategy not in STRATEGIES:
        raise ValueError(f"context-parallel strategy must be one of {STRATEGIES}, got "
                         f"{strategy!r}")
    if seq_q != seq_k:
        raise ValueError(f"context parallelism splits the queries and the keys of one sequence; "
                         f"got Tq={seq_q} and Tk={seq_k} both split over the sequence axis. "
                         f"Map activation_length to None for this model or use self-attention")
    if bias_shape is not None and bias_shape[2:] != (1, 1):
        raise ValueError(f"context-parallel attention supports a bias broadcast over the "
                         f"sequence ([B|1, H|1, 1, 1]); got a bias of shape {bias_shape}. Fold "
                         f"a positional bias into the model, or map activation_length to None")
    chunks = 2 * axis_size if (strategy == "ring" and causal and load_balance
                               and axis_size > 1) else axis_size
    if seq_q % chunks:
        what = ("2 x the sequence axis size (load-balanced causal ring: two half-chunks per "
                "device)" if chunks != axis_size else "the sequence axis size")
        raise ValueError(f"context parallelism: sequence length {seq_q} must be divisible by "
                         f"{what} = {chunks}")
    if causal_chunk is not None and strategy == "ring":
        if bias_shape is not None:
            raise ValueError("context-parallel ring attention takes causal_chunk or a bias, "
                             "not both")
        if (seq_q // chunks) % causal_chunk:
            raise ValueError(f"context parallelism: the ring cuts the sequence into {chunks} "
                             f"pieces of {seq_q // chunks} tokens, which must hold whole "
                             f"causal_chunk blocks of {causal_chunk} (FIT: whole groups)")
    if strategy == "all_to_all" and local_heads % axis_size:
        raise ValueError(f"context-parallel strategy 'all_to_all' needs the heads on each "
                         f"device ({local_heads}) divisible by the sequence axis size "
                         f"({axis_size}); use strategy 'ring', or a head count that divides")


# ---------------------------------------------------------------------------------------------
# Layouts: contiguous chunks <-> zigzag half-chunks.


def _shift(x, axis, size: int, by: int = 1):
    """Device i's `x` goes to device (i + by) mod size along the ring."""
    return lax.ppermute(x, axis, [(i, (i + by) % size) for i in range(size)])


def _zigzag_device(half: int, size: int) -> int:
    return half if half < size else 2 * size - 1 - half


def _to_zigzag(x, axis, size: int, dim: int = 1):
    """Contiguous local chunk (global halves 2i, 2i+1) -> zigzag chunk (halves i, 2N-1-i)."""
    first, second = jnp.split(x, 2, axis=dim)
    # Half 2i goes to the device that owns it in the zigzag layout, and so does half 2i+1; each
    # of the two sends is a permutation of the devices.
    got_even = lax.ppermute(first, axis, [(i, _zigzag_device(2 * i, size))
                                          for i in range(size)])
    got_odd = lax.ppermute(second, axis, [(i, _zigzag_device(2 * i + 1, size))
                                          for i in range(size)])
    # Device d owns halves d and 2N-1-d; half d came from the even sends iff d is even.
    even = lax.axis_index(axis) % 2 == 0
    low = jnp.where(even, got_even, got_odd)
    high = jnp.where(even, got_odd, got_even)
    return jnp.concatenate([low, high], axis=dim)


def _from_zigzag(x, axis, size: int, dim: int = 1):
    """Inverse of `_to_zigzag`."""
    low, high = jnp.split(x, 2, axis=dim)
    even = lax.axis_index(axis) % 2 == 0
    to_even = jnp.where(even, low, high)  # the half that came from the even sends
    to_odd = jnp.where(even, high, low)
    first = lax.ppermute(to_even, axis, [(_zigzag_device(2 * i, size), i)
                                         for i in range(size)])
    second = lax.ppermute(to_odd, axis, [(_zigzag_device(2 * i + 1, size), i)
                                         for i in range(size)])
    return jnp.concatenate([first, second], axis=dim)


def _chunk_indices(spec: RingSpec, device):
    """Global indices (in units of the local sub-chunk length) of a device's sub-chunks."""
    if spec.zigzag:
        return (device, 2 * spec.size - 1 - device)
    return (device,)


def _split(x, parts: int, dim: int):
    if x is None:
        return (None,) * parts
    return (x,) if parts == 1 else tuple(jnp.split(x, parts, axis=dim))


def _local_lengths(lengths, index, chunk: int):
    if lengths is None:
        return None
    return jnp.clip(lengths - index * chunk, 0, chunk).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# One (query sub-chunk, key sub-chunk) pair.

_FULL, _DIAGONAL, _SKIP = 0, 1, 2


def _pair_kind(spec: RingSpec, step: int, i: int, j: int, device, source):
    """How query sub-chunk i meets key sub-chunk j at ring `step`: a Python int where the
    layout decides it for every device (most pairs), else a traced FULL-or-SKIP.

    Causal, contiguous: at step 0 every device holds its own keys (diagonal); later, keys from a
    lower device are wholly visible and keys from a higher one wholly masked. Causal, zigzag
    (query halves d and 2N-1-d, key halves s and 2N-1-s): at step 0 the pairs are diagonal,
    masked (d vs 2N-1-d), visible (2N-1-d vs d) and diagonal; later, the second query half
    always sees the first key half, the first never sees the second, and of the two same-half
    pairs exactly one is visible: the first if the keys' device is lower, the second if higher.
    So each device runs the same number of kernel calls at every step."""
    if not spec.causal:
        return _FULL
    if step == 0:
        if not spec.zigzag:
            return _DIAGONAL
        return _DIAGONAL if i == j else (_SKIP if i < j else _FULL)
    if spec.zigzag and i != j:
        return _SKIP if i < j else _FULL
    visible = source < device if i == 0 else source > device
    return jnp.where(visible, _FULL, _SKIP)


def _diagonal(spec: RingSpec, causal: bool, length: int, bias):
    """(bias, causal flag) of a pair's kernel call. A block-causal diagonal pair carries the
    chunk mask of one sub-chunk: sub-chunks start on chunk boundaries (check_call), so every
    diagonal pair has the same mask, and off-diagonal pairs are wholly visible or skipped."""
    if causal and spec.causal_chunk is not None:
        return chunk_causal_bias(length, spec.causal_chunk)[None, None], False
    return bias, causal


def _pair_forward(spec: RingSpec, q, k, v, bias, q_len, kv_len, q_seg, kv_seg, kind):
    """(out f32, lse) of one pair; `kind` is not a static _SKIP (those are never called)."""
    def run(causal):
        def fn():
            diagonal_bias, causal_flag = _diagonal(spec, causal, q.shape[1], bias)
            out, lse = spec.forward(q, k, v, diagonal_bias, q_len, kv_len, q_seg, kv_seg,
                                    **dict(spec.kwargs, causal=causal_flag))
            return out.astype(F32), lse
        return fn

    if isinstance(kind, int):
        return run(kind == _DIAGONAL)()

    def skip():
        out = jnp.zeros((*q.shape[:3], v.shape[3]), F32)
        lse = (jnp.full((q.shape[0], q.shape[2], q.shape[1]), -jnp.inf, F32)
               if spec.logits == "softmax" else None)
        return out, lse

    # The kernel runs only where the keys are visible (lax.cond is control flow on GPU/TPU).
    return lax.cond(kind == _FULL, run(False), skip)


def _pair_backward(spec: RingSpec, q, k, v, bias, q_len, kv_len, q_seg, kv_seg, out, lse, d_out,
                   kind):
    def run(causal):
        def fn():
            diagonal_bias, causal_flag = _diagonal(spec, causal, q.shape[1], bias)
            dq, dk, dv, dbias = spec.backward(q, k, v, diagonal_bias, q_len, kv_len, q_seg,
                                              kv_seg, out, lse, d_out,
                                              **dict(spec.kwargs, causal=causal_flag))
            # With causal_chunk the bias is the chunk mask (a constant): no gradient.
            return (dq.astype(F32), dk.astype(F32), dv.astype(F32),
                    None if bias is None else dbias.astype(F32))
        return fn

    if isinstance(kind, int):
        return run(kind == _DIAGONAL)()

    def skip():
        return (jnp.zeros(q.shape, F32), jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32),
                None if bias is None else jnp.zeros(bias.shape, F32))

    return lax.cond(kind == _FULL, run(False), skip)


# ---------------------------------------------------------------------------------------------
# The ring (custom VJP over the whole ring, so that the backward re-circulates K/V instead of
# saving every chunk a device was passed).


def _ring_forward(spec: RingSpec, q, k, v, bias, q_len, kv_len, q_seg, kv_seg):
    parts = 2 if spec.zigzag else 1
    chunk = q.shape[1] // parts
    device = lax.axis_index(spec.axis)
    q_index = _chunk_indices(spec, device)
    qs, q_segs = _split(q, parts, 1), _split(q_seg, parts, 1)
    outs = [None] * parts
    lses = [None] * parts
    travelling = (k, v, kv_seg)
    for step in range(spec.size):
        source = (device - step) % spec.size
        k_index = _chunk_indices(spec, source)
        # Issue the next chunk's transfer before this step's kernels, so XLA may overlap them.
        upcoming = (_shift(travelling, spec.axis, spec.size) if step + 1 < spec.size
                    else None)
        ks, vs, kv_segs = (_split(x, parts, 1) for x in travelling)
        for i in range(parts):
            for j in range(parts):
                kind = _pair_kind(spec, step, i, j, device, source)
                if isinstance(kind, int) and kind == _SKIP:
                    continue
                out, lse = _pair_forward(
                        spec, qs[i], ks[j], vs[j], bias, _local_lengths(q_len, q_index[i], chunk),
                        _local_lengths(kv_len, k_index[j], chunk), q_segs[i], kv_segs[j], kind)
                if outs[i] is None:
                    outs[i], lses[i] = out, lse
                elif spec.logits == "softmax":
                    outs[i], lses[i] = merge_blocks(outs[i], lses[i], out, lse)
                else:
                    outs[i] = outs[i] + out
        travelling = upcoming
    out = jnp.concatenate(outs, axis=1).astype(q.dtype)
    lse = jnp.concatenate(lses, axis=2) if spec.logits == "softmax" else None
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_core(spec, q, k, v, bias, q_len, kv_len, q_seg, kv_seg):
    return _ring_forward(spec, q, k, v, bias, q_len, kv_len, q_seg, kv_seg)[0]


def _ring_core_fwd(spec, q, k, v, bias, q_len, kv_len, q_seg, kv_seg):
    out, lse = _ring_forward(spec, q, k, v, bias, q_len, kv_len, q_seg, kv_seg)
    return out, (q, k, v, bias, q_len, kv_len, q_seg, kv_seg, out, lse)


def _ring_core_bwd(spec, residuals, d_out):
    q, k, v, bias, q_len, kv_len, q_seg, kv_seg, out, lse = residuals
    parts = 2 if spec.zigzag else 1
    chunk = q.shape[1] // parts
    device = lax.axis_index(spec.axis)
    q_index = _chunk_indices(spec, device)
    qs, q_segs = _split(q, parts, 1), _split(q_seg, parts, 1)
    outs, d_outs = _split(out, parts, 1), _split(d_out, parts, 1)
    lses = _split(lse, parts, 2)
    dqs = [jnp.zeros(x.shape, F32) for x in qs]
    dbias = None if bias is None else jnp.zeros(bias.shape, F32)
    travelling = (k, v, kv_seg)
    # dK/dV of the chunk in hand travel with it and arrive home after the last step.
    grads = (jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))
    for step in range(spec.size):
        source = (device - step) % spec.size
        k_index = _chunk_indices(spec, source)
        ks, vs, kv_segs = (_split(x, parts, 1) for x in travelling)
        dks, dvs = [list(_split(g, parts, 1)) for g in grads]
        for i in range(parts):
            for j in range(parts):
                kind = _pair_kind(spec, step, i, j, device, source)
                if isinstance(kind, int) and kind == _SKIP:
                    continue
                dq, dk, dv, db = _pair_backward(
                        spec, qs[i], ks[j], vs[j], bias, _local_lengths(q_len, q_index[i], chunk),
                        _local_lengths(kv_len, k_index[j], chunk), q_segs[i], kv_segs[j],
                        outs[i], lses[i], d_outs[i], kind)
                dqs[i] = dqs[i] + dq
                dks[j] = dks[j] + dk
                dvs[j] = dvs[j] + dv
                if db is not None:
                    dbias = dbias + db
        grads = (jnp.concatenate(dks, axis=1), jnp.concatenate(dvs, axis=1))
        if step + 1 < spec.size:
            travelling = _shift(travelling, spec.axis, spec.size)
        if spec.size > 1:
            grads = _shift(grads, spec.axis, spec.size)
    dk, dv = grads
    return (jnp.concatenate(dqs, axis=1).astype(q.dtype), dk.astype(k.dtype),
            dv.astype(v.dtype), None if bias is None else dbias.astype(bias.dtype),
            None, None, None, None)


_ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)


def ring_attention(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, *,
                   axis, axis_size: int, load_balance: bool, forward: Callable,
                   backward: Callable, options: dict, causal_chunk: int | None = None):
    """Ring attention on a device's local chunks (inside `shard_map`, sequence contiguous).

    `forward`/`backward` are a backend's key-block pair (`reference.reference_forward`
    contract); `options` the normalised static options of `kernels_pallas.api`;
    `causal_chunk` makes causality block-wise (full inside chunks of that many tokens).
    """
    causal = options["causal"]
    zigzag = bool(causal and load_balance and axis_size > 1)
    rest = tuple(sorted((name, value) for name, value in options.items()
                        if name not in ("causal", "logits")))
    spec = RingSpec(axis=axis, size=axis_size, zigzag=zigzag, causal=causal,
                    logits=options["logits"], forward=forward, backward=backward, options=rest,
                    causal_chunk=causal_chunk)
    if zigzag:
        q, k, v = (_to_zigzag(x, axis, axis_size) for x in (q, k, v))
        if q_segment_ids is not None:
            q_segment_ids = _to_zigzag(q_segment_ids, axis, axis_size)
            kv_segment_ids = _to_zigzag(kv_segment_ids, axis, axis_size)
    out = _ring_core(spec, q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids)
    return _from_zigzag(out, axis, axis_size) if zigzag else out


def all_to_all_attention(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids,
                         *, axis, axis_size: int, kernel: Callable):
    """DeepSpeed-Ulysses on a device's local chunks (inside `shard_map`): sequence-split ->
    head-split, `kernel` (any differentiable attention with the api's normalised signature) on
    the whole sequence, and back."""
    def to_heads(x):  # [b, T/N, h, d] -> [b, T, h/N, d]
        return lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)

    q, k, v = to_heads(q), to_heads(k), to_heads(v)
    if q_segment_ids is not None:
        q_segment_ids = lax.all_gather(q_segment_ids, axis, axis=1, tiled=True)
        kv_segment_ids = lax.all_gather(kv_segment_ids, axis, axis=1, tiled=True)
    if bias is not None and bias.shape[1] > 1:
        heads = q.shape[2]
        bias = lax.dynamic_slice_in_dim(bias, lax.axis_index(axis) * heads, heads, axis=1)
    out = kernel(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids)
    return lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)
