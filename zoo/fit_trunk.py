r"""The FIT trunk (Chen & Li 2023, arXiv:2305.12689), shared by the three heads in zoo/fit.py.

Reference: google-research/pix2seq `architectures/transformers.py` (`get_layer_config`, `FIT`).

Trunk. Data tokens x [B, T, n, c] in T groups of n; latents [B, T, m, d_l], initialised from a
learned table of T*m distinct slots (trunc-normal 0.02). The layer spec `'(a)b(c)d...'` is a
list of pairs (local layers, global layers), parsed exactly as the reference
(`parse_layer_spec`: '(2)4(2)' -> [(2, 4), (2, 0)]). For each pair:
  local   a layers of pre-LN self-attention + MLP inside each group;
  read    latents of group t cross-attend to group t's tokens (only if the pair has globals);
  global  b layers over all T*m latents;
  write   tokens of group t cross-attend to group t's latents (not after the last pair).
Outputs: LN(x) and LN(latents), eps 1e-6 (FIT, FIT-AR); the denoiser's trunk has no output
norms (`output_norms=False`), as pix2seq's FITDenoiser.

Reference conventions kept: exact (erf) GELU; LayerNorm eps 1e-6 with scale and shift; every
projection has a bias; Keras Glorot-uniform kernels and zero biases, where Keras's
MultiHeadAttention kernels are 3-D ([in, heads, head_dim] / [heads, head_dim, out]) and their
Glorot fans count all three dimensions (`layers.Attention(glorot_per_head=True)`): for the
registered sizes that is a 4-7x smaller std than Glorot on the flattened matrix; MLP dropout
after the GELU only (the reference's FeedForwardLayer); learned embeddings trunc-normal 0.02; read/write layers are `q + MHA(LN(q), LN_kv(kv))` with no MLP,
min(latent_heads, x_heads) heads of key width min(d_l, c) // heads, value width = key width,
output projected back to the query width. x position embedding [n, c] is shared by all groups
(zoo/fit.py: learned, or pix2seq's fixed sin-cos codes).

pix2seq's options, all off by default as there:
  * `latent_mask="causal"` (its `mask='causal'`, FIT and FITDenoiser): the global layers are
    chunk-causal over the latents, as FIT-AR's, without FIT-AR's causal tokens or shifted
    writes;
  * `x_self_attention=False` (FITDenoiser): local layers are MLP blocks only;
  * `xattn_with_mlp=True` (FITDenoiser): read and write layers add a pre-LN MLP block
    (width mlp_ratio x the query width, no dropout);
  * `xattn_enc_ln=False` (FITDenoiser): read, write and condition layers attend to their
    keys/values without LN_kv.

Attention, all through `kernels_pallas.attention`:
  * local layers fold the groups into the batch ([B*T, n, c]): each group is a small dense
    problem the kernel tiles on its own, where segment ids over [B, T*n] would make the kernel
    visit (and mask) T^2 tile pairs per row of groups;
  * read/write fold groups likewise (latents [B*T, m, d_l] vs tokens [B*T, n, c]);
  * FIT-AR: tokens are causal within their group (`causal=True`); latents are chunk-causal
    (full attention among a group's m latents, causal across groups: `causal_chunk=m`, which
    reaches the kernel as an additive block bias [T*m, T*m] of 0 / -1e30, since neither plain
    causality nor segment ids express it); and before each write the latents are shifted by
    one group (group t reads the latents of group t-1, group 0 reads zeros), so token i never
    sees information from tokens >= i.

Context parallelism (a `sequence` mesh axis splitting `activation_length`): the groups are the
unit that is split. Local, read and write layers run under `sharding.groups_in_batch()`, so
their folded batch [B*T] is split over the data and sequence axes and each group's attention
runs on one device; the global latent layers attend across devices through the
context-parallel attention (ring: a block-causal ring whose chunks hold whole groups). The
groups per device must divide: T by the sequence axis size (twice that for the causal ring).
Not yet free: XLA re-lays the latents out between the folded [B*T, m] and the sequence-split
[B, T*m] forms with all-to-alls, and gathers some latent-sized arrays (measured on FIT-AR at
(data 2, sequence 4): 21 all-to-alls and 10 all-gathers per step); the losses and gradients
equal one device's (tests/training/test_context_parallel_training.py).

Gradient checkpointing: `remat=True` wraps every local, global, read and write layer in
`nnx.remat`, so only layer inputs are kept for the backward pass.

Deliberate difference: no dropout on attention probabilities (pix2seq's `drop_att`, 0 in its
configs): the fused kernels never form the probabilities.
"""
from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
from flax import nnx

from kernels_pallas import sharding
from zoo import axes, layers

NORM_EPS = 1e-6
LATENT_MASKS = ("none", "causal")


def parse_layer_spec(spec: str) -> list[tuple[int, int]]:
    """'(local)global...' -> [(local, global), ...], as pix2seq's `get_layer_config`.

    A trailing ')' gets an implicit 0 global layers; every pair but the last needs global > 0.
    """
    if not isinstance(spec, str):
        raise ValueError(f"layers must be a spec string like '(2)4(2)', got {spec!r}")
    text = spec + "0" if spec.endswith(")") else spec
    if not re.fullmatch(r"(\(\d+\)\d+)+", text):
        raise ValueError(f"layer_spec={spec!r} is not a FIT layer spec: expected '(local)global' "
                         f"pairs such as '(2)4(2)' or '(1)2(1)2'")
    pairs = [tuple(map(int, re.findall(r"\d+", block)))
             for block in re.findall(r"\(\d+\)\d+", text)]
    for i, (_, global_layers) in enumerate(pairs[:-1]):
        if global_layers == 0:
            raise ValueError(f"layer_spec={spec!r}: pair {i} has no global layers; only the last "
                             f"pair may end without them")
    return [(int(a), int(b)) for a, b in pairs]


class FITLayer(nnx.Module):
    """Pre-LN self-attention + MLP (the reference's TransformerEncoderLayer); with
    `self_attention=False` the MLP block alone (pix2seq's `x_self_attention=False`)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, drop_path: float,
                 dropout: float, attn_impl: str, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
                 self_attention: bool = True):
        common = dict(dtype=dtype, param_dtype=param_dtype)
        if self_attention:
            self.norm1 = layers.LayerNorm(dim, eps=NORM_EPS, **common)
            self.attn = layers.Attention(dim, num_heads, attn_impl=attn_impl,
                                         glorot_per_head=True, rngs=rngs, **common)
        else:
            self.norm1 = self.attn = None
        self.norm2 = layers.LayerNorm(dim, eps=NORM_EPS, **common)
        # pix2seq's FeedForwardLayer: dense1 -> GELU -> dropout -> dense2, nothing after.
        self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), drop=dropout, output_dropout=False,
                              kernel_init=layers.XAVIER_INIT, rngs=rngs, **common)
        self.drop_path = layers.DropPath(drop_path)

    def __call__(self, x, bias=None, *, causal: bool = False, causal_chunk: int | None = None,
                 train: bool = False, rngs: nnx.Rngs | None = None):
        if self.attn is not None:
            y = self.attn(self.norm1(x), bias=bias, causal=causal, causal_chunk=causal_chunk,
                          train=train, rngs=rngs)
            x = x + self.drop_path(y, train=train, rngs=rngs)
        y = self.mlp(self.norm2(x), train=train, rngs=rngs)
        return axes.constrain(x + self.drop_path(y, train=train, rngs=rngs), axes.TOKENS)


class CrossAttention(nnx.Module):
    """q + MHA(LN(q), LN_kv(kv)): the read/write (and l2c) layers.

    `kv_norm=False` drops LN_kv (pix2seq's `xattn_enc_ln=False`); `mlp_ratio` adds the pre-LN
    MLP block q + MLP(LN(q)) after the attention (its `xattn_with_mlp`, no dropout, as there).
    """

    def __init__(self, q_dim: int, kv_dim: int, num_heads: int, key_width: int, *,
                 attn_impl: str, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
                 kv_norm: bool = True, mlp_ratio: float | None = None):
        if key_width % num_heads:
            raise ValueError(f"cross-attention key width {key_width} is not divisible by its "
                             f"{num_heads} heads")
        common = dict(dtype=dtype, param_dtype=param_dtype)
        self.q_norm = layers.LayerNorm(q_dim, eps=NORM_EPS, **common)
        self.kv_norm = layers.LayerNorm(kv_dim, eps=NORM_EPS, **common) if kv_norm else None
        self.attn = layers.Attention(q_dim, num_heads, head_dim=key_width // num_heads,
                                     cross_attention=True, kv_dim=kv_dim, attn_impl=attn_impl,
                                     glorot_per_head=True, rngs=rngs, **common)
        if mlp_ratio:
            self.mlp_norm = layers.LayerNorm(q_dim, eps=NORM_EPS, **common)
            self.mlp = layers.Mlp(q_dim, int(q_dim * mlp_ratio), output_dropout=False,
                                  kernel_init=layers.XAVIER_INIT, rngs=rngs, **common)
        else:
            self.mlp_norm = self.mlp = None

    def __call__(self, q, kv, *, train: bool = False, rngs: nnx.Rngs | None = None):
        if self.kv_norm is not None:
            kv = self.kv_norm(kv)
        out = q + self.attn(self.q_norm(q), kv, train=train, rngs=rngs)
        if self.mlp is not None:
            out = out + self.mlp(self.mlp_norm(out), train=train, rngs=rngs)
        return axes.constrain(out, axes.TOKENS)


def _run(layer, remat: bool, *args, train: bool, rngs, **static):
    """layer(*args, train=..., rngs=..., **static), under nnx.remat when asked. The rngs go
    through the transform as an argument (dropout keys advance inside it)."""
    if not remat:
        return layer(*args, train=train, rngs=rngs, **static)

    def call(module, layer_rngs, *a):
        return module(*a, train=train, rngs=layer_rngs, **static)

    return nnx.remat(call)(layer, rngs, *args)


class FITTrunk(nnx.Module):
    """The interleaved local/global stack (module docstring); no embeddings, no heads."""

    def __init__(self, *, layer_spec: str, num_groups: int, tokens_per_group: int,
                 latents_per_group: int, x_dim: int, latent_dim: int, x_heads: int,
                 latent_heads: int, mlp_ratio: float, drop_path_rate: float, dropout_rate: float,
                 cond_attention: bool, remat: bool, attn_impl: str, dtype: Any,
                 param_dtype: Any, rngs: nnx.Rngs, output_norms: bool = True,
                 latent_mask: str = "none", x_self_attention: bool = True,
                 xattn_with_mlp: bool = False, xattn_enc_ln: bool = True):
        if latent_mask not in LATENT_MASKS:
            raise ValueError(f"latent_mask must be one of {LATENT_MASKS}, got {latent_mask!r}")
        self.pairs = tuple(parse_layer_spec(layer_spec))
        self.latent_mask = latent_mask
        self.num_groups, self.tokens_per_group = num_groups, tokens_per_group
        self.latents_per_group = latents_per_group
        self.x_dim, self.latent_dim = x_dim, latent_dim
        self.remat = bool(remat)
        for name, dim, heads in (("x_dim", x_dim, x_heads),
                                 ("latent_dim", latent_dim, latent_heads)):
            if dim % heads:
                raise ValueError(f"{name} ({dim}) must be divisible by its heads ({heads})")
        common = dict(attn_impl=attn_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        layer_args = dict(drop_path=drop_path_rate, dropout=dropout_rate, **common)
        rw_heads, rw_width = min(latent_heads, x_heads), min(latent_dim, x_dim)
        rw_args = dict(kv_norm=bool(xattn_enc_ln),
                       mlp_ratio=mlp_ratio if xattn_with_mlp else None, **common)
        x_nets, reads, l_nets, writes, l2c = [], [], [], [], []
        for i, (local, global_) in enumerate(self.pairs):
            x_nets.append(nnx.List([FITLayer(x_dim, x_heads, mlp_ratio,
                                             self_attention=bool(x_self_attention), **layer_args)
                                    for _ in range(local)]))
            if global_:
                reads.append(CrossAttention(latent_dim, x_dim, rw_heads, rw_width, **rw_args))
                l_nets.append(nnx.List([FITLayer(latent_dim, latent_heads, mlp_ratio,
                                                 **layer_args) for _ in range(global_)]))
                # the condition layer never has an MLP, but follows xattn_enc_ln (pix2seq)
                l2c.append(CrossAttention(latent_dim, latent_dim, latent_heads, latent_dim,
                                          kv_norm=bool(xattn_enc_ln), **common)
                           if cond_attention else None)
            else:
                reads.append(None)
                l_nets.append(nnx.List([]))
                l2c.append(None)
            writes.append(CrossAttention(x_dim, latent_dim, rw_heads, rw_width, **rw_args)
                          if i < len(self.pairs) - 1 else None)
        self.x_networks, self.reads = nnx.List(x_nets), nnx.List(reads)
        self.latent_networks, self.writes = nnx.List(l_nets), nnx.List(writes)
        self.cond_attention = nnx.List(l2c)
        # pix2seq's FIT and FITAR end with x_output_ln / l_output_ln; its FITDenoiser has
        # neither (it returns raw latents and normalises x once, before its output layer).
        if output_norms:
            self.x_norm = layers.LayerNorm(x_dim, eps=NORM_EPS, dtype=dtype,
                                           param_dtype=param_dtype)
            self.latent_norm = layers.LayerNorm(latent_dim, eps=NORM_EPS, dtype=dtype,
                                                param_dtype=param_dtype)
        else:
            self.x_norm = self.latent_norm = None

    def __call__(self, x, latents, *, cond=None, autoregressive: bool = False,
                 train: bool = False, rngs: nnx.Rngs | None = None):
        """x [B, T, n, c], latents [B, T, m, d_l] (cond [B, S, d_l] for l2c) -> same shapes."""
        b, t, n, c = x.shape
        m, d = latents.shape[2], latents.shape[3]
        x = x.reshape(b * t, n, c)
        # FIT-AR, and pix2seq's mask='causal' option of FIT and FITDenoiser: the global layers
        # see the latents of their own and earlier groups only.
        latent_causality = (dict(causal=True, causal_chunk=m)
                            if autoregressive or self.latent_mask == "causal" else {})
        kw = dict(train=train, rngs=rngs)
        for i, (local, global_) in enumerate(self.pairs):
            with sharding.groups_in_batch():
                for layer in self.x_networks[i]:
                    x = _run(layer, self.remat, x, causal=autoregressive, **kw)
                if global_:
                    latents = _run(self.reads[i], self.remat, latents.reshape(b * t, m, d), x,
                                   **kw)
            if not global_:
                continue
            latents = latents.reshape(b, t * m, d)
            if self.cond_attention[i] is not None:
                latents = _run(self.cond_attention[i], self.remat, latents, cond, **kw)
            for layer in self.latent_networks[i]:
                latents = _run(layer, self.remat, latents, **latent_causality, **kw)
            latents = latents.reshape(b, t, m, d)
            if self.writes[i] is not None:
                source = latents
                if autoregressive:  # group t writes from group t-1's latents; group 0: zeros
                    source = jnp.concatenate([jnp.zeros_like(latents[:, :1]),
                                              latents[:, :-1]], axis=1)
                with sharding.groups_in_batch():
                    x = _run(self.writes[i], self.remat, x, source.reshape(b * t, m, d), **kw)
        x = x.reshape(b, t, n, c)
        if self.x_norm is None:
            return x, latents
        return self.x_norm(x), self.latent_norm(latents)


# ---------------------------------------------------------------------------------------------
# Parameter count from the configuration (papers.md §1.8), tested against the modules.
# ---------------------------------------------------------------------------------------------

def _self_layer(dim, r, attention=True):
    mlp_block = 2 * r * dim * dim + r * dim + dim + 2 * dim  # MLP + its LN
    return mlp_block + (4 * dim * dim + 4 * dim + 2 * dim if attention else 0)


def _cross_layer(q_w, kv_w, k, r=0, kv_norm=True):
    attention = q_w * k + k + 2 * (kv_w * k + k) + k * q_w + q_w
    norms = 2 * q_w + (2 * kv_w if kv_norm else 0)
    mlp_block = 2 * r * q_w * q_w + r * q_w + q_w + 2 * q_w if r else 0
    return attention + norms + mlp_block


def trunk_param_count(*, layer_spec: str, x_dim: int, latent_dim: int, mlp_ratio: float = 4.0,
                      cond_attention: bool = False, output_norms: bool = True,
                      x_self_attention: bool = True, xattn_with_mlp: bool = False,
                      xattn_enc_ln: bool = True) -> int:
    """Parameters of the trunk: local/global layers, read/write (+ l2c) layers, output LNs."""
    r = int(mlp_ratio)
    pairs = parse_layer_spec(layer_spec)
    k = min(x_dim, latent_dim)
    rw = dict(r=r if xattn_with_mlp else 0, kv_norm=xattn_enc_ln)
    total = 2 * x_dim + 2 * latent_dim if output_norms else 0  # output LayerNorms
    for i, (local, global_) in enumerate(pairs):
        total += local * _self_layer(x_dim, r, attention=x_self_attention)
        if global_:
            total += global_ * _self_layer(latent_dim, r) + _cross_layer(latent_dim, x_dim, k,
                                                                         **rw)
            if cond_attention:
                total += _cross_layer(latent_dim, latent_dim, latent_dim,
                                      kv_norm=xattn_enc_ln)
        if i < len(pairs) - 1:
            total += _cross_layer(x_dim, latent_dim, k, **rw)
    return total
