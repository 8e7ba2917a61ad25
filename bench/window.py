r"""Swin window attention: our path (`kernels_pallas.attention` with the relative-position bias
and shift regions as segment ids) vs timm-style XLA window attention (materialised logits +
bias + additive -100 mask, softmax, @ V), at Swin-T stage shapes.

  python bench/window.py            # GPU: Swin-T at 224 px, batch 64, all four stages
  python bench/window.py --quick    # CPU proof-of-run (< 1 min), batch 2

A second table compares whole layers on [B, H, W, C] maps: Swin's (shifted) `WindowAttention`
vs `zoo.vsa.VSAAttention` (regressor, bilinear sampling of keys/values, attention), both with
their projections, to show what VSA's sampling costs over window attention.

For each stage and mode (fwd, fwd+bwd w.r.t. q, k, v and the bias table) it prints the median
wall time and the compiled peak-memory estimate (`compiled.memory_analysis()`: temp + output).
"ours" is impl="auto": the Pallas kernel on GPU/TPU, the XLA reference on CPU; --interpret adds
the Pallas interpreter on CPU (a correctness proof-of-run, not a speed figure).
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

import kernels_pallas  # noqa: E402
from bench.timing import compile_and_time, mib  # noqa: E402
from flax import nnx  # noqa: E402

from zoo import swin, vsa, windows  # noqa: E402

WINDOW = 7
# (label, map side, heads): Swin-T at 224 px, head width 32.
STAGES = [("stage1 56x56", 56, 3), ("stage2 28x28", 28, 6), ("stage3 14x14", 14, 12),
          ("stage4 7x7", 7, 24)]
HEAD_DIM = 32


def make_inputs(batch, side, heads, dtype, seed=0):
    windows = batch * (side // WINDOW) ** 2
    n = WINDOW * WINDOW
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((windows, n, heads, HEAD_DIM)), dtype)
               for _ in range(3))
    table = jnp.asarray(0.02 * rng.standard_normal(((2 * WINDOW - 1) ** 2, heads)),
                        jnp.float32)
    return q, k, v, table


def bias_from_table(table):
    index = windows.relative_position_index(WINDOW)
    return jnp.transpose(table[index.reshape(-1)].reshape(*index.shape, -1), (2, 0, 1))[None]


def ours(side, impl):
    shifted = side > WINDOW
    labels = (windows.shift_region_labels(side, side, WINDOW, WINDOW // 2) if shifted else None)

    def forward(q, k, v, table):
        segments = None
        if labels is not None:
            segments = jnp.tile(jnp.asarray(labels), (q.shape[0] // labels.shape[0], 1))
        return kernels_pallas.attention(q, k, v, bias_from_table(table).astype(q.dtype),
                                        q_segment_ids=segments, kv_segment_ids=segments,
                                        impl=impl)

    return forward


def xla_timm(side):
    shifted = side > WINDOW
    mask = (windows.shift_attention_mask(side, side, WINDOW, WINDOW // 2) if shifted else None)

    def forward(q, k, v, table):
        windows, n, heads, d = q.shape
        logits = jnp.einsum("wqhd,wkhd->whqk", q, k) * (d ** -0.5)
        logits = logits + bias_from_table(table).astype(q.dtype)
        if mask is not None:
            per_image = mask.shape[0]
            logits = logits.reshape(windows // per_image, per_image, heads, n, n)
            logits = (logits + jnp.asarray(mask, q.dtype)[None, :, None]).reshape(
                    windows, heads, n, n)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
        return jnp.einsum("whqk,wkhd->wqhd", weights, v)

    return forward


def with_backward(forward):
    def fwd_bwd(*arrays):
        return jax.grad(lambda *a: jnp.sum(forward(*a).astype(jnp.float32)),
                        argnums=range(4))(*arrays)
    return fwd_bwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 2, CPU-sized")
    parser.add_argument("--interpret", action="store_true",
                        help="also time the Pallas interpreter (CPU)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    args = parser.parse_args()
    accelerated = jax.default_backend() in ("gpu", "tpu")
    batch = args.batch or (2 if args.quick else 64)
    repeats = args.repeats or (3 if args.quick else 20)
    dtype = jnp.dtype(args.dtype or ("bfloat16" if accelerated else "float32"))
    impls = ["auto"] + (["interpret"] if args.interpret else [])
    print(f"# Swin-T window attention | device {jax.devices()[0].device_kind} | jax "
          f"{jax.__version__} | {datetime.date.today()} | batch {batch} | dtype {dtype.name} | "
          f"window {WINDOW}, head dim {HEAD_DIM} | median of {repeats}")
    print(f"# ours impl='auto' resolves to {kernels_pallas.api.resolve_impl('auto')!r} here")
    header = "| stage | windows | heads | shifted | mode | timm-style XLA ms | MiB |"
    header += "".join(f" ours[{i}] ms | MiB |" for i in impls)
    print(header)
    print("|" + "---|" * (6 + 2 * len(impls) + 1))
    for label, side, heads in STAGES:
        arrays = make_inputs(batch, side, heads, dtype)
        for mode in ("fwd", "fwd+bwd"):
            wrap = (lambda f: f) if mode == "fwd" else with_backward
            ref_ms, ref_mib = compile_and_time(wrap(xla_timm(side)), arrays, repeats)
            row = (f"| {label} | {arrays[0].shape[0]} | {heads} | {side > WINDOW} | {mode} | "
                   f"{ref_ms:.2f} | {mib(ref_mib)} |")
            for impl in impls:
                ms, peak = compile_and_time(wrap(ours(side, impl)), arrays, repeats)
                row += f" {ms:.2f} | {mib(peak)} |"
            print(row, flush=True)
    print()
    print("| stage | mode | Swin (shifted) window attention layer ms | MiB | VSAAttention layer "
          "ms | MiB |")
    print("|---|---|---|---|---|---|")
    for label, side, heads in STAGES:
        dim = heads * HEAD_DIM
        x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, side, side, dim)),
                        dtype)
        layers = {"window": nnx.split(swin.WindowAttention(dim, heads, WINDOW, dtype=dtype,
                                                           rngs=nnx.Rngs(0))),
                  "vsa": nnx.split(vsa.VSAAttention(dim, heads, WINDOW, dtype=dtype,
                                                    rngs=nnx.Rngs(0)))}
        for mode in ("fwd", "fwd+bwd"):
            cells = []
            for name, (graphdef, state) in layers.items():
                def forward(state, x, graphdef=graphdef, name=name):
                    module = nnx.merge(graphdef, state)
                    return module(x) if name == "vsa" else window_layer(module, x, side)

                fn = forward if mode == "fwd" else (lambda st, x, f=forward: jax.grad(
                        lambda st: jnp.sum(f(st, x).astype(jnp.float32)))(st))
                ms, peak = compile_and_time(fn, (state, x), repeats)
                cells.append(f"{ms:.2f} | {mib(peak)}")
            print(f"| {label} | {mode} | {cells[0]} | {cells[1]} |", flush=True)


def window_layer(attn, x, side):
    """Swin's W-MSA / SW-MSA on a map: (shift,) partition, attend, reverse (, shift back)."""
    shift = WINDOW // 2 if side > WINDOW else 0
    labels = windows.shift_region_labels(side, side, WINDOW, shift) if shift else None
    if shift:
        x = jnp.roll(x, (-shift, -shift), axis=(1, 2))
    out = windows.window_reverse(attn(windows.window_partition(x, WINDOW), region_labels=labels),
                              WINDOW, side, side)
    return jnp.roll(out, (shift, shift), axis=(1, 2)) if shift else out


if __name__ == "__main__":
    main()
