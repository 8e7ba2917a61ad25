"""Halo attention (HaloNet, Vaswani et al. 2021): blocked local self-attention on 2-D maps.

The entry point is `halo_attention`; `halo_attention_reference` is the pure-jnp oracle every
kernel is tested against, and the `impl="xla"` path. The reference unfolds windows with slices
(no gathers) and computes in float32 at Precision.HIGHEST, which makes it exact but not fast on
GPUs. Fused Pallas kernels sit behind the same function, one per backend in `_BACKENDS`
(kernels_pallas/halo_pallas.py: the same Pallas kernels lowered by Triton on GPUs and by Mosaic
on TPUs); a kernel
reads each query block's haloed key/value window straight from the zero-padded map, so the
~(win/b)^2 unfolded copy of K/V is never written to HBM, and computes the relative logits
in-kernel. A kernel module may also define `supports(block, halo, q_stride)`; where it returns
False, impl="auto" uses the reference and impl="pallas" raises.

Kernel contract (what a `_BACKENDS` function receives, after `check_halo_arguments`):
    kernel(q, k, v, rel_h, rel_w, *, block, halo, q_stride, scale, scale_relative,
           interpret) -> [B, H/q_stride, W/q_stride, heads, dv] in q.dtype
i.e. attention at the query resolution only; the average pooling of the `q_stride == 1,
stride > 1` mode is applied here, in XLA, after the kernel. Kernels are differentiable
(custom_vjp) in q, k, v, rel_h and rel_w.

Semantics (timm's `HaloAttn`, `timm/layers/halo_attn.py`, reproduced exactly so timm weights
map one to one):
  * The key/value map [B, H, W, heads, d] is cut into non-overlapping `block` x `block` query
    blocks; the keys and values of a block are the (block + 2*halo)^2 window centred on it
    (win = block + 2*halo). Outside the image the window reads zeros, and those zero keys are
    NOT masked: they take part in the softmax with logit 0 + their relative-position term.
  * Relative logits are factorised over height and width and depend on the query:
        logit(i, j) = scale * <q_i, k_j> + <q_i, rel_h[win-1 + ky_j - qy_i]>
                                          + <q_i, rel_w[win-1 + kx_j - qx_i]>
    with ky, kx the key's row/column inside its window (0 .. win-1) and qy, qx the query's
    row/column inside its block (0 .. query_block-1). Tables have 2*win - 1 rows of head_dim
    entries and are shared by all heads. The relative term is NOT multiplied by `scale`
    unless `scale_relative=True` (timm's `scale_pos_embed`).
  * Strided attention (down-sampling by `stride`): when `block % stride == 0` (and not
    `avg_down`) the queries are subsampled, so `q` comes at [H/stride, W/stride] (the caller
    applies its query projection to x[:, ::stride, ::stride], as timm's strided 1x1 conv
    does); each block then holds (block/stride)^2 queries and the relative index uses the
    query's row/column in that subsampled block (timm's convention, not the pixel offset).
    Otherwise attention runs at full resolution and the output is average-pooled over
    non-overlapping stride x stride windows.
  * The softmax runs over the win^2 keys of the window; math is float32 whatever the input
    dtype (dots at Precision.HIGHEST); the result is cast back to q.dtype.
  * There is no output projection here: in HaloNet the block's BN-ReLU and 1x1 conv that
    follow play that role.

Shapes: q [B, Hq, Wq, heads, dk], k [B, H, W, heads, dk], v [B, H, W, heads, dv]
-> [B, H/stride, W/stride, heads, dv].
"""
from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import sharding

HALO_IMPLS = ("auto", "xla", "pallas", "interpret")
# backend -> (module, function) of its fused kernel; imported lazily because a backend's kernel
# module may import backend-only Pallas modules.
_BACKENDS = {
        "gpu": ("kernels_pallas.halo_pallas", "gpu_halo_attention"),
        "tpu": ("kernels_pallas.halo_pallas", "tpu_halo_attention"),
}
# The kernel "interpret" runs (the Pallas interpreter works on any backend, including CPU).
_INTERPRET_BACKEND = "gpu"
_HIGHEST = jax.lax.Precision.HIGHEST
# Logical activation names of q/k/v and the output [B, H, W, heads, d] (sharding.py).
_MAP_NAMES = (sharding.BATCH, None, None, sharding.HEADS, None)


def query_stride(block: int, stride: int, avg_down: bool = False) -> int:
    """How much the queries are subsampled: `stride` when the block splits evenly, else 1.

    When it returns 1 for `stride > 1`, the attention output is average-pooled instead.
    """
    if stride > 1 and not avg_down and block % stride == 0:
        return stride
    return 1


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _check_map(name: str, x) -> tuple[int, ...]:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an array [batch, height, width, heads, head_dim], "
                         f"got {type(x).__name__}")
    if x.ndim != 5:
        raise ValueError(f"{name} must be 5-D [batch, height, width, heads, head_dim], got "
                         f"shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    return tuple(x.shape)


def check_halo_arguments(q, k, v, rel_h, rel_w, *, block, halo, stride, scale, avg_down):
    """Validates shapes and options before anything is traced; returns the static options."""
    block = _positive_int("block", block)
    halo = _positive_int("halo", halo, minimum=0)
    stride = _positive_int("stride", stride)
    if not isinstance(avg_down, (bool, np.bool_)):
        raise ValueError(f"avg_down must be a bool, got {avg_down!r}")
    q_shape, k_shape, v_shape = (_check_map("q", q), _check_map("k", k), _check_map("v", v))
    batch, height, width, heads, head_dim = k_shape
    if v_shape[:4] != k_shape[:4]:
        raise ValueError(f"v must match k in [batch, height, width, heads] = {k_shape[:4]}, "
                         f"got v shape {v_shape}")
    if height % block or width % block:
        raise ValueError(f"the key/value map height and width must be multiples of block="
                         f"{block}, got {height}x{width} (k shape {k_shape})")
    q_stride = query_stride(block, stride, bool(avg_down))
    if q_stride == 1 and stride > 1 and (height % stride or width % stride):
        raise ValueError(f"with block={block} not divisible by stride={stride} (or avg_down) "
                         f"the output is average-pooled by {stride}, so height and width must "
                         f"be multiples of {stride}; got {height}x{width}")
    expected_q = (batch, height // q_stride, width // q_stride, heads, head_dim)
    if q_shape != expected_q:
        raise ValueError(f"q must have shape [batch, H/{q_stride}, W/{q_stride}, heads, "
                         f"head_dim] = {expected_q} for k shape {k_shape}, block={block}, "
                         f"stride={stride}, avg_down={bool(avg_down)}; got {q_shape}")
    win = block + 2 * halo
    for name, table in (("rel_h", rel_h), ("rel_w", rel_w)):
        shape = tuple(getattr(table, "shape", ()))
        if shape != (2 * win - 1, head_dim):
            raise ValueError(f"{name} must have shape (2*(block+2*halo)-1, head_dim) = "
                             f"({2 * win - 1}, {head_dim}), got {shape}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif (isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real)
          or not scale > 0):
        raise ValueError(f"scale must be None or a positive Python float, got {scale!r}")
    return dict(block=block, halo=halo, stride=stride, q_stride=q_stride,
                scale=float(scale), avg_down=bool(avg_down))


def halo_attention(q, k, v, rel_h, rel_w, *, block: int, halo: int, stride: int = 1,
                   scale: float | None = None, scale_relative: bool = False,
                   avg_down: bool = False, impl: str = "auto"):
    """Halo attention on [batch, height, width, heads, head_dim] maps (see module docstring).

    Args:
        q: queries [B, H/s, W/s, heads, dk] where s = `query_stride(block, stride, avg_down)`.
        k: keys [B, H, W, heads, dk]; H and W multiples of `block`.
        v: values [B, H, W, heads, dv].
        rel_h, rel_w: relative-position tables [2*(block + 2*halo) - 1, dk].
        block: query block side b.
        halo: halo width h (the key window is b + 2h square).
        stride: output down-sampling factor (see module docstring for the two modes).
        scale: logits scale, default dk ** -0.5.
        scale_relative: also multiply the relative logits by `scale`.
        avg_down: always down-sample by average pooling, never by strided queries.
        impl: "xla" (pure jnp, `halo_attention_reference`), "pallas" (the fused kernel of
            the current backend), "interpret" (the GPU kernel in the Pallas interpreter, any
            backend) or "auto" (pallas where the backend has a kernel that supports the
            configuration, xla elsewhere).

    Returns:
        [B, H/stride, W/stride, heads, dv] in q.dtype.
    """
    resolved = resolve_halo_impl(impl)
    options = check_halo_arguments(q, k, v, rel_h, rel_w, block=block, halo=halo,
                                   stride=stride, scale=scale, avg_down=avg_down)
    if resolved != "xla":
        backend = _INTERPRET_BACKEND if resolved == "interpret" else jax.default_backend()
        module_name, function_name = _BACKENDS[backend]
        import importlib
        module = importlib.import_module(module_name)
        supports = getattr(module, "supports", None)
        if (impl == "auto" and supports is not None
                and not supports(options["block"], options["halo"], options["q_stride"])):
            resolved = "xla"
    if resolved == "xla":
        return halo_attention_reference(q, k, v, rel_h, rel_w, block=block, halo=halo,
                                        stride=stride, scale=scale,
                                        scale_relative=scale_relative, avg_down=avg_down)
    kernel = functools.partial(
            getattr(module, function_name), block=options["block"], halo=options["halo"],
            q_stride=options["q_stride"], scale=options["scale"],
            scale_relative=bool(scale_relative), interpret=resolved == "interpret")
    # Inside a mesh the kernel runs per shard (kernels_pallas/sharding.py): batch and heads
    # split, the map whole (a window reads its neighbours), the tables replicated.
    out = sharding.shard_kernel(kernel, (q, k, v, rel_h, rel_w),
                                (_MAP_NAMES, _MAP_NAMES, _MAP_NAMES, None, None), _MAP_NAMES,
                                what="halo_attention")
    return _average_pool(out, options["stride"], options["q_stride"])


def resolve_halo_impl(impl: str) -> str:
    """"auto" -> "pallas" on a backend with a halo kernel (GPU, TPU), "xla" elsewhere; checks
    the value and the backend."""
    if impl not in HALO_IMPLS:
        raise ValueError(f"impl must be one of {HALO_IMPLS}, got {impl!r}")
    backend = jax.default_backend()
    if impl == "auto":
        return "pallas" if backend in _BACKENDS else "xla"
    if impl == "pallas" and backend not in _BACKENDS:
        raise ValueError(f"impl='pallas' needs a GPU or TPU backend (the halo kernels are "
                         f"{sorted(_BACKENDS)}), this process runs on "
                         f"{backend!r}; use impl='interpret' (the GPU kernel, interpreted) or "
                         f"impl='xla'")
    return impl


def _average_pool(out, stride: int, q_stride: int):
    """The down-sampling of strided attention when queries were not subsampled: mean over
    non-overlapping stride x stride windows of the full-resolution output."""
    if stride == 1 or q_stride != 1:
        return out
    batch, height, width, heads, value_dim = out.shape
    pooled = out.astype(jnp.float32).reshape(batch, height // stride, stride, width // stride,
                                             stride, heads, value_dim).mean(axis=(2, 4))
    return pooled.astype(out.dtype)


def _unfold_axis(x, axis: int, block: int, halo: int):
    """Splits `axis` (length n*block) into [n, block + 2*halo] overlapping zero-padded windows.

    Built from slices of the block-reshaped axis rather than a gather, so that the backward
    pass is slicing and padding too (a gather's scatter-add backward compiles and runs much
    slower on CPU).
    """
    length = x.shape[axis]
    blocks = length // block
    reach = -(-halo // block)  # neighbouring blocks a window reaches into, each side
    pad = [(0, 0)] * x.ndim
    pad[axis] = (reach * block, reach * block)
    x = jnp.pad(x, pad)
    x = x.reshape(*x.shape[:axis], blocks + 2 * reach, block, *x.shape[axis + 1:])
    # Window i = blocks i-reach .. i+reach (padded indices i .. i+2*reach), concatenated.
    neighbours = [jax.lax.slice_in_dim(x, offset, offset + blocks, axis=axis)
                  for offset in range(2 * reach + 1)]
    x = jnp.concatenate(neighbours, axis=axis + 1)  # [.., n, (2*reach+1)*block, ..]
    start = reach * block - halo
    return jax.lax.slice_in_dim(x, start, start + block + 2 * halo, axis=axis + 1)


def _windows(x, block: int, halo: int):
    """[B, H, W, heads, d] -> [B, H/b, W/b, heads, win*win, d] zero-padded halo windows."""
    batch, height, width, heads, dim = x.shape
    win = block + 2 * halo
    x = _unfold_axis(x, 1, block, halo)  # [B, nbh, win, W, heads, d]
    x = _unfold_axis(x, 3, block, halo)  # [B, nbh, win, nbw, win, heads, d]
    x = x.transpose(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(batch, height // block, width // block, heads, win * win, dim)


def _relative_to_absolute(x, win: int):
    """[..., n, 2*win-1] indexed by relative offset -> [..., n, win] indexed by key position:
    out[..., p, k] = x[..., p, win-1 + k - p] (n <= win).

    The pad-flatten-reshape shift of Attention Augmented Convolutions (Bello et al. 2019),
    also used by timm: only pads, reshapes and slices, so it compiles and differentiates far
    faster than a gather or a one-hot contraction with a batch axis in the middle.
    """
    *lead, n, rows = x.shape
    no_pad = [(0, 0)] * len(lead)
    x = jnp.pad(x, no_pad + [(0, 0), (0, 1)]).reshape(*lead, n * (rows + 1))
    x = jnp.pad(x, no_pad + [(0, rows - n)]).reshape(*lead, n + 1, rows)
    return x[..., :n, win - 1:]


def _relative_logits(queries, rel_h, rel_w, query_block: int, win: int):
    """<q, rel_h[win-1 + ky - qy]> + <q, rel_w[win-1 + kx - qx]> as [..., qb^2, win^2]."""
    lead = queries.shape[:-2]
    rows = 2 * win - 1
    by_row = jnp.einsum("...qd,rd->...qr", queries, rel_h, precision=_HIGHEST)
    by_col = jnp.einsum("...qd,rd->...qr", queries, rel_w, precision=_HIGHEST)
    by_row = by_row.reshape(*lead, query_block, query_block, rows)
    by_col = by_col.reshape(*lead, query_block, query_block, rows)
    # Rows: shift along qy (moved next to the table axis), columns: along qx.
    rel_rows = _relative_to_absolute(jnp.swapaxes(by_row, -3, -2), win)  # [.., qx, qy, ky]
    rel_rows = jnp.swapaxes(rel_rows, -3, -2)  # [..., qy, qx, ky]
    rel_cols = _relative_to_absolute(by_col, win)  # [..., qy, qx, kx]
    relative = rel_rows[..., :, None] + rel_cols[..., None, :]  # [..., qy, qx, ky, kx]
    return relative.reshape(*lead, query_block * query_block, win * win)


def halo_attention_reference(q, k, v, rel_h, rel_w, *, block: int, halo: int, stride: int = 1,
                             scale: float | None = None, scale_relative: bool = False,
                             avg_down: bool = False):
    """Pure-jnp halo attention by explicit unfolding; the oracle. Same contract as
    `halo_attention`."""
    options = check_halo_arguments(q, k, v, rel_h, rel_w, block=block, halo=halo,
                                   stride=stride, scale=scale, avg_down=avg_down)
    return _reference_core(q, k, v, rel_h, rel_w, block=options["block"],
                           halo=options["halo"], stride=options["stride"],
                           q_stride=options["q_stride"], scale=options["scale"],
                           scale_relative=bool(scale_relative))


def halo_attention_weights(q, k, rel_h, rel_w, *, block: int, halo: int, stride: int = 1,
                           scale: float | None = None, scale_relative: bool = False,
                           avg_down: bool = False):
    """Softmax weights of `halo_attention` with the same arguments (no values needed):
    float32 [B, blocks_h, blocks_w, heads, query_block**2, window**2], where query_block =
    block / query stride and window = block + 2 * halo; queries and keys in raster order within
    their block and window. For inspection (`zoo.capture_attention`): the reference, always."""
    options = check_halo_arguments(q, k, k, rel_h, rel_w, block=block, halo=halo, stride=stride,
                                   scale=scale, avg_down=avg_down)
    return _halo_weights(q, k, rel_h, rel_w, block=options["block"], halo=options["halo"],
                         q_stride=options["q_stride"], scale=options["scale"],
                         scale_relative=bool(scale_relative))


def _halo_weights(q, k, rel_h, rel_w, *, block, halo, q_stride, scale, scale_relative):
    batch, height, width, heads, _ = k.shape
    win = block + 2 * halo
    query_block = block // q_stride
    blocks_h, blocks_w = height // block, width // block
    f32 = jnp.float32
    # Layout [B, block row, block column, head, position in block/window, channel]: every
    # product below is then a plain batched matmul.
    queries = q.astype(f32).reshape(batch, blocks_h, query_block, blocks_w, query_block, heads,
                                    -1).transpose(0, 1, 3, 5, 2, 4, 6)
    queries = queries.reshape(batch, blocks_h, blocks_w, heads, query_block * query_block, -1)
    keys = _windows(k.astype(f32), block, halo)
    content = jnp.einsum("...qd,...kd->...qk", queries, keys, precision=_HIGHEST)
    relative = _relative_logits(queries, rel_h.astype(f32), rel_w.astype(f32), query_block,
                                win)
    if scale_relative:
        logits = (content + relative) * scale
    else:
        logits = content * scale + relative
    return jax.nn.softmax(logits, axis=-1)


# Jitted so that eager (un-jitted) model calls compile the whole computation once per shape
# instead of once per primitive; inside an outer jit it is simply inlined.
@functools.partial(jax.jit, static_argnames=("block", "halo", "stride", "q_stride", "scale",
                                             "scale_relative"))
def _reference_core(q, k, v, rel_h, rel_w, *, block, halo, stride, q_stride, scale,
                    scale_relative):
    batch, height, width, heads, _ = k.shape
    value_dim = v.shape[-1]
    query_block = block // q_stride
    blocks_h, blocks_w = height // block, width // block
    weights = _halo_weights(q, k, rel_h, rel_w, block=block, halo=halo, q_stride=q_stride,
                            scale=scale, scale_relative=scale_relative)
    values = _windows(v.astype(jnp.float32), block, halo)
    out = jnp.einsum("...qk,...ke->...qe", weights, values, precision=_HIGHEST)
    # Fold blocks back: [B, bh, bw, heads, qy, qx, e] -> [B, bh*qy, bw*qx, heads, e].
    out = out.reshape(batch, blocks_h, blocks_w, heads, query_block, query_block, value_dim)
    out = out.transpose(0, 1, 4, 2, 5, 3, 6).reshape(
            batch, blocks_h * query_block, blocks_w * query_block, heads, value_dim)
    return _average_pool(out, stride, q_stride).astype(q.dtype)
