"""Attention kernel benchmark: forward, backward and fwd+bwd time and TFLOP/s per shape.

Compares, on identical inputs, the zoo kernel (softmax and sigmoid logits) with
jax.nn.dot_product_attention (XLA, and cuDNN where it accepts the call) and the upstream Pallas
Triton flash attention (`jax.experimental.pallas.ops.gpu.attention.mha`, where it applies: no
bias, sequences that divide its blocks). Shapes: the FlashAttention-3 paper grid (B*S = 16k,
H*D = 2048, S = 512 ... 16k, head_dim 64 and 128, causal off/on) and the zoo's shapes (Swin/VSA
49x49 windows, HaloNet 64x196 blocks, NViST 817x576 cross attention).

Correctness first: before any implementation is timed on a shape, its forward and every
gradient (q, k, v, bias) are compared with the float32 reference (`attention_reference`) on a
cut-down copy of the shape (batch 1, at most 2 heads and 1024 tokens per side, same head_dim,
causality and bias kind), by relative L2 error against the tolerance of the kernel tests. A
failing implementation is reported and not timed, and the script exits with status 1.

The "speed vs" column is fwd+bwd speed relative to cuDNN (cuDNN time / this time; > 1 is faster),
or to XLA where cuDNN does not take the shape or is not in the table.

Protocol: jit, warm-up calls (compile excluded), then the median of --runs timed calls, cycling
through --input-sets different input sets so no call reuses the previous call's inputs. The
backward is timed on its own (the VJP function applied to the saved residuals). FLOPs follow the
FlashAttention convention: fwd = 4*B*H*Tq*Tk*D (halved for causal), bwd = 2.5 x fwd,
fwd+bwd = 3.5 x fwd; the zoo shapes count every (unmasked) pair of their dense problem.

  python bench/attention.py                 # GPU: full grid, all implementations
  python bench/attention.py --quick         # CPU: a tiny grid in seconds (xla + interpret)
  python bench/attention.py --shapes zoo --impls ours,xla,cudnn --runs 50
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels_pallas import attention, attention_reference  # noqa: E402

IMPLS = ("ours", "ours_sigmoid", "xla", "cudnn", "pallas_mha")
# rel-L2 bounds of the correctness check (tests/kernels/test_attention.py's table).
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 3e-3}
CHECK_MAX_TOKENS = 1024


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    tq: int
    tk: int
    heads: int
    head_dim: int
    causal: bool = False
    bias: str | None = None  # None | "heads" ([1, H, Tq, Tk], shared) | "full"

    def flops(self, pass_name: str) -> float:
        forward = 4.0 * self.batch * self.heads * self.tq * self.tk * self.head_dim
        if self.causal:
            forward /= 2
        return forward * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[pass_name]


def fa3_grid(seq_lens=(512, 1024, 2048, 4096, 8192, 16384), head_dims=(64, 128)):
    return [Shape(f"fa S={s} D={d}{' causal' if causal else ''}", 16384 // s, s, s, 2048 // d,
                  d, causal)
            for d in head_dims for causal in (False, True) for s in seq_lens]


def zoo_shapes():
    return [
            # Swin-T stage 1 at 224px: 64 images x 64 windows of 7x7 tokens, 3 heads of 32.
            Shape("swin 49x49 d32 rpb", 4096, 49, 49, 3, 32, bias="heads"),
            # HaloNet block 8, halo 3: 64 queries see a 14x14 window; relative logits as bias.
            Shape("halo 64x196 d32 bias", 1024, 64, 196, 8, 32, bias="full"),
            Shape("nvist cross 817x576 d64", 8, 817, 576, 12, 64),
            Shape("nvist self 817x817 d64", 8, 817, 817, 12, 64),
    ]


def quick_shapes():
    return [Shape("tiny S=128 D=32 causal", 1, 128, 128, 2, 32, causal=True),
            Shape("tiny window 49x49 rpb", 8, 49, 49, 2, 32, bias="heads")]


def make_inputs(shape: Shape, dtype, seed: int):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (shape.batch, shape.tq, shape.heads, shape.head_dim), dtype)
    k = jax.random.normal(keys[1], (shape.batch, shape.tk, shape.heads, shape.head_dim), dtype)
    v = jax.random.normal(keys[2], (shape.batch, shape.tk, shape.heads, shape.head_dim), dtype)
    bias = None
    if shape.bias == "heads":
        bias = jax.random.normal(keys[3], (1, shape.heads, shape.tq, shape.tk), dtype)
    elif shape.bias == "full":
        bias = jax.random.normal(keys[3], (shape.batch, shape.heads, shape.tq, shape.tk), dtype)
    d_out = jax.random.normal(keys[4], q.shape[:3] + (shape.head_dim,), dtype)
    return (q, k, v, bias), d_out


def attention_fn(impl: str, shape: Shape, kernel_impl: str):
    """(q, k, v, bias) -> out for one implementation, or raise if it does not apply."""
    if impl in ("ours", "ours_sigmoid"):
        logits = "sigmoid" if impl == "ours_sigmoid" else "softmax"
        return functools.partial(attention, causal=shape.causal, logits=logits,
                                 impl=kernel_impl)
    if impl in ("xla", "cudnn"):
        def fn(q, k, v, bias):
            return jax.nn.dot_product_attention(q, k, v, bias, is_causal=shape.causal,
                                                implementation=impl)
        return fn
    if impl == "pallas_mha":
        if shape.bias is not None or jax.default_backend() != "gpu":
            raise NotImplementedError("no bias support / GPU only")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu import attention as upstream
        # Backward blocks of 64: the upstream default of 32 is tuned for small-SMEM GPUs.
        blocks = upstream.BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64,
                                     block_q_dq=64, block_kv_dq=64)

        def fn(q, k, v, bias):
            del bias
            return upstream.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5,
                                causal=shape.causal, block_sizes=blocks)
        return fn
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def check_shape(shape: Shape) -> Shape:
    """The cut-down copy of `shape` the correctness check runs on."""
    return dataclasses.replace(shape, name=shape.name + " (check)", batch=1,
                               heads=min(shape.heads, 2), tq=min(shape.tq, CHECK_MAX_TOKENS),
                               tk=min(shape.tk, CHECK_MAX_TOKENS))


def check_one(impl: str, fn, shape: Shape, dtype) -> list[tuple[str, float]]:
    """[(what, rel-L2 error)] of `fn` against the f32 reference: output and each gradient."""
    small = check_shape(shape)
    arrays, d_out = make_inputs(small, dtype, seed=123)
    logits = "sigmoid" if impl == "ours_sigmoid" else "softmax"

    def reference(q, k, v, bias):
        return attention_reference(q, k, v, bias, causal=small.causal, logits=logits)

    def value_and_grads(f, inputs):
        present = [i for i, a in enumerate(inputs) if a is not None]

        def loss(*diff):
            full = list(inputs)
            for i, a in zip(present, diff):
                full[i] = a
            out = f(*full)
            return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32)), out

        grads, out = jax.jit(jax.grad(loss, argnums=tuple(range(len(present))), has_aux=True))(
                *[inputs[i] for i in present])
        return [out, *grads]

    upcast = [None if a is None else a.astype(jnp.float32) for a in arrays]
    names = ["out"] + [n for n, a in zip(("dq", "dk", "dv", "dbias"), arrays) if a is not None]
    errors = []
    for name, got, want in zip(names, value_and_grads(fn, list(arrays)),
                               value_and_grads(reference, upcast)):
        got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
        error = float(jnp.linalg.norm(got - want) / jnp.maximum(jnp.linalg.norm(want), 1e-30))
        errors.append((name, error if bool(jnp.all(jnp.isfinite(got))) else float("inf")))
    return errors


def _median_time(fn, input_sets, runs: int, warmup: int) -> float:
    for i in range(warmup):
        jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
    times = []
    for i in range(runs):
        args = input_sets[i % len(input_sets)]
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_one(fn, inputs, runs: int, warmup: int) -> dict[str, float]:
    """Median seconds of fwd, bwd (VJP applied to saved residuals) and fwd+bwd."""
    differentiable = [i for i, a in enumerate(inputs[0][0]) if a is not None]

    def vjp_of(arrays):
        def apply(*diff):
            full = list(arrays)
            for i, a in zip(differentiable, diff):
                full[i] = a
            return fn(*full)
        return jax.vjp(apply, *[arrays[i] for i in differentiable])

    forward = jax.jit(lambda arrays: fn(*arrays))
    # One trace of vjp_of: every returned VJP function shares its code, so applying them
    # compiles once and the residuals of each input set are plain arrays.
    with_residuals = jax.jit(vjp_of)
    vjp_sets = [(with_residuals(arrays)[1], d_out) for arrays, d_out in inputs]
    backward = jax.jit(lambda vjp_fn, d_out: vjp_fn(d_out))
    forward_backward = jax.jit(lambda arrays, d_out: vjp_of(arrays)[1](d_out))
    return {
            "fwd": _median_time(forward, [(arrays,) for arrays, _ in inputs], runs, warmup),
            "bwd": _median_time(backward, vjp_sets, runs, warmup),
            "fwd+bwd": _median_time(forward_backward, inputs, runs, warmup),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny CPU grid, impls xla + interpret kernel, few runs")
    parser.add_argument("--shapes", default="all", choices=("all", "fa", "zoo"))
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help=f"comma-separated subset of {IMPLS}")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16",
                                                                "float32"))
    parser.add_argument("--runs", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--input-sets", type=int, default=3)
    args = parser.parse_args(argv)
    impls = [x for x in args.impls.split(",") if x]
    for impl in impls:
        if impl not in IMPLS:
            parser.error(f"--impls: unknown implementation {impl!r}; choose from {IMPLS}")
    if args.runs < 1 or args.input_sets < 1 or args.warmup < 0:
        parser.error("--runs and --input-sets must be >= 1, --warmup >= 0")

    backend = jax.default_backend()
    kernel_impl = "pallas" if backend in ("gpu", "tpu") else "interpret"
    if args.quick:
        shapes = quick_shapes()
        impls = [i for i in impls if i in ("ours", "ours_sigmoid", "xla")]
        runs, warmup = min(args.runs, 3), min(args.warmup, 1)
    else:
        shapes = {"all": fa3_grid() + zoo_shapes(), "fa": fa3_grid(), "zoo": zoo_shapes()}[
                args.shapes]
        runs, warmup = args.runs, args.warmup
    dtype = jnp.dtype(args.dtype)

    device = jax.devices()[0]
    print(f"# attention benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# device: {device.platform} {device.device_kind} (x{jax.device_count()});  "
          f"jax {jax.__version__};  dtype {dtype.name};  ours = impl={kernel_impl!r}")
    print(f"# median of {runs} runs after {warmup} warm-up calls, {args.input_sets} input sets "
          f"rotated; TFLOP/s: fwd 4BHTqTkD (/2 causal), bwd 2.5x, fwd+bwd 3.5x")
    print(f"# correctness: fwd and grads vs the f32 reference on batch 1, <= 2 heads, <= "
          f"{CHECK_MAX_TOKENS} tokens per side; rel-L2 < {TOLERANCE[dtype.name]:g}")
    failures = []
    for shape in shapes:
        print(f"\n## {shape.name}: B={shape.batch} Tq={shape.tq} Tk={shape.tk} H={shape.heads} "
              f"D={shape.head_dim} causal={shape.causal} bias={shape.bias}")
        print(f"{'impl':<14}" + "".join(f"{p + ' ms':>12}{'TFLOP/s':>9}"
                                        for p in ("fwd", "bwd", "fwd+bwd"))
              + f"{'max err':>10}{'speed vs':>14}")
        inputs = [make_inputs(shape, dtype, seed) for seed in range(args.input_sets)]
        rows = {}
        for impl in impls:
            try:
                fn = attention_fn(impl, shape, kernel_impl)
                errors = check_one(impl, fn, shape, dtype)
                worst = max(error for _, error in errors)
                if not worst < TOLERANCE[dtype.name]:
                    detail = ", ".join(f"{name} {error:.1e}" for name, error in errors)
                    print(f"{impl:<14}  FAILED correctness, not timed: {detail}")
                    failures.append(f"{shape.name} / {impl}")
                    continue
                result = bench_one(fn, inputs, runs, warmup)
            except Exception as error:  # noqa: BLE001 (a benchmark row reports, not raises)
                reason = str(error).strip().splitlines()[0][:90] if str(error) else ""
                print(f"{impl:<14}  n/a: {type(error).__name__}: {reason}")
                continue
            rows[impl] = (result, worst)
        baseline = "cudnn" if "cudnn" in rows else "xla" if "xla" in rows else None
        for impl, (result, worst) in rows.items():
            cells = "".join(f"{result[p] * 1e3:>12.3f}{shape.flops(p) / result[p] / 1e12:>9.2f}"
                            for p in ("fwd", "bwd", "fwd+bwd"))
            speed = (f"{rows[baseline][0]['fwd+bwd'] / result['fwd+bwd']:>8.2f}x {baseline:<5}"
                     if baseline else f"{'-':>14}")
            print(f"{impl:<14}{cells}{worst:>10.1e}{speed}")
    print("\n# speed vs: fwd+bwd speed relative to cuDNN, or to XLA where cuDNN is absent")
    if failures:
        print(f"# FAILED correctness: {failures}")
        sys.exit(1)


if __name__ == "__main__":
    main()
