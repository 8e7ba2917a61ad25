"""Flash attention for TPU: Mosaic-TPU Pallas kernels behind `attention(impl="pallas")`.

`tpu_attention` is the TPU row of the dispatcher in `kernels_pallas.api`; its arguments arrive
validated and normalised there, and its semantics are those of
`kernels_pallas.reference.attention_reference`.

Design (FlashAttention-2 on the TPU memory hierarchy):
* Layout. The kernels work on [B, H, T, D] so that a block's last two dims are (sequence, head
  dim), which is what TPU tiling constrains (multiples of (8, 128) or the full dim). Sequences
  are zero-padded to whole blocks and head dims to the 128-lane width: the MXU and the vector
  registers work in 128-lane units anyway, so the padding costs HBM bandwidth but no MXU passes,
  and it makes every head_dim legal. f16 is computed as f32 (TPUs have no f16 matmul).
* Forward. Grid (B, H, q blocks, kv blocks); the kv axis is "arbitrary" and carries the online
  softmax state (running max, running sum, f32 accumulator) in VMEM scratch. It writes the
  output and the log-sum-exp of each row (replicated over 128 lanes, the layout Mosaic handles
  best for per-row values; +inf for a row without a valid key, so that the backward's
  exp(s - lse) is 0 there).
* Backward. Two kernels that recompute the probabilities from the saved log-sum-exp: a dK/dV
  kernel (grid over kv blocks, inner "arbitrary" loop over q blocks) and a dQ kernel (grid over
  q blocks, inner loop over kv blocks). delta = rowsum(dO * O) is recomputed per q tile from
  the dO and O blocks rather than stored. Sigmoid logits keep no row statistics:
  dS = dP * sigma * (1 - sigma).
* Bias gradient. dS is the bias gradient. Where the bias is broadcast along a sequence axis it
  is summed in-kernel along the inner grid loop (key axis in the dQ kernel, query axis in the
  dK/dV kernel); broadcast batch and head axes of those (small) partials are summed by XLA.
  A bias full over (Tq, Tk) but broadcast over batch or heads (Swin's relative position bias
  [1, H, Tq, Tk]) gets its own kernel, whose innermost grid axes walk the broadcast batch and
  heads and accumulate each (q block, kv block) tile in VMEM: its gradient is written once in
  the bias's own shape and [B, H, Tq, Tk] never exists (the dQ kernel would otherwise write it
  per tile for XLA to sum). It recomputes the tile's probabilities, one more QK^T and dO V^T.
* Key blocks. `tpu_attention_forward` / `tpu_attention_backward` expose the two halves for
  context parallelism: a ring runs the forward per key block and merges the (out, lse) pairs,
  then runs the backward per key block with the merged out and lse, and sums the gradients.
  `tpu_attention` is the special case of one block, with the forward/backward pair wrapped in
  a custom VJP.
* Sparsity. Sequence lengths are scalar-prefetched into SMEM. A (q block, kv block) pair that
  is entirely masked (causal, lengths) is skipped with `pl.when`, and the index maps clamp the
  block index to the last useful block so that no DMA is issued for skipped steps (a repeated
  block index is not fetched again). Fully valid blocks run a mask-free body; only blocks that
  straddle a mask boundary (or carry segment ids) build the iota mask.
"""
from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
# 512 x 512 tiles: each grid step has a fixed cost (DMA set-up, pipeline bookkeeping) that
# 128 x 128 tiles amortise poorly, and a 128-row tile under-fills the MXU's passes; splash
# attention uses 512 and more. A 512 x 512 f32 score tile is 1 MiB of VMEM. Shorter sequences
# shrink to one block. Unmeasured on a TPU (none was available; bench/attention.py measures
# it): `block_q`/`block_k` override.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of one attention problem, shared by the three kernels."""
    causal: bool
    scale: float
    logits: str
    sigmoid_bias: float
    batch: int
    heads: int
    block_q: int
    block_k: int
    num_q_blocks: int
    num_k_blocks: int
    head_dim: int           # padded
    value_dim: int          # padded
    bias_shape: tuple | None  # padded 4-D bias shape; dims of size 1 are broadcast
    segments: bool
    mask_q_lengths: bool
    mask_kv_lengths: bool
    interpret: object       # False, True or pltpu.InterpretParams (hashable)

    @property
    def softmax(self) -> bool:
        return self.logits == "softmax"

    @property
    def any_mask(self) -> bool:
        return self.causal or self.segments or self.mask_q_lengths or self.mask_kv_lengths

    @property
    def bias_grad_in_dkv(self) -> bool:
        """A bias broadcast over queries only is reduced along the dK/dV kernel's q loop."""
        return (self.bias_shape is not None and self.bias_shape[2] == 1
                and self.bias_shape[3] > 1)

    @property
    def bias_grad_own_kernel(self) -> bool:
        """A bias full over (Tq, Tk), broadcast over batch or heads: reduced in `_dbias_kernel`."""
        if self.bias_shape is None:
            return False
        bb, hb, tqb, tkb = self.bias_shape
        return (tqb > 1 and tkb > 1
                and ((bb == 1 and self.batch > 1) or (hb == 1 and self.heads > 1)))

    @property
    def bias_grad_in_dq(self) -> bool:
        return (self.bias_shape is not None and not self.bias_grad_in_dkv
                and not self.bias_grad_own_kernel)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _sublanes(*dtypes) -> int:
    """Row multiple of a TPU tile: 8 for 32-bit arrays, 16 when a 16-bit array is involved."""
    return 16 if any(jnp.dtype(d).itemsize == 2 for d in dtypes) else 8


def _block_sizes(tq: int, tk: int, block_q, block_k, sublanes: int):
    """Validated (block_q, block_k); a block covering a whole short sequence shrinks to fit."""
    block_q = DEFAULT_BLOCK_Q if block_q is None else block_q
    block_k = DEFAULT_BLOCK_K if block_k is None else block_k
    tq_min, tk_min = _round_up(tq, sublanes), _round_up(tk, sublanes)
    if block_q < tq_min and block_q % sublanes:
        raise ValueError(f"block_q must be a multiple of {sublanes} on TPU for these dtypes (the "
                         f"sublane tiling), or cover the whole query sequence Tq={tq}; got "
                         f"block_q={block_q}")
    if block_k < tk_min and block_k % LANES:
        raise ValueError(f"block_k must be a multiple of {LANES} on TPU (the lane tiling of the "
                         f"score and bias tiles), or cover the whole key sequence Tk={tk}; got "
                         f"block_k={block_k}")
    return min(block_q, tq_min), min(block_k, tk_min)


def tpu_attention(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, *,
                  causal, scale, logits, sigmoid_bias, block_q, block_k, interpret=False):
    """Attention on [B, T, H, D] inputs with Mosaic-TPU flash kernels; see the module docstring.

    Arguments are those of `kernels_pallas.api.attention` after normalisation: bias is None or
    4-D with each dim full or 1, lengths are int32 [B] or None, segment ids int32 [B, T] (both
    or neither), `scale` / `sigmoid_bias` Python floats. `interpret` is False, True or a
    `pltpu.InterpretParams` (TPU interpret mode, which runs on CPU). Returns [B, Tq, H, Dv] in
    q.dtype, differentiable in q, k, v and bias.
    """
    cfg, arrays = _prepare(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids,
                           causal=causal, scale=scale, logits=logits, sigmoid_bias=sigmoid_bias,
                           block_q=block_q, block_k=block_k, interpret=interpret)
    out = _flash(cfg, *arrays)
    return _from_kernel_layout(out, q.shape[1], v.shape[3], q.dtype)


def tpu_attention_forward(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids,
                          *, causal, scale, logits, sigmoid_bias, block_q, block_k,
                          interpret=False):
    """Forward of one key block: (out [B, Tq, H, Dv] in q.dtype, lse [B, H, Tq] f32).

    Context parallelism (ring attention) splits the keys over devices and runs attention of
    the local queries against one key block at a time; the blocks' results are combined
    afterwards (`kernels_pallas.reference.merge_blocks`). A normalised softmax output alone
    cannot be combined, so this also returns each row's natural log-sum-exp over the block's
    valid keys: -inf for a row without one (whose output row is 0), so that the merge gives
    such a block zero weight. lse is None for sigmoid logits, whose outputs simply add up.
    On the whole key range, out is that of `tpu_attention` (the same kernel).

    Arguments as `tpu_attention` (`sigmoid_bias` is the whole attention's, not derived from
    this block's length). Not differentiable itself: its VJP is `tpu_attention_backward`,
    which a ring needs to call with the merged statistics anyway. The contract is that of
    `kernels_pallas.reference.reference_forward`.
    """
    cfg, arrays = _prepare(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids,
                           causal=causal, scale=scale, logits=logits, sigmoid_bias=sigmoid_bias,
                           block_q=block_q, block_k=block_k, interpret=interpret)
    out, lse = _forward(cfg, *arrays)
    out = _from_kernel_layout(out, q.shape[1], v.shape[3], q.dtype)
    if lse is not None:
        # Lane-replicated [B, H, Tq_pad, 128] -> [B, H, Tq]; the kernel marks a row without a
        # valid key +inf (what its backward wants), the merge's convention is -inf.
        lse = lse[:, :, :q.shape[1], 0]
        lse = jnp.where(lse == jnp.inf, -jnp.inf, lse)
    return out, lse


def tpu_attention_backward(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids,
                           out, lse, d_out, *, causal, scale, logits, sigmoid_bias, block_q,
                           block_k, interpret=False):
    """This key block's share (dq, dk, dv, dbias) of the gradients of a larger attention.

    In ring attention a block's probabilities are exp(s - lse) with the lse of the *whole*
    attention, not the block's own, and delta = rowsum(d_out * out) uses the whole (merged)
    output; with those, the softmax gradient splits exactly over key blocks: the dk, dv (and
    bias columns) of this block's keys come from this call alone, and dq (and a bias broadcast
    over keys) gets a partial sum that adds up over the blocks.
    So `out` [B, Tq, H, Dv] and `lse` [B, H, Tq] (natural log, -inf for a row without a valid
    key anywhere) are the merged ones (`merge_blocks`), or this call's own from
    `tpu_attention_forward` when there is one block; both are ignored for sigmoid logits
    (pass None), whose gradient needs no row statistics. `d_out` is the output cotangent.

    Returns dq, dk, dv in the dtypes of q, k, v and dbias (None without a bias) in the bias's
    own (broadcast) shape and dtype. The contract is that of
    `kernels_pallas.reference.reference_backward`.
    """
    cfg, arrays = _prepare(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids,
                           causal=causal, scale=scale, logits=logits, sigmoid_bias=sigmoid_bias,
                           block_q=block_q, block_k=block_k, interpret=interpret)
    tq, tq_pad = q.shape[1], cfg.num_q_blocks * cfg.block_q
    compute_dtype = arrays[0].dtype
    d_out_p = _to_kernel_layout(d_out, compute_dtype, tq_pad, cfg.value_dim)
    out_p = lse_p = None
    if cfg.softmax:
        # The kernels only read O for delta, in f32: a merged f32 output stays f32 (rounding it
        # to bf16 would only add error); anything else goes as the compute dtype.
        out_dtype = jnp.float32 if out.dtype == jnp.float32 else compute_dtype
        out_p = _to_kernel_layout(out, out_dtype, tq_pad, cfg.value_dim)
        # The kernels' convention: +inf for a row without a valid key (and for padded rows),
        # so that exp(s - lse) = 0 there; one lane, [B, H, Tq_pad, 1], like the residual of
        # `_flash_fwd`.
        lse_p = lse.astype(jnp.float32)
        lse_p = jnp.where(lse_p == -jnp.inf, jnp.inf, lse_p)
        lse_p = jnp.pad(lse_p, ((0, 0), (0, 0), (0, tq_pad - tq)), constant_values=jnp.inf)
        lse_p = lse_p[..., None]
    dq, dk, dv, dbias = _backward(cfg, (*arrays, out_p, lse_p), d_out_p)
    dq = _from_kernel_layout(dq, tq, q.shape[3], q.dtype)
    dk = _from_kernel_layout(dk, k.shape[1], k.shape[3], k.dtype)
    dv = _from_kernel_layout(dv, v.shape[1], v.shape[3], v.dtype)
    if dbias is not None:
        # Padded (query, key) positions of a full bias dim are cut off again.
        dbias = dbias[:, :, :bias.shape[2], :bias.shape[3]].astype(bias.dtype)
    return dq, dk, dv, dbias


def _to_kernel_layout(x, dtype, seq_pad: int, dim_pad: int):
    """[B, T, H, D] -> [B, H, seq_pad, dim_pad] in `dtype`, zero-padded."""
    x = jnp.transpose(x.astype(dtype), (0, 2, 1, 3))
    return jnp.pad(x, ((0, 0), (0, 0), (0, seq_pad - x.shape[2]), (0, dim_pad - x.shape[3])))


def _from_kernel_layout(x, seq: int, dim: int, dtype):
    """[B, H, T_pad, D_pad] -> [B, seq, H, dim] in `dtype`: the inverse of `_to_kernel_layout`."""
    return jnp.transpose(x[:, :, :seq, :dim], (0, 2, 1, 3)).astype(dtype)


def _prepare(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, *, causal,
             scale, logits, sigmoid_bias, block_q, block_k, interpret):
    """(cfg, (q, k, v, bias, q_len, kv_len, q_seg, kv_seg)): the static `_Config` and the
    kernels' inputs in their layout, padded to whole blocks and 128 lanes."""
    batch, tq, heads, head_dim = q.shape
    tk, value_dim = k.shape[1], v.shape[3]
    # TPUs have no f16 matmul: f16 runs as f32 and the result is rounded back.
    compute_dtype = jnp.float32 if q.dtype == jnp.float16 else q.dtype
    bias_dtype = None
    if bias is not None:
        bias_dtype = jnp.float32 if bias.dtype == jnp.float16 else bias.dtype
    dtypes = [compute_dtype] + ([bias_dtype] if bias is not None else [])
    bq, bk = _block_sizes(tq, tk, block_q, block_k, _sublanes(*dtypes))
    tq_pad, tk_pad = _round_up(tq, bq), _round_up(tk, bk)
    d_pad, dv_pad = _round_up(head_dim, LANES), _round_up(value_dim, LANES)

    q_p = _to_kernel_layout(q, compute_dtype, tq_pad, d_pad)
    k_p = _to_kernel_layout(k, compute_dtype, tk_pad, d_pad)
    v_p = _to_kernel_layout(v, compute_dtype, tk_pad, dv_pad)
    bias_p = None
    if bias is not None:
        pad_q = tq_pad - tq if bias.shape[2] > 1 else 0
        pad_k = tk_pad - tk if bias.shape[3] > 1 else 0
        bias_p = jnp.pad(bias.astype(bias_dtype), ((0, 0), (0, 0), (0, pad_q), (0, pad_k)))

    q_len = (jnp.full((batch,), tq, jnp.int32) if q_lengths is None
             else q_lengths.astype(jnp.int32))
    kv_len = (jnp.full((batch,), tk, jnp.int32) if kv_lengths is None
              else kv_lengths.astype(jnp.int32))
    q_seg = kv_seg = None
    if q_segment_ids is not None:
        # Query ids are replicated over lanes and key ids laid out along lanes, so that their
        # comparison is a plain (rows, 1) x (1, cols) broadcast inside the kernel.
        q_seg = jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, tq_pad - tq)))
        q_seg = jnp.broadcast_to(q_seg[:, :, None], (batch, tq_pad, LANES))
        kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, tk_pad - tk)))
        kv_seg = kv_seg[:, None, :]

    cfg = _Config(
            causal=bool(causal), scale=float(scale), logits=logits,
            sigmoid_bias=0.0 if sigmoid_bias is None else float(sigmoid_bias),
            batch=batch, heads=heads, block_q=bq, block_k=bk, num_q_blocks=tq_pad // bq,
            num_k_blocks=tk_pad // bk, head_dim=d_pad, value_dim=dv_pad,
            bias_shape=None if bias_p is None else tuple(bias_p.shape),
            segments=q_seg is not None, mask_q_lengths=q_lengths is not None,
            # Padded keys are masked as keys past the length.
            mask_kv_lengths=kv_lengths is not None or tk_pad != tk,
            interpret=interpret)
    return cfg, (q_p, k_p, v_p, bias_p, q_len, kv_len, q_seg, kv_seg)


# ----------------------------------------------------------------------------------------------
# Block-level masking and skipping, shared by the three kernels.

def _block_flags(cfg: _Config, q_block, k_block, q_len, kv_len):
    """(run, partial): whether a (q block, kv block) pair has any valid entry / any masked one."""
    q_first, k_first = q_block * cfg.block_q, k_block * cfg.block_k
    q_last, k_last = q_first + cfg.block_q - 1, k_first + cfg.block_k - 1
    run = (k_first < kv_len) & (q_first < q_len)
    partial = []
    if cfg.causal:
        run = run & (k_first <= q_last)
        partial.append(k_last > q_first)
    if cfg.mask_q_lengths:
        partial.append(q_last >= q_len)
    if cfg.mask_kv_lengths:
        partial.append(k_last >= kv_len)
    if cfg.segments:
        # Segment boundaries are data: any block may straddle one.
        return run, None
    return run, functools.reduce(jnp.logical_or, partial) if partial else None


def _tile_mask(cfg: _Config, q_block, k_block, q_len, kv_len, q_seg_ref, kv_seg_ref):
    """Boolean (block_q, block_k) validity of a score tile, from iotas and segment ids."""
    shape = (cfg.block_q, cfg.block_k)
    rows = lax.broadcasted_iota(jnp.int32, shape, 0) + q_block * cfg.block_q
    cols = lax.broadcasted_iota(jnp.int32, shape, 1) + k_block * cfg.block_k
    terms = []
    if cfg.causal:
        terms.append(cols <= rows)
    if cfg.mask_q_lengths:
        terms.append(rows < q_len)
    if cfg.mask_kv_lengths:
        terms.append(cols < kv_len)
    if cfg.segments:
        terms.append(q_seg_ref[:, :1] == kv_seg_ref[...])
    return functools.reduce(jnp.logical_and, terms)


def _masked_and_plain(cfg: _Config, run, partial, body):
    """Runs body(masked=True) on straddling blocks and body(masked=False) on fully valid ones."""
    if not cfg.any_mask:
        pl.when(run)(lambda: body(False))
    elif partial is None:
        pl.when(run)(lambda: body(True))
    else:
        pl.when(run & partial)(lambda: body(True))
        pl.when(run & jnp.logical_not(partial))(lambda: body(False))


def _div(numerator, denominator: int):
    """Integer division of a non-negative traced int32. `//` would floor via a sign op, which
    Mosaic lowers only with a real TPU attached (it queries the chip generation)."""
    return lax.div(numerator, jnp.int32(denominator))


def _last_k_block(cfg: _Config, q_block, kv_len):
    """Index of the last kv block a q block needs (0 when none): later steps reuse it."""
    last = _div(kv_len + cfg.block_k - 1, cfg.block_k) - 1
    if cfg.causal:
        last = jnp.minimum(last, _div(q_block * cfg.block_q + cfg.block_q - 1, cfg.block_k))
    return jnp.maximum(last, 0)


def _clamped_q_block(cfg: _Config, q_block, k_block, q_len):
    """q block to fetch in the dK/dV loop: inside [first causal block, last valid block]."""
    last = jnp.maximum(_div(q_len + cfg.block_q - 1, cfg.block_q) - 1, 0)
    first = _div(k_block * cfg.block_k, cfg.block_q) if cfg.causal else 0
    return jnp.minimum(jnp.maximum(q_block, first), last)


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _dot(a, b, contract_a: int, contract_b: int):
    """2-D matmul contracting a's dim `contract_a` with b's `contract_b`, accumulated in f32."""
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                           precision=_precision(a.dtype), preferred_element_type=jnp.float32)


def _scores(cfg: _Config, q, k, bias_ref):
    s = _dot(q, k, 1, 1) * cfg.scale
    if bias_ref is not None:
        s = s + bias_ref[...].astype(jnp.float32)
    return s


def _bias_index(cfg: _Config, b, h, q_block, k_block):
    bb, hb, tqb, tkb = cfg.bias_shape
    return (b if bb > 1 else 0, h if hb > 1 else 0, q_block if tqb > 1 else 0,
            k_block if tkb > 1 else 0)


def _bias_block(cfg: _Config):
    tqb, tkb = cfg.bias_shape[2:]
    return (pl.squeezed, pl.squeezed, cfg.block_q if tqb > 1 else 1,
            cfg.block_k if tkb > 1 else 1)


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel",
                                                     "arbitrary"))


def _take(refs, present: bool):
    return next(refs) if present else None


# ----------------------------------------------------------------------------------------------
# Forward.

def _forward_kernel(q_len_ref, kv_len_ref, *refs, cfg: _Config):
    refs = iter(refs)
    q_ref, k_ref, v_ref = next(refs), next(refs), next(refs)
    bias_ref = _take(refs, cfg.bias_shape is not None)
    q_seg_ref = _take(refs, cfg.segments)
    kv_seg_ref = _take(refs, cfg.segments)
    o_ref = next(refs)
    lse_ref = _take(refs, cfg.softmax)
    acc_ref = next(refs)
    m_ref = _take(refs, cfg.softmax)
    l_ref = _take(refs, cfg.softmax)

    b, q_block, k_block = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    q_len, kv_len = q_len_ref[b], kv_len_ref[b]

    @pl.when(k_block == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        if cfg.softmax:
            m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
            l_ref[...] = jnp.zeros_like(l_ref)

    def step(masked: bool):
        v = v_ref[...]
        s = _scores(cfg, q_ref[...], k_ref[...], bias_ref)
        valid = (_tile_mask(cfg, q_block, k_block, q_len, kv_len, q_seg_ref, kv_seg_ref)
                 if masked else None)
        if cfg.softmax:
            if masked:
                s = jnp.where(valid, s, -jnp.inf)
            m_prev = m_ref[:, :1]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            if masked:
                # A row with no valid key so far keeps max -inf; shift by 0 there to avoid
                # (-inf) - (-inf).
                m_new_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            else:
                m_new_safe = m_new
            p = jnp.exp(s - m_new_safe)
            alpha = jnp.exp(m_prev - m_new_safe)
            l_new = alpha * l_ref[:, :1] + jnp.sum(p, axis=1, keepdims=True)
            m_ref[...] = jnp.broadcast_to(m_new, m_ref.shape)
            l_ref[...] = jnp.broadcast_to(l_new, l_ref.shape)
            acc_ref[...] = alpha * acc_ref[...] + _dot(p.astype(v.dtype), v, 1, 0)
        else:
            p = jax.nn.sigmoid(s + cfg.sigmoid_bias)
            if masked:
                p = jnp.where(valid, p, 0.0)
            acc_ref[...] += _dot(p.astype(v.dtype), v, 1, 0)

    run, partial = _block_flags(cfg, q_block, k_block, q_len, kv_len)
    _masked_and_plain(cfg, run, partial, step)

    @pl.when(k_block == cfg.num_k_blocks - 1)
    def _finish():
        if cfg.softmax:
            l = l_ref[:, :1]
            has_keys = l > 0.0
            # Rows without a valid key output 0 and get lse = +inf: exp(s - lse) is then 0 in
            # the backward kernels even on tiles they do not mask, and the lse of a row that
            # had keys in another key block (ring attention) is never taken for this one's.
            inv_l = jnp.where(has_keys, 1.0 / jnp.where(has_keys, l, 1.0), 0.0)
            o_ref[...] = (acc_ref[...] * inv_l).astype(o_ref.dtype)
            lse = jnp.where(has_keys, m_ref[:, :1] + jnp.log(jnp.where(has_keys, l, 1.0)),
                            jnp.inf)
            lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)
        else:
            o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _forward(cfg: _Config, q, k, v, bias, q_len, kv_len, q_seg, kv_seg):
    bq, bk, sq = cfg.block_q, cfg.block_k, pl.squeezed

    def q_map(b, h, i, j, q_len_ref, kv_len_ref):
        return b, h, i, 0

    def kv_block(b, i, j, kv_len_ref):
        return jnp.minimum(j, _last_k_block(cfg, i, kv_len_ref[b]))

    def kv_map(b, h, i, j, q_len_ref, kv_len_ref):
        return b, h, kv_block(b, i, j, kv_len_ref), 0

    inputs = [q, k, v]
    in_specs = [pl.BlockSpec((sq, sq, bq, cfg.head_dim), q_map),
                pl.BlockSpec((sq, sq, bk, cfg.head_dim), kv_map),
                pl.BlockSpec((sq, sq, bk, cfg.value_dim), kv_map)]
    if bias is not None:
        inputs.append(bias)
        in_specs.append(pl.BlockSpec(
                _bias_block(cfg), lambda b, h, i, j, ql, kl: _bias_index(
                        cfg, b, h, i, kv_block(b, i, j, kl))))
    if cfg.segments:
        inputs += [q_seg, kv_seg]
        in_specs += [pl.BlockSpec((sq, bq, LANES), lambda b, h, i, j, ql, kl: (b, i, 0)),
                     pl.BlockSpec((sq, 1, bk),
                                  lambda b, h, i, j, ql, kl: (b, 0, kv_block(b, i, j, kl)))]
    tq_pad = cfg.num_q_blocks * bq
    out_shape = [jax.ShapeDtypeStruct((cfg.batch, cfg.heads, tq_pad, cfg.value_dim), q.dtype)]
    out_specs = [pl.BlockSpec((sq, sq, bq, cfg.value_dim), q_map)]
    scratch = [pltpu.VMEM((bq, cfg.value_dim), jnp.float32)]
    if cfg.softmax:
        out_shape.append(jax.ShapeDtypeStruct((cfg.batch, cfg.heads, tq_pad, LANES),
                                              jnp.float32))
        out_specs.append(pl.BlockSpec((sq, sq, bq, LANES), q_map))
        scratch += [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32)]
    outs = pl.pallas_call(
            functools.partial(_forward_kernel, cfg=cfg),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                    num_scalar_prefetch=2,
                    grid=(cfg.batch, cfg.heads, cfg.num_q_blocks, cfg.num_k_blocks),
                    in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch),
            out_shape=out_shape, compiler_params=_compiler_params(),
            interpret=cfg.interpret, name="flash_tpu_forward",
    )(q_len, kv_len, *inputs)
    return outs[0], (outs[1] if cfg.softmax else None)


# ----------------------------------------------------------------------------------------------
# Backward.

def _probabilities_and_ds(cfg: _Config, q, k, v, do, o_ref, lse_ref, bias_ref, valid):
    """Recomputed probabilities p and the logits gradient dS of one tile (both f32)."""
    s = _scores(cfg, q, k, bias_ref)
    dp = _dot(do, v, 1, 1)
    if cfg.softmax:
        p = jnp.exp(s - lse_ref[:, :1])
        if valid is not None:
            p = jnp.where(valid, p, 0.0)
        delta = jnp.sum(do.astype(jnp.float32) * o_ref[...].astype(jnp.float32), axis=1,
                        keepdims=True)
        ds = p * (dp - delta)
    else:
        p = jax.nn.sigmoid(s + cfg.sigmoid_bias)
        if valid is not None:
            p = jnp.where(valid, p, 0.0)
        ds = dp * p * (1.0 - p)
    return p, ds


def _dkv_kernel(q_len_ref, kv_len_ref, *refs, cfg: _Config):
    refs = iter(refs)
    q_ref, k_ref, v_ref, do_ref = next(refs), next(refs), next(refs), next(refs)
    o_ref = _take(refs, cfg.softmax)
    lse_ref = _take(refs, cfg.softmax)
    bias_ref = _take(refs, cfg.bias_shape is not None)
    q_seg_ref = _take(refs, cfg.segments)
    kv_seg_ref = _take(refs, cfg.segments)
    dk_ref, dv_ref = next(refs), next(refs)
    dbias_ref = _take(refs, cfg.bias_grad_in_dkv)
    dk_acc, dv_acc = next(refs), next(refs)

    b, k_block, q_block = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    q_len, kv_len = q_len_ref[b], kv_len_ref[b]

    @pl.when(q_block == 0)
    def _init():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)
        if dbias_ref is not None:
            dbias_ref[...] = jnp.zeros_like(dbias_ref)

    def step(masked: bool):
        q, do = q_ref[...], do_ref[...]
        valid = (_tile_mask(cfg, q_block, k_block, q_len, kv_len, q_seg_ref, kv_seg_ref)
                 if masked else None)
        p, ds = _probabilities_and_ds(cfg, q, k_ref[...], v_ref[...], do, o_ref, lse_ref,
                                      bias_ref, valid)
        dv_acc[...] += _dot(p.astype(do.dtype), do, 0, 0)
        dk_acc[...] += _dot(ds.astype(q.dtype), q, 0, 0)
        if dbias_ref is not None:
            dbias_ref[...] += jnp.sum(ds, axis=0, keepdims=True)

    run, partial = _block_flags(cfg, q_block, k_block, q_len, kv_len)
    _masked_and_plain(cfg, run, partial, step)

    @pl.when(q_block == cfg.num_q_blocks - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(q_len_ref, kv_len_ref, *refs, cfg: _Config):
    refs = iter(refs)
    q_ref, k_ref, v_ref, do_ref = next(refs), next(refs), next(refs), next(refs)
    o_ref = _take(refs, cfg.softmax)
    lse_ref = _take(refs, cfg.softmax)
    bias_ref = _take(refs, cfg.bias_shape is not None)
    q_seg_ref = _take(refs, cfg.segments)
    kv_seg_ref = _take(refs, cfg.segments)
    dq_ref = next(refs)
    dbias_ref = _take(refs, cfg.bias_grad_in_dq)
    dq_acc = next(refs)
    # Per-tile bias gradient, or (bias broadcast over keys) a row sum kept over the kv loop.
    bias_grad_per_tile = dbias_ref is not None and cfg.bias_shape[3] > 1

    b, q_block, k_block = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    q_len, kv_len = q_len_ref[b], kv_len_ref[b]

    @pl.when(k_block == 0)
    def _init():
        dq_acc[...] = jnp.zeros_like(dq_acc)
        if dbias_ref is not None and not bias_grad_per_tile:
            dbias_ref[...] = jnp.zeros_like(dbias_ref)

    def step(masked: bool):
        k = k_ref[...]
        valid = (_tile_mask(cfg, q_block, k_block, q_len, kv_len, q_seg_ref, kv_seg_ref)
                 if masked else None)
        _, ds = _probabilities_and_ds(cfg, q_ref[...], k, v_ref[...], do_ref[...], o_ref,
                                      lse_ref, bias_ref, valid)
        dq_acc[...] += _dot(ds.astype(k.dtype), k, 1, 0)
        if bias_grad_per_tile:
            dbias_ref[...] = ds
        elif dbias_ref is not None:
            dbias_ref[...] += jnp.sum(ds, axis=1, keepdims=True)

    run, partial = _block_flags(cfg, q_block, k_block, q_len, kv_len)
    _masked_and_plain(cfg, run, partial, step)
    if bias_grad_per_tile:
        # Every output tile is written once: skipped tiles get their zero gradient here.
        @pl.when(jnp.logical_not(run))
        def _zero_tile():
            dbias_ref[...] = jnp.zeros_like(dbias_ref)

    @pl.when(k_block == cfg.num_k_blocks - 1)
    def _finish():
        dq_ref[...] = (dq_acc[...] * cfg.scale).astype(dq_ref.dtype)


def _backward(cfg: _Config, residuals, do):
    q, k, v, bias, q_len, kv_len, q_seg, kv_seg, o, lse = residuals
    bq, bk, sq = cfg.block_q, cfg.block_k, pl.squeezed
    tq_pad, tk_pad = cfg.num_q_blocks * bq, cfg.num_k_blocks * bk
    grid_b_h = (cfg.batch, cfg.heads)
    do = do.astype(q.dtype)

    # dK/dV: grid (b, h, kv block, q block).
    def q_block_dkv(b, j, i, q_len_ref):
        return _clamped_q_block(cfg, i, j, q_len_ref[b])

    def q_map_dkv(b, h, j, i, ql, kl):
        return b, h, q_block_dkv(b, j, i, ql), 0

    def kv_map_dkv(b, h, j, i, ql, kl):
        return b, h, j, 0

    arrays = (q, k, v, do, o, lse, bias, q_seg, kv_seg)

    def common_inputs(*index_maps):
        return _backward_inputs(cfg, arrays, *index_maps)

    inputs, in_specs = common_inputs(
            q_map_dkv, kv_map_dkv,
            lambda b, h, j, i, ql, kl: _bias_index(cfg, b, h, q_block_dkv(b, j, i, ql), j),
            lambda b, h, j, i, ql, kl: (b, q_block_dkv(b, j, i, ql), 0),
            lambda b, h, j, i, ql, kl: (b, 0, j))
    out_shape = [jax.ShapeDtypeStruct((*grid_b_h, tk_pad, cfg.head_dim), k.dtype),
                 jax.ShapeDtypeStruct((*grid_b_h, tk_pad, cfg.value_dim), v.dtype)]
    out_specs = [pl.BlockSpec((sq, sq, bk, cfg.head_dim), kv_map_dkv),
                 pl.BlockSpec((sq, sq, bk, cfg.value_dim), kv_map_dkv)]
    if cfg.bias_grad_in_dkv:
        out_shape.append(jax.ShapeDtypeStruct((*grid_b_h, 1, tk_pad), jnp.float32))
        out_specs.append(pl.BlockSpec((sq, sq, 1, bk), lambda b, h, j, i, ql, kl: (b, h, 0, j)))
    dkv_outs = pl.pallas_call(
            functools.partial(_dkv_kernel, cfg=cfg),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                    num_scalar_prefetch=2,
                    grid=(*grid_b_h, cfg.num_k_blocks, cfg.num_q_blocks),
                    in_specs=in_specs, out_specs=out_specs,
                    scratch_shapes=[pltpu.VMEM((bk, cfg.head_dim), jnp.float32),
                                    pltpu.VMEM((bk, cfg.value_dim), jnp.float32)]),
            out_shape=out_shape, compiler_params=_compiler_params(),
            interpret=cfg.interpret, name="flash_tpu_dkv",
    )(q_len, kv_len, *inputs)
    dk, dv = dkv_outs[:2]

    # dQ: grid (b, h, q block, kv block).
    def kv_block_dq(b, i, j, kv_len_ref):
        return jnp.minimum(j, _last_k_block(cfg, i, kv_len_ref[b]))

    def q_map_dq(b, h, i, j, ql, kl):
        return b, h, i, 0

    inputs, in_specs = common_inputs(
            q_map_dq,
            lambda b, h, i, j, ql, kl: (b, h, kv_block_dq(b, i, j, kl), 0),
            lambda b, h, i, j, ql, kl: _bias_index(cfg, b, h, i, kv_block_dq(b, i, j, kl)),
            lambda b, h, i, j, ql, kl: (b, i, 0),
            lambda b, h, i, j, ql, kl: (b, 0, kv_block_dq(b, i, j, kl)))
    out_shape = [jax.ShapeDtypeStruct((*grid_b_h, tq_pad, cfg.head_dim), q.dtype)]
    out_specs = [pl.BlockSpec((sq, sq, bq, cfg.head_dim), q_map_dq)]
    if cfg.bias_grad_in_dq:
        if cfg.bias_shape[3] > 1:
            out_shape.append(jax.ShapeDtypeStruct((*grid_b_h, tq_pad, tk_pad), jnp.float32))
            out_specs.append(pl.BlockSpec((sq, sq, bq, bk),
                                          lambda b, h, i, j, ql, kl: (b, h, i, j)))
        else:
            out_shape.append(jax.ShapeDtypeStruct((*grid_b_h, tq_pad, 1), jnp.float32))
            out_specs.append(pl.BlockSpec((sq, sq, bq, 1), q_map_dq))
    dq_outs = pl.pallas_call(
            functools.partial(_dq_kernel, cfg=cfg),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                    num_scalar_prefetch=2,
                    grid=(*grid_b_h, cfg.num_q_blocks, cfg.num_k_blocks),
                    in_specs=in_specs, out_specs=out_specs,
                    scratch_shapes=[pltpu.VMEM((bq, cfg.head_dim), jnp.float32)]),
            out_shape=out_shape, compiler_params=_compiler_params(),
            interpret=cfg.interpret, name="flash_tpu_dq",
    )(q_len, kv_len, *inputs)
    dq = dq_outs[0]

    dbias = None
    if cfg.bias_grad_own_kernel:
        dbias = _backward_dbias(cfg, q, k, v, do, o, lse, bias, q_len, kv_len, q_seg, kv_seg)
        dbias = dbias.astype(bias.dtype)
    elif bias is not None:
        partial_dbias = dkv_outs[2] if cfg.bias_grad_in_dkv else dq_outs[1]
        # Sum over every axis along which the bias was broadcast (size 1 in bias_shape).
        axes = tuple(axis for axis, size in enumerate(cfg.bias_shape)
                     if size == 1 and partial_dbias.shape[axis] > 1)
        dbias = jnp.sum(partial_dbias, axis=axes, keepdims=True).astype(bias.dtype)
    return dq, dk, dv, dbias


def _backward_inputs(cfg: _Config, arrays, q_map, kv_map, bias_map, q_seg_map, kv_seg_map):
    """(inputs, BlockSpecs) of the backward kernels: q, k, v, dO, (O, lse), (bias), (segment
    ids), with the given index maps. `arrays` = (q, k, v, do, o, lse, bias, q_seg, kv_seg)."""
    q, k, v, do, o, lse, bias, q_seg, kv_seg = arrays
    bq, bk, sq = cfg.block_q, cfg.block_k, pl.squeezed
    inputs = [q, k, v, do]
    specs = [pl.BlockSpec((sq, sq, bq, cfg.head_dim), q_map),
             pl.BlockSpec((sq, sq, bk, cfg.head_dim), kv_map),
             pl.BlockSpec((sq, sq, bk, cfg.value_dim), kv_map),
             pl.BlockSpec((sq, sq, bq, cfg.value_dim), q_map)]
    if cfg.softmax:
        inputs += [o, lse]
        specs += [pl.BlockSpec((sq, sq, bq, cfg.value_dim), q_map),
                  pl.BlockSpec((sq, sq, bq, 1), q_map)]
    if bias is not None:
        inputs.append(bias)
        specs.append(pl.BlockSpec(_bias_block(cfg), bias_map))
    if cfg.segments:
        inputs += [q_seg, kv_seg]
        specs += [pl.BlockSpec((sq, bq, LANES), q_seg_map),
                  pl.BlockSpec((sq, 1, bk), kv_seg_map)]
    return inputs, specs


def _backward_dbias(cfg: _Config, q, k, v, do, o, lse, bias, q_len, kv_len, q_seg, kv_seg):
    """Gradient of a bias full over (Tq, Tk) and broadcast over batch and/or heads, in the
    bias's own (padded) shape. Grid (bias batch, bias heads, q block, kv block, summed batch,
    summed heads): the two summed axes are innermost and sequential, so each output tile
    stays in VMEM while every (example, head) adds its dS."""
    bq, bk, sq = cfg.block_q, cfg.block_k, pl.squeezed
    bias_b, bias_h = cfg.bias_shape[:2]
    sum_b = cfg.batch if bias_b == 1 else 1
    sum_h = cfg.heads if bias_h == 1 else 1

    def q_map(bb, hb, i, j, bs, hs, ql, kl):
        return bb + bs, hb + hs, i, 0

    def kv_map(bb, hb, i, j, bs, hs, ql, kl):
        return bb + bs, hb + hs, j, 0

    tile_map = lambda bb, hb, i, j, bs, hs, ql, kl: (bb, hb, i, j)  # noqa: E731
    inputs, specs = _backward_inputs(
            cfg, (q, k, v, do, o, lse, bias, q_seg, kv_seg), q_map, kv_map, tile_map,
            lambda bb, hb, i, j, bs, hs, ql, kl: (bb + bs, i, 0),
            lambda bb, hb, i, j, bs, hs, ql, kl: (bb + bs, 0, j))
    return pl.pallas_call(
            functools.partial(_dbias_kernel, cfg=cfg),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                    num_scalar_prefetch=2,
                    grid=(bias_b, bias_h, cfg.num_q_blocks, cfg.num_k_blocks, sum_b, sum_h),
                    in_specs=specs, out_specs=pl.BlockSpec((sq, sq, bq, bk), tile_map)),
            out_shape=jax.ShapeDtypeStruct(cfg.bias_shape, jnp.float32),
            compiler_params=pltpu.CompilerParams(dimension_semantics=(
                    "parallel", "parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
            interpret=cfg.interpret, name="flash_tpu_dbias",
    )(q_len, kv_len, *inputs)


def _dbias_kernel(q_len_ref, kv_len_ref, *refs, cfg: _Config):
    refs = iter(refs)
    q_ref, k_ref, v_ref, do_ref = next(refs), next(refs), next(refs), next(refs)
    o_ref = _take(refs, cfg.softmax)
    lse_ref = _take(refs, cfg.softmax)
    bias_ref = next(refs)
    q_seg_ref = _take(refs, cfg.segments)
    kv_seg_ref = _take(refs, cfg.segments)
    dbias_ref = next(refs)

    bb, q_block, k_block = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bs, hs = pl.program_id(4), pl.program_id(5)
    b = bb + bs
    q_len, kv_len = q_len_ref[b], kv_len_ref[b]

    @pl.when((bs == 0) & (hs == 0))
    def _init():
        dbias_ref[...] = jnp.zeros_like(dbias_ref)

    def step(masked: bool):
        valid = (_tile_mask(cfg, q_block, k_block, q_len, kv_len, q_seg_ref, kv_seg_ref)
                 if masked else None)
        _, ds = _probabilities_and_ds(cfg, q_ref[...], k_ref[...], v_ref[...], do_ref[...],
                                      o_ref, lse_ref, bias_ref, valid)
        dbias_ref[...] += ds

    run, partial = _block_flags(cfg, q_block, k_block, q_len, kv_len)
    _masked_and_plain(cfg, run, partial, step)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, bias, q_len, kv_len, q_seg, kv_seg):
    return _forward(cfg, q, k, v, bias, q_len, kv_len, q_seg, kv_seg)[0]


def _flash_fwd(cfg, q, k, v, bias, q_len, kv_len, q_seg, kv_seg):
    out, lse = _forward(cfg, q, k, v, bias, q_len, kv_len, q_seg, kv_seg)
    # The kernel writes the log-sum-exp lane-replicated ([.., Tq, 128], a dense store); the
    # residual kept for the backward is one lane, [B, H, Tq, 1] f32, as small as splash's.
    # The backward kernels read it in (block_q, 1) blocks (a full last dim is a legal block).
    if lse is not None:
        lse = lse[..., :1]
    return out, (q, k, v, bias, q_len, kv_len, q_seg, kv_seg, out, lse)


def _flash_bwd(cfg, residuals, d_out):
    dq, dk, dv, dbias = _backward(cfg, residuals, d_out)
    # Lengths and segment ids are integer inputs: no cotangent.
    return dq, dk, dv, dbias, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
