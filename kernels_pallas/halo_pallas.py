"""Fused halo attention in Pallas: the GPU (Triton) and TPU (Mosaic) kernels of halo.py.

The kernels use only backend-neutral Pallas (BlockSpecs, ref slices, dots, fori_loop), so the
same code is lowered by Triton (`gpu_halo_attention`) and by Mosaic (`tpu_halo_attention`);
the differences are the compiler parameters and the layout of per-query statistics (Mosaic
wants the last two dims of a block tiled, so they carry a trailing unit axis there).

One program per (batch x head, query-block row, query-block column). The program keeps its
query block in registers and walks the rows of its (block + 2*halo)^2 key/value window one at a
time, reading each row straight from the zero-padded [B*heads, Hp, Wp, d] map (a `win`-long
span padded to a power of two), with an online softmax across rows. So the unfolded window copy
of K/V (~(win/b)^2 = 3x the map for b=8, h=3, what timm's unfold writes) never exists in HBM:
K/V are read from the map once per window that covers them, from L2 in practice.

Relative logits are computed in the kernel, never as a dense [.., q, win^2] tensor:
  * the width term <q, rel_w[win-1 + kx - qx]> is the same for every window row; it is built
    once per program as `block/q_stride` small matmuls against shifted slices of rel_w, one per
    query column qx, each kept for the queries of that column;
  * the height term <q, rel_h[win-1 + ky - qy]> of window row ky is one matmul of the queries
    against the slice rel_h[win-1 + ky - (qb-1) : ...] (qb rows), of which each query keeps the
    column of its own qy (an iota comparison, no gather).
Masking is needed only for the padding columns beyond `win` of each row: the zero halo takes
part in the softmax unmasked, exactly as timm's HaloAttn and `halo_attention_reference`.

Backward (custom_vjp, FlashAttention-2 style, recomputing probabilities from the saved
log-sum-exp; no atomics, so results are deterministic):
  * dQ pass, one program per query block, walking the window rows like the forward: dQ, plus
    this block's gradient of the relative tables. The height-table gradient is gathered as a
    [queries, table rows] matrix (one iota pick per window row, no matmul) and turned into
    table rows with one matmul at the end; the width-table gradient (the sum over window rows
    of dS) goes through one small matmul per query column. The per-block table partials
    ([blocks, ~2*win, d] floats) are summed in XLA.
  * dK/dV pass, one program per b x b key block: the key block lies in the windows of the
    query blocks at most ceil(halo/b) blocks away (3x3 for halo <= b), so the program loops over
    those, recomputes their probabilities for its keys and accumulates dK and dV in registers.
    The relative logits are the query-table products q.rel_h and q.rel_w (one small matmul
    each), from which each query's entry for each key row/column is picked by index (an iota
    comparison per key row, as the dQ pass does). Until 2026-12 they were rebuilt with f32
    one-hot matmuls, one pair per query row/column offset: about 20x the useful backward FLOPs
    at HaloNet-H0 stage 1. Keys of the zero halo are
    not real keys and receive no gradient; their probabilities still enter dQ and the tables.

Supported configurations (others raise ValueError; `supports` says so without raising, and
`halo_attention(impl="auto")` then falls back to XLA): the query block side
`block / q_stride` must be a power of two, so that a query block is a power-of-two tile
(Triton's requirement), and `(block / q_stride)^2 >= 16` (the minimum tile of a GPU dot).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


F32 = jnp.float32
# Triton tiles: every dimension of a loaded or multiplied block is a power of two, and a dot
# needs at least 16 along each dimension.
_MIN_TILE = 16


def _pow2_at_least(n: int, minimum: int = _MIN_TILE) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def unsupported_reason(block: int, halo: int, q_stride: int) -> str | None:
    """Why this kernel cannot run a configuration, or None when it can."""
    del halo
    query_block = block // q_stride
    if block & (block - 1):
        return f"block={block} is not a power of two (key tiles are block x block)"
    if query_block & (query_block - 1):
        return (f"the query block side block/q_stride = {block}/{q_stride} = {query_block} is "
                f"not a power of two")
    if query_block * query_block < _MIN_TILE:
        return (f"the query block has {query_block}x{query_block} < {_MIN_TILE} queries (the "
                f"smallest GPU dot tile)")
    return None


def supports(block: int, halo: int, q_stride: int) -> bool:
    return unsupported_reason(block, halo, q_stride) is None


@dataclasses.dataclass(frozen=True)
class _Static:
    block: int
    halo: int
    q_stride: int
    scale: float
    scale_relative: bool
    head_dim: int
    value_dim: int
    interpret: bool
    # "gpu" (Triton) or "tpu" (Mosaic): the same kernels, lowered by either backend.
    backend: str = "gpu"

    @property
    def row_stat_shape(self) -> tuple[int, ...]:
        """Per-query statistics (log-sum-exp, delta) of one block: Mosaic needs the block's
        last two dims tiled, so on TPU they carry a trailing unit axis."""
        queries = self.query_block * self.query_block
        return (queries, 1) if self.backend == "tpu" else (queries,)

    def compiler_params(self):
        if self.backend == "tpu":
            return None
        # Imported on the GPU path only: the TPU lowering must not depend on Triton's Pallas
        # module (deprecated and absent from some jax builds).
        from jax.experimental.pallas import triton as pl_triton
        return pl_triton.CompilerParams(num_warps=4, num_stages=2)

    @property
    def win(self) -> int:
        return self.block + 2 * self.halo

    @property
    def query_block(self) -> int:
        return self.block // self.q_stride

    @property
    def row_width(self) -> int:  # a window row, padded to a tile
        return _pow2_at_least(self.win)

    @property
    def rel_h_slice(self) -> int:  # rows of rel_h one window row needs, padded to a tile
        return _pow2_at_least(self.query_block)

    @property
    def rel_local_rows(self) -> int:  # table rows one query block touches, padded to a tile
        return _pow2_at_least(self.win - 1 + max(self.query_block, self.row_width))

    @property
    def rel_full_rows(self) -> int:  # the whole 2*win-1 table, padded to a tile
        return _pow2_at_least(2 * self.win - 1)

    @property
    def head_dim_padded(self) -> int:
        return _pow2_at_least(self.head_dim)

    @property
    def value_dim_padded(self) -> int:
        return _pow2_at_least(self.value_dim)


def _dot_t(a, b):
    """a @ b.T accumulated in f32; f32 operands at full precision (no TF32)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=F32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=F32)


def _tile_coordinates(side: int):
    """(row, column) of each position of a side x side tile flattened row-major."""
    rows = lax.div(jnp.arange(side * side, dtype=jnp.int32), jnp.int32(side))
    return rows, jnp.arange(side * side, dtype=jnp.int32) - rows * side


def _width_term(q, rel_w_ref, q_col, static: "_Static"):
    """<q, rel_w[win-1 + kx - qx]> as [queries, row_width]: the same for every window row.
    Query column c reads the table slice rel_w[win-1-c : win-1-c+row_width]."""
    term = jnp.zeros((q.shape[0], static.row_width), F32)
    for column in range(static.query_block):
        table = rel_w_ref[pl.ds(static.win - 1 - column, static.row_width), :]
        term = jnp.where((q_col == column)[:, None], _dot_t(q, table), term)
    return term


def _forward_kernel(q_ref, k_ref, v_ref, rel_h_ref, rel_w_ref, out_ref, lse_ref, *,
                    static: _Static):
    qb, win, row = static.query_block, static.win, static.row_width
    block_row, block_col = pl.program_id(1), pl.program_id(2)
    q = q_ref[...]
    queries = qb * qb
    q_row, q_col = _tile_coordinates(qb)
    cols = jnp.arange(row, dtype=jnp.int32)
    slice_cols = jnp.arange(static.rel_h_slice, dtype=jnp.int32)
    width_term = _width_term(q, rel_w_ref, q_col, static)

    def body(window_row, carry):
        acc, row_max, row_sum = carry
        y = block_row * static.block + window_row
        x = block_col * static.block
        k = k_ref[y, pl.ds(x, row), :]
        v = v_ref[y, pl.ds(x, row), :]
        content = _dot_t(q, k)
        # rel_h rows win-1+ky-qy for qy = qb-1 .. 0 are consecutive: slice column qb-1-qy.
        table = rel_h_ref[pl.ds(win - 1 + window_row - (qb - 1), static.rel_h_slice), :]
        by_row = _dot_t(q, table)
        pick = slice_cols[None, :] == (qb - 1 - q_row)[:, None]
        height_term = jnp.sum(jnp.where(pick, by_row, 0.0), axis=1)
        relative = height_term[:, None] + width_term
        if static.scale_relative:
            s = (content + relative) * static.scale
        else:
            s = content * static.scale + relative
        s = jnp.where((cols < win)[None, :], s, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        correction = jnp.exp(row_max - new_max)
        p = jnp.exp(s - new_max[:, None])
        row_sum = row_sum * correction + jnp.sum(p, axis=1)
        acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
        return acc, new_max, row_sum

    init = (jnp.zeros((queries, static.value_dim_padded), F32),
            jnp.full((queries,), -jnp.inf, F32), jnp.zeros((queries,), F32))
    acc, row_max, row_sum = lax.fori_loop(0, win, body, init)
    out_ref[...] = (acc / row_sum[:, None]).astype(out_ref.dtype)
    lse_ref[...] = (row_max + jnp.log(row_sum)).reshape(lse_ref.shape)


def _pad_last(x, size: int):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def _padded_map(x, static: _Static, dim_padded: int):
    """[B, H, W, heads, d] -> [B*heads, H + 2h, W + 2h + (row - win), d_padded], zeros
    around: the halo, plus spare columns so every padded window row stays in bounds."""
    batch, height, width, heads, _ = x.shape
    h = static.halo
    x = x.transpose(0, 3, 1, 2, 4).reshape(batch * heads, height, width, -1)
    x = jnp.pad(x, [(0, 0), (h, h), (h, h + static.row_width - static.win),
                    (0, dim_padded - x.shape[-1])])
    return x


def _query_blocks(q, static: _Static, dim_padded: int | None = None):
    """[B, Hq, Wq, heads, d] -> [B*heads, blocks_h, blocks_w, qb*qb, d_padded] (d_padded
    defaults to the padded head_dim)."""
    batch, height, width, heads, _ = q.shape
    qb = static.query_block
    q = q.reshape(batch, height // qb, qb, width // qb, qb, heads, -1)
    q = q.transpose(0, 5, 1, 3, 2, 4, 6).reshape(batch * heads, height // qb, width // qb,
                                                 qb * qb, -1)
    return _pad_last(q, static.head_dim_padded if dim_padded is None else dim_padded)


def _row_stat_spec(static: _Static):
    shape = static.row_stat_shape
    return pl.BlockSpec((None, None, None, *shape),
                        lambda n, i, j: (n, i, j) + (0,) * len(shape))


def _forward(q, k, v, rel_h, rel_w, static: _Static):
    batch, height, width, heads, _ = q.shape
    qb, win, row = static.query_block, static.win, static.row_width
    blocks_h, blocks_w = height // qb, width // qb
    queries = qb * qb
    dkp, dvp = static.head_dim_padded, static.value_dim_padded
    q_blocks = _query_blocks(q, static)
    k_map = _padded_map(k, static, dkp)
    v_map = _padded_map(v, static, dvp)
    # Zero rows after the tables keep every fixed-size slice in bounds; they are never picked.
    rel_h_rows = 2 * win - 1 + static.rel_h_slice
    rel_w_rows = max(2 * win - 1, win - 1 + row)
    rel_h = _pad_last(jnp.pad(rel_h, [(0, rel_h_rows - rel_h.shape[0]), (0, 0)]), dkp)
    rel_w = _pad_last(jnp.pad(rel_w, [(0, rel_w_rows - rel_w.shape[0]), (0, 0)]), dkp)
    rel_h, rel_w = rel_h.astype(q.dtype), rel_w.astype(q.dtype)

    grid = (batch * heads, blocks_h, blocks_w)
    tile = lambda n, i, j: (n, i, j, 0, 0)  # noqa: E731
    whole_map = lambda n, i, j: (n, 0, 0, 0)  # noqa: E731
    whole_table = lambda n, i, j: (0, 0)  # noqa: E731
    out, lse = pl.pallas_call(
            functools.partial(_forward_kernel, static=static),
            grid=grid,
            in_specs=[pl.BlockSpec((None, None, None, queries, dkp), tile),
                      pl.BlockSpec((None, *k_map.shape[1:]), whole_map),
                      pl.BlockSpec((None, *v_map.shape[1:]), whole_map),
                      pl.BlockSpec(rel_h.shape, whole_table),
                      pl.BlockSpec(rel_w.shape, whole_table)],
            out_specs=[pl.BlockSpec((None, None, None, queries, dvp), tile),
                       _row_stat_spec(static)],
            out_shape=[jax.ShapeDtypeStruct((batch * heads, blocks_h, blocks_w, queries, dvp),
                                            q.dtype),
                       jax.ShapeDtypeStruct((batch * heads, blocks_h, blocks_w,
                                             *static.row_stat_shape), F32)],
            compiler_params=static.compiler_params(),
            interpret=static.interpret, name="halo_attention_fwd")(
                    q_blocks, k_map, v_map, rel_h, rel_w)
    out = out[..., :static.value_dim].reshape(batch, heads, blocks_h, blocks_w, qb, qb, -1)
    out = out.transpose(0, 2, 4, 3, 5, 1, 6).reshape(batch, height, width, heads, -1)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _halo(q, k, v, rel_h, rel_w, static: _Static):
    return _forward(q, k, v, rel_h, rel_w, static)[0]


def _halo_fwd(q, k, v, rel_h, rel_w, static: _Static):
    out, lse = _forward(q, k, v, rel_h, rel_w, static)
    return out, (q, k, v, rel_h, rel_w, out, lse)


def _halo_bwd(static: _Static, residuals, d_out):
    q, k, v, rel_h, rel_w, out, lse = residuals
    return _backward(q, k, v, rel_h, rel_w, out, lse, d_out, static)


# ----------------------------------------------------------------------------------------------
# backward: a query-centric dQ + dRel pass and a key-centric dK + dV pass, no atomics


def _rel_tables(rel_h, rel_w, static: _Static):
    """Zero-extended tables so every fixed-size slice a kernel takes stays in bounds."""
    win, qb = static.win, static.query_block
    rows = max(2 * win - 1 + static.rel_h_slice, win - qb + static.rel_local_rows,
               static.rel_full_rows, win - 1 + static.row_width)
    dkp = static.head_dim_padded
    extend = lambda t: _pad_last(jnp.pad(t, [(0, rows - t.shape[0]), (0, 0)]), dkp)  # noqa
    return extend(rel_h), extend(rel_w)


def _dq_kernel(q_ref, k_ref, v_ref, rel_h_ref, rel_w_ref, do_ref, lse_ref, delta_ref,
               dq_ref, drel_h_ref, drel_w_ref, *, static: _Static):
    qb, win, row = static.query_block, static.win, static.row_width
    block_row, block_col = pl.program_id(1), pl.program_id(2)
    q, d_out = q_ref[...], do_ref[...]
    queries = qb * qb
    lse, delta = lse_ref[...].reshape(queries), delta_ref[...].reshape(queries)
    q_row, q_col = _tile_coordinates(qb)
    cols = jnp.arange(row, dtype=jnp.int32)
    local = jnp.arange(static.rel_local_rows, dtype=jnp.int32)
    # Height tables as seen from this block: local row u is table row win-qb+u, and query qy
    # of window row ky uses u = qb-1-qy+ky.
    rel_h_local = rel_h_ref[pl.ds(win - qb, static.rel_local_rows), :]
    by_row = _dot_t(q, rel_h_local)
    width_term = _width_term(q, rel_w_ref, q_col, static)
    rel_factor = static.scale if static.scale_relative else 1.0

    def body(window_row, carry):
        dq, height_grad, width_grad = carry
        y = block_row * static.block + window_row
        x = block_col * static.block
        k = k_ref[y, pl.ds(x, row), :]
        v = v_ref[y, pl.ds(x, row), :]
        pick = local[None, :] == (qb - 1 - q_row + window_row)[:, None]
        height_term = jnp.sum(jnp.where(pick, by_row, 0.0), axis=1)
        relative = height_term[:, None] + width_term
        content = _dot_t(q, k)
        if static.scale_relative:
            s = (content + relative) * static.scale
        else:
            s = content * static.scale + relative
        p = jnp.where((cols < win)[None, :], jnp.exp(s - lse[:, None]), 0.0)
        dp = _dot_t(d_out, v)
        ds = p * (dp - delta[:, None])
        dq = dq + _dot(ds.astype(k.dtype), k) * static.scale
        d_relative = ds * rel_factor
        height_grad = height_grad + jnp.where(pick, jnp.sum(d_relative, axis=1)[:, None], 0.0)
        return dq, height_grad, width_grad + d_relative

    init = (jnp.zeros((queries, static.head_dim_padded), F32),
            jnp.zeros((queries, static.rel_local_rows), F32), jnp.zeros((queries, row), F32))
    dq, height_grad, width_grad = lax.fori_loop(0, win, body, init)
    q32 = q.astype(F32)
    dq = dq + _dot(height_grad, rel_h_local.astype(F32))
    drel_h_ref[...] = _dot(height_grad.T, q32)
    # Width: query column c used rel_w[win-1-c+kx]; local row v = kx + qb-1-c.
    drel_w = jnp.zeros((static.rel_local_rows, static.head_dim_padded), F32)
    for column in range(qb):
        table = rel_w_ref[pl.ds(win - 1 - column, row), :].astype(F32)
        grad = jnp.where((q_col == column)[:, None], width_grad, 0.0)
        dq = dq + _dot(grad, table)
        shift = (local[:, None] == cols[None, :] + (qb - 1 - column)).astype(F32)
        drel_w = drel_w + _dot(shift, _dot(grad.T, q32))
    drel_w_ref[...] = drel_w
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, rel_h_ref, rel_w_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, static: _Static, blocks_h: int, blocks_w: int):
    qb, win, block = static.query_block, static.win, static.block
    key_row, key_col = pl.program_id(1), pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    keys, queries = block * block, qb * qb
    key_y, key_x = _tile_coordinates(block)
    q_row, q_col = _tile_coordinates(qb)
    full = jnp.arange(static.rel_full_rows, dtype=jnp.int32)
    rel_h = rel_h_ref[pl.ds(0, static.rel_full_rows), :]
    rel_w = rel_w_ref[pl.ds(0, static.rel_full_rows), :]
    reach = -(-static.halo // block)
    dk = jnp.zeros((keys, static.head_dim_padded), F32)
    dv = jnp.zeros((keys, static.value_dim_padded), F32)
    # Each key block lies in the windows of the query blocks at most `reach` blocks away.
    for di in range(-reach, reach + 1):
        for dj in range(-reach, reach + 1):
            i, j = key_row - di, key_col - dj
            inside = (i >= 0) & (i < blocks_h) & (j >= 0) & (j < blocks_w)
            i_safe = jnp.clip(i, 0, blocks_h - 1)
            j_safe = jnp.clip(j, 0, blocks_w - 1)
            q = q_ref[i_safe, j_safe]
            d_out = do_ref[i_safe, j_safe]
            lse = lse_ref[i_safe, j_safe].reshape(queries)
            delta = delta_ref[i_safe, j_safe].reshape(queries)
            # The keys' row/column inside that query block's window.
            ky = key_y + di * block + static.halo
            kx = key_x + dj * block + static.halo
            in_window = (ky >= 0) & (ky < win) & (kx >= 0) & (kx < win) & inside
            by_row, by_col = _dot_t(q, rel_h), _dot_t(q, rel_w)
            # Key row y of this key block sits at window row di*b + halo + y: its height
            # logit for query (qy, qx) is by_row[., win-1 + di*b + halo + y - qy], one entry
            # per query, picked by index (as the dQ pass does) and spread over that key row;
            # likewise the width logits by key column.
            relative = jnp.zeros((queries, keys), F32)
            for y in range(block):
                height = _pick(by_row, full, win - 1 + di * block + static.halo + y - q_row)
                width = _pick(by_col, full, win - 1 + dj * block + static.halo + y - q_col)
                relative = (relative + jnp.where((key_y == y)[None, :], height[:, None], 0.0)
                            + jnp.where((key_x == y)[None, :], width[:, None], 0.0))
            content = _dot_t(q, k)
            if static.scale_relative:
                s = (content + relative) * static.scale
            else:
                s = content * static.scale + relative
            p = jnp.where(in_window[None, :], jnp.exp(s - lse[:, None]), 0.0)
            dv = dv + _dot(p.T.astype(d_out.dtype), d_out)
            ds = p * (_dot_t(d_out, v) - delta[:, None])
            dk = dk + _dot(ds.T.astype(q.dtype), q) * static.scale
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _pick(table, columns, index):
    """table[i, index[i]] for each row i (0 where index is outside the table): an iota
    comparison and a row sum, no gather and no matmul."""
    return jnp.sum(jnp.where(columns[None, :] == index[:, None], table, 0.0), axis=1)


def _key_blocks(x, block: int, dim_padded: int):
    """[B, H, W, heads, d] -> [B*heads, H/b, W/b, b*b, d_padded] (block-major key tiles)."""
    batch, height, width, heads, _ = x.shape
    x = x.reshape(batch, height // block, block, width // block, block, heads, -1)
    x = x.transpose(0, 5, 1, 3, 2, 4, 6).reshape(batch * heads, height // block,
                                                 width // block, block * block, -1)
    return _pad_last(x, dim_padded)


def _unblock(x, batch, heads, side: int, dim: int):
    """Inverse of `_key_blocks` / `_query_blocks` (tile side `side`), cropped to `dim`."""
    _, blocks_h, blocks_w, _, _ = x.shape
    x = x[..., :dim].reshape(batch, heads, blocks_h, blocks_w, side, side, dim)
    return x.transpose(0, 2, 4, 3, 5, 1, 6).reshape(batch, blocks_h * side, blocks_w * side,
                                                    heads, dim)


def _backward(q, k, v, rel_h, rel_w, out, lse, d_out, static: _Static):
    batch, height, width, heads, dk = q.shape
    dv_dim = v.shape[-1]
    qb, win, block = static.query_block, static.win, static.block
    blocks_h, blocks_w = height // qb, width // qb
    queries, keys = qb * qb, block * block
    dkp, dvp = static.head_dim_padded, static.value_dim_padded
    delta = jnp.sum(out.astype(F32) * d_out.astype(F32), axis=-1)[..., None]
    delta = _query_blocks(delta, static, 1)[..., :1]
    delta = delta.reshape(*delta.shape[:3], *static.row_stat_shape)
    q_blocks = _query_blocks(q, static)
    do_blocks = _query_blocks(d_out, static, dvp)
    rel_h_ext, rel_w_ext = _rel_tables(rel_h.astype(q.dtype), rel_w.astype(q.dtype), static)
    rel_spec = pl.BlockSpec(rel_h_ext.shape, lambda n, i, j: (0, 0))
    tile = lambda n, i, j: (n, i, j, 0, 0)  # noqa: E731
    whole = lambda a: pl.BlockSpec((None, *a.shape[1:]),  # noqa: E731
                                   lambda n, i, j: (n,) + (0,) * (a.ndim - 1))
    grid = (batch * heads, blocks_h, blocks_w)
    params = static.compiler_params()

    k_map = _padded_map(k, static, dkp)
    v_map = _padded_map(v, static, dvp)
    local = static.rel_local_rows
    dq, drel_h, drel_w = pl.pallas_call(
            functools.partial(_dq_kernel, static=static), grid=grid,
            in_specs=[pl.BlockSpec((None, None, None, queries, dkp), tile), whole(k_map),
                      whole(v_map), rel_spec, rel_spec,
                      pl.BlockSpec((None, None, None, queries, dvp), tile),
                      _row_stat_spec(static), _row_stat_spec(static)],
            out_specs=[pl.BlockSpec((None, None, None, queries, dkp), tile),
                       pl.BlockSpec((None, None, None, local, dkp), tile),
                       pl.BlockSpec((None, None, None, local, dkp), tile)],
            out_shape=[jax.ShapeDtypeStruct(q_blocks.shape, q.dtype),
                       jax.ShapeDtypeStruct((*grid, local, dkp), F32),
                       jax.ShapeDtypeStruct((*grid, local, dkp), F32)],
            compiler_params=params, interpret=static.interpret, name="halo_attention_dq")(
                    q_blocks, k_map, v_map, rel_h_ext, rel_w_ext, do_blocks, lse, delta)

    k_blocks, v_blocks = _key_blocks(k, block, dkp), _key_blocks(v, block, dvp)
    d_keys, d_values = pl.pallas_call(
            functools.partial(_dkv_kernel, static=static, blocks_h=blocks_h,
                              blocks_w=blocks_w), grid=grid,
            in_specs=[whole(q_blocks), pl.BlockSpec((None, None, None, keys, dkp), tile),
                      pl.BlockSpec((None, None, None, keys, dvp), tile), rel_spec, rel_spec,
                      whole(do_blocks), whole(lse), whole(delta)],
            out_specs=[pl.BlockSpec((None, None, None, keys, dkp), tile),
                       pl.BlockSpec((None, None, None, keys, dvp), tile)],
            out_shape=[jax.ShapeDtypeStruct(k_blocks.shape, k.dtype),
                       jax.ShapeDtypeStruct(v_blocks.shape, v.dtype)],
            compiler_params=params, interpret=static.interpret, name="halo_attention_dkv")(
                    q_blocks, k_blocks, v_blocks, rel_h_ext, rel_w_ext, do_blocks, lse, delta)

    # Per-block table partials (local row u = table row win-qb+u), summed and placed here.
    rows = 2 * win - 1

    def place(partial):
        total = jnp.sum(partial, axis=(0, 1, 2))[:, :dk]
        total = jnp.pad(total, [(win - qb, 0), (0, 0)])
        total = total[:rows] if total.shape[0] >= rows else jnp.pad(
                total, [(0, rows - total.shape[0]), (0, 0)])
        return total

    return (_unblock(dq, batch, heads, qb, dk),
            _unblock(d_keys, batch, heads, block, dk),
            _unblock(d_values, batch, heads, block, dv_dim),
            place(drel_h).astype(rel_h.dtype), place(drel_w).astype(rel_w.dtype))


_halo.defvjp(_halo_fwd, _halo_bwd)


def gpu_halo_attention(q, k, v, rel_h, rel_w, *, block: int, halo: int, q_stride: int,
                       scale: float, scale_relative: bool, interpret: bool,
                       backend: str = "gpu"):
    """The halo.py kernel contract: attention at the query resolution, [B, H/q_stride,
    W/q_stride, heads, dv] in q.dtype (arguments already checked by `check_halo_arguments`)."""
    reason = unsupported_reason(block, halo, q_stride)
    if reason is not None:
        raise ValueError(f"the fused GPU halo kernel does not support block={block}, "
                         f"halo={halo}, q_stride={q_stride}: {reason}; use impl='xla'")
    static = _Static(block=block, halo=halo, q_stride=q_stride, scale=float(scale),
                     scale_relative=bool(scale_relative), head_dim=q.shape[-1],
                     value_dim=v.shape[-1], interpret=bool(interpret), backend=backend)
    return _halo(q, k, v, rel_h, rel_w, static)


def tpu_halo_attention(q, k, v, rel_h, rel_w, *, block: int, halo: int, q_stride: int,
                       scale: float, scale_relative: bool, interpret: bool):
    """The same kernels lowered by Mosaic for TPUs (the halo.py contract)."""
    return gpu_halo_attention(q, k, v, rel_h, rel_w, block=block, halo=halo,
                              q_stride=q_stride, scale=scale, scale_relative=scale_relative,
                              interpret=interpret, backend="tpu")
