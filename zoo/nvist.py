r"""NViST: novel-view synthesis from a single image (Jang & Agapito, CVPR 2024).

"NViST: In the Wild New View Synthesis from a Single Image with Transformers",
arXiv:2312.08568; official code wbjang/nvist_official (`models/decoder.py`, `models/blocks.py`,
`models/renderer.py`, `models/model.py`), whose default configuration this file follows.

Pipeline: image [B, 160, 90, 3] -> MAE ViT-B/5 encoder (zoo/mae.py; every patch, no final
norm) -> features [B, 577, 768] -> decoder -> vector-matrix radiance field -> renderer -> pixel
colours along given rays.

Decoder (`NViSTDecoder`):
  * queries: the encoder's class token followed by 816 output tokens (one learned token,
    N(0, 0.02), repeated), plus a FIXED 2-D sin-cos code on a [48, 17] grid with index offset
    0.5 and a zero row for the class token (NViST's posemb; rows are assigned in raster order
    of that grid, so they are a unique code per token, not the plane layout);
  * keys/values: the 576 patch features + a learned position table (randn * 0.01);
  * camera: [distance, focal / 160] -> [x, sin(2^k pi x), cos(2^k pi x)], k < 4, ordered
    (values, all sines (parameter-major), all cosines) = 18 dims -> Linear(18, 768) -> ReLU
    -> Linear(768, 768) = c;
  * 12 adaLN blocks, even ones cross-attend to the image features, odd ones self-attend:
    (shift, scale, gate) x 2 = Linear(768, 4608)(SiLU(c)); q = norm1(x) * (1 + scale) + shift
    (norm1/norm2 LayerNorms without affine, eps 1e-6); self: k = v = q; cross: k = norm_k(y),
    v = norm_v(y) (affine LNs, present in every block as in the reference, unused in
    self-attention blocks); separate q/k/v/proj Linear(768, 768) with bias, 12 heads, scale
    1/8; x += gate * attn; x += gate * MLP(modulate(norm2(x)));
  * heads: tokens 1..768 -> LN + GELU -> three Linear(768, 3*3*32) (256 tokens each) ->
    unpatchify the [48, 16] token grid of 3x3 patches into a 144 x 48 map -> three 48 x 48
    planes; tokens 769..816 -> LN + GELU -> three Linear(768, 3*32) -> three 48 x 1 lines.
    Channels: 32 = 8 density + 24 colour. Fields are channels-last here ([3, B, 48, 48, 32]).
Renderer (`Renderer`, TensoRF VM as the reference): points normalised from the AABB
[-0.8, 0.8]^3 to [-1, 1]; plane modes (x,y), (z,x), (y,z) and line modes z, y, x, sampled with
bilinear `grid_sample`, align_corners=False, zero padding; sigma = ReLU(sum over modes and the
8 density channels of plane * line); colour features concat_modes(plane_rgb * line_rgb) (72)
-> GELU -> Linear(72, 64) -> GELU -> concat [PE(dir, 4 freqs) (24: sin then cos of
d * 2^k, no pi), dir (3)] -> Linear(91, 64) -> GELU -> Linear(64, 3) -> sigmoid. 48 samples per
ray at the midpoints of 49 uniform edges on [near, far]; in training every edge but the last
moves by U(0, 1) * (far - near) / 48, ONE jitter vector shared by all rays of the call (as the
reference). alpha = 1 - exp(-sigma * delta), T = cumprod(1 - alpha + 1e-10), w = alpha * T;
no white background. Distortion loss (Mip-NeRF 360, `eff_distloss`):
sum_ij w_i w_j |m_i - m_j| + 1/3 sum_i w_i^2 delta_i, averaged over rays.

Sizes (abstract build, tests/models/test_nvist.py): decoder 129,514,368 trainable, encoder
85,115,136, renderer 10,755: 214,640,259 in all (reference config: 214.6M).
Init: all Linear Xavier-uniform with zero bias (the reference's `use_adaln_zero=False`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import kernels_pallas
from kernels_pallas.grid_sample import grid_sample
from zoo import axes, layers
from zoo.axes import with_axes
from zoo.mae import MAEEncoder
from zoo.registry import model_arguments, register_variant

NORM_EPS = 1e-6
MAT_MODES = ((0, 1), (2, 0), (1, 2))
VEC_MODES = (2, 1, 0)


def camera_encoding(camera_params: jax.Array, freqs: int = 4) -> jax.Array:
    """[B, P] -> [B, P + 2 P freqs]: values, sin(2^k pi x), cos(2^k pi x) (parameter-major)."""
    omega = (2.0 ** jnp.arange(freqs)) * math.pi
    angles = (camera_params[..., :, None] * omega).reshape(camera_params.shape[0], -1)
    return jnp.concatenate([camera_params, jnp.sin(angles), jnp.cos(angles)], axis=-1)


class AdaLNBlock(nnx.Module):
    """NViST decoder block (module docstring): adaLN-modulated self- or cross-attention + MLP.

    Inspection (`zoo.capture_attention`): sows `attention_weights` [B, heads, N, M]; in a
    cross-attention block, from each of the N output (3-D) tokens to the M image-patch tokens.
    """

    capture_attention = False

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, attn_impl: str,
                 dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype)
        self.dim, self.num_heads, self.attn_impl = dim, num_heads, attn_impl
        self.norm1 = layers.LayerNorm(dim, eps=NORM_EPS, use_scale=False, use_bias=False,
                                      **common)
        self.norm2 = layers.LayerNorm(dim, eps=NORM_EPS, use_scale=False, use_bias=False,
                                      **common)
        self.norm_k = layers.LayerNorm(dim, eps=NORM_EPS, **common)
        self.norm_v = layers.LayerNorm(dim, eps=NORM_EPS, **common)
        # Six [dim] chunks, split apart below: their concatenation is not a hidden layer that
        # tensor parallelism could split.
        self.modulation = layers.xavier_linear(dim, 6 * dim, ("embed", None), rngs=rngs, **common)
        self.q = layers.xavier_linear(dim, dim, ("embed", "heads"), rngs=rngs, **common)
        self.k = layers.xavier_linear(dim, dim, ("embed", "heads"), rngs=rngs, **common)
        self.v = layers.xavier_linear(dim, dim, ("embed", "heads"), rngs=rngs, **common)
        self.proj = layers.xavier_linear(dim, dim, ("heads", "embed"), rngs=rngs, **common)
        self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), kernel_init=layers.XAVIER_INIT, rngs=rngs,
                              **common)

    def __call__(self, x, c, y=None):
        """x [B, N, D] queries, c [B, D] camera condition, y [B, M, D] (cross-attention)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(
                self.modulation(jax.nn.silu(c)), 6, axis=-1)
        q = self.norm1(x) * (1 + scale_a[:, None]) + shift_a[:, None]
        k, v = (q, q) if y is None else (self.norm_k(y), self.norm_v(y))
        heads = lambda t: axes.constrain(  # noqa: E731
                t.reshape(*t.shape[:2], self.num_heads, -1), axes.QKV)
        queries, keys, values = heads(self.q(q)), heads(self.k(k)), heads(self.v(v))
        if layers.capturing(self):
            self.sow(nnx.Intermediate, "attention_weights",
                     kernels_pallas.attention_weights(queries, keys))
        out = kernels_pallas.attention(queries, keys, values, impl=self.attn_impl)
        x = x + gate_a[:, None] * self.proj(out.reshape(*out.shape[:2], self.dim))
        h = self.norm2(x) * (1 + scale_m[:, None]) + shift_m[:, None]
        return axes.constrain(x + gate_m[:, None] * self.mlp(h), axes.TOKENS)


class NViSTDecoder(nnx.Module):
    """Image features + camera -> vector-matrix field (planes [3,B,R,R,C], lines [3,B,R,1,C])."""

    def __init__(self, *, num_image_tokens: int = 576, dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, resolution: int = 48,
                 patch_size: int = 3, channels: int = 32, camera_freqs: int = 4,
                 attn_impl: str = "auto", dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if resolution % patch_size:
            raise ValueError(f"resolution={resolution} must be divisible by "
                             f"patch_size={patch_size}")
        self.dtype = layers.canonical_dtype(dtype)
        param_dtype = layers.canonical_dtype(param_dtype, "param_dtype")
        common = dict(dtype=self.dtype, param_dtype=param_dtype)
        self.dim, self.resolution, self.patch = dim, resolution, patch_size
        self.channels, self.camera_freqs = channels, camera_freqs
        self.grid = (3 * resolution // patch_size, resolution // patch_size)  # [48, 16]
        self.num_matrix = self.grid[0] * self.grid[1]
        self.num_tokens = self.num_matrix + self.grid[0]  # + 3 lines of 16 tokens
        self.output_token = nnx.Param(with_axes(nnx.initializers.normal(0.02), ("embed",))(
                rngs.params(), (dim,), param_dtype))
        self.image_pos_embed = nnx.Param(with_axes(nnx.initializers.normal(0.01),
                                                   ("pos", "embed"))(
                rngs.params(), (num_image_tokens, dim), param_dtype))
        camera_in = 2 + 2 * 2 * camera_freqs
        self.camera_fc1 = layers.xavier_linear(camera_in, dim, (None, "mlp"), rngs=rngs, **common)
        self.camera_fc2 = layers.xavier_linear(dim, dim, ("mlp", "embed"), rngs=rngs, **common)
        self.blocks = nnx.List([AdaLNBlock(dim, num_heads, mlp_ratio, attn_impl=attn_impl,
                                           rngs=rngs, **common) for _ in range(depth)])
        self.matrix_norm = layers.LayerNorm(dim, eps=NORM_EPS, **common)
        self.vector_norm = layers.LayerNorm(dim, eps=NORM_EPS, **common)
        self.matrix_heads = nnx.List([layers.xavier_linear(dim, patch_size * patch_size * channels,
                                              ("embed", None),
                                              rngs=rngs, **common) for _ in range(3)])
        self.vector_heads = nnx.List([layers.xavier_linear(dim, patch_size * channels, ("embed", None),
                                              rngs=rngs, **common)
                                      for _ in range(3)])

    def position_code(self) -> jax.Array:
        # [48, 17] grid (816 cells) + cls zero row, index offset 0.5 (NViST posemb).
        code = layers.sincos_2d(self.grid[0], self.grid[1] + 1, self.dim, mae_frequencies=True,
                                cls_token=True, offset=0.5)
        return jnp.asarray(code, self.dtype)

    def __call__(self, features, camera_params):
        """features [B, 1 + M, D] (class token first), camera_params [B, 2]."""
        b = features.shape[0]
        cls, y = features[:, :1].astype(self.dtype), features[:, 1:].astype(self.dtype)
        y = y + layers.gathered(self.image_pos_embed[...].astype(self.dtype))
        tokens = jnp.broadcast_to(self.output_token[...].astype(self.dtype),
                                  (b, self.num_tokens, self.dim))
        x = jnp.concatenate([cls, tokens], axis=1) + self.position_code()
        c = camera_encoding(camera_params.astype(jnp.float32), self.camera_freqs)
        c = self.camera_fc2(jax.nn.relu(self.camera_fc1(c.astype(self.dtype))))
        for i, block in enumerate(self.blocks):
            x = block(x, c, y if i % 2 == 0 else None)
        r, p, ch = self.resolution, self.patch, self.channels
        matrix = jax.nn.gelu(self.matrix_norm(x[:, 1:1 + self.num_matrix]), approximate=False)
        per_plane = self.num_matrix // 3
        matrix = jnp.concatenate([head(matrix[:, j * per_plane:(j + 1) * per_plane])
                                  for j, head in enumerate(self.matrix_heads)], axis=1)
        hh, ww = self.grid
        matrix = matrix.reshape(b, hh, ww, p, p, ch).transpose(0, 1, 3, 2, 4, 5)
        planes = matrix.reshape(b, 3, r, r, ch).transpose(1, 0, 2, 3, 4)
        vector = jax.nn.gelu(self.vector_norm(x[:, 1 + self.num_matrix:]), approximate=False)
        per_line = hh // 3
        vector = jnp.concatenate([head(vector[:, j * per_line:(j + 1) * per_line])
                                  for j, head in enumerate(self.vector_heads)], axis=1)
        lines = vector.reshape(b, 3, r, 1, ch).transpose(1, 0, 2, 3, 4)
        return planes.astype(jnp.float32), lines.astype(jnp.float32)


def view_encoding(dirs: jax.Array, freqs: int = 4) -> jax.Array:
    """TensoRF positional_encoding: [..., 3] -> [..., 6 freqs]: sin | cos of d * 2^k."""
    pts = (dirs[..., None] * (2.0 ** jnp.arange(freqs))).reshape(*dirs.shape[:-1], -1)
    return jnp.concatenate([jnp.sin(pts), jnp.cos(pts)], axis=-1)


def distortion_loss(weights, midpoints, intervals):
    """Mip-NeRF 360 distortion loss per ray, mean over rays (exact O(S^2) form)."""
    pair = jnp.abs(midpoints[..., :, None] - midpoints[..., None, :])
    inter = jnp.einsum("...i,...ij,...j->...", weights, pair, weights)
    intra = jnp.sum(weights ** 2 * intervals, axis=-1) / 3.0
    return jnp.mean(inter + intra)


class Renderer(nnx.Module):
    """Vector-matrix radiance field volume renderer (module docstring)."""

    def __init__(self, *, channels: int = 32, sigma_channels: int = 8, feature_dim: int = 64,
                 view_freqs: int = 4, num_samples: int = 48, aabb: float = 0.8,
                 near_far: Sequence[float] = (0.0, 1.5), param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.sigma_channels, self.rgb_channels = sigma_channels, channels - sigma_channels
        self.view_freqs, self.num_samples = view_freqs, int(num_samples)
        self.aabb, self.near_far = float(aabb), (float(near_far[0]), float(near_far[1]))
        if not self.near_far[0] < self.near_far[1]:
            raise ValueError(f"near_far must have near < far, got {near_far!r}")
        common = dict(dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        # A ~10k-parameter MLP per sample point: kept whole under tensor parallelism.
        axes = ("conv_in", "conv_out")
        self.rgb_features = layers.xavier_linear(3 * self.rgb_channels, feature_dim, axes, **common)
        self.rgb_hidden = layers.xavier_linear(feature_dim + 6 * view_freqs + 3, feature_dim, axes, **common)
        self.rgb_out = layers.xavier_linear(feature_dim, 3, axes, **common)

    def sample_depths(self, rng=None):
        """(edges [S + 1], midpoints [S]): jittered (shared by all rays) when rng is given."""
        near, far = self.near_far
        edges = jnp.linspace(near, far, self.num_samples + 1)
        if rng is not None:
            jitter = jax.random.uniform(rng, (self.num_samples + 1,)) * (far - near)
            edges = edges + jnp.where(jnp.arange(self.num_samples + 1) < self.num_samples,
                                      jitter / self.num_samples, 0.0)
        return edges, (edges[1:] + edges[:-1]) / 2

    def field(self, points, dirs, planes, lines):
        """points [B, P, 3] in [-1, 1], dirs [B, P, 3] -> (sigma [B, P], rgb [B, P, 3])."""
        b, p, _ = points.shape
        plane_coords = jnp.stack([points[..., list(m)] for m in MAT_MODES], 1)  # [B, 3, P, 2]
        line_coords = jnp.stack([jnp.stack([jnp.zeros_like(points[..., v]), points[..., v]], -1)
                                 for v in VEC_MODES], 1)
        # Sampled batch-major ([B * 3] images): the batch stays the leading, split axis under a
        # mesh, where a [3 * B] flattening would make XLA gather the whole batch first.
        flat = lambda t: t.reshape(b * 3, *t.shape[2:])  # noqa: E731
        by_batch = lambda t: flat(jnp.swapaxes(t, 0, 1))  # [3, B, ...] -> [B * 3, ...]  # noqa
        plane = grid_sample(by_batch(planes), flat(plane_coords)[:, :, None],
                            align_corners=False)
        line = grid_sample(by_batch(lines), flat(line_coords)[:, :, None], align_corners=False)
        plane, line = plane.reshape(b, 3, p, -1), line.reshape(b, 3, p, -1)
        s = self.sigma_channels
        sigma = jax.nn.relu(jnp.sum(plane[..., :s] * line[..., :s], axis=(1, 3)))
        rgb = plane[..., s:] * line[..., s:]  # [B, 3, P, 24]
        rgb = jnp.concatenate([rgb[:, 0], rgb[:, 1], rgb[:, 2]], axis=-1)
        h = jax.nn.gelu(self.rgb_features(jax.nn.gelu(rgb, approximate=False)),
                        approximate=False)
        h = jnp.concatenate([h, view_encoding(dirs, self.view_freqs), dirs], axis=-1)
        rgb = self.rgb_out(jax.nn.gelu(self.rgb_hidden(h), approximate=False))
        return sigma, jax.nn.sigmoid(rgb)

    def __call__(self, rays_o, rays_d, planes, lines, *, rng=None) -> dict[str, jax.Array]:
        """rays [B, R, 3] (any direction length) -> rgb [B, R, 3], depth, weights, distloss."""
        dirs = rays_d / jnp.linalg.norm(rays_d, axis=-1, keepdims=True)
        edges, mids = self.sample_depths(rng)
        pts = rays_o[..., None, :] + dirs[..., None, :] * mids[:, None]  # [B, R, S, 3]
        b, r, s, _ = pts.shape
        normalised = pts / self.aabb  # AABB [-a, a]^3 -> [-1, 1]
        view = jnp.broadcast_to(dirs[..., None, :], pts.shape)
        sigma, rgb = self.field(normalised.reshape(b, r * s, 3), view.reshape(b, r * s, 3),
                                planes, lines)
        sigma, rgb = sigma.reshape(b, r, s), rgb.reshape(b, r, s, 3)
        delta = edges[1:] - edges[:-1]
        alpha = 1.0 - jnp.exp(-sigma * delta)
        transmittance = jnp.cumprod(jnp.concatenate(
                [jnp.ones_like(alpha[..., :1]), 1.0 - alpha + 1e-10], axis=-1), axis=-1)
        weights = alpha * transmittance[..., :-1]
        return {"rgb": jnp.sum(weights[..., None] * rgb, axis=-2),
                "depth": jnp.sum(weights * mids, axis=-1),
                "weights": weights,
                "distloss": distortion_loss(weights, jnp.broadcast_to(mids, weights.shape),
                                            jnp.broadcast_to(delta, weights.shape))}


class NViST(nnx.Module):
    """Encoder + decoder + renderer. Call: model(images [B,H,W,3], camera_params [B,2],
    rays_o [B,R,3], rays_d [B,R,3], *, rng=None) -> dict(rgb, depth, weights, distloss).

    Rays are in the input camera's frame (input camera at identity rotation, at (0,0,-dist));
    `rng` jitters the sample depths (training)."""

    def __init__(self, *, image_size: Sequence[int] = (160, 90), patch_size: int = 5,
                 encoder_dim: int = 768, encoder_depth: int = 12, encoder_heads: int = 12,
                 decoder_dim: int = 768, decoder_depth: int = 12, decoder_heads: int = 12,
                 resolution: int = 48, decoder_patch_size: int = 3, channels: int = 32,
                 num_samples: int = 48, near_far: Sequence[float] = (0.0, 1.5),
                 aabb: float = 0.8, attn_impl: str = "auto", dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if encoder_dim != decoder_dim:
            raise ValueError(f"encoder_dim ({encoder_dim}) must equal decoder_dim "
                             f"({decoder_dim}): the reference applies no projection between "
                             f"them (apply_decoder_embed=False)")
        common = dict(attn_impl=attn_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = MAEEncoder(image_size=image_size, patch_size=patch_size,
                                  embed_dim=encoder_dim, depth=encoder_depth,
                                  num_heads=encoder_heads, **common)
        self.decoder = NViSTDecoder(num_image_tokens=self.encoder.num_patches, dim=decoder_dim,
                                    depth=decoder_depth, num_heads=decoder_heads,
                                    resolution=resolution, patch_size=decoder_patch_size,
                                    channels=channels, **common)
        self.renderer = Renderer(channels=channels, num_samples=num_samples, near_far=near_far,
                                 aabb=aabb, param_dtype=param_dtype, rngs=rngs)
        self.image_size = self.encoder.image_size

    def radiance_field(self, images, camera_params, *, train: bool = False, rngs=None):
        features, _ = self.encoder(images, apply_norm=False, train=train, rngs=rngs)
        return self.decoder(features, camera_params)

    def __call__(self, images, camera_params, rays_o, rays_d, *, rng=None,
                 train: bool = False, rngs: nnx.Rngs | None = None):
        planes, lines = self.radiance_field(images, camera_params, train=train, rngs=rngs)
        return self.renderer(rays_o, rays_d, planes, lines, rng=rng)


MODEL_ARGS = model_arguments(NViST)

_PAPER = ("Jang & Agapito 2024, NViST: In the Wild New View Synthesis from a Single Image "
          "with Transformers (CVPR), arXiv:2312.08568")
_REFERENCE = "wbjang/nvist_official models/{decoder,blocks,renderer,model}.py"
_INPUT = {"images": ((160, 90, 3), "float32"), "camera_params": ((2,), "float32"),
          "rays_o": ((256, 3), "float32"), "rays_d": ((256, 3), "float32")}
SMALL = dict(encoder_dim=64, encoder_depth=2, encoder_heads=4, decoder_dim=64,
             decoder_depth=2, decoder_heads=4, resolution=24, num_samples=24)
_TINY = dict(image_size=(20, 10), encoder_dim=16, encoder_depth=1, encoder_heads=2,
             decoder_dim=16, decoder_depth=2, decoder_heads=2, resolution=6, num_samples=8)
_TINY_INPUT = {"images": ((20, 10, 3), "float32"), "camera_params": ((2,), "float32"),
               "rays_o": ((16, 3), "float32"), "rays_d": ((16, 3), "float32")}


nvist = register_variant(
        "nvist", NViST,
        weights={"nvist_official": "zoo.converters.nvist:nvist_from_official"},
        paper=_PAPER, reference=_REFERENCE, default_input=_INPUT,
        config="configs/nvist.py:nvist", tiny=_TINY, tiny_input=_TINY_INPUT,
        paper_params=214.6, paper_params_tolerance=0.01,
        notes="Reference config: MAE ViT-B/5 encoder (85,115,136) + decoder "
              "(129,514,368) + renderer (10,755) = 214,640,259 trainable parameters.")


nvist_small = register_variant(
        "nvist_small", NViST, SMALL,
        paper=_PAPER, reference=_REFERENCE, default_input=_INPUT,
        config="configs/nvist.py:smoke", tiny=_TINY, tiny_input=_TINY_INPUT,
        notes="CPU-sized NViST (width 64, 2+2 blocks, 24^3 field, 24 samples per ray) "
              "for the smoke config and tests; same architecture otherwise.")
