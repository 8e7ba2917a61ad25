"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", ICLR 2021).

The platform's baseline model, and the template later paper models follow. Structure, names and
initialisation match timm's `vision_transformer.py` (so parameter counts agree exactly, e.g.
vit_base_patch16_224 = 86,567,656, and timm weights map by transposes): patch embedding, a class
token and a learned position embedding (both also covering the class token), pre-LN blocks
(LayerNorm eps 1e-6, exact GELU, fused qkv with bias), final LayerNorm, linear head.

Differences from timm worth knowing:
  * Images are NHWC (JAX convention); timm is NCHW. See `zoo.layers.PatchEmbed` for the weight map.
  * `pool="gap"` drops the class token (as big_vision's gap models do) and normalises the pooled
    features (timm's `fc_norm`) instead of the tokens.
  * No dropout on attention probabilities (fused kernels never materialise them); ViT and DeiT
    train with that rate at 0 anyway.

Init ("timm" mode): Linear kernels trunc-normal std 0.02 and zero biases, position embedding
trunc-normal std 0.02, class token normal std 1e-6, patch embedding PyTorch's conv default.
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from zoo import axes, layers
from zoo.axes import with_axes
from zoo.registry import register_variant

_POOLS = ("cls", "gap")


class Block(nnx.Module):
    """Pre-LN transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(Mlp(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_norm: bool = False, norm_eps: float = 1e-6,
                 approximate_gelu: bool = False, logits: str = "softmax",
                 attn_impl: str = "auto", dropout_rate: float = 0.0,
                 drop_path_rate: float = 0.0, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layers.LayerNorm(dim, eps=norm_eps, **common)
        self.attn = layers.Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                                     norm_eps=norm_eps, logits=logits, attn_impl=attn_impl,
                                     proj_drop=dropout_rate, rngs=rngs, **common)
        self.norm2 = layers.LayerNorm(dim, eps=norm_eps, **common)
        self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), approximate_gelu=approximate_gelu,
                              drop=dropout_rate, rngs=rngs, **common)
        self.drop_path = layers.DropPath(drop_path_rate)

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        x = x + self.drop_path(self.attn(self.norm1(x), train=train, rngs=rngs),
                               train=train, rngs=rngs)
        x = x + self.drop_path(self.mlp(self.norm2(x), train=train, rngs=rngs),
                               train=train, rngs=rngs)
        return axes.constrain(x, axes.TOKENS)


class VisionTransformer(nnx.Module):
    """ViT classifier on NHWC images.

    Args:
        image_size: int or (height, width); must be divisible by `patch_size`.
        patch_size: side of the square patches.
        in_chans: image channels.
        num_classes: classifier outputs; 0 = no head (`__call__` returns pooled features).
        embed_dim, depth, num_heads, mlp_ratio: transformer size.
        qkv_bias, qk_norm: attention projection options (see `zoo.layers.Attention`).
        pool: "cls" (class token, timm/ViT default) or "gap" (mean of patch tokens, no class
            token).
        logits: attention normaliser, "softmax" or "sigmoid".
        attn_impl: `kernels_pallas.attention` implementation ("auto" picks per backend).
        dropout_rate: dropout after the position embedding, attention projection and MLP layers
            (the ViT paper's placement).
        head_dropout_rate: dropout on the pooled features before the head (timm's drop_rate).
        drop_path_rate: stochastic depth, increasing linearly from 0 to this rate over depth
            (DeiT/timm schedule).
        norm_eps, approximate_gelu: LayerNorm epsilon and GELU flavour.
        dtype: compute dtype (jnp dtype or "float32"/"bfloat16"/"float16").
        param_dtype: storage dtype of the parameters.
    """

    def __init__(self, *, image_size: int | Sequence[int] = 224, patch_size: int = 16,
                 in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_norm: bool = False, pool: str = "cls",
                 logits: str = "softmax", attn_impl: str = "auto", dropout_rate: float = 0.0,
                 head_dropout_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_eps: float = 1e-6, approximate_gelu: bool = False,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
        if (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
                or num_classes < 0):
            raise ValueError(f"num_classes must be an integer >= 0 (0 = no head), got "
                             f"{num_classes!r}")
        num_classes = int(num_classes)
        if not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        depth = layers.check_positive_int(depth, "depth")
        embed_dim = layers.check_positive_int(embed_dim, "embed_dim")
        num_heads = layers.check_positive_int(num_heads, "num_heads")
        # Checked here as well as in the layers so that no parameter is initialised (and no op
        # compiled) for an argument set that cannot build.
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        if logits not in layers.ATTENTION_LOGITS:
            raise ValueError(f"logits must be one of {layers.ATTENTION_LOGITS}, got "
                             f"{logits!r}")
        if attn_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(f"attn_impl must be one of {layers.ATTENTION_IMPLS}, got "
                             f"{attn_impl!r}")
        drop_path_rate = layers.check_rate(drop_path_rate, "drop_path_rate")
        self.dtype = layers.canonical_dtype(dtype)
        param_dtype = layers.canonical_dtype(param_dtype, "param_dtype")
        common = dict(dtype=self.dtype, param_dtype=param_dtype)
        self.pool = pool
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.dropout_rate = layers.check_rate(dropout_rate, "dropout_rate")
        self.head_dropout_rate = layers.check_rate(head_dropout_rate, "head_dropout_rate")

        self.patch_embed = layers.PatchEmbed(image_size, patch_size, in_chans, embed_dim,
                                             rngs=rngs, **common)
        self.grid_size = self.patch_embed.grid_size
        self.num_prefix_tokens = 1 if pool == "cls" else 0
        num_tokens = self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens
        if pool == "cls":
            cls_init = nnx.initializers.normal(stddev=1e-6)
            self.cls_token = nnx.Param(with_axes(cls_init, (None, None, "embed"))(
                    rngs.params(), (1, 1, embed_dim), param_dtype))
        else:
            self.cls_token = None
        self.pos_embed = nnx.Param(with_axes(layers.DEFAULT_KERNEL_INIT, (None, "pos", "embed"))(
                rngs.params(), (1, num_tokens, embed_dim), param_dtype))

        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nnx.List([
                Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      qk_norm=qk_norm, norm_eps=norm_eps, approximate_gelu=approximate_gelu,
                      logits=logits, attn_impl=attn_impl, dropout_rate=dropout_rate,
                      drop_path_rate=rate, rngs=rngs, **common)
                for rate in rates])
        # timm: the final norm acts on all tokens for class-token pooling, on the pooled vector
        # (`fc_norm`) for average pooling.
        final_norm = layers.LayerNorm(embed_dim, eps=norm_eps, **common)
        self.norm, self.fc_norm = (final_norm, None) if pool == "cls" else (None, final_norm)
        self.head = (layers.Linear(embed_dim, num_classes, axes=("embed", "classes"),
                                   rngs=rngs, **common) if num_classes else None)

    def _embed(self, x, *, train, rngs):
        tokens = self.patch_embed(x)
        tokens = tokens.reshape(tokens.shape[0], -1, self.embed_dim)
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype),
                                   (tokens.shape[0], 1, self.embed_dim))
            tokens = jnp.concatenate([cls, tokens], axis=1)
        tokens = tokens + layers.gathered(self.pos_embed[...].astype(self.dtype))
        tokens = axes.constrain(tokens, axes.TOKENS)
        return layers.dropout(tokens, self.dropout_rate, train=train, rngs=rngs)

    def forward_features(self, x: jax.Array, *, train: bool = False,
                         rngs: nnx.Rngs | None = None) -> jax.Array:
        """Images [B, H, W, C] -> tokens [B, num_prefix_tokens + patches, embed_dim].

        For pool="cls" the tokens are normalised by the final norm; for pool="gap" they are
        not (the norm follows pooling, in `forward_head`).
        """
        x = self._embed(x, train=train, rngs=rngs)
        for block in self.blocks:
            x = block(x, train=train, rngs=rngs)
        return self.norm(x) if self.norm is not None else x

    def forward_head(self, x: jax.Array, *, pre_logits: bool = False, train: bool = False,
                     rngs: nnx.Rngs | None = None) -> jax.Array:
        """Tokens from `forward_features` -> logits [B, num_classes] (or pooled features)."""
        pooled = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
        if self.fc_norm is not None:
            pooled = self.fc_norm(pooled)
        pooled = layers.dropout(pooled, self.head_dropout_rate, train=train, rngs=rngs)
        if pre_logits or self.head is None:
            return pooled
        return self.head(pooled)

    def __call__(self, x: jax.Array, *, train: bool = False,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.forward_head(self.forward_features(x, train=train, rngs=rngs),
                                 train=train, rngs=rngs)

    def forward_intermediates(self, x: jax.Array, *, indices: int | Sequence[int] | None = None,
                              norm: bool = False, train: bool = False,
                              rngs: nnx.Rngs | None = None
                              ) -> tuple[jax.Array, list[jax.Array]]:
        """Features of every (or selected) block as spatial token maps, timm-style.

        Args:
            indices: None = all blocks; an int n = the last n blocks; a sequence = those block
                indices (negative counts from the end).
            norm: apply the final LayerNorm to the returned maps.

        Returns:
            (final tokens as `forward_features` returns them,
             list of [B, grid_h, grid_w, embed_dim] patch-token maps, class token removed).
        """
        wanted = layers.select_indices(indices, len(self.blocks), "block")
        final_norm = self.norm if self.norm is not None else self.fc_norm
        maps = []
        x = self._embed(x, train=train, rngs=rngs)
        for i, block in enumerate(self.blocks):
            x = block(x, train=train, rngs=rngs)
            if i in wanted:
                patch_tokens = x[:, self.num_prefix_tokens:]
                if norm:
                    patch_tokens = final_norm(patch_tokens)
                maps.append(patch_tokens.reshape(x.shape[0], *self.grid_size, self.embed_dim))
        features = self.norm(x) if self.norm is not None else x
        return features, maps


# ---------------------------------------------------------------------------------------------
# Registered variants. Sizes: ViT paper Table 1 (B, L) and DeiT / AugReg (Ti, S).
# ---------------------------------------------------------------------------------------------

_VARIANTS: dict[str, dict[str, int]] = {
        "ti16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
        "s16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
        "b16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
        "b32": dict(patch_size=32, embed_dim=768, depth=12, num_heads=12),
        "l16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
}
_PAPER = ("Dosovitskiy et al. 2021, An Image is Worth 16x16 Words: Transformers for Image "
          "Recognition at Scale (ICLR), arXiv:2010.11929")
_REFERENCE = ("timm timm/models/vision_transformer.py (structure, names, init); "
              "google-research/big_vision big_vision/models/vit.py")
_INPUT = {"image": ((224, 224, 3), "float32")}


# CPU-sized instance for the all-models test, which feeds `default_input` (224x224): tiny width
# and depth, and 32x32 patches to keep the token count low. One shape for every variant, so the
# test compiles it once.
_TINY = dict(patch_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=10)


vit_ti16 = register_variant(
        "vit_ti16", VisionTransformer, _VARIANTS["ti16"],
        paper=_PAPER, reference=_REFERENCE, default_input=_INPUT,
        config="configs/vit.py:ti16", eval_interpolation="bicubic", tiny=_TINY, paper_params=None,
        notes="ViT-Ti/16 (width 192, depth 12, 3 heads) from DeiT (Touvron et al. 2021); "
              "5,717,416 params = timm vit_tiny_patch16_224. DeiT Table 1 prints '5M' "
              "(rounded down), so no paper count is registered.")


vit_s16 = register_variant(
        "vit_s16", VisionTransformer, _VARIANTS["s16"],
        paper=_PAPER, reference=_REFERENCE, default_input=_INPUT,
        config="configs/vit.py:s16", eval_interpolation="bicubic", tiny=_TINY, paper_params=22.0,
        notes="ViT-S/16 (width 384, depth 12, 6 heads) from DeiT (Touvron et al. 2021, "
              "Table 1: 22M); 22,050,664 params = timm vit_small_patch16_224.")


vit_b16 = register_variant(
        "vit_b16", VisionTransformer, _VARIANTS["b16"],
        paper=_PAPER, reference=_REFERENCE, default_input=_INPUT,
        config="configs/vit.py:b16", eval_interpolation="bicubic", tiny=_TINY, paper_params=86.0,
        notes="ViT-B/16, paper Table 1 (86M); 86,567,656 params = timm "
              "vit_base_patch16_224.")


vit_b32 = register_variant(
        "vit_b32", VisionTransformer, _VARIANTS["b32"],
        paper=_PAPER, reference=_REFERENCE, default_input=_INPUT,
        config="configs/vit.py:b32", eval_interpolation="bicubic", tiny=_TINY, paper_params=None,
        notes="ViT-B/32: 88,224,232 params = timm vit_base_patch32_224. The paper's "
              "86M for ViT-Base does not include the larger 32x32 patch embedding, so "
              "no paper count is registered.")


vit_l16 = register_variant(
        "vit_l16", VisionTransformer, _VARIANTS["l16"],
        paper=_PAPER, reference=_REFERENCE, default_input=_INPUT,
        config="configs/vit.py:l16", eval_interpolation="bicubic", tiny=_TINY, paper_params=307.0,
        notes="ViT-L/16, paper Table 1 (307M); 304,326,632 params = timm "
              "vit_large_patch16_224.")
