r"""Halo attention: the fused Pallas kernel vs the XLA unfold reference, at HaloNet stage shapes.

  python bench/halo.py            # GPU: full HaloNet-H0/H4 stage grid
  python bench/halo.py --quick    # CPU proof-of-run (< 2 min); "fused" is the Pallas interpreter

For each shape and mode (fwd, fwd+bwd) it prints the median wall time of `--repeats` runs
(after a compile-and-warm-up call) and the compiled peak memory estimate from
`compiled.memory_analysis()` (temp + output bytes). On CPU the fused kernel can only run in the
Pallas interpreter, which says nothing about GPU speed: the table header says so.

Baseline: the XLA unfold reference in the same dtype, bfloat16 by default (what a HaloNet
trains in; `--dtype float32` for the f32 figures). FLOPs: "useful" counts the dense work of
halo attention itself (q.k and p.v over each query's win^2 window, the two relative-table
products; the backward as the dV, dP, dQ, dK products plus the table gradients), from which
the TFLOP/s columns are computed. "dkv rel" counts the matmul FLOPs the fused backward's dK/dV
pass spends rebuilding the relative logits of its keys (kernels_pallas/halo_pallas.py: the
query-table products of every covering query block; the entries are then picked by index,
element-wise work not counted), as a multiple of the useful backward FLOPs. The one-hot matmuls
it used before 2026-12 cost `dkv_one_hot_flops` (20.7x at HaloNet-H0 stage 1).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import compile_and_time, mib  # noqa: E402
from kernels_pallas import halo  # noqa: E402

# (label, batch, map side, block, halo, heads, head_dim, stride): HaloNet stages at 256 px
# (H0: b=8, h=3; H4: b=8, h=3 with wider stages; rv=1 keeps dv = dk). papers.md §2.2.
FULL_SHAPES = [
        ("H0 s1 64x64", 64, 64, 8, 3, 8, 16, 1),
        ("H0 s2 32x32", 64, 32, 8, 3, 8, 16, 1),
        ("H0 s3 16x16", 64, 16, 8, 3, 8, 32, 1),
        ("H0 s4 8x8", 64, 8, 8, 3, 8, 64, 1),
        ("H4 s1 64x64", 32, 64, 8, 3, 8, 32, 1),
        ("H4 s2 s=2", 32, 64, 8, 3, 8, 32, 2),
        ("H4 s3 16x16", 32, 16, 8, 3, 8, 64, 1),
]
QUICK_SHAPES = [
        ("H0 s4 8x8", 2, 8, 8, 3, 2, 16, 1),
        ("16x16 b8h3", 1, 16, 8, 3, 2, 16, 1),
        ("16x16 s=2", 1, 16, 8, 2, 2, 16, 2),
]


def _inputs(batch, side, block, halo_size, heads, dim, stride, dtype):
    rng = np.random.default_rng(0)
    q_side = side // halo.query_stride(block, stride)
    rows = 2 * (block + 2 * halo_size) - 1
    shapes = [(batch, q_side, q_side, heads, dim), (batch, side, side, heads, dim),
              (batch, side, side, heads, dim), (rows, dim), (rows, dim)]
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def useful_flops(batch, side, block, halo_size, heads, dim, stride, mode) -> float:
    """Dense FLOPs of halo attention (see the module docstring)."""
    q_side = side // halo.query_stride(block, stride)
    queries = batch * heads * q_side * q_side
    win = block + 2 * halo_size
    window = 2.0 * queries * win * win * dim  # one [queries x win^2] x dim product
    tables = 2.0 * 2 * queries * (2 * win - 1) * dim  # q . rel_h and q . rel_w
    forward = 2 * window + tables
    backward = 4 * window + 2 * tables  # dV, dP, dQ, dK; table grads (dQ and drel)
    return forward if mode == "fwd" else forward + backward


def _dkv_geometry(batch, side, block, halo_size, heads, stride):
    """(query block side, covering query blocks per key block, padded table rows, programs)."""
    q_block = block // halo.query_stride(block, stride)
    reach = -(-halo_size // block)
    table_rows = 1 << (2 * (block + 2 * halo_size) - 2).bit_length()  # padded to a tile
    return q_block, (2 * reach + 1) ** 2, table_rows, batch * heads * (side // block) ** 2


def dkv_relative_flops(batch, side, block, halo_size, heads, dim, stride) -> float:
    """Matmul FLOPs of the dK/dV pass's relative logits: per key block and covering query
    block, the two [queries x d] x [d x table rows] query-table products."""
    q_block, neighbours, table_rows, programs = _dkv_geometry(batch, side, block, halo_size,
                                                              heads, stride)
    return programs * neighbours * 2 * (2.0 * q_block * q_block * dim * table_rows)


def dkv_one_hot_flops(batch, side, block, halo_size, heads, dim, stride) -> float:
    """What the one-hot version (before 2026-12) spent on top: per key block, covering query
    block and query row/column offset, two [queries x table rows] x [table rows x keys]
    one-hot products."""
    q_block, neighbours, table_rows, programs = _dkv_geometry(batch, side, block, halo_size,
                                                              heads, stride)
    per_neighbour = q_block * 2 * (2.0 * q_block * q_block * table_rows * block * block)
    return programs * neighbours * per_neighbour


def _functions(impl, options):
    def forward(*arrays):
        return halo.halo_attention(*arrays, impl=impl, **options)

    def forward_backward(*arrays):
        def loss(*a):
            return jnp.sum(forward(*a).astype(jnp.float32))
        return jax.grad(loss, argnums=range(5))(*arrays)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU grid")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    repeats = args.repeats or (3 if args.quick else 20)
    dtype = jnp.dtype(args.dtype or "bfloat16")
    fused_impl = "pallas" if on_gpu else "interpret"
    device = jax.devices()[0].device_kind
    print(f"# halo attention | device {device} | jax {jax.__version__} | "
          f"{datetime.date.today()} | dtype {dtype.name} | median of {repeats}")
    print(f"# fused = impl={fused_impl!r}" + ("" if on_gpu else
          " (Pallas INTERPRETER on CPU: correctness proof-of-run, not a speed figure)"))
    print("| shape | B | b | h | heads | d | stride | mode | GFLOP | xla ms | xla TFLOP/s | "
          "xla MiB | fused ms | fused TFLOP/s | fused MiB | dkv rel / useful bwd |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, batch, side, block, halo_size, heads, dim, stride in shapes:
        arrays = _inputs(batch, side, block, halo_size, heads, dim, stride, dtype)
        options = dict(block=block, halo=halo_size, stride=stride)
        reference = _functions("xla", options)
        fused = _functions(fused_impl, options)
        geometry = (batch, side, block, halo_size, heads, dim, stride)
        relative = dkv_relative_flops(*geometry)
        backward = useful_flops(*geometry, "fwd+bwd") - useful_flops(*geometry, "fwd")
        for mode in ("fwd", "fwd+bwd"):
            flops = useful_flops(*geometry, mode)
            xla_ms, xla_mib = compile_and_time(reference[mode], arrays, repeats)
            fused_ms, fused_mib = compile_and_time(fused[mode], arrays, repeats)
            overhead = f"{relative / backward:.2f}x" if mode == "fwd+bwd" else "-"
            print(f"| {label} | {batch} | {block} | {halo_size} | {heads} | {dim} | {stride} "
                  f"| {mode} | {flops / 1e9:.2f} | {xla_ms:.2f} | "
                  f"{flops / xla_ms / 1e9:.3f} | {mib(xla_mib)} | {fused_ms:.2f} | "
                  f"{flops / fused_ms / 1e9:.3f} | {mib(fused_mib)} | {overhead} |", flush=True)


if __name__ == "__main__":
    main()
