"""Flash attention for GPUs in Pallas with Triton lowering (FlashAttention-2 structure).

Why this shape of kernel:
  * Forward: one program per (q block, batch, head) streams key/value blocks with an online
    softmax and saves the row log-sum-exp for the backward. Softmax logits are kept in base 2
    (x log2(e), folded into the one multiply by the scale), so every exponential is an exp2,
    the GPU's native instruction (exp costs an extra multiply per logit); the saved
    log-sum-exp is base 2 too. Probabilities, and so every gradient, are unchanged. Sigmoid logits need
    no row statistics: the program just accumulates sigmoid(s + b) @ V.
  * Backward: deterministic, without atomics: a dK/dV kernel (one program per key block,
    looping over query blocks) and a dQ kernel (one program per query block, looping over key
    blocks); `delta = rowsum(dO * O)` comes from XLA. Each recomputes P from the saved LSE.
  * Masked-out work is skipped by loop bounds, not computed and discarded: causal (top-left
    aligned) and `kv_lengths` bound the key loop, causal and `q_lengths` bound the query loop,
    and a q (k) block lying wholly beyond its length does no iterations. Of the blocks that
    remain, only boundary ones (crossing a length or the diagonal, or any block when segment
    ids are given) pay for the element-wise mask; the others run a mask-free loop body. With
    segment ids, a tile whose query and key segment-id ranges do not overlap is skipped
    (`lax.cond` on the tile's min/max ids, read from the ids the program loads anyway): with
    packed sequences most off-diagonal tiles hold no valid pair. The test is necessary, not
    sufficient, for a valid pair, so ids need not be sorted.
  * Bias gradient. A full bias ([B, H, Tq, Tk], nothing broadcast) takes its gradient from the
    dQ pass, which computes every dS tile anyway and writes it out (tiles the pass skips are
    written as zeros). A broadcast bias gets a separate pass whose grid follows its shape; each
    program recomputes dS for the batches/heads/rows/columns its bias tile is broadcast over
    and sums them in registers, so dbias never materialises [B, H, Tq, Tk] for a broadcast
    bias. Its batch loop is split over a few programs (partial sums added by XLA) to keep the
    GPU busy when the bias is shared by the whole batch (Swin's relative position bias).
    Without a bias (or when its gradient is unused, under jit) the pass does not run.
  * Triton tiles must have power-of-two sides >= 16: head dims are padded to the next power of
    two inside the kernel (masked loads and stores, no copies); sequences are padded with zeros
    to a block multiple by `gpu_attention` and the padding is masked through the lengths.

Every argument reaching `gpu_attention` was validated by `kernels_pallas.api`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

F32 = jnp.float32
LOG2_E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2_E)
MIN_BLOCK = 16  # smallest tile side Triton's dot accepts
# The dbias pass splits a batch-broadcast bias's batch loop until about this many programs run.
DBIAS_TARGET_PROGRAMS = 256


@dataclasses.dataclass(frozen=True)
class _Static:
    """Compile-time configuration of one attention call (hashable: a jit static argument)."""
    causal: bool
    scale: float
    logits: str
    sigmoid_bias: float
    head_dim: int  # D of q and k, before padding to a power of two
    value_dim: int  # Dv
    block_q: int  # forward tiles
    block_k: int
    block_q_bwd: int  # backward tiles (dQ, dK/dV and dbias passes)
    block_k_bwd: int
    has_segments: bool
    interpret: bool
    # Triton launch parameters; None = by head width (4 warps up to 64, else 8) and 2 stages.
    num_warps: int | None = None
    num_stages: int | None = None

    @property
    def head_dim_padded(self) -> int:
        return max(MIN_BLOCK, pl.next_power_of_2(self.head_dim))

    @property
    def value_dim_padded(self) -> int:
        return max(MIN_BLOCK, pl.next_power_of_2(self.value_dim))

    def compiler_params(self):
        widest = max(self.head_dim_padded, self.value_dim_padded)
        warps = self.num_warps or (4 if widest <= 64 else 8)
        return pl_triton.CompilerParams(num_warps=warps, num_stages=self.num_stages or 2)


def default_blocks(tq: int, tk: int, head_dim: int) -> tuple[int, int, int, int]:
    """Per-pass tile sizes (fwd q, fwd k, bwd q, bwd k) for a problem, before user overrides.

    The forward keeps a [block_q, D] accumulator; the backward keeps two [block_k, D]
    accumulators plus more live tiles, so it gets smaller blocks. Short sequences (window
    attention) shrink the tiles to the sequence instead of padding 49 tokens to 128.
    """
    fwd_q, fwd_k = (128, 64) if head_dim <= 128 else (64, 32)
    bwd_q, bwd_k = (64, 64) if head_dim <= 64 else (32, 64)
    fit_q = max(MIN_BLOCK, pl.next_power_of_2(tq))
    fit_k = max(MIN_BLOCK, pl.next_power_of_2(tk))
    return min(fwd_q, fit_q), min(fwd_k, fit_k), min(bwd_q, fit_q), min(bwd_k, fit_k)


def _static_for(q, k, v, q_segment_ids, *, causal, scale, logits, sigmoid_bias, block_q,
                block_k, interpret, num_warps=None, num_stages=None) -> _Static:
    """The `_Static` of a call: default tiles per pass unless block_q/block_k override them."""
    for name, value in (("num_warps", num_warps), ("num_stages", num_stages)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1 or (name == "num_warps" and value & (value - 1))):
            raise ValueError(f"{name} must be None or a positive integer"
                             f"{' power of two' if name == 'num_warps' else ''}, got {value!r}")
    tq, head_dim = q.shape[1], q.shape[3]
    fwd_q, fwd_k, bwd_q, bwd_k = default_blocks(tq, k.shape[1], head_dim)
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if value is not None and value < MIN_BLOCK:
            raise ValueError(f"{name} must be >= {MIN_BLOCK} for the Triton GPU kernel (the "
                             f"smallest tile its matmul accepts), got {value}")
    if block_q is not None:
        fwd_q = bwd_q = block_q
    if block_k is not None:
        fwd_k = bwd_k = block_k
    return _Static(causal=causal, scale=scale, logits=logits,
                   sigmoid_bias=0.0 if sigmoid_bias is None else sigmoid_bias,
                   head_dim=head_dim, value_dim=v.shape[3], block_q=fwd_q, block_k=fwd_k,
                   block_q_bwd=bwd_q, block_k_bwd=bwd_k,
                   has_segments=q_segment_ids is not None, interpret=interpret,
                   num_warps=num_warps, num_stages=num_stages)


def gpu_attention(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, *,
                  causal: bool, scale: float, logits: str, sigmoid_bias: float | None,
                  block_q: int | None, block_k: int | None, interpret: bool = False,
                  num_warps: int | None = None, num_stages: int | None = None):
    """Attention on validated, normalised arguments (see `kernels_pallas.api`).

    q [B,Tq,H,D], k [B,Tk,H,D], v [B,Tk,H,Dv]; bias None or 4-D with each dim full or 1;
    lengths None or int32 [B]; segment ids None or int32 [B,Tq]/[B,Tk]. `block_q`/`block_k`
    override the tiles of every pass, `num_warps`/`num_stages` Triton's launch parameters
    (for tuning; bench/attention.py). Returns [B,Tq,H,Dv] in q.dtype; differentiable in
    q, k, v and bias.
    """
    static = _static_for(q, k, v, q_segment_ids, causal=causal, scale=scale, logits=logits,
                         sigmoid_bias=sigmoid_bias, block_q=block_q, block_k=block_k,
                         interpret=interpret, num_warps=num_warps, num_stages=num_stages)
    return _padded_attention(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids,
                             kv_segment_ids, static)


# Key-block primitives for context parallelism (kernels_pallas/context_parallel.py): a ring
# step attends the local queries to one key block, so it needs the block's log-sum-exp to merge
# blocks, and a backward that takes the *merged* output and log-sum-exp of all blocks. The
# contract is that of `reference.reference_forward` / `reference_backward`: natural-log lse,
# -inf for a row without a valid key. The kernels keep base-2 lse with +inf for such rows;
# the conversion happens here, on [B, H, Tq] row statistics only.
LN_2 = 0.6931471805599453


def gpu_attention_forward(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids,
                          *, causal, scale, logits, sigmoid_bias, block_q, block_k,
                          interpret=False):
    """(out [B,Tq,H,Dv] in q.dtype, lse [B,H,Tq] f32 natural log or None for sigmoid) of one
    key block; not differentiable (the ring's custom VJP calls `gpu_attention_backward`)."""
    static = _static_for(q, k, v, q_segment_ids, causal=causal, scale=scale, logits=logits,
                         sigmoid_bias=sigmoid_bias, block_q=block_q, block_k=block_k,
                         interpret=interpret)
    return _block_forward(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids,
                          kv_segment_ids, static)


def gpu_attention_backward(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids,
                           kv_segment_ids, out, lse, d_out, *, causal, scale, logits,
                           sigmoid_bias, block_q, block_k, interpret=False):
    """(dq, dk, dv, dbias) of one key block given the merged `out`/`lse` of the whole
    attention (softmax; ignored for sigmoid) and the output cotangent `d_out`."""
    static = _static_for(q, k, v, q_segment_ids, causal=causal, scale=scale, logits=logits,
                         sigmoid_bias=sigmoid_bias, block_q=block_q, block_k=block_k,
                         interpret=interpret)
    return _block_backward(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids,
                           kv_segment_ids, out, lse, d_out, static)


def _padded_operands(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids,
                     static: _Static):
    """Pads sequences to block multiples; the padding is masked through the lengths, which
    are therefore always given to the kernels."""
    batch, tq, _, _ = q.shape
    tk = k.shape[1]
    # Blocks are powers of two, so a multiple of the largest is a multiple of all of them.
    tq_padded = _round_up(tq, max(static.block_q, static.block_q_bwd))
    tk_padded = _round_up(tk, max(static.block_k, static.block_k_bwd))
    if q_lengths is None:
        q_lengths = jnp.full((batch,), tq, jnp.int32)
    if kv_lengths is None:
        kv_lengths = jnp.full((batch,), tk, jnp.int32)
    q = _pad_axis(q, 1, tq_padded)
    k = _pad_axis(k, 1, tk_padded)
    v = _pad_axis(v, 1, tk_padded)
    if bias is not None:
        # Only full-size dims grow; a broadcast (size 1) dim stays broadcast over the padding.
        if bias.shape[2] == tq and tq > 1:
            bias = _pad_axis(bias, 2, tq_padded)
        if bias.shape[3] == tk and tk > 1:
            bias = _pad_axis(bias, 3, tk_padded)
    if q_segment_ids is not None:
        q_segment_ids = _pad_axis(q_segment_ids, 1, tq_padded)
        kv_segment_ids = _pad_axis(kv_segment_ids, 1, tk_padded)
    return q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids


@functools.partial(jax.jit, static_argnums=(8,))
def _padded_attention(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids,
                      static: _Static):
    """Pads sequences to block multiples (masked via the lengths) around the custom-vjp core."""
    padded = _padded_operands(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids,
                              kv_segment_ids, static)
    return _flash(*padded, static)[:, :q.shape[1]]


@functools.partial(jax.jit, static_argnums=(8,))
def _block_forward(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids,
                   static: _Static):
    tq = q.shape[1]
    padded = _padded_operands(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids,
                              kv_segment_ids, static)
    out, lse = _forward(*padded, static)
    if lse is not None:
        lse = lse[:, :, :tq]
        lse = jnp.where(jnp.isinf(lse), -jnp.inf, lse * LN_2)
    return out[:, :tq], lse


@functools.partial(jax.jit, static_argnums=(11,))
def _block_backward(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, out,
                    lse, d_out, static: _Static):
    tq, tk = q.shape[1], k.shape[1]
    padded = _padded_operands(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids,
                              kv_segment_ids, static)
    tq_padded = padded[0].shape[1]
    d_out_padded = _pad_axis(d_out, 1, tq_padded)
    lse2 = delta = None
    if static.logits == "softmax":
        # A row without any valid key: +inf makes every recomputed probability exp2(-inf) = 0.
        lse2 = jnp.where(jnp.isfinite(lse), lse / LN_2, jnp.inf)
        lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, tq_padded - tq)), constant_values=jnp.inf)
        delta = jnp.einsum("bqhd,bqhd->bhq", _pad_axis(out, 1, tq_padded).astype(F32),
                           d_out_padded.astype(F32))
    dq, dk, dv, dbias = _gradients(*padded, d_out_padded, lse2, delta, static)
    if dbias is not None:
        if dbias.shape[2] > 1:
            dbias = dbias[:, :, :tq]
        if dbias.shape[3] > 1:
            dbias = dbias[:, :, :, :tk]
    return dq[:, :tq], dk[:, :tk], dv[:, :tk], dbias


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _pad_axis(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


# ----------------------------------------------------------------------------------------------
# custom_vjp core on padded arrays


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _flash(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, static):
    out, _ = _forward(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids,
                      static)
    return out


def _flash_fwd(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, static):
    out, lse = _forward(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids,
                        static)
    residuals = (q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, out, lse)
    return out, residuals


def _flash_bwd(static, residuals, d_out):
    q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, out, lse = residuals
    if static.logits == "softmax":
        delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(F32), d_out.astype(F32))
    else:
        delta = None
    dq, dk, dv, dbias = _gradients(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids,
                                   kv_segment_ids, d_out, lse, delta, static)
    return dq, dk, dv, dbias, None, None, None, None


def _gradients(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, d_out, lse,
               delta, static):
    """(dq, dk, dv, dbias) on padded arrays from base-2 `lse` and `delta = rowsum(dO * O)`."""
    common = (q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, d_out, lse,
              delta)
    dq, dbias = _backward_dq(*common, static)
    dk, dv = _backward_dkv(*common, static)
    if bias is not None and dbias is None:
        dbias = _backward_dbias(*common, static)
    return dq, dk, dv, dbias


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# shared tile math (runs inside kernels)


def _dot(a, b, *, transpose_a: bool = False, transpose_b: bool = False):
    """2-D matmul accumulated in f32; f32 operands run at full precision (no TF32)."""
    contract = (((0 if transpose_a else 1),), ((1 if transpose_b else 0),))
    return lax.dot_general(a, b, (contract, ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=F32)


def _valid(static, q_pos, k_pos, q_len, kv_len, q_seg, kv_seg):
    """[block_q, block_k] mask from absolute positions, lengths, causality, segments."""
    valid = (q_pos[:, None] < q_len) & (k_pos[None, :] < kv_len)
    if static.causal:
        valid = valid & (k_pos[None, :] <= q_pos[:, None])
    if static.has_segments:
        valid = valid & (q_seg[:, None] == kv_seg[None, :])
    return valid


def _logits(static, q, k, bias_tile):
    """Logits of a tile: natural for sigmoid, base 2 (x log2(e)) for softmax."""
    factor = LOG2_E if static.logits == "softmax" else 1.0
    s = _dot(q, k, transpose_b=True) * (static.scale * factor)
    if bias_tile is not None:
        bias_tile = bias_tile.astype(F32)
        s = s + (bias_tile * factor if factor != 1.0 else bias_tile)
    return s


def _probabilities(static, s, valid, lse):
    """Attention weights of a tile, zero where masked (valid None: nothing masked)."""
    if static.logits == "softmax":
        # Masked logits become -inf so exp2() gives exactly 0; a fully masked row has
        # lse=+inf. Both s and lse are base 2 (see `_logits`).
        if valid is not None:
            s = jnp.where(valid, s, -jnp.inf)
        return jnp.exp2(s - lse[:, None])
    p = jax.nn.sigmoid(s + static.sigmoid_bias)
    return p if valid is None else jnp.where(valid, p, 0.0)


def _logits_grad(static, p, dp, delta):
    """dL/ds of a tile from P and dP = dO V^T."""
    if static.logits == "softmax":
        return p * (dp - delta[:, None])
    return dp * p * (1.0 - p)


def _key_blocks_for(static, q_start, block_q, block_k, q_len, kv_len):
    """Number of key blocks a query block at q_start must visit (0 if it is beyond q_len)."""
    key_end = kv_len
    if static.causal:
        key_end = jnp.minimum(key_end, q_start + block_q)
    count = lax.div(key_end + block_k - 1, block_k)
    return jnp.where(q_start < q_len, count, 0)


def _query_block_range(static, k_start, block_q, q_len, kv_len):
    """[first, end) query blocks a key block at k_start must visit (empty beyond kv_len)."""
    first = lax.div(k_start, block_q) if static.causal else jnp.int32(0)
    end = jnp.maximum(lax.div(q_len + block_q - 1, block_q), first)
    end = jnp.where(k_start < kv_len, end, first)
    return first, end


# Element-wise masking costs VPU work on every logit, so each loop is split into phases: blocks
# that need no mask (wholly inside the lengths, below the causal diagonal, no segment ids) run
# a body without one; only boundary blocks pay for it.


def _unmasked_key_blocks(static, q_start, block_q, block_k, q_len, kv_len, num_key_blocks):
    """Leading key blocks that need no mask for the query block at q_start."""
    if static.has_segments:
        return jnp.int32(0)
    count = lax.div(kv_len, block_k)
    if static.causal:
        # Key block j is wholly at or before the block's first query: (j+1)*bk - 1 <= q_start.
        count = jnp.minimum(count, lax.div(q_start + 1, block_k))
    count = jnp.where(q_start + block_q <= q_len, count, 0)
    return jnp.clip(count, 0, num_key_blocks)


def _unmasked_query_blocks(static, k_start, block_q, block_k, q_len, kv_len, first, end):
    """[lo, hi) within [first, end): query blocks that need no mask for this key block."""
    if static.has_segments:
        return end, end
    lo = first
    if static.causal:
        # Query block i is wholly at or after the key block's last key: i*bq >= k_start+bk-1.
        lo = lax.div(k_start + block_k - 1 + block_q - 1, block_q)
    lo = jnp.clip(lo, first, end)
    hi = jnp.clip(lax.div(q_len, block_q), lo, end)
    whole_key_block = k_start + block_k <= kv_len
    return jnp.where(whole_key_block, lo, end), jnp.where(whole_key_block, hi, end)


def _phased_loop(phases, body, init, visible=None):
    """Runs body(index, carry, masked) over each (lo, hi, masked) range in turn.

    `visible(index)` (a bool scalar), when given, guards the masked phases: a block it rules
    out keeps the carry unchanged without loading or computing anything.
    """
    carry = init
    for lo, hi, masked in phases:
        guard = visible if masked else None
        carry = lax.fori_loop(lo, hi, functools.partial(_call_body, body, masked=masked,
                                                        visible=guard), carry)
    return carry


def _call_body(body, index, carry, *, masked, visible):
    if visible is None:
        return body(index, carry, masked)
    return lax.cond(visible(index), lambda c: body(index, c, masked), lambda c: c, carry)


def _segments_overlap(q_seg, kv_seg):
    """False when no query id of the tile can equal a key id of it (disjoint id ranges)."""
    low = jnp.maximum(jnp.min(q_seg), jnp.min(kv_seg))
    return low <= jnp.minimum(jnp.max(q_seg), jnp.max(kv_seg))


def _key_tile_overlaps(kv_seg_ref, q_seg, block_k, key_block):
    return _segments_overlap(q_seg, kv_seg_ref[pl.ds(key_block * block_k, block_k)])


def _query_tile_overlaps(q_seg_ref, kv_seg, block_q, query_block):
    return _segments_overlap(q_seg_ref[pl.ds(query_block * block_q, block_q)], kv_seg)


def _bias_tile(bias_ref, rows, cols):
    """Bias tile: `rows`/`cols` are a pl.ds along a full-size axis, or None for size 1."""
    return bias_ref[slice(None) if rows is None else rows,
                    slice(None) if cols is None else cols]


def _load_rows(ref, start, size, valid_width):
    """Rows [start, start+size) of a [seq, width_padded] ref, zero beyond the true width."""
    cols = jnp.arange(ref.shape[-1]) < valid_width
    return pl_triton.load(ref.at[pl.ds(start, size), :], mask=cols[None, :], other=0.0)


def _load_all(ref, valid_width):
    cols = jnp.arange(ref.shape[-1]) < valid_width
    return pl_triton.load(ref, mask=cols[None, :], other=0.0)


def _store(ref, value, valid_width):
    cols = jnp.arange(ref.shape[-1]) < valid_width
    pl_triton.store(ref, value.astype(ref.dtype), mask=cols[None, :])


# ----------------------------------------------------------------------------------------------
# pallas_call plumbing


def _specs_and_args(entries):
    """Splits [(name, array, BlockSpec)] (array None = absent) into names, arrays, specs."""
    present = [(n, a, s) for n, a, s in entries if a is not None]
    return [n for n, _, _ in present], [a for _, a, _ in present], [s for _, _, s in present]


def _bias_spec(bias, rows: int, cols: int, index_map):
    """BlockSpec for a 4-D broadcastable bias: size-1 dims keep block 1 and block index 0.

    index_map(grid ids) -> (batch, head, row block, col block) in full-size terms.
    """
    shape = bias.shape
    block = (None, None, rows if shape[2] > 1 else 1, cols if shape[3] > 1 else 1)

    def bias_index(*ids):
        b, h, i, j = index_map(*ids)
        return (b if shape[0] > 1 else 0, h if shape[1] > 1 else 0,
                i if shape[2] > 1 else 0, j if shape[3] > 1 else 0)

    return pl.BlockSpec(block, bias_index)


def _call(kernel, names, static, grid, in_specs, out_specs, out_shape, args, name):
    return pl.pallas_call(
            functools.partial(kernel, names=tuple(names), static=static),
            grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
            compiler_params=static.compiler_params(), interpret=static.interpret,
            name=name)(*args)


# ----------------------------------------------------------------------------------------------
# forward


def _forward(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, static):
    batch, tq, heads, _ = q.shape
    tk = k.shape[1]
    bq = static.block_q
    dp, dvp = static.head_dim_padded, static.value_dim_padded
    grid = (tq // bq, batch, heads)
    whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)  # noqa: E731
    entries = [
            ("q", q, pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0))),
            ("k", k, pl.BlockSpec((None, tk, None, dp), lambda i, b, h: (b, 0, h, 0))),
            ("v", v, pl.BlockSpec((None, tk, None, dvp), lambda i, b, h: (b, 0, h, 0))),
            ("bias", bias, None if bias is None else _bias_spec(
                    bias, bq, tk, lambda i, b, h: (b, h, i, 0))),
            ("q_len", q_lengths, whole(q_lengths)),
            ("kv_len", kv_lengths, whole(kv_lengths)),
            ("q_seg", q_segment_ids, pl.BlockSpec((None, bq), lambda i, b, h: (b, i))),
            ("kv_seg", kv_segment_ids, pl.BlockSpec((None, tk), lambda i, b, h: (b, 0))),
    ]
    names, args, in_specs = _specs_and_args(entries)
    out_shape = [jax.ShapeDtypeStruct((batch, tq, heads, static.value_dim), q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, tq), F32)]
    out_specs = [pl.BlockSpec((None, bq, None, dvp), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))]
    if static.logits == "sigmoid":  # no row statistics to save
        out_shape, out_specs = out_shape[:1], out_specs[:1]
    outs = _call(_forward_kernel, names, static, grid, in_specs, out_specs, out_shape, args,
                 "attention_forward")
    return (outs[0], outs[1]) if static.logits == "softmax" else (outs[0], None)


def _forward_kernel(*refs, names, static):
    ref = dict(zip(names, refs))
    o_ref = refs[len(names)]
    bq, bk = static.block_q, static.block_k
    q_block, b = pl.program_id(0), pl.program_id(1)
    q_start = q_block * bq
    q_len, kv_len = ref["q_len"][b], ref["kv_len"][b]
    bias_ref = ref.get("bias")
    full_bias_cols = bias_ref is not None and bias_ref.shape[-1] > 1
    q_pos = q_start + jnp.arange(bq)
    q_seg = ref["q_seg"][...] if static.has_segments else None
    q = _load_all(ref["q"], static.head_dim)
    num_key_blocks = _key_blocks_for(static, q_start, bq, bk, q_len, kv_len)
    unmasked = _unmasked_key_blocks(static, q_start, bq, bk, q_len, kv_len, num_key_blocks)
    phases = [(0, unmasked, False), (unmasked, num_key_blocks, True)]

    def tile(key_block, masked):
        k_start = key_block * bk
        keys = pl.ds(k_start, bk)
        k = _load_rows(ref["k"], k_start, bk, static.head_dim)
        v = _load_rows(ref["v"], k_start, bk, static.value_dim)
        bias_tile = None
        if bias_ref is not None:
            bias_tile = _bias_tile(bias_ref, None, keys if full_bias_cols else None)
        s = _logits(static, q, k, bias_tile)
        valid = None
        if masked:
            kv_seg = ref["kv_seg"][keys] if static.has_segments else None
            valid = _valid(static, q_pos, k_start + jnp.arange(bk), q_len, kv_len, q_seg,
                           kv_seg)
        return s, valid, v

    dvp = static.value_dim_padded
    visible = (functools.partial(_key_tile_overlaps, ref["kv_seg"], q_seg, bk)
               if static.has_segments else None)
    if static.logits == "softmax":
        def body(key_block, carry, masked):
            acc, row_max, row_sum = carry
            s, valid, v = tile(key_block, masked)
            if valid is not None:
                s = jnp.where(valid, s, -jnp.inf)
            new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
            # Rows with no valid key yet keep max -inf; shift them by 0 so exp() stays 0.
            shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
            correction = jnp.exp2(row_max - shift)
            p = jnp.exp2(s - shift[:, None])
            row_sum = row_sum * correction + jnp.sum(p, axis=1)
            acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
            return acc, new_max, row_sum

        init = (jnp.zeros((bq, dvp), F32), jnp.full((bq,), -jnp.inf, F32),
                jnp.zeros((bq,), F32))
        acc, row_max, row_sum = _phased_loop(phases, body, init, visible)
        has_keys = row_sum > 0
        out = acc / jnp.where(has_keys, row_sum, 1.0)[:, None]
        lse_ref = refs[len(names) + 1]
        lse_ref[...] = jnp.where(has_keys,
                                 row_max + jnp.log2(jnp.where(has_keys, row_sum, 1.0)), jnp.inf)
    else:
        def body(key_block, acc, masked):
            s, valid, v = tile(key_block, masked)
            p = _probabilities(static, s, valid, None)
            return acc + _dot(p.astype(v.dtype), v)

        out = _phased_loop(phases, body, jnp.zeros((bq, dvp), F32), visible)
    _store(o_ref, out, static.value_dim)


# ----------------------------------------------------------------------------------------------
# backward: dQ


def _backward_dq(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, d_out,
                 lse, delta, static):
    batch, tq, heads, _ = q.shape
    tk = k.shape[1]
    bq = static.block_q_bwd
    dp, dvp = static.head_dim_padded, static.value_dim_padded
    whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)  # noqa: E731
    row_stat = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    entries = [
            ("q", q, pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0))),
            ("k", k, pl.BlockSpec((None, tk, None, dp), lambda i, b, h: (b, 0, h, 0))),
            ("v", v, pl.BlockSpec((None, tk, None, dvp), lambda i, b, h: (b, 0, h, 0))),
            ("bias", bias, None if bias is None else _bias_spec(
                    bias, bq, tk, lambda i, b, h: (b, h, i, 0))),
            ("q_len", q_lengths, whole(q_lengths)),
            ("kv_len", kv_lengths, whole(kv_lengths)),
            ("q_seg", q_segment_ids, pl.BlockSpec((None, bq), lambda i, b, h: (b, i))),
            ("kv_seg", kv_segment_ids, pl.BlockSpec((None, tk), lambda i, b, h: (b, 0))),
            ("d_out", d_out, pl.BlockSpec((None, bq, None, dvp), lambda i, b, h: (b, i, h, 0))),
            ("lse", lse, row_stat),
            ("delta", delta, row_stat),
    ]
    names, args, in_specs = _specs_and_args(entries)
    out_specs = [pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    # A full bias: its gradient is dS itself, written here row block by row block.
    full_bias = bias is not None and bias.shape == (batch, heads, tq, tk)
    if full_bias:
        out_specs.append(pl.BlockSpec((None, None, bq, tk), lambda i, b, h: (b, h, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct(bias.shape, F32))
    outs = _call(_dq_kernel, names, static, (tq // bq, batch, heads), in_specs, out_specs,
                 out_shape, args, "attention_backward_dq")
    return (outs[0], outs[1].astype(bias.dtype)) if full_bias else (outs[0], None)


def _dq_kernel(*refs, names, static):
    ref = dict(zip(names, refs))
    dq_ref = refs[len(names)]
    dbias_ref = refs[len(names) + 1] if len(refs) > len(names) + 1 else None
    bq, bk = static.block_q_bwd, static.block_k_bwd
    q_block, b = pl.program_id(0), pl.program_id(1)
    q_start = q_block * bq
    q_len, kv_len = ref["q_len"][b], ref["kv_len"][b]
    bias_ref = ref.get("bias")
    full_bias_cols = bias_ref is not None and bias_ref.shape[-1] > 1
    q_pos = q_start + jnp.arange(bq)
    q_seg = ref["q_seg"][...] if static.has_segments else None
    q = _load_all(ref["q"], static.head_dim)
    d_out = _load_all(ref["d_out"], static.value_dim)
    lse = ref["lse"][...] if "lse" in ref else None
    delta = ref["delta"][...] if "delta" in ref else None

    def body(key_block, dq, masked):
        k_start = key_block * bk
        keys = pl.ds(k_start, bk)
        k = _load_rows(ref["k"], k_start, bk, static.head_dim)
        v = _load_rows(ref["v"], k_start, bk, static.value_dim)
        bias_tile = None
        if bias_ref is not None:
            bias_tile = _bias_tile(bias_ref, None, keys if full_bias_cols else None)
        valid = None
        if masked:
            kv_seg = ref["kv_seg"][keys] if static.has_segments else None
            valid = _valid(static, q_pos, k_start + jnp.arange(bk), q_len, kv_len, q_seg,
                           kv_seg)
        p = _probabilities(static, _logits(static, q, k, bias_tile), valid, lse)
        ds = _logits_grad(static, p, _dot(d_out, v, transpose_b=True), delta)
        if dbias_ref is not None:
            dbias_ref[:, keys] = ds
        return dq + _dot(ds.astype(k.dtype), k)

    visible = (functools.partial(_key_tile_overlaps, ref["kv_seg"], q_seg, bk)
               if static.has_segments else None)

    num_key_blocks = _key_blocks_for(static, q_start, bq, bk, q_len, kv_len)
    unmasked = _unmasked_key_blocks(static, q_start, bq, bk, q_len, kv_len, num_key_blocks)
    if dbias_ref is not None:
        # Zeros where no dS tile will be written: past the visited key blocks, and (segment
        # ids: tiles may be skipped anywhere) the whole row block, overwritten as computed.
        def zero_tile(key_block, carry):
            dbias_ref[:, pl.ds(key_block * bk, bk)] = jnp.zeros((bq, bk), F32)
            return carry

        first_zero = jnp.int32(0) if static.has_segments else num_key_blocks
        lax.fori_loop(first_zero, dbias_ref.shape[1] // bk, zero_tile, 0)
    dq = _phased_loop([(0, unmasked, False), (unmasked, num_key_blocks, True)], body,
                      jnp.zeros((bq, static.head_dim_padded), F32), visible)
    _store(dq_ref, dq * static.scale, static.head_dim)


# ----------------------------------------------------------------------------------------------
# backward: dK, dV


def _backward_dkv(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, d_out,
                  lse, delta, static):
    batch, tq, heads, _ = q.shape
    tk = k.shape[1]
    bk = static.block_k_bwd
    dp, dvp = static.head_dim_padded, static.value_dim_padded
    whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)  # noqa: E731
    row_stat = pl.BlockSpec((None, None, tq), lambda j, b, h: (b, h, 0))
    entries = [
            ("q", q, pl.BlockSpec((None, tq, None, dp), lambda j, b, h: (b, 0, h, 0))),
            ("k", k, pl.BlockSpec((None, bk, None, dp), lambda j, b, h: (b, j, h, 0))),
            ("v", v, pl.BlockSpec((None, bk, None, dvp), lambda j, b, h: (b, j, h, 0))),
            ("bias", bias, None if bias is None else _bias_spec(
                    bias, tq, bk, lambda j, b, h: (b, h, 0, j))),
            ("q_len", q_lengths, whole(q_lengths)),
            ("kv_len", kv_lengths, whole(kv_lengths)),
            ("q_seg", q_segment_ids, pl.BlockSpec((None, tq), lambda j, b, h: (b, 0))),
            ("kv_seg", kv_segment_ids, pl.BlockSpec((None, bk), lambda j, b, h: (b, j))),
            ("d_out", d_out, pl.BlockSpec((None, tq, None, dvp), lambda j, b, h: (b, 0, h, 0))),
            ("lse", lse, row_stat),
            ("delta", delta, row_stat),
    ]
    names, args, in_specs = _specs_and_args(entries)
    out_specs = [pl.BlockSpec((None, bk, None, dp), lambda j, b, h: (b, j, h, 0)),
                 pl.BlockSpec((None, bk, None, dvp), lambda j, b, h: (b, j, h, 0))]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    dk, dv = _call(_dkv_kernel, names, static, (tk // bk, batch, heads), in_specs, out_specs,
                   out_shape, args, "attention_backward_dkv")
    return dk, dv


def _dkv_kernel(*refs, names, static):
    ref = dict(zip(names, refs))
    dk_ref, dv_ref = refs[len(names):]
    bq, bk = static.block_q_bwd, static.block_k_bwd
    key_block, b = pl.program_id(0), pl.program_id(1)
    k_start = key_block * bk
    q_len, kv_len = ref["q_len"][b], ref["kv_len"][b]
    bias_ref = ref.get("bias")
    full_bias_rows = bias_ref is not None and bias_ref.shape[0] > 1
    k_pos = k_start + jnp.arange(bk)
    kv_seg = ref["kv_seg"][...] if static.has_segments else None
    k = _load_all(ref["k"], static.head_dim)
    v = _load_all(ref["v"], static.value_dim)

    def body(query_block, carry, masked):
        dk, dv = carry
        q_start = query_block * bq
        rows = pl.ds(q_start, bq)
        q = _load_rows(ref["q"], q_start, bq, static.head_dim)
        d_out = _load_rows(ref["d_out"], q_start, bq, static.value_dim)
        bias_tile = None
        if bias_ref is not None:
            bias_tile = _bias_tile(bias_ref, rows if full_bias_rows else None, None)
        valid = None
        if masked:
            q_seg = ref["q_seg"][rows] if static.has_segments else None
            valid = _valid(static, q_start + jnp.arange(bq), k_pos, q_len, kv_len, q_seg,
                           kv_seg)
        lse = ref["lse"][rows] if "lse" in ref else None
        delta = ref["delta"][rows] if "delta" in ref else None
        p = _probabilities(static, _logits(static, q, k, bias_tile), valid, lse)
        dv = dv + _dot(p.astype(d_out.dtype), d_out, transpose_a=True)
        ds = _logits_grad(static, p, _dot(d_out, v, transpose_b=True), delta)
        dk = dk + _dot(ds.astype(q.dtype), q, transpose_a=True)
        return dk, dv

    first, end = _query_block_range(static, k_start, bq, q_len, kv_len)
    lo, hi = _unmasked_query_blocks(static, k_start, bq, bk, q_len, kv_len, first, end)
    init = (jnp.zeros((bk, static.head_dim_padded), F32),
            jnp.zeros((bk, static.value_dim_padded), F32))
    visible = (functools.partial(_query_tile_overlaps, ref["q_seg"], kv_seg, bq)
               if static.has_segments else None)
    dk, dv = _phased_loop([(first, lo, True), (lo, hi, False), (hi, end, True)], body, init,
                          visible)
    _store(dk_ref, dk * static.scale, static.head_dim)
    _store(dv_ref, dv, static.value_dim)


# ----------------------------------------------------------------------------------------------
# backward: dbias, reduced over the bias's broadcast axes


def _backward_dbias(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids,
                    d_out, lse, delta, static):
    batch, tq, heads, _ = q.shape
    tk = k.shape[1]
    bq, bk = static.block_q_bwd, static.block_k_bwd
    bias_batch, bias_heads, bias_rows, bias_cols = bias.shape
    # A size-1 bias axis is summed over inside each program; a full one is tiled by the grid.
    row_tiles = tq // bq if bias_rows > 1 else 1
    col_tiles = tk // bk if bias_cols > 1 else 1
    tile_rows = bq if bias_rows > 1 else 1
    tile_cols = bk if bias_cols > 1 else 1
    splits = 1
    if bias_batch == 1 and batch > 1:
        programs = row_tiles * col_tiles * bias_heads
        splits = min(batch, max(1, DBIAS_TARGET_PROGRAMS // programs))

    def tile_index(tile, group, split):
        del split
        return (group // bias_heads, group % bias_heads, tile // col_tiles, tile % col_tiles)

    def whole(array, width=None):
        if array is None:
            return None
        shape = array.shape if width is None else (*array.shape[:-1], width)
        return pl.BlockSpec(shape, lambda *_: (0,) * array.ndim)

    dp, dvp = static.head_dim_padded, static.value_dim_padded
    entries = [
            ("q", q, whole(q, dp)), ("k", k, whole(k, dp)), ("v", v, whole(v, dvp)),
            ("bias", bias, pl.BlockSpec((None, None, tile_rows, tile_cols), tile_index)),
            ("q_len", q_lengths, whole(q_lengths)), ("kv_len", kv_lengths, whole(kv_lengths)),
            ("q_seg", q_segment_ids, whole(q_segment_ids)),
            ("kv_seg", kv_segment_ids, whole(kv_segment_ids)),
            ("d_out", d_out, whole(d_out, dvp)), ("lse", lse, whole(lse)),
            ("delta", delta, whole(delta)),
    ]
    names, args, in_specs = _specs_and_args(entries)
    out_spec = pl.BlockSpec((None, None, None, tile_rows, tile_cols),
                            lambda t, g, s: (s, *tile_index(t, g, s)))
    kernel = functools.partial(_dbias_kernel, batch=batch, heads=heads,
                               sum_batch=bias_batch == 1, sum_heads=bias_heads == 1,
                               bias_heads=bias_heads, col_tiles=col_tiles, splits=splits)
    grid = (row_tiles * col_tiles, bias_batch * bias_heads, splits)
    partial_sums = _call(kernel, names, static, grid, in_specs, out_spec,
                         jax.ShapeDtypeStruct((splits, *bias.shape), F32), args,
                         "attention_backward_dbias")
    return jnp.sum(partial_sums, axis=0).astype(bias.dtype)


def _load_head_rows(ref, b, h, start, size, valid_width):
    """Rows [start, start+size) of head h of example b from a whole [B, T, H, W] ref."""
    cols = jnp.arange(ref.shape[-1]) < valid_width
    return pl_triton.load(ref.at[b, pl.ds(start, size), h, :], mask=cols[None, :], other=0.0)


def _dbias_kernel(*refs, names, static, batch, heads, sum_batch, sum_heads, bias_heads,
                  col_tiles, splits):
    ref = dict(zip(names, refs))
    dbias_ref = refs[len(names)]
    bq, bk = static.block_q_bwd, static.block_k_bwd
    tile, group, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row_tile, col_tile = tile // col_tiles, tile % col_tiles
    # This program's bias tile broadcasts against every [bq, bk] logits tile it visits: an
    # axis of size 1 is exactly an axis this program sums dS over.
    bias_tile = ref["bias"][...].astype(F32)
    sum_rows, sum_cols = bias_tile.shape[0] == 1, bias_tile.shape[1] == 1

    def one_head(b, h, acc):
        q_len, kv_len = ref["q_len"][b], ref["kv_len"][b]
        if sum_rows:
            q_first = jnp.int32(0)
            if static.causal and not sum_cols:
                q_first = lax.div(col_tile * bk, bq)
            q_end = lax.div(q_len + bq - 1, bq)
        else:
            q_first = row_tile
            q_end = jnp.where(row_tile * bq < q_len, row_tile + 1, row_tile)

        def query_block(qb, acc):
            q_start = qb * bq
            rows = pl.ds(q_start, bq)
            q = _load_head_rows(ref["q"], b, h, q_start, bq, static.head_dim)
            d_out = _load_head_rows(ref["d_out"], b, h, q_start, bq, static.value_dim)
            lse = ref["lse"][b, h, rows] if "lse" in ref else None
            delta = ref["delta"][b, h, rows] if "delta" in ref else None
            q_seg = ref["q_seg"][b, rows] if static.has_segments else None
            if sum_cols:
                k_first = jnp.int32(0)
                k_end = _key_blocks_for(static, q_start, bq, bk, q_len, kv_len)
            else:
                k_first = col_tile
                visit = col_tile * bk < kv_len
                if static.causal:
                    visit = visit & (col_tile * bk < q_start + bq)
                k_end = jnp.where(visit, col_tile + 1, col_tile)

            def key_block(kb, acc):
                if static.has_segments:
                    kv_seg = ref["kv_seg"][b, pl.ds(kb * bk, bk)]
                    return lax.cond(_segments_overlap(q_seg, kv_seg),
                                    lambda a: key_tile(kb, a), lambda a: a, acc)
                return key_tile(kb, acc)

            def key_tile(kb, acc):
                k_start = kb * bk
                k = _load_head_rows(ref["k"], b, h, k_start, bk, static.head_dim)
                v = _load_head_rows(ref["v"], b, h, k_start, bk, static.value_dim)
                kv_seg = ref["kv_seg"][b, pl.ds(k_start, bk)] if static.has_segments else None
                valid = _valid(static, q_start + jnp.arange(bq), k_start + jnp.arange(bk),
                               q_len, kv_len, q_seg, kv_seg)
                p = _probabilities(static, _logits(static, q, k, bias_tile), valid, lse)
                ds = _logits_grad(static, p, _dot(d_out, v, transpose_b=True), delta)
                if sum_rows:
                    ds = jnp.sum(ds, axis=0, keepdims=True)
                if sum_cols:
                    ds = jnp.sum(ds, axis=1, keepdims=True)
                return acc + ds

            return lax.fori_loop(k_first, k_end, key_block, acc)

        return lax.fori_loop(q_first, q_end, query_block, acc)

    def one_example(b, acc):
        if sum_heads:
            return lax.fori_loop(0, heads, lambda h, a: one_head(b, h, a), acc)
        return one_head(b, group % bias_heads, acc)

    acc = jnp.zeros(bias_tile.shape, F32)
    if sum_batch:
        # Examples split, (split + splits * t), so the partial sums of all splits cover them.
        count = lax.div(batch - split + splits - 1, splits)
        acc = lax.fori_loop(0, count, lambda t, a: one_example(split + splits * t, a), acc)
    else:
        acc = one_example(group // bias_heads, acc)
    dbias_ref[...] = acc
