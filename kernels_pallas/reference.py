"""Pure-jnp attention: the oracle for every kernel option, and the `impl="xla"` path.

Semantics (shared by every backend; kernels are tested against this function):
  s[b,h,i,j]  = scale * <q[b,i,h], k[b,j,h]> + bias[b,h,i,j]         (f32)
  valid[b,h,i,j] = i < q_lengths[b] and j < kv_lengths[b]
                   and q_segment_ids[b,i] == kv_segment_ids[b,j]
                   and (not causal or j <= i)                           (top-left aligned)
  softmax: out[b,i,h] = sum_j softmax_j(s | valid) v[b,j,h]; a row with no valid key -> 0
  sigmoid: out[b,i,h] = sum_j valid * sigmoid(s + sigmoid_bias) v[b,j,h]  (no normalisation;
           sigmoid_bias defaults to -log(Tk), Tk = k.shape[1], as in Ramapuram et al. 2024)
Math is f32 whatever the input dtype; the result is cast back to q.dtype.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


# Additive logit of a masked-out pair in a mask given as a bias: exp(-1e30 - max) and
# sigmoid(-1e30) are exactly 0 in float32, and unlike -inf it never makes inf - inf.
MASKED_LOGIT = -1e30


def chunk_causal_bias(length: int, chunk: int):
    """[length, length] f32 additive bias of block-causal attention: 0 where
    key // chunk <= query // chunk (full inside a chunk, causal across chunks), else
    MASKED_LOGIT. How `kernels_pallas.attention(causal_chunk=)` reaches a kernel."""
    index = jnp.arange(length) // chunk
    return jnp.where(index[None, :] <= index[:, None], 0.0, MASKED_LOGIT).astype(jnp.float32)


def attention_mask(batch: int, tq: int, tk: int, *, causal: bool = False, q_lengths=None,
                   kv_lengths=None, q_segment_ids=None, kv_segment_ids=None):
    """Boolean [B, 1, Tq, Tk] validity mask (broadcast over heads), or None if all valid."""
    mask = None

    def conj(a, b):
        return b if a is None else a & b

    i = jnp.arange(tq)[:, None]
    j = jnp.arange(tk)[None, :]
    if causal:
        mask = conj(mask, (j <= i)[None, None])
    if q_lengths is not None:
        mask = conj(mask, (i[None] < jnp.asarray(q_lengths)[:, None, None])[:, None])
    if kv_lengths is not None:
        mask = conj(mask, (j[None] < jnp.asarray(kv_lengths)[:, None, None])[:, None])
    if q_segment_ids is not None or kv_segment_ids is not None:
        if q_segment_ids is None or kv_segment_ids is None:
            raise ValueError("q_segment_ids and kv_segment_ids must be given together")
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = conj(mask, same[:, None])
    if mask is not None:
        mask = jnp.broadcast_to(mask, (batch, 1, tq, tk))
    return mask


def attention_weights(q, k, bias=None, *, causal: bool = False, scale: float | None = None,
                      q_lengths=None, kv_lengths=None, q_segment_ids=None, kv_segment_ids=None,
                      logits: str = "softmax", sigmoid_bias: float | None = None):
    """[B, H, Tq, Tk] float32 attention weights of [batch, seq, heads, head_dim] q and k: the
    softmax (or sigmoid) probabilities that `attention_reference` applies to the values, 0 where
    masked. What inspection reads (`zoo.capture_attention`); fused kernels never form them."""
    if logits not in ("softmax", "sigmoid"):
        raise ValueError(f"logits must be 'softmax' or 'sigmoid', got {logits!r}")
    batch, tq, _, d = q.shape
    tk = k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    f32 = jnp.float32
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(f32), k.astype(f32),
                   precision=jax.lax.Precision.HIGHEST) * scale
    if bias is not None:
        s = s + jnp.asarray(bias).astype(f32)
    mask = attention_mask(batch, tq, tk, causal=causal, q_lengths=q_lengths,
                          kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                          kv_segment_ids=kv_segment_ids)
    if logits == "softmax":
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        row_max = jnp.max(s, axis=-1, keepdims=True)
        # A fully masked row has max -inf; use 0 there so exp() gives 0, not NaN.
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        p = jnp.exp(s - jax.lax.stop_gradient(row_max))
        denom = jnp.sum(p, axis=-1, keepdims=True)
        return p / jnp.where(denom > 0, denom, 1.0)
    b = -math.log(tk) if sigmoid_bias is None else sigmoid_bias
    p = jax.nn.sigmoid(s + b)
    return p if mask is None else jnp.where(mask, p, 0.0)


def attention_reference(q, k, v, bias=None, *, causal: bool = False, scale: float | None = None,
                        q_lengths=None, kv_lengths=None, q_segment_ids=None,
                        kv_segment_ids=None, logits: str = "softmax",
                        sigmoid_bias: float | None = None):
    """Dense attention on [batch, seq, heads, head_dim] inputs; see the module docstring."""
    p = attention_weights(q, k, bias, causal=causal, scale=scale, q_lengths=q_lengths,
                          kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                          kv_segment_ids=kv_segment_ids, logits=logits,
                          sigmoid_bias=sigmoid_bias)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# Key-block primitives: the contract every backend's `*_forward` / `*_backward` pair follows, and
# what context parallelism (kernels_pallas/context_parallel.py) composes. A long attention is
# split along its keys into blocks; each block's forward returns its normalised output and the
# rows' log-sum-exp, which merge exactly (`merge_blocks`); each block's backward, given the
# *merged* output and log-sum-exp, returns that block's share of the gradients, which add up.


def _block_scores(q, k, bias, *, causal, scale, q_lengths, kv_lengths, q_segment_ids,
                  kv_segment_ids):
    batch, tq = q.shape[:2]
    f32 = jnp.float32
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(f32), k.astype(f32),
                   precision=jax.lax.Precision.HIGHEST) * scale
    if bias is not None:
        s = s + bias.astype(f32)
    mask = attention_mask(batch, tq, k.shape[1], causal=causal, q_lengths=q_lengths,
                          kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                          kv_segment_ids=kv_segment_ids)
    if mask is None:
        mask = jnp.ones((1, 1, 1, 1), bool)
    return s, mask


def reference_forward(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, *,
                      causal, scale, logits, sigmoid_bias, **_):
    """(out [B,Tq,H,Dv] in q.dtype, lse [B,H,Tq] f32 natural log, -inf for a row without a
    valid key; None for sigmoid logits) of one key block. Arguments as normalised by
    `kernels_pallas.api`; `sigmoid_bias` is that of the whole attention, not of the block."""
    s, mask = _block_scores(q, k, bias, causal=causal, scale=scale, q_lengths=q_lengths,
                            kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                            kv_segment_ids=kv_segment_ids)
    f32 = jnp.float32
    if logits == "softmax":
        s = jnp.where(mask, s, -jnp.inf)
        row_max = jnp.max(s, axis=-1)
        safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        p = jnp.exp(s - safe_max[..., None])
        denom = jnp.sum(p, axis=-1)
        has_keys = denom > 0
        p = p / jnp.where(has_keys, denom, 1.0)[..., None]
        lse = jnp.where(has_keys, safe_max + jnp.log(jnp.where(has_keys, denom, 1.0)),
                        -jnp.inf)
    else:
        p = jnp.where(mask, jax.nn.sigmoid(s + sigmoid_bias), 0.0)
        lse = None
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(f32), precision=jax.lax.Precision.HIGHEST)
    return out.astype(q.dtype), lse


def reference_backward(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids,
                       out, lse, d_out, *, causal, scale, logits, sigmoid_bias, **_):
    """(dq, dk, dv, dbias) of one key block, given the merged `out` and `lse` of the whole
    attention (for softmax; unused for sigmoid) and the output cotangent `d_out`. dbias has
    the bias's (broadcast) shape, None without a bias."""
    s, mask = _block_scores(q, k, bias, causal=causal, scale=scale, q_lengths=q_lengths,
                            kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                            kv_segment_ids=kv_segment_ids)
    f32 = jnp.float32
    hi = jax.lax.Precision.HIGHEST
    do = d_out.astype(f32)
    dp = jnp.einsum("bqhd,bkhd->bhqk", do, v.astype(f32), precision=hi)
    if logits == "softmax":
        # A row without any valid key (lse = -inf) has p = 0 everywhere.
        p = jnp.where(mask & jnp.isfinite(lse)[..., None],
                      jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
        delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(f32), do, precision=hi)
        ds = p * (dp - delta[..., None])
    else:
        p = jnp.where(mask, jax.nn.sigmoid(s + sigmoid_bias), 0.0)
        ds = dp * p * (1.0 - p)
    dv = jnp.einsum("bhqk,bqhd->bkhd", p, do, precision=hi)
    dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k.astype(f32), precision=hi) * scale
    dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q.astype(f32), precision=hi) * scale
    dbias = None
    if bias is not None:
        axes = tuple(a for a in range(4) if bias.shape[a] == 1 and ds.shape[a] > 1)
        dbias = jnp.sum(ds, axis=axes, keepdims=True).astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


def merge_blocks(out_a, lse_a, out_b, lse_b):
    """Merges two key blocks' (out, lse) of the same queries (softmax); f32 results.

    out: [B, Tq, H, Dv], lse: [B, H, Tq] natural log, -inf for rows without a valid key."""
    lse = jnp.logaddexp(lse_a, lse_b)
    finite = jnp.isfinite(lse)
    safe = jnp.where(finite, lse, 0.0)

    def weight(part):  # [B, H, Tq] -> [B, Tq, H, 1]; 0 where the block had no valid key
        w = jnp.where(jnp.isfinite(part), jnp.exp(part - safe), 0.0)
        return jnp.transpose(w, (0, 2, 1))[..., None]

    out = out_a.astype(jnp.float32) * weight(lse_a) + out_b.astype(jnp.float32) * weight(lse_b)
    return out, lse
