"""Masked autoencoder ViT (He et al. 2022), as NViST uses it: the image encoder of zoo/nvist.py
and, on its own, the masked-reconstruction model NViST fine-tunes on multi-view data first.

Follows NViST's `models/mae_original_model.py` (itself the MAE reference): patch embedding
conv, a class token (N(0, 0.02)), FIXED 2-D sin-cos position embedding with a zero row for the
class token (the MAE layout: the first half of the channels encodes the column, the second the
row, each as [sin | cos] with frequencies 10000^(-k / (D/4))), pre-LN ViT blocks (fused qkv
with bias, exact GELU, LayerNorm eps 1e-6), final LayerNorm. Masking is MAE's: per example a
random permutation keeps the first (1 - mask_ratio) of the patches. The reconstruction
decoder (width 512, depth 8, 16 heads in NViST's MAE stage) predicts the pixels of every patch;
the loss is the MSE over masked patches (optionally on per-patch normalised pixels).

Images are NHWC; NViST's are portrait 160 x 90 (H x W), patch 5: 32 x 18 = 576 patches.
Linear kernels are Xavier-uniform with zero bias and the patch conv is Xavier-uniform over
its flattened fan, as the reference's `initialize_weights`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo import axes, layers
from zoo.axes import with_axes
from zoo.registry import register_variant
from zoo.vit import Block



def _mae_code(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """MAE's fixed 2-D sin-cos code with a zero class-token row (MAE's frequencies)."""
    return layers.sincos_2d(grid_h, grid_w, dim, mae_frequencies=True, cls_token=True)


def _xavier_conv(key, shape, dtype=jnp.float32):
    """Xavier-uniform over the conv's flattened [out, in*kh*kw] view, as MAE initialises it."""
    kh, kw, cin, cout = shape
    fan_in, fan_out = kh * kw * cin, cout
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class MAEEncoder(nnx.Module):
    """ViT encoder with a fixed sin-cos code and optional MAE masking."""

    def __init__(self, *, image_size: int | Sequence[int] = (160, 90), patch_size: int = 5,
                 in_chans: int = 3, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, norm_eps: float = 1e-6, attn_impl: str = "auto",
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.dtype = layers.canonical_dtype(dtype)
        param_dtype = layers.canonical_dtype(param_dtype, "param_dtype")
        common = dict(dtype=self.dtype, param_dtype=param_dtype)
        self.embed_dim = layers.check_positive_int(embed_dim, "embed_dim")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        self.patch_embed = layers.PatchEmbed(image_size, patch_size, in_chans, embed_dim,
                                             rngs=rngs, **common)
        self.patch_embed.kernel.set_value(_xavier_conv(
                rngs.params(), self.patch_embed.kernel.shape, param_dtype))
        self.patch_embed.bias.set_value(jnp.zeros_like(self.patch_embed.bias[...]))
        self.grid_size = self.patch_embed.grid_size
        self.image_size = self.patch_embed.image_size
        self.cls_token = nnx.Param(with_axes(nnx.initializers.normal(0.02),
                                             (None, None, "embed"))(
                rngs.params(), (1, 1, embed_dim), param_dtype))
        self.blocks = nnx.List([
                Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps,
                      attn_impl=attn_impl, rngs=rngs, **common) for _ in range(depth)])
        for block in self.blocks:
            _xavier_linears(block, rngs)
        self.norm = layers.LayerNorm(embed_dim, eps=norm_eps, **common)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def position_code(self) -> jax.Array:
        return jnp.asarray(_mae_code(*self.grid_size, self.embed_dim), self.dtype)

    def __call__(self, images, *, mask_ratio: float = 0.0, rng=None, apply_norm: bool = True,
                 train: bool = False, rngs: nnx.Rngs | None = None):
        """images [B, H, W, C] -> (tokens [B, 1 + kept, D], keep_ids [B, kept] or None).

        With mask_ratio > 0 (needs `rng`) only a random (1 - mask_ratio) of the patches is
        encoded; keep_ids lists them. NViST encodes every patch and skips the final norm
        (apply_norm=False).
        """
        if images.ndim != 4 or tuple(images.shape[1:3]) != self.image_size:
            raise ValueError(f"MAEEncoder expects images [B, {self.image_size[0]}, "
                             f"{self.image_size[1]}, C], got {images.shape}")
        b = images.shape[0]
        code = self.position_code()
        x = self.patch_embed(images.astype(self.dtype)).reshape(b, -1, self.embed_dim)
        x = x + code[1:]
        keep_ids = None
        if mask_ratio > 0:
            if rng is None:
                raise ValueError("masking (mask_ratio > 0) needs `rng`")
            keep = int(round(self.num_patches * (1.0 - mask_ratio)))
            noise = jax.random.uniform(rng, (b, self.num_patches))
            keep_ids = jnp.argsort(noise, axis=1)[:, :keep]
            x = jnp.take_along_axis(x, keep_ids[..., None], axis=1)
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype) + code[:1],
                               (b, 1, self.embed_dim))
        x = axes.constrain(jnp.concatenate([cls, x], axis=1), axes.TOKENS)
        for block in self.blocks:
            x = block(x, train=train, rngs=rngs)
        return (self.norm(x) if apply_norm else x), keep_ids


def _xavier_linears(module: nnx.Module, rngs: nnx.Rngs) -> None:
    """Re-initialise every Linear kernel of `module` Xavier-uniform (its 2-D view), bias 0."""
    for _, sub in nnx.iter_graph(module):
        if isinstance(sub, layers.Linear):
            shape = sub.kernel.shape
            flat = (shape[0], int(np.prod(shape[1:])))
            sub.kernel.set_value(layers.XAVIER_INIT(rngs.params(), flat, sub.kernel.dtype).reshape(shape))
            if sub.bias is not None:
                sub.bias.set_value(jnp.zeros_like(sub.bias[...]))


class MAE(nnx.Module):
    """Encoder + MAE reconstruction decoder. Call: model(images) -> (pred [B, L, p*p*C],
    mask [B, L] with 1 = masked); `loss(images, rng)` is the MAE objective."""

    def __init__(self, *, image_size: int | Sequence[int] = (160, 90), patch_size: int = 5,
                 in_chans: int = 3, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 mlp_ratio: float = 4.0, mask_ratio: float = 0.75, norm_pix_loss: bool = False,
                 attn_impl: str = "auto", dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
        self.mask_ratio, self.norm_pix_loss = float(mask_ratio), bool(norm_pix_loss)
        self.encoder = MAEEncoder(image_size=image_size, patch_size=patch_size,
                                  in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                                  num_heads=num_heads, mlp_ratio=mlp_ratio, attn_impl=attn_impl,
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = self.encoder.dtype
        common = dict(dtype=self.dtype, param_dtype=param_dtype)
        self.patch = self.encoder.patch_embed.patch_size
        self.decoder_dim = decoder_dim
        self.decoder_embed = layers.Linear(embed_dim, decoder_dim, axes=("embed", None),
                                           kernel_init=layers.XAVIER_INIT, rngs=rngs, **common)
        self.mask_token = nnx.Param(with_axes(nnx.initializers.normal(0.02),
                                              (None, None, "embed"))(
                rngs.params(), (1, 1, decoder_dim), param_dtype))
        self.decoder_blocks = nnx.List([
                Block(decoder_dim, decoder_heads, mlp_ratio=mlp_ratio, attn_impl=attn_impl,
                      rngs=rngs, **common) for _ in range(decoder_depth)])
        for block in self.decoder_blocks:
            _xavier_linears(block, rngs)
        self.decoder_norm = layers.LayerNorm(decoder_dim, eps=1e-6, **common)
        self.decoder_pred = layers.Linear(decoder_dim, self.patch[0] * self.patch[1] * in_chans,
                                          axes=("embed", None), kernel_init=layers.XAVIER_INIT, rngs=rngs,
                                          **common)

    def patchify(self, images):
        """[B, H, W, C] -> [B, L, p*p*C] (patch rows, then columns, then channels)."""
        b, h, w, c = images.shape
        (ph, pw), (gh, gw) = self.patch, self.encoder.grid_size
        x = images.reshape(b, gh, ph, gw, pw, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, gh * gw, ph * pw * c)

    def __call__(self, images, *, rng=None, train: bool = False, rngs: nnx.Rngs | None = None):
        rng = rng if rng is not None else jax.random.key(0)
        tokens, keep_ids = self.encoder(images, mask_ratio=self.mask_ratio, rng=rng,
                                        train=train, rngs=rngs)
        b, n = images.shape[0], self.encoder.num_patches
        x = self.decoder_embed(tokens)
        slots = jnp.broadcast_to(self.mask_token[...].astype(self.dtype), (b, n, self.decoder_dim))
        mask = jnp.ones((b, n), jnp.float32)
        if keep_ids is not None:
            # Per example (vmap): the scatter then has a batch dimension XLA can keep split
            # over the data axes; explicit row indices would make it gather the whole batch.
            put = jax.vmap(lambda target, ids, values: target.at[ids].set(values))
            slots = put(slots, keep_ids, x[:, 1:])
            mask = put(mask, keep_ids, jnp.zeros(keep_ids.shape, mask.dtype))
        else:
            slots, mask = x[:, 1:], jnp.zeros((b, n), jnp.float32)
        code = jnp.asarray(_mae_code(*self.encoder.grid_size, self.decoder_dim), self.dtype)
        x = jnp.concatenate([x[:, :1], slots], axis=1) + code
        for block in self.decoder_blocks:
            x = block(x, train=train, rngs=rngs)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:].astype(jnp.float32), mask

    def loss(self, images, rng, *, train: bool = True, rngs=None):
        """MSE over the masked patches (pixels normalised per patch if norm_pix_loss)."""
        pred, mask = self(images, rng=rng, train=train, rngs=rngs)
        target = self.patchify(images.astype(jnp.float32))
        if self.norm_pix_loss:
            mean = target.mean(-1, keepdims=True)
            var = target.var(-1, keepdims=True)
            target = (target - mean) / jnp.sqrt(var + 1e-6)
        per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
        return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


_PAPER = ("He et al. 2022, Masked Autoencoders Are Scalable Vision Learners (CVPR); as used by "
          "Jang & Agapito 2024, NViST (CVPR)")
_REFERENCE = "wbjang/nvist_official models/mae_original_model.py; facebookresearch/mae"


mae_vit_b5 = register_variant(
        "mae_vit_b5", MAE,
        paper=_PAPER, reference=_REFERENCE,
        default_input={"images": ((160, 90, 3), "float32")},
        config="configs/nvist.py:mae_smoke",
        tiny=dict(image_size=(20, 10), embed_dim=16, depth=1, num_heads=2,
                  decoder_dim=16, decoder_depth=1, decoder_heads=2),
        tiny_input={"images": ((20, 10, 3), "float32")},
        notes="MAE ViT-B/5 on 160x90 (576 patches), decoder 512/8/16 as NViST's MAE "
              "fine-tuning stage; encoder 85,115,136 trainable parameters (the fixed "
              "sin-cos codes are not parameters).")
