"""Multi-head attention around `kernels_pallas.attention`, the zoo's one attention entry point."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import kernels_pallas
import kernels_pallas.api
from zoo import axes
from zoo.layers.checks import check_positive_int, check_rate
from zoo.layers.dense import (DEFAULT_KERNEL_INIT, Initializer, LayerNorm, Linear,
                              dropout)

ATTENTION_LOGITS = ("softmax", "sigmoid")
ATTENTION_IMPLS = kernels_pallas.api.IMPLS


def glorot_uniform_with_fans(fan_in: int, fan_out: int) -> Initializer:
    """Glorot (Xavier) uniform with the fans given, whatever the kernel's shape:
    U(-limit, limit), limit = sqrt(6 / (fan_in + fan_out))."""
    limit = math.sqrt(6.0 / (fan_in + fan_out))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def capturing(module: nnx.Module) -> bool:
    """Whether `zoo.capture_attention` switched inspection on for this attention module. When it
    has, the module also sows (nnx.Intermediate) what it attends to, computed on the pure-jnp
    reference beside the unchanged fused call; otherwise nothing extra is traced."""
    return getattr(module, "capture_attention", False)


class Attention(nnx.Module):
    """Multi-head self- or cross-attention around `kernels_pallas.attention`.

    Projections (timm names, so timm state dicts map by transposes/reshapes):
      * self-attention, fused:    `qkv`  kernel (dim, 3, heads*head_dim)  [timm `attn.qkv`]
      * cross-attention, fused:   `q` (dim, heads*head_dim) and `kv` (kv_dim, 2, heads*head_dim)
      * unfused (either kind):    `q`, `k`, `v`
      * output:                   `proj` (heads*head_dim, dim)
    The heads*head_dim axis is laid out head-major ([heads, head_dim] flattened), as in timm.
    Optional q/k norm (Dehghani et al. 2023; recommended for sigmoid attention) is a LayerNorm
    over head_dim shared by all heads, applied before the dot product.

    Args:
        dim: width of the query stream (and of the output).
        num_heads: number of heads.
        head_dim: per-head width; default dim // num_heads (dim must then divide evenly).
        cross_attention: keys/values come from a `context` argument instead of `x`.
        kv_dim: width of `context` (cross-attention only); default dim.
        fused_qkv: one projection for q,k,v (self) or k,v (cross) instead of separate ones.
        qkv_bias, out_bias: biases on the input / output projections.
        qk_norm: LayerNorm q and k per head; `norm_eps` is its epsilon.
        logits: "softmax" or "sigmoid" (Ramapuram et al. 2024: sigmoid(s + sigmoid_bias)).
        sigmoid_bias: the sigmoid offset; None = the kernel's default -log(num_keys).
        scale: logit scale; None = 1/sqrt(head_dim).
        attn_impl: passed to `kernels_pallas.attention(impl=...)` ("auto" picks per backend).
        proj_drop: dropout on the output projection. (Dropout on attention probabilities is not
            offered: fused kernels never materialise them.)
        glorot_per_head: initialise as Keras `MultiHeadAttention` does (pix2seq's FIT): its
            kernels are 3-D, [in, heads, head_dim] for q/k/v and [heads, head_dim, out] for the
            output, and Keras's Glorot uniform takes its fans over all three dimensions
            (fan_in + fan_out = in * (heads + head_dim) for q/k/v, heads * (head_dim + out) for
            the output) instead of `kernel_init` on the flattened 2-D matrix. Biases zero.

    Inspection (`zoo.capture_attention`): sows `attention_weights` [B, heads, q_len, kv_len].
    """

    capture_attention = False

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None,
                 cross_attention: bool = False, kv_dim: int | None = None,
                 fused_qkv: bool = True, qkv_bias: bool = True, out_bias: bool = True,
                 qk_norm: bool = False, norm_eps: float = 1e-6, logits: str = "softmax",
                 sigmoid_bias: float | None = None, scale: float | None = None,
                 attn_impl: str = "auto", proj_drop: float = 0.0,
                 kernel_init: Initializer = DEFAULT_KERNEL_INIT, glorot_per_head: bool = False,
                 dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        dim = check_positive_int(dim, "dim")
        num_heads = check_positive_int(num_heads, "num_heads")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) "
                                 "when head_dim is not given")
            head_dim = dim // num_heads
        head_dim = check_positive_int(head_dim, "head_dim")
        if logits not in ATTENTION_LOGITS:
            raise ValueError(f"logits must be one of {ATTENTION_LOGITS}, got {logits!r}")
        if kv_dim is not None and not cross_attention:
            raise ValueError(f"kv_dim={kv_dim!r} is only meaningful with cross_attention=True")
        if attn_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTENTION_IMPLS}, got "
                             f"{attn_impl!r}")
        if sigmoid_bias is not None and logits != "sigmoid":
            raise ValueError(f"sigmoid_bias={sigmoid_bias!r} is only used with "
                             f"logits='sigmoid', got logits={logits!r}")
        kv_dim = dim if kv_dim is None else check_positive_int(kv_dim, "kv_dim")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.cross_attention = bool(cross_attention)
        self.fused_qkv = bool(fused_qkv)
        self.logits = logits
        self.sigmoid_bias = None if sigmoid_bias is None else float(sigmoid_bias)
        self.scale = None if scale is None else float(scale)
        self.attn_impl = attn_impl
        self.proj_drop = check_rate(proj_drop, "proj_drop")
        inner = num_heads * head_dim

        def proj(in_features, out_features, axes, use_bias, output=False):
            init = kernel_init
            if glorot_per_head:  # the fans of Keras's 3-D MultiHeadAttention kernels
                # [in, heads, head_dim]: fans in * heads and in * head_dim; the output's
                # [heads, head_dim, out]: heads * head_dim and heads * out.
                init = (glorot_uniform_with_fans(num_heads * head_dim, num_heads * out_features)
                        if output else glorot_uniform_with_fans(in_features * num_heads,
                                                                in_features * head_dim))
            return Linear(in_features, out_features, axes=axes, use_bias=use_bias,
                          kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        if self.fused_qkv and not self.cross_attention:
            self.qkv = proj(dim, (3, inner), ("embed", None, "heads"), qkv_bias)
        elif self.fused_qkv:
            self.q = proj(dim, inner, ("embed", "heads"), qkv_bias)
            self.kv = proj(kv_dim, (2, inner), ("embed", None, "heads"), qkv_bias)
        else:
            self.q = proj(dim, inner, ("embed", "heads"), qkv_bias)
            self.k = proj(kv_dim, inner, ("embed", "heads"), qkv_bias)
            self.v = proj(kv_dim, inner, ("embed", "heads"), qkv_bias)
        if qk_norm:
            self.q_norm = LayerNorm(head_dim, eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = LayerNorm(head_dim, eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None
        self.proj = proj(inner, dim, ("heads", "embed"), out_bias, output=True)

    def _project(self, x, context):
        if self.fused_qkv and not self.cross_attention:
            qkv = self.qkv(x)
            return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        if self.fused_qkv:
            kv = self.kv(context)
            return self.q(x), kv[..., 0, :], kv[..., 1, :]
        return self.q(x), self.k(context), self.v(context)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, bias=None,
                 causal: bool = False, causal_chunk: int | None = None, q_lengths=None,
                 kv_lengths=None, q_segment_ids=None, kv_segment_ids=None, train: bool = False,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """x: [batch, q_len, dim]; context: [batch, kv_len, kv_dim] (cross-attention only).

        bias, causal, causal_chunk, lengths and segment ids are passed to
        `kernels_pallas.attention` unchanged
        (see kernels_pallas/reference.py for their semantics).
        """
        if x.ndim != 3:
            raise ValueError(f"Attention expects x of shape [batch, tokens, dim], got {x.shape}")
        if self.cross_attention and context is None:
            raise ValueError("a cross-attention layer needs `context` (the key/value tokens)")
        if not self.cross_attention and context is not None:
            raise ValueError("`context` was given to a self-attention layer; build it with "
                             "cross_attention=True to attend to other tokens")
        if context is None:
            context = x
        elif context.ndim != 3 or context.shape[0] != x.shape[0]:
            raise ValueError(f"context must be [batch, tokens, kv_dim] with the batch of x "
                             f"{x.shape}, got {context.shape}")
        q, k, v = self._project(x, context)
        split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, self.head_dim)  # noqa: E731
        q, k, v = (axes.constrain(split(t), axes.QKV) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if capturing(self):
            self.sow(nnx.Intermediate, "attention_weights", kernels_pallas.attention_weights(
                    q, k, bias, causal=causal, causal_chunk=causal_chunk, scale=self.scale,
                    q_lengths=q_lengths, kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                    kv_segment_ids=kv_segment_ids, logits=self.logits,
                    sigmoid_bias=self.sigmoid_bias))
        out = kernels_pallas.attention(
                q, k, v, bias, causal=causal, causal_chunk=causal_chunk, scale=self.scale,
                q_lengths=q_lengths,
                kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                kv_segment_ids=kv_segment_ids, logits=self.logits,
                sigmoid_bias=self.sigmoid_bias, impl=self.attn_impl)
        out = self.proj(out.reshape(*out.shape[:2], self.num_heads * self.head_dim))
        return axes.constrain(dropout(out, self.proj_drop, train=train, rngs=rngs), axes.TOKENS)
