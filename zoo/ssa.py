r"""Selective attention (SSA) in a GPT-2 language model (Zhang et al., NeurIPS 2024).

"Selective Attention: Enhancing Transformer through Principled Context Control",
arXiv:2411.12892; official code umich-sota/selective_attention (`lit_gpt/gpt_2_PTS.py`).

The trunk is GPT-2 (Radford et al. 2019) exactly as Hugging Face `GPT2LMHeadModel` computes it,
so that GPT-2 checkpoints import (`zoo.convert.from_gpt2`) and reproduce GPT-2's logits with SSA
off: learned absolute positions (not rotary: GPT-2 has none, and the paper fine-tunes GPT-2),
pre-LN blocks with LayerNorm eps 1e-5, fused qkv projection with bias, GELU tanh approximation
(GPT-2's "gelu_new"), 4x MLP, final LayerNorm, output head tied to the token embedding.

Selective attention, per layer and head h, for the query at absolute position i (0-based, so
n_i = i + 1 keys are visible to it) and token features x_i:

    tau_q(i, x_i) = 1 + exp(-exp(beta)) * log(n_i)     [ssa_query_position]
                      + tanh(u_q,h(x_i))               [ssa_query_token]
    tau_v(x_j)    = 1 + tanh(u_v,h(x_j))               [ssa_value]
    out_i = sum_j softmax_j( tau_q(i, x_i) * <q_i, k_j> / sqrt(d) ) * tau_v(x_j) * v_j

Each temperature multiplies q (or v) before `kernels_pallas.attention`, which is exactly
equivalent to multiplying row i of the logits (resp. value j) and keeps the kernel fused: no
logits are materialised. Autodiff gives d(beta) and the token-temperature gradients.

  * Position term: the official code's form and init, verbatim: logits * (1 + exp(-e^beta) *
    log n) with one learnable scalar beta per attention layer shared by its heads, initialised
    to 1.5 (`gpt_2_PTS.py`; exp(-e^1.5) = 0.0113; the code's Llama/Pythia fine-tuning file
    uses 2.0 — pass `ssa_beta_init=2.0` for that). The released code contains nothing else.
  * Token terms u_q, u_v (one scalar per head and token): NOT in the released code. The paper's
    abstract and summaries say the temperature also depends on the query embedding, that values
    get their own temperature, and that a weight-sharing strategy keeps the overhead under
    0.5%; we could not read the paper's Section 3 equations here, so the form below is ours
    and is [unverified] against the paper text:
      - weight sharing (`ssa_weight_sharing=True`, default): u_h(x) = <w_h, p_h(x)> + b_h where
        p_h(x) is head h's own query (resp. value) projection, i.e. the temperature re-uses the
        attention's projection weights and adds only heads * (head_dim + 1) = width + heads
        parameters per temperature per layer;
      - unshared: u(x) = x W + b with its own W: [width, heads] (width * heads + heads params).
    Both are zero-initialised, so tanh(u) = 0 and the token terms start as the identity; the
    model at init is then vanilla attention up to the position term (exactly vanilla with the
    position term off). tanh bounds each token term to (-1, 1), so tau_v is in (0, 2) and the
    token part can never flip the sign of a logit row by itself.
  * Which vector feeds u: the query/value *before* any temperature (so the temperatures do not
    feed back into each other), computed per head.
  * Paper text vs code: the `_no_func` file uses 1 + beta * log n directly; the NeurIPS
    abstract says "about 5% more parameters" where arXiv v1 says "< 0.5%" — our measured
    overheads are in the registry notes (`model_card`) and tests/models/test_ssa.py.

Init follows nanoGPT (the GPT-2 recipe): Linear and embedding weights N(0, 0.02), biases 0,
residual output projections (attention and MLP `fc2`) N(0, 0.02 / sqrt(2 * depth)).

Generation: `init_cache` + `decode` keep per-layer keys and *tempered* values, so a cached
step computes the same temperatures (absolute positions, per-token value temperatures) as the
full forward; `zoo.generate.generate` drives them.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import kernels_pallas
from zoo import axes, layers
from zoo.axes import with_axes
from zoo.registry import model_arguments, register_variant

# Official gpt_2_PTS.py initialisation of beta (per-layer learnable scalar).
BETA_INIT = 1.5
# GPT-2 (and nanoGPT) initialisation.
_INIT_STD = 0.02
_MASKED = -1e30


def position_temperature(beta: jax.Array, positions: jax.Array) -> jax.Array:
    """exp(-exp(beta)) * log(positions + 1): the official position-aware query term.

    positions: int array of absolute 0-based query positions; returns float32 of its shape.
    """
    squash = jnp.exp(-jnp.exp(beta.astype(jnp.float32)))
    return squash * jnp.log(positions.astype(jnp.float32) + 1.0)


class TokenTemperature(nnx.Module):
    """u_h(x) -> tanh(u_h), one scalar per token and head (see the module docstring).

    Shared: u_h = <w_h, p_h> + b_h on the head's own projection p (query or value), so the
    attention's projection weights are re-used. Unshared: u = x W + b on the block input x.
    Zero-initialised either way (the temperature starts at exactly 1).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, shared: bool,
                 param_dtype: Any, rngs: nnx.Rngs):
        self.shared = bool(shared)
        zeros = nnx.initializers.zeros
        if self.shared:
            self.weight = nnx.Param(with_axes(zeros, ("heads", "kv"))(
                    rngs.params(), (num_heads, head_dim), param_dtype))
            self.bias = nnx.Param(with_axes(zeros, ("heads",))(
                    rngs.params(), (num_heads,), param_dtype))
            self.proj = None
        else:
            self.proj = layers.Linear(dim, num_heads, axes=("embed", "heads"), kernel_init=zeros,
                                      param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, per_head: jax.Array) -> jax.Array:
        """x: [B, T, width]; per_head: [B, T, heads, head_dim] -> tanh(u): [B, T, heads] f32."""
        if self.shared:
            u = jnp.einsum("bthd,hd->bth", per_head.astype(jnp.float32),
                           self.weight[...].astype(jnp.float32))
            u = u + self.bias[...].astype(jnp.float32)
        else:
            u = self.proj(x.astype(jnp.float32))
        return jnp.tanh(u)


class SelectiveAttention(nnx.Module):
    """Causal multi-head self-attention with SSA query/value temperatures (GPT-2 layout).

    Inspection (`zoo.capture_attention`, full-sequence calls): sows `query_temperatures` and
    `value_temperatures` [B, T, heads] (float32, the factors q and v are multiplied by; absent
    when the variant has none) and `attention_weights` [B, heads, T, T] of the tempered queries.
    """

    capture_attention = False

    def __init__(self, dim: int, num_heads: int, *, depth: int, query_position: bool,
                 query_token: bool, value: bool, weight_sharing: bool, beta_init: float,
                 attn_impl: str, dropout_rate: float, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_impl = attn_impl
        self.dropout_rate = dropout_rate
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        normal = nnx.initializers.normal(_INIT_STD)
        residual = nnx.initializers.normal(_INIT_STD / math.sqrt(2 * depth))
        self.qkv = layers.Linear(dim, (3, dim), axes=("embed", None, "heads"),
                                 kernel_init=normal, **common)
        self.proj = layers.Linear(dim, dim, axes=("heads", "embed"), kernel_init=residual,
                                  **common)
        if query_position:
            # A scalar shared by the heads: no logical axis to shard.
            self.beta = nnx.Param(jnp.full((), beta_init, param_dtype))
        else:
            self.beta = None
        temperature = dict(shared=weight_sharing, param_dtype=param_dtype, rngs=rngs)
        self.query_temperature = (TokenTemperature(dim, num_heads, self.head_dim, **temperature)
                                  if query_token else None)
        self.value_temperature = (TokenTemperature(dim, num_heads, self.head_dim, **temperature)
                                  if value else None)

    def query_value_scales(self, x, q, v, positions):
        """(tau_q [B,T,H] or None, tau_v [B,T,H] or None), float32; positions: [T] absolute."""
        tau_q = None
        if self.beta is not None:
            tau_q = jnp.broadcast_to(1.0 + position_temperature(self.beta[...], positions)
                                     [None, :, None], q.shape[:3])
        if self.query_temperature is not None:
            tau_q = (1.0 if tau_q is None else tau_q) + self.query_temperature(x, q)
        tau_v = None
        if self.value_temperature is not None:
            tau_v = 1.0 + self.value_temperature(x, v)
        return tau_q, tau_v

    def _project(self, x, positions):
        qkv = self.qkv(x)
        split = lambda t: t.reshape(*t.shape[:2], self.num_heads, self.head_dim)  # noqa: E731
        q, k, v = (axes.constrain(split(qkv[..., i, :]), axes.QKV) for i in range(3))
        tau_q, tau_v = self.query_value_scales(x, q, v, positions)
        if layers.capturing(self):
            for name, tau in (("query_temperatures", tau_q), ("value_temperatures", tau_v)):
                if tau is not None:
                    self.sow(nnx.Intermediate, name, tau)
        if tau_q is not None:
            q = (q.astype(jnp.float32) * tau_q[..., None]).astype(q.dtype)
        if tau_v is not None:
            v = (v.astype(jnp.float32) * tau_v[..., None]).astype(v.dtype)
        return q, k, v

    def _output(self, out, train, rngs):
        out = self.proj(out.reshape(*out.shape[:2], self.num_heads * self.head_dim))
        return axes.constrain(layers.dropout(out, self.dropout_rate, train=train, rngs=rngs),
                              axes.TOKENS)

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        q, k, v = self._project(x, jnp.arange(x.shape[1]))
        if layers.capturing(self):
            self.sow(nnx.Intermediate, "attention_weights",
                     kernels_pallas.attention_weights(q, k, causal=True))
        out = kernels_pallas.attention(q, k, v, causal=True, impl=self.attn_impl)
        return self._output(out, train, rngs)

    def decode(self, x, keys, values, position):
        """Cached step: x [B, t, width] at absolute positions position..position+t-1.

        keys/values: [B, max_len, H, D] (values already tempered). Returns (out, keys, values).
        """
        t, max_len = x.shape[1], keys.shape[1]
        q, k, v = self._project(x, position + jnp.arange(t))
        keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, position, 0, 0))
        values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype),
                                              (0, position, 0, 0))
        # Key j is visible to query i (absolute position + i) iff j <= position + i; unwritten
        # cache rows all lie beyond that. The kernel's `causal` is top-left aligned, so the
        # offset mask travels as an additive bias.
        visible = jnp.arange(max_len)[None, :] <= position + jnp.arange(t)[:, None]
        bias = jnp.where(visible, 0.0, _MASKED).astype(jnp.float32)[None, None]
        out = kernels_pallas.attention(q, keys.astype(q.dtype), values.astype(q.dtype), bias,
                                       impl=self.attn_impl)
        return self._output(out, False, None), keys, values


class Block(nnx.Module):
    """GPT-2 block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, *, depth: int, mlp_ratio: float,
                 norm_eps: float, dropout_rate: float, ssa: dict[str, Any], attn_impl: str,
                 dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layers.LayerNorm(dim, eps=norm_eps, **common)
        self.attn = SelectiveAttention(dim, num_heads, depth=depth, attn_impl=attn_impl,
                                       dropout_rate=dropout_rate, rngs=rngs, **ssa, **common)
        self.norm2 = layers.LayerNorm(dim, eps=norm_eps, **common)
        self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), approximate_gelu=True,
                              drop=dropout_rate, kernel_init=nnx.initializers.normal(_INIT_STD),
                              rngs=rngs, **common)
        # nanoGPT: residual projections scaled by 1/sqrt(2 * depth).
        self.mlp.fc2.kernel.set_value(self.mlp.fc2.kernel[...] / math.sqrt(2 * depth))

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        x = x + self.attn(self.norm1(x), train=train, rngs=rngs)
        return axes.constrain(x + self.mlp(self.norm2(x), train=train, rngs=rngs), axes.TOKENS)

    def decode(self, x, keys, values, position):
        out, keys, values = self.attn.decode(self.norm1(x), keys, values, position)
        x = x + out
        return x + self.mlp(self.norm2(x)), keys, values


class SelectiveGPT(nnx.Module):
    """GPT-2 language model with selective attention.

    Args:
        vocab_size: token vocabulary (50257 for GPT-2's BPE, 256 for bytes).
        max_seq_len: rows of the learned position table (the longest context).
        width, depth, num_heads, mlp_ratio: transformer size (GPT-2: head width 64).
        norm_eps: LayerNorm epsilon (GPT-2: 1e-5).
        dropout_rate: dropout after the embeddings and on both residual branches (GPT-2
            pre-training used 0.1; nanoGPT and the default here use 0).
        ssa_query_position, ssa_query_token, ssa_value: the three SSA temperatures (module
            docstring); all False gives plain GPT-2.
        ssa_weight_sharing: token temperatures re-use the q/v projections (True) or have
            their own projection from the block input (False).
        ssa_beta_init: initial beta of the position term (official GPT-2 code: 1.5).
        attn_impl: `kernels_pallas.attention` implementation.
        dtype, param_dtype: compute and parameter dtypes.

    Call: `model(tokens [B, T] int32) -> logits [B, T, vocab_size]` (float32).
    """

    def __init__(self, *, vocab_size: int = 50257, max_seq_len: int = 1024, width: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 norm_eps: float = 1e-5, dropout_rate: float = 0.0,
                 ssa_query_position: bool = True, ssa_query_token: bool = True,
                 ssa_value: bool = True, ssa_weight_sharing: bool = True,
                 ssa_beta_init: float = BETA_INIT, attn_impl: str = "auto",
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.vocab_size = layers.check_positive_int(vocab_size, "vocab_size")
        self.max_seq_len = layers.check_positive_int(max_seq_len, "max_seq_len")
        width = layers.check_positive_int(width, "width")
        depth = layers.check_positive_int(depth, "depth")
        num_heads = layers.check_positive_int(num_heads, "num_heads")
        if width % num_heads:
            raise ValueError(f"width ({width}) must be divisible by num_heads ({num_heads})")
        if not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        switches = dict(ssa_query_position=ssa_query_position, ssa_query_token=ssa_query_token,
                        ssa_value=ssa_value, ssa_weight_sharing=ssa_weight_sharing)
        for name, value in switches.items():
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if not isinstance(ssa_beta_init, (int, float)) or not math.isfinite(ssa_beta_init):
            raise ValueError(f"ssa_beta_init must be a finite number, got {ssa_beta_init!r}")
        if attn_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(f"attn_impl must be one of {layers.ATTENTION_IMPLS}, got "
                             f"{attn_impl!r}")
        self.dtype = layers.canonical_dtype(dtype)
        param_dtype = layers.canonical_dtype(param_dtype, "param_dtype")
        self.width, self.depth, self.num_heads = width, depth, num_heads
        self.dropout_rate = layers.check_rate(dropout_rate, "dropout_rate")
        common = dict(dtype=self.dtype, param_dtype=param_dtype)
        normal = nnx.initializers.normal(_INIT_STD)
        self.embedding = nnx.Param(with_axes(normal, ("vocab", "embed"))(
                rngs.params(), (self.vocab_size, width), param_dtype))
        self.pos_embedding = nnx.Param(with_axes(normal, ("pos", "embed"))(
                rngs.params(), (self.max_seq_len, width), param_dtype))
        ssa = dict(query_position=ssa_query_position, query_token=ssa_query_token,
                   value=ssa_value, weight_sharing=ssa_weight_sharing,
                   beta_init=float(ssa_beta_init))
        self.blocks = nnx.List([
                Block(width, num_heads, depth=depth, mlp_ratio=mlp_ratio, norm_eps=norm_eps,
                      dropout_rate=self.dropout_rate, ssa=ssa, attn_impl=attn_impl, rngs=rngs,
                      **common)
                for _ in range(depth)])
        self.final_norm = layers.LayerNorm(width, eps=norm_eps, **common)

    def _check_tokens(self, tokens, start: int = 0):
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length] int ids, got shape "
                             f"{tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if isinstance(start, int) and start + tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"{start + tokens.shape[1]} positions exceed max_seq_len="
                             f"{self.max_seq_len} (the learned position table)")

    def _embed(self, tokens, positions):
        x = jnp.take(layers.gathered(self.embedding[...]), tokens, axis=0)
        x = x + jnp.take(layers.gathered(self.pos_embedding[...]), positions, axis=0)
        return axes.constrain(x.astype(self.dtype), axes.TOKENS)

    def _logits(self, x):
        x = self.final_norm(x)
        logits = jnp.einsum("btd,vd->btv", x, self.embedding[...].astype(self.dtype),
                            preferred_element_type=jnp.float32)
        return axes.constrain(logits, axes.TOKEN_LOGITS)

    def __call__(self, tokens: jax.Array, *, train: bool = False,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        self._check_tokens(tokens)
        x = self._embed(tokens, jnp.arange(tokens.shape[1]))
        x = layers.dropout(x, self.dropout_rate, train=train, rngs=rngs)
        for block in self.blocks:
            x = block(x, train=train, rngs=rngs)
        return self._logits(x)

    def init_cache(self, batch_size: int, max_length: int | None = None,
                   dtype: Any = None) -> dict[str, tuple[jax.Array, ...]]:
        """Zeroed per-layer key/value caches [batch, max_length, heads, head_dim]."""
        batch_size = layers.check_positive_int(batch_size, "batch_size")
        max_length = self.max_seq_len if max_length is None else max_length
        max_length = layers.check_positive_int(max_length, "max_length")
        if max_length > self.max_seq_len:
            raise ValueError(f"max_length={max_length} exceeds max_seq_len="
                             f"{self.max_seq_len} (the learned position table)")
        dtype = self.dtype if dtype is None else layers.canonical_dtype(dtype)
        shape = (batch_size, max_length, self.num_heads, self.width // self.num_heads)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in self.blocks)
        return {"keys": zeros, "values": tuple(jnp.zeros(shape, dtype) for _ in self.blocks)}

    def decode(self, tokens: jax.Array, cache: dict[str, tuple[jax.Array, ...]],
               position) -> tuple[jax.Array, dict[str, tuple[jax.Array, ...]]]:
        """Logits of `tokens` [B, t] at positions position..position+t-1, using and updating
        `cache` (from `init_cache`): a prefill when t > 1, a generation step when t == 1.

        `position` may be traced (an int32 scalar); it and t must keep within the cache.
        """
        self._check_tokens(tokens, position if isinstance(position, int) else 0)
        position = jnp.asarray(position, jnp.int32)
        x = self._embed(tokens, position + jnp.arange(tokens.shape[1]))
        keys, values = [], []
        for block, k, v in zip(self.blocks, cache["keys"], cache["values"]):
            x, k, v = block.decode(x, k, v, position)
            keys.append(k)
            values.append(v)
        return self._logits(x), {"keys": tuple(keys), "values": tuple(values)}


# ---------------------------------------------------------------------------------------------
# Registered variants: GPT-2 sizes (Radford et al. 2019, Table 2, as released on HF).
# ---------------------------------------------------------------------------------------------

_VARIANTS = {
        "small": dict(width=768, depth=12, num_heads=12),
        "medium": dict(width=1024, depth=24, num_heads=16),
}
MODEL_ARGS = model_arguments(SelectiveGPT)
SSA_OFF = dict(ssa_query_position=False, ssa_query_token=False, ssa_value=False)


def ssa_overhead(width: int, depth: int, num_heads: int, *, query_position=True,
                 query_token=True, value=True, weight_sharing=True) -> int:
    """Parameters SSA adds to a GPT-2 of this size (closed form; tested against the module)."""
    per_temperature = (width + num_heads) if weight_sharing else (width * num_heads + num_heads)
    per_layer = int(query_position) + per_temperature * (int(query_token) + int(value))
    return depth * per_layer


def _overhead_note(variant: str) -> str:
    size = _VARIANTS[variant]
    base = {"small": 124_439_808, "medium": 354_823_168}[variant]
    shared = ssa_overhead(**size)
    unshared = ssa_overhead(**size, weight_sharing=False)
    position = ssa_overhead(**size, query_token=False, value=False)
    return (f"SSA overhead over GPT-2 ({base:,} params): full SSA with weight sharing "
            f"+{shared:,} ({100 * shared / base:.4f}%), unshared +{unshared:,} "
            f"({100 * unshared / base:.3f}%), position term only +{position} (one beta per "
            f"layer).")


_PAPER = ("Zhang, Chang, Li, Roy-Chowdhury, Chen, Oymak 2024, Selective Attention: Enhancing "
          "Transformer through Principled Context Control (NeurIPS), arXiv:2411.12892")
_REFERENCE = ("umich-sota/selective_attention lit_gpt/gpt_2_PTS.py (position temperature); "
              "Hugging Face transformers GPT2LMHeadModel / nanoGPT (trunk, names, init)")
_INPUT = {"tokens": ((1024,), "int32")}
_TINY = dict(vocab_size=64, max_seq_len=32, width=32, depth=2, num_heads=2)
_TINY_INPUT = {"tokens": ((16,), "int32")}
# Registered counts are GPT-2's (tied embeddings): 124,439,808 and 354,823,168. SSA adds at
# most 0.23% (unshared, medium) on top, so a 0.3% tolerance admits every SSA variant while a
# wrong trunk (e.g. an untied head: +31%) fails.
_TOLERANCE = 0.003


# Hugging Face GPT2LMHeadModel weights of any size (sizes are read from the arrays).
_FROM_HF = "zoo.converters.gpt2:gpt2_from_hf"

ssa_gpt2_small = register_variant(
        "ssa_gpt2_small", SelectiveGPT, _VARIANTS["small"],
        weights={"hf:gpt2": _FROM_HF},
        paper=_PAPER, reference=_REFERENCE, default_input=_INPUT,
        config="configs/ssa.py:gpt2_small", tiny=_TINY, tiny_input=_TINY_INPUT,
        paper_params=124.44, paper_params_tolerance=_TOLERANCE,
        notes="GPT-2 small (width 768, depth 12, 12 heads, vocab 50257, 1024 positions) "
              "+ SSA. " + _overhead_note("small"))


ssa_gpt2_medium = register_variant(
        "ssa_gpt2_medium", SelectiveGPT, _VARIANTS["medium"],
        weights={"hf:gpt2-medium": _FROM_HF},
        paper=_PAPER, reference=_REFERENCE, default_input=_INPUT,
        config="configs/ssa.py:gpt2_medium", tiny=_TINY, tiny_input=_TINY_INPUT,
        paper_params=354.82, paper_params_tolerance=_TOLERANCE,
        notes="GPT-2 medium (width 1024, depth 24, 16 heads, vocab 50257, 1024 "
              "positions) + SSA. " + _overhead_note("medium"))
