r"""FIT: Far-reaching Interleaved Transformers (Chen & Li 2023, arXiv:2305.12689).

Reference: the official TF code, google-research/pix2seq `architectures/transformers.py`
(`get_layer_config`, `FIT`, `FITAR`, `FITDenoiser`, `ScalarEmbedding`). Three heads share one
trunk here, as in the paper: `FITEncoder` (image classification), `FITAR` (autoregressive
language model) and `FITDenoiser` (pixel diffusion; objective and sampler in zoo/diffusion.py).

Trunk: zoo/fit_trunk.py (layer spec, local/read/global/write layers, attention folding,
chunk-causal latents for FIT-AR, gradient checkpointing).

Heads:
  * FITEncoder: image [B, H, W, C] -> sqrt(T) x sqrt(T) sub-images, each cut into n
    patches (raster order inside the sub-image) -> stem Dense(p*p*C -> c) + LN (as the
    reference's `stem`, `stem_ln`) + x_pos_emb -> trunk -> mean of the output latents (of the
    output tokens if the spec ends with local layers) -> Linear head. The pooling is ours: the
    reference encoder feeds a Pix2Seq decoder instead of a classifier.
  * FITAR: token ids [B, L] (L = T*n) -> shared token embedding [vocab, c] + x_pos_emb -> trunk
    -> LN(x) @ embedding^T + output bias -> logits [B, L, vocab] (the reference's
    shared_embedding=True, output_bias=True).
  * FITDenoiser: noisy image [B, H, W, C], noise level gamma(t) in (0, 1] (what pix2seq feeds
    its denoiser, zoo/diffusion.py) -> sub-image patches as the encoder; time embedding
    ScalarEmbedding(d_l // 4, scaling 1000, expansion 4) (sin-cos of 1000 gamma, normalised,
    Dense -> SiLU -> Dense, width d_l); optional conditioning vectors
    (e.g. one-hot class labels) through `cond_proj`; before every global stack the latents
    cross-attend to [time; cond] ("l2c"); latent self-conditioning adds
    LN_{gamma=0}(MLP-block(latents_prev)); output Dense(p*p*C)(LN(x)) -> image, with
    that one LayerNorm (the trunk adds no output norms here, as in pix2seq).
    Returns (prediction image, raw latents) so the caller can self-condition.

Position codes (`x_pos_encoding`, `latent_pos_encoding`), pix2seq's names and formulas:
"learned" (trunc-normal 0.02 tables, the default), or fixed "sin_cos" codes with coordinates
normalised to [0, 1000] (`pix2seq_position_code`): for x a 1-D code over the n positions of a
group, or "sin_cos2d" (images) a 2-D code over the group's square patch grid; for latents the
2-D code over the (T, m) grid. The trunk options of pix2seq (causal latent mask,
x_self_attention, xattn_with_mlp, xattn_enc_ln) are described in zoo/fit_trunk.py; the encoder
takes pix2seq's extra conditioning tokens y (`y_dim`, its `stem_y`). FITDenoiser also accepts
"sin_cos2d", which pix2seq's denoiser does not offer.

Sizes: the paper's configurations are not in the released code (papers.md §1.7), so the
registered sizes are ours, chosen per use and stated in each registration.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo import axes, layers
from zoo.axes import with_axes
from zoo.fit_trunk import NORM_EPS, FITTrunk, parse_layer_spec, trunk_param_count
from zoo.registry import register_variant

_EMBED_INIT = nnx.initializers.truncated_normal(0.02)
# pix2seq's names: "sin_cos" is a 1-D code over the position inside the group, "sin_cos2d" a 2-D
# code over the group's square grid of patches (images only); both fixed, not parameters.
X_POS_ENCODINGS = ("learned", "sin_cos", "sin_cos2d")
LATENT_POS_ENCODINGS = ("learned", "sin_cos")
# pix2seq normalises the coordinates of its FIT position codes to [0, 1000].
_POSITION_RANGE = 1000.0


def _pix2seq_encoding(coords: np.ndarray, dim: int) -> np.ndarray:
    """pix2seq `positional_encoding` for 1-D coords: channel i has the angle
    coord * 10000^(-2 (i // 2) / dim); the sines of the even channels come first, then the
    cosines of the odd ones. float32 throughout, as the reference computes it (angles reach
    1000 rad, so float64 angles would differ from its codes by ~1e-4)."""
    i = np.arange(dim)
    rates = np.float32(1.0) / np.power(np.float32(10000.0),
                                       (2 * (i // 2)).astype(np.float32) / np.float32(dim))
    angles = coords.astype(np.float32)[:, None] * rates[None].astype(np.float32)
    return np.concatenate([np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])], axis=-1)


def _normalised_coords(length: int, name: str) -> np.ndarray:
    if length < 2:
        # the reference divides by length - 1 and would produce NaN codes
        raise ValueError(f"{name}: pix2seq's sin-cos code needs at least 2 positions per "
                         f"axis, got {length}")
    return (np.arange(length, dtype=np.float32) / np.float32(length - 1)
            * np.float32(_POSITION_RANGE))


def pix2seq_position_code(rows: int, cols: int, dim: int, *, name: str = "position code"
                          ) -> np.ndarray:
    """pix2seq `add_vis_pos_emb(..., 'sin_cos', rows, cols, dim, normalization_max=1000)`:
    [rows * cols, dim], row-major. A 1-D code over rows * cols positions when either side is
    1; otherwise the first dim/2 channels encode the row and the last dim/2 the column."""
    if rows == 1 or cols == 1:
        return _pix2seq_encoding(_normalised_coords(rows * cols, name), dim)
    if dim % 2:
        raise ValueError(f"{name}: a 2-D sin-cos code needs an even width, got {dim}")
    half = dim // 2
    row_code = _pix2seq_encoding(_normalised_coords(rows, name), half)
    col_code = _pix2seq_encoding(_normalised_coords(cols, name), half)
    code = np.concatenate([np.broadcast_to(row_code[:, None], (rows, cols, half)),
                           np.broadcast_to(col_code[None], (rows, cols, half))], axis=-1)
    return code.reshape(rows * cols, dim)


# ---------------------------------------------------------------------------------------------
# Shared pieces of the three heads
# ---------------------------------------------------------------------------------------------

def image_to_group_patches(images: jax.Array, groups_per_side: int, patch: int) -> jax.Array:
    """[B, H, W, C] -> [B, T, n, p*p*C]: T = s*s sub-images (raster), each cut into n patches
    (raster inside the sub-image), each patch flattened (row, column, channel)."""
    b, h, w, ch = images.shape
    s = groups_per_side
    gh, gw = h // s // patch, w // s // patch
    x = images.reshape(b, s, gh, patch, s, gw, patch, ch)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)  # b, sy, sx, gy, gx, py, px, ch
    return x.reshape(b, s * s, gh * gw, patch * patch * ch)


def group_patches_to_image(tokens: jax.Array, groups_per_side: int, patch: int, height: int,
                           width: int) -> jax.Array:
    """Inverse of `image_to_group_patches`."""
    b = tokens.shape[0]
    s = groups_per_side
    gh, gw = height // s // patch, width // s // patch
    ch = tokens.shape[-1] // (patch * patch)
    x = tokens.reshape(b, s, s, gh, gw, patch, patch, ch).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, height, width, ch)


class _FITBase(nnx.Module):
    """Embedding tables and the trunk, shared by the three heads."""

    def _init_trunk(self, *, layers_spec, num_groups, tokens_per_group, latents_per_group,
                    x_dim, latent_dim, x_heads, latent_heads, mlp_ratio, drop_path_rate,
                    dropout_rate, x_pos_encoding, x_pos_grid, cond_attention, remat,
                    attn_impl, dtype, param_dtype, rngs, latent_pos_encoding="learned",
                    **trunk_options):
        for name, value in (("num_groups", num_groups), ("tokens_per_group", tokens_per_group),
                            ("latents_per_group", latents_per_group), ("x_dim", x_dim),
                            ("latent_dim", latent_dim), ("x_heads", x_heads),
                            ("latent_heads", latent_heads)):
            layers.check_positive_int(value, name)
        if x_pos_encoding not in X_POS_ENCODINGS:
            raise ValueError(f"x_pos_encoding must be one of {X_POS_ENCODINGS} (pix2seq's "
                             f"names), got {x_pos_encoding!r}")
        if latent_pos_encoding not in LATENT_POS_ENCODINGS:
            raise ValueError(f"latent_pos_encoding must be one of {LATENT_POS_ENCODINGS}, got "
                             f"{latent_pos_encoding!r}")
        if attn_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(f"attn_impl must be one of {layers.ATTENTION_IMPLS}, got "
                             f"{attn_impl!r}")
        self.dtype = layers.canonical_dtype(dtype)
        param_dtype = layers.canonical_dtype(param_dtype, "param_dtype")
        self.num_groups, self.tokens_per_group = num_groups, tokens_per_group
        self.latents_per_group, self.latent_dim = latents_per_group, latent_dim
        self.dropout_rate = layers.check_rate(dropout_rate, "dropout_rate")
        self.trunk = FITTrunk(
                layer_spec=layers_spec, num_groups=num_groups,
                tokens_per_group=tokens_per_group, latents_per_group=latents_per_group,
                x_dim=x_dim, latent_dim=latent_dim, x_heads=x_heads, latent_heads=latent_heads,
                mlp_ratio=mlp_ratio, drop_path_rate=layers.check_rate(drop_path_rate,
                                                                      "drop_path_rate"),
                dropout_rate=self.dropout_rate, cond_attention=cond_attention, remat=remat,
                attn_impl=attn_impl, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs,
                **trunk_options)
        # Fixed codes are computed here, checked once, and rebuilt at trace time as constants
        # (not model state): x_pos_code / latent_pos_code hold only the geometry.
        if latent_pos_encoding == "learned":
            self.latent_pos_emb = nnx.Param(with_axes(_EMBED_INIT, ("latents", "embed"))(
                    rngs.params(), (num_groups * latents_per_group, latent_dim), param_dtype))
            self.latent_pos_code = None
        else:
            self.latent_pos_emb = None
            self.latent_pos_code = (num_groups, latents_per_group, latent_dim)
            pix2seq_position_code(*self.latent_pos_code, name="latent_pos_encoding='sin_cos'")
        if x_pos_encoding == "learned":
            self.x_pos_emb = nnx.Param(with_axes(_EMBED_INIT, ("pos", "embed"))(
                    rngs.params(), (tokens_per_group, x_dim), param_dtype))
            self.x_pos_code = None
        else:
            if x_pos_encoding == "sin_cos2d" and (x_pos_grid is None
                                                  or x_pos_grid[0] != x_pos_grid[1]):
                raise ValueError(f"x_pos_encoding='sin_cos2d' needs a square grid of patches "
                                 f"per group (image models only), got {x_pos_grid}")
            self.x_pos_emb = None
            self.x_pos_code = ((tokens_per_group, 1, x_dim) if x_pos_encoding == "sin_cos"
                               else (*x_pos_grid, x_dim))
            pix2seq_position_code(*self.x_pos_code,
                                  name=f"x_pos_encoding={x_pos_encoding!r}")
        self.x_dim = x_dim
        return param_dtype

    def _x_pos(self):
        if self.x_pos_emb is not None:
            return layers.gathered(self.x_pos_emb[...].astype(self.dtype))
        return jnp.asarray(pix2seq_position_code(*self.x_pos_code), self.dtype)

    def _initial_latents(self, batch: int):
        if self.latent_pos_emb is not None:
            table = layers.gathered(self.latent_pos_emb[...].astype(self.dtype))
        else:
            table = jnp.asarray(pix2seq_position_code(*self.latent_pos_code), self.dtype)
        latents = table.reshape(1, self.num_groups, self.latents_per_group, self.latent_dim)
        return jnp.broadcast_to(latents, (batch, *latents.shape[1:]))


def _image_geometry(image_size, patch_size, num_groups):
    height, width = layers.int_pair(image_size, "image_size")
    patch = layers.check_positive_int(patch_size, "patch_size")
    side = math.isqrt(layers.check_positive_int(num_groups, "num_groups"))
    if side * side != num_groups:
        raise ValueError(f"num_groups={num_groups} must be a square (groups are sqrt x sqrt "
                         f"sub-images)")
    if height % (side * patch) or width % (side * patch):
        raise ValueError(f"image_size {(height, width)} must be divisible by "
                         f"sqrt(num_groups) * patch_size = {side * patch}")
    grid = (height // side // patch, width // side // patch)
    return height, width, side, grid


class FITEncoder(_FITBase):
    """FIT encoder as an image classifier (module docstring). Call: model(images [B,H,W,C])."""

    def __init__(self, *, image_size: int | Sequence[int] = 256, patch_size: int = 8,
                 in_chans: int = 3, num_classes: int = 1000, layer_spec: str = "(2)4(2)4(2)",
                 num_groups: int = 16, latents_per_group: int = 16, x_dim: int = 384,
                 latent_dim: int = 768, x_heads: int = 6, latent_heads: int = 12,
                 mlp_ratio: float = 4.0, x_pos_encoding: str = "learned",
                 latent_pos_encoding: str = "learned", latent_mask: str = "none",
                 y_dim: int = 0, drop_path_rate: float = 0.0, dropout_rate: float = 0.0,
                 remat: bool = False, attn_impl: str = "auto", dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        height, width, self.groups_per_side, grid = _image_geometry(image_size, patch_size,
                                                                   num_groups)
        self.patch_size, self.image_size = patch_size, (height, width)
        if not isinstance(y_dim, int) or isinstance(y_dim, bool) or y_dim < 0:
            raise ValueError(f"y_dim must be an int >= 0 (0: no conditioning tokens), got "
                             f"{y_dim!r}")
        self.y_dim = y_dim
        param_dtype = self._init_trunk(
                layers_spec=layer_spec, num_groups=num_groups, tokens_per_group=grid[0] * grid[1],
                latents_per_group=latents_per_group, x_dim=x_dim, latent_dim=latent_dim,
                x_heads=x_heads, latent_heads=latent_heads, mlp_ratio=mlp_ratio,
                drop_path_rate=drop_path_rate, dropout_rate=dropout_rate,
                x_pos_encoding=x_pos_encoding, x_pos_grid=grid, cond_attention=False,
                remat=remat, attn_impl=attn_impl, dtype=dtype, param_dtype=param_dtype,
                rngs=rngs, latent_pos_encoding=latent_pos_encoding, latent_mask=latent_mask)
        common = dict(dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        self.stem = layers.xavier_linear(patch_size * patch_size * in_chans, x_dim, axes=_STEM_AXES,
                            **common)
        self.stem_norm = _norm(x_dim, self.dtype, param_dtype)
        # pix2seq FIT's `stem_y`: conditioning tokens y [B, T, k, y_dim] become k extra tokens
        # at the front of each group (no position code), seen by every local layer.
        if y_dim:
            self.stem_y = layers.xavier_linear(y_dim, x_dim, axes=(None, "embed"), **common)
            self.stem_y_norm = _norm(x_dim, self.dtype, param_dtype)
        else:
            self.stem_y = self.stem_y_norm = None
        self.pool_latents = self.trunk.pairs[-1][1] > 0
        width_out = latent_dim if self.pool_latents else x_dim
        self.head = (layers.xavier_linear(width_out, num_classes, axes=("embed", "classes"), **common)
                     if num_classes else None)

    def forward_features(self, images, y=None, *, train: bool = False,
                         rngs: nnx.Rngs | None = None):
        """Images (and y [B, T, k, y_dim] when y_dim > 0) -> (tokens [B, T, k + n, c], the
        y tokens first, latents [B, T, m, d_l]), both layer-normalised."""
        if images.ndim != 4 or tuple(images.shape[1:3]) != self.image_size:
            raise ValueError(f"FITEncoder expects images [B, {self.image_size[0]}, "
                             f"{self.image_size[1]}, C], got {images.shape}")
        x = image_to_group_patches(images.astype(self.dtype), self.groups_per_side,
                                   self.patch_size)
        x = self.stem_norm(self.stem(x)) + self._x_pos()  # no dropout here, as in pix2seq
        if y is not None:
            if self.stem_y is None:
                raise ValueError("y was given but this FITEncoder has y_dim=0: build it with "
                                 "y_dim=<width of y> to condition on extra tokens")
            if y.ndim != 4 or y.shape[0] != x.shape[0] or y.shape[1] != self.num_groups \
                    or y.shape[3] != self.y_dim:
                raise ValueError(f"y must be [B={x.shape[0]}, T={self.num_groups}, k, "
                                 f"y_dim={self.y_dim}], got {y.shape}")
            y = self.stem_y_norm(self.stem_y(y.astype(self.dtype)))
            x = jnp.concatenate([y.astype(x.dtype), x], axis=2)
        return self.trunk(x, self._initial_latents(x.shape[0]), train=train, rngs=rngs)

    def __call__(self, images, y=None, *, train: bool = False, rngs: nnx.Rngs | None = None):
        x, latents = self.forward_features(images, y, train=train, rngs=rngs)
        pooled = jnp.mean(latents if self.pool_latents else x, axis=(1, 2))
        return pooled if self.head is None else self.head(pooled)


class FITAR(_FITBase):
    """FIT autoregressive LM: model(tokens [B, L]) -> logits [B, L, vocab], L = T * n."""

    def __init__(self, *, vocab_size: int = 256, seq_len: int = 1024, layer_spec: str = "(2)4(2)",
                 num_groups: int = 16, latents_per_group: int = 16, x_dim: int = 256,
                 latent_dim: int = 512, x_heads: int = 4, latent_heads: int = 8,
                 mlp_ratio: float = 4.0, x_pos_encoding: str = "learned",
                 latent_pos_encoding: str = "learned", drop_path_rate: float = 0.0,
                 dropout_rate: float = 0.0, remat: bool = False, attn_impl: str = "auto",
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        seq_len = layers.check_positive_int(seq_len, "seq_len")
        num_groups = layers.check_positive_int(num_groups, "num_groups")
        if seq_len % num_groups:
            raise ValueError(f"seq_len={seq_len} must be divisible by num_groups={num_groups}")
        self.vocab_size = layers.check_positive_int(vocab_size, "vocab_size")
        self.seq_len = seq_len
        param_dtype = self._init_trunk(
                layers_spec=layer_spec, num_groups=num_groups,
                tokens_per_group=seq_len // num_groups, latents_per_group=latents_per_group,
                x_dim=x_dim, latent_dim=latent_dim, x_heads=x_heads, latent_heads=latent_heads,
                mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, dropout_rate=dropout_rate,
                x_pos_encoding=x_pos_encoding, x_pos_grid=None, cond_attention=False,
                remat=remat, attn_impl=attn_impl, dtype=dtype, param_dtype=param_dtype,
                rngs=rngs, latent_pos_encoding=latent_pos_encoding)
        self.token_embedding = nnx.Param(with_axes(_EMBED_INIT, ("vocab", "embed"))(
                rngs.params(), (self.vocab_size, x_dim), param_dtype))
        self.output_bias = nnx.Param(with_axes(_EMBED_INIT, ("vocab",))(
                rngs.params(), (self.vocab_size,), param_dtype))

    def __call__(self, tokens, *, train: bool = False, rngs: nnx.Rngs | None = None):
        if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"FITAR expects tokens [B, {self.seq_len}] (seq_len = num_groups "
                             f"* tokens_per_group), got {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        b = tokens.shape[0]
        t, n = self.num_groups, self.tokens_per_group
        x = jnp.take(layers.gathered(self.token_embedding[...]), tokens, axis=0)
        x = x.astype(self.dtype)
        x = x.reshape(b, t, n, -1) + self._x_pos()  # no dropout here, as in pix2seq
        x, _ = self.trunk(x, self._initial_latents(b), autoregressive=True, train=train,
                          rngs=rngs)
        logits = jnp.einsum("btnc,vc->btnv", x, self.token_embedding[...].astype(self.dtype),
                            preferred_element_type=jnp.float32)
        logits = (logits + self.output_bias[...].astype(jnp.float32)).reshape(b, t * n, -1)
        return axes.constrain(logits, axes.TOKEN_LOGITS)


class ScalarEmbedding(nnx.Module):
    """pix2seq ScalarEmbedding: sin-cos of (scaling * gamma) in `dim` channels, normalised per
    example, Dense(dim*expansion) -> SiLU -> Dense(dim*expansion) (no final SiLU)."""

    def __init__(self, dim: int, *, scaling: float = 1000.0, expansion: int = 4, dtype: Any,
                 param_dtype: Any, rngs: nnx.Rngs):
        if dim % 2:
            raise ValueError(f"ScalarEmbedding dim must be even, got {dim}")
        self.dim, self.scaling = dim, float(scaling)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dense0 = layers.xavier_linear(dim, dim * expansion, **common)
        self.dense1 = layers.xavier_linear(dim * expansion, dim * expansion, axes=("mlp", "embed"), **common)

    def __call__(self, t):
        half = self.dim // 2
        # pix2seq `positional_encoding`: channel i has rate 10000^(-2 (i // 2) / dim), sines of
        # the even channels then cosines of the odd ones, so both halves use the frequencies
        # 10000^(-k / half), k = 0 .. half - 1.
        freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / half)
        angles = (t.astype(jnp.float32) * self.scaling)[:, None] * freqs[None]
        code = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
        code = (code - code.mean(-1, keepdims=True)) / (code.std(-1, keepdims=True) + 1e-12)
        return self.dense1(jax.nn.silu(self.dense0(code)))


class FITDenoiser(_FITBase):
    """FIT diffusion denoiser (module docstring).

    Call: model(images [B,H,W,C], gamma [B] noise level in (0,1], cond=None [B, cond_dim] or
    [B,S,cond_dim], latents_prev=None [B,T,m,d_l]) -> (prediction [B,H,W,C], latents
    [B,T,m,d_l], un-normalised).
    """

    def __init__(self, *, image_size: int | Sequence[int] = 64, patch_size: int = 4,
                 in_chans: int = 3, cond_dim: int = 0, layer_spec: str = "(2)4(2)4(2)",
                 num_groups: int = 4, latents_per_group: int = 32, x_dim: int = 256,
                 latent_dim: int = 512, x_heads: int = 4, latent_heads: int = 8,
                 mlp_ratio: float = 4.0, self_condition: bool = True,
                 x_pos_encoding: str = "learned", latent_pos_encoding: str = "learned",
                 latent_mask: str = "none", x_self_attention: bool = True,
                 xattn_with_mlp: bool = False, xattn_enc_ln: bool = True,
                 drop_path_rate: float = 0.0,
                 dropout_rate: float = 0.0, remat: bool = False, attn_impl: str = "auto",
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        height, width, self.groups_per_side, grid = _image_geometry(image_size, patch_size,
                                                                   num_groups)
        if latent_dim % 8:
            raise ValueError(f"latent_dim={latent_dim} must be a multiple of 8 (the time "
                             f"embedding has latent_dim // 4 sin-cos channels)")
        self.patch_size, self.image_size, self.in_chans = patch_size, (height, width), in_chans
        self.cond_dim = int(cond_dim)
        param_dtype = self._init_trunk(
                layers_spec=layer_spec, num_groups=num_groups, tokens_per_group=grid[0] * grid[1],
                latents_per_group=latents_per_group, x_dim=x_dim, latent_dim=latent_dim,
                x_heads=x_heads, latent_heads=latent_heads, mlp_ratio=mlp_ratio,
                drop_path_rate=drop_path_rate, dropout_rate=dropout_rate,
                x_pos_encoding=x_pos_encoding, x_pos_grid=grid, cond_attention=True,
                remat=remat, attn_impl=attn_impl, dtype=dtype, param_dtype=param_dtype,
                rngs=rngs, output_norms=False, latent_pos_encoding=latent_pos_encoding,
                latent_mask=latent_mask, x_self_attention=x_self_attention,
                xattn_with_mlp=xattn_with_mlp, xattn_enc_ln=xattn_enc_ln)
        common = dict(dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        patch_dim = patch_size * patch_size * in_chans
        self.stem = layers.xavier_linear(patch_dim, x_dim, axes=_STEM_AXES, **common)
        self.stem_norm = _norm(x_dim, self.dtype, param_dtype)
        self.time_emb = ScalarEmbedding(latent_dim // 4, **common)
        self.cond_proj = (layers.xavier_linear(self.cond_dim, latent_dim, axes=(None, "embed"), **common)
                          if self.cond_dim else None)
        self.self_condition = bool(self_condition)
        if self.self_condition:
            # pix2seq MLP(num_layers=1): x + FFN(LN(x)), then LN with zero-initialised scale.
            self.latent_prev_norm = _norm(latent_dim, self.dtype, param_dtype)
            self.latent_prev_mlp = layers.Mlp(latent_dim, int(latent_dim * mlp_ratio),
                                              kernel_init=layers.XAVIER_INIT, **common)
            self.latent_prev_out_norm = layers.LayerNorm(latent_dim, eps=NORM_EPS,
                                                         dtype=self.dtype,
                                                         param_dtype=param_dtype)
            self.latent_prev_out_norm.scale.set_value(
                    jnp.zeros_like(self.latent_prev_out_norm.scale[...]))
        self.output_norm = _norm(x_dim, self.dtype, param_dtype)
        self.output = layers.xavier_linear(x_dim, patch_dim, axes=("embed", "conv_out"), **common)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.num_groups, self.latents_per_group, self.latent_dim)

    def __call__(self, images, gamma, cond=None, *, latents_prev=None, train: bool = False,
                 rngs: nnx.Rngs | None = None):
        if images.ndim != 4 or tuple(images.shape[1:3]) != self.image_size:
            raise ValueError(f"FITDenoiser expects images [B, {self.image_size[0]}, "
                             f"{self.image_size[1]}, C], got {images.shape}")
        b = images.shape[0]
        if gamma.shape != (b,):
            raise ValueError(f"gamma must be [batch={b}] noise levels in (0, 1], got shape "
                             f"{gamma.shape}")
        if self.cond_dim and cond is None:
            raise ValueError(f"this denoiser is conditional (cond_dim={self.cond_dim}): pass "
                             f"cond [B, {self.cond_dim}]")
        x = image_to_group_patches(images.astype(self.dtype), self.groups_per_side,
                                   self.patch_size)
        x = self.stem_norm(self.stem(x)) + self._x_pos()
        latents = self._initial_latents(b)
        if self.self_condition:
            prev = (jnp.zeros((b, *self.latent_shape), self.dtype) if latents_prev is None
                    else latents_prev.astype(self.dtype))
            prev = prev + self.latent_prev_mlp(self.latent_prev_norm(prev))
            latents = latents + self.latent_prev_out_norm(prev)
        context = self.time_emb(gamma)[:, None]
        if self.cond_proj is not None:
            c = cond.astype(self.dtype)
            c = self.cond_proj(c[:, None] if c.ndim == 2 else c)
            context = jnp.concatenate([context, c.astype(context.dtype)], axis=1)
        x, latents = self.trunk(x, latents, cond=context.astype(self.dtype), train=train,
                                rngs=rngs)
        out = self.output(self.output_norm(x))
        image = group_patches_to_image(out, self.groups_per_side, self.patch_size,
                                       *self.image_size)
        return image.astype(jnp.float32), latents


# The patch stem maps pixels to the residual width: its output is "embed" (an "mlp" output
# would be split over `tensor` and gathered again by the first layer norm).
_STEM_AXES = ("conv_in", "embed")


def _norm(dim, dtype, param_dtype):
    return layers.LayerNorm(dim, eps=NORM_EPS, dtype=dtype, param_dtype=param_dtype)


def fit_param_count(kind: str, **config) -> int:
    """Whole-model count for kind in {"encoder", "ar", "denoiser"} from builder arguments."""
    c = {**dict(inspect.signature({"encoder": FITEncoder, "ar": FITAR,
                                    "denoiser": FITDenoiser}[kind].__init__).parameters
                     .items()), **config}
    default = lambda name: (c[name].default if isinstance(c[name], inspect.Parameter)  # noqa
                            else c[name])
    x_dim, d_l, r = default("x_dim"), default("latent_dim"), int(default("mlp_ratio"))
    groups, m = default("num_groups"), default("latents_per_group")
    options = {name: default(name) for name in ("x_self_attention", "xattn_with_mlp",
                                                 "xattn_enc_ln") if name in c}
    total = trunk_param_count(layer_spec=default("layer_spec"), x_dim=x_dim, latent_dim=d_l,
                              mlp_ratio=r, cond_attention=kind == "denoiser",
                              output_norms=kind != "denoiser", **options)
    if default("latent_pos_encoding") == "learned":
        total += groups * m * d_l  # latent_pos_emb
    if kind == "ar":
        vocab, n = default("vocab_size"), default("seq_len") // groups
        x_pos = n * x_dim if default("x_pos_encoding") == "learned" else 0
        return total + x_pos + vocab * x_dim + vocab
    size = default("image_size")
    side = math.isqrt(groups)
    p, ch = default("patch_size"), default("in_chans")
    n = (size // side // p) ** 2
    patch_dim = p * p * ch
    total += patch_dim * x_dim + x_dim + 2 * x_dim  # stem + stem LN
    if default("x_pos_encoding") == "learned":
        total += n * x_dim
    if kind == "encoder":
        y_dim = default("y_dim")
        total += y_dim * x_dim + 3 * x_dim if y_dim else 0  # stem_y + its LN
        classes = default("num_classes")
        pooled = d_l if parse_layer_spec(default("layer_spec"))[-1][1] else x_dim
        return total + (pooled * classes + classes if classes else 0)
    e = d_l // 4
    total += e * d_l + d_l + d_l * d_l + d_l  # time embedding
    cond = default("cond_dim")
    total += cond * d_l + d_l if cond else 0
    if default("self_condition"):
        # LN + MLP block (2 r d^2 + r d + d) + the zero-scale output LN
        total += 2 * d_l + 2 * r * d_l * d_l + r * d_l + d_l + 2 * d_l
    return total + 2 * x_dim + x_dim * patch_dim + patch_dim  # output LN + Dense


# ---------------------------------------------------------------------------------------------
# Registered variants. Sizes are ours (the paper's are not in the released code), stated below.
# ---------------------------------------------------------------------------------------------

_PAPER = ("Chen & Li 2023, FIT: Far-reaching Interleaved Transformers, arXiv:2305.12689")
_REFERENCE = "google-research/pix2seq architectures/transformers.py (FIT, FITAR, FITDenoiser)"

_ENCODER_B = dict(image_size=256, patch_size=8, num_classes=1000, layer_spec="(2)4(2)4(2)",
                  num_groups=16, latents_per_group=16, x_dim=384, latent_dim=768, x_heads=6,
                  latent_heads=12)
_AR_SMALL = dict(vocab_size=256, seq_len=1024, layer_spec="(2)4(2)4(2)", num_groups=16,
                 latents_per_group=16, x_dim=256, latent_dim=512, x_heads=4, latent_heads=8)
_DENOISER_64 = dict(image_size=64, patch_size=4, layer_spec="(2)4(2)4(2)", num_groups=4,
                    latents_per_group=32, x_dim=256, latent_dim=512, x_heads=4,
                    latent_heads=8)


fit_encoder_b = register_variant(
        "fit_encoder_b", FITEncoder, _ENCODER_B,
        weights={"pix2seq:fit": "zoo.converters.fit:encoder_from_pix2seq"},
        paper=_PAPER, reference=_REFERENCE,
        default_input={"image": ((256, 256, 3), "float32")},
        config="configs/fit.py:encoder",
        tiny=dict(image_size=32, patch_size=4, num_classes=10, layer_spec="(1)1(1)",
                  num_groups=4, latents_per_group=4, x_dim=16, latent_dim=32,
                  x_heads=2, latent_heads=2),
        tiny_input={"image": ((32, 32, 3), "float32")},
        notes="Our size (the paper's are unverified): 256 px, patch 8 -> 1024 patches "
              "in 16 groups of 64, 16 latents per group, c=384, d_l=768, "
              "'(2)4(2)4(2)'; ImageNet classifier on the mean of the output latents.")


fit_ar_small = register_variant(
        "fit_ar_small", FITAR, _AR_SMALL,
        weights={"pix2seq:fitar": "zoo.converters.fit:ar_from_pix2seq"},
        paper=_PAPER, reference=_REFERENCE,
        default_input={"tokens": ((1024,), "int32")},
        config="configs/fit.py:ar",
        tiny=dict(vocab_size=64, seq_len=16, layer_spec="(1)1(1)", num_groups=4,
                  latents_per_group=2, x_dim=16, latent_dim=32, x_heads=2,
                  latent_heads=2),
        tiny_input={"tokens": ((16,), "int32")},
        notes="Our size: byte-level (vocab 256) context 1024 in 16 groups of 64 tokens, "
              "16 latents per group, c=256, d_l=512, '(2)4(2)4(2)'.")


fit_denoiser_64 = register_variant(
        "fit_denoiser_64", FITDenoiser, _DENOISER_64,
        weights={"pix2seq:fit_denoiser": "zoo.converters.fit:denoiser_from_pix2seq"},
        paper=_PAPER, reference=_REFERENCE,
        default_input={"images": ((64, 64, 3), "float32"), "gamma": ((), "float32")},
        config="configs/fit.py:denoiser",
        tiny=dict(image_size=16, patch_size=2, layer_spec="(1)1(1)", num_groups=4,
                  latents_per_group=4, x_dim=16, latent_dim=32, x_heads=2,
                  latent_heads=2),
        tiny_input={"images": ((16, 16, 3), "float32"), "gamma": ((), "float32")},
        notes="Our size: 64x64 pixels, patch 4 -> 256 patches in 4 sub-image groups, "
              "32 latents per group, c=256, d_l=512, '(2)4(2)4(2)', unconditional unless "
              "cond_dim > 0 (configs/fit.py trains it class-conditional, as pix2seq); "
              "called on the noise level gamma; returns (image, raw latents).")
