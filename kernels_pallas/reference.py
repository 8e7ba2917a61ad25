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


def attention_reference(q, k, v, bias=None, *, causal: bool = False, scale: float | None = None,
                        q_lengths=None, kv_lengths=None, q_segment_ids=None,
                        kv_segment_ids=None, logits: str = "softmax",
                        sigmoid_bias: float | None = None):
    """Dense attention on [batch, seq, heads, head_dim] inputs; see the module docstring."""
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
        p = p / jnp.where(denom > 0, denom, 1.0)
    else:
        b = -math.log(tk) if sigmoid_bias is None else sigmoid_bias
        p = jax.nn.sigmoid(s + b)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(f32), precision=jax.lax.Precision.HIGHEST)
    return out.astype(q.dtype)
