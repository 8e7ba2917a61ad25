#!/usr/bin/env bash
# One-shot GPU check of kernels_pallas on a single H100/H200 (jax[cuda] installed, nothing else):
#   1. correctness of every GPU kernel vs the f32 XLA reference (forward, dQ, dK/dV, dbias,
#      sigmoid, lengths/segments/ragged tails, D=48..256, grid > 65535, halo fwd+bwd), and the
#      cuDNN gate: impl="cudnn" against the reference where its semantics could differ from
#      ours (causal Tq != Tk, broadcast bias gradients). "CUDNN GATE: PASS" is what allows
#      kernels_pallas.api.CUDNN_ROUTING to be switched on (docs/kernels.md, dispatch policy);
#   2. a side-by-side speed table: ours (Pallas-Triton) vs cuDNN vs jax.nn XLA vs upstream
#      Pallas mha (Triton) vs attention_mgpu (Mosaic GPU, f16), with ratios to cuDNN and a
#      per-kernel CUPTI breakdown of our fwd+bwd;
#   3. halo: fused kernel vs the XLA unfold reference, with a per-kernel breakdown.
# Every step runs in its own process under `timeout`; a failing/timed-out step is reported and
# the script goes on. Worst case ~8 min wall (30+120+60+210+60 s). Output: stdout and
# $OUT/device_check.log (or /tmp/device_check_out/).
#
# Usage (repo root as cwd, or REPO=/path/to/repo):  bash bench/device_check.sh
# CPU smoke test of the harness itself:             DRY_RUN=1 bash bench/device_check.sh
# Record its tables in docs/benchmarks.md with the device, date, jax version and commit.
set -u
REPO=${REPO:-${1:-$PWD}}
[ -d "$REPO/kernels_pallas" ] || { echo "run from the repository root (no kernels_pallas/ in $REPO)"; exit 2; }
OUTDIR=${OUT:-/tmp/device_check_out}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/device_check.log"
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/device_check.XXXXXX)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}
if [ "${DRY_RUN:-0}" = 1 ]; then export JAX_PLATFORMS=cpu; else export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}; fi
export DRY_RUN=${DRY_RUN:-0}

# ---------------------------------------------------------------------------------------------
cat > "$WORK/common.py" <<'PY'
import os, sys, time, statistics, warnings
import numpy as np
import jax, jax.numpy as jnp

DRY = os.environ.get("DRY_RUN") == "1"
IMPL = "interpret" if DRY else "pallas"
F32 = jnp.float32
TOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 1.5e-2, jnp.dtype(jnp.float16): 4e-3}
T0 = time.time()

# Record (not print) warnings: the Triton-backend deprecation under jax >= 0.11 shows up here.
warnings.simplefilter("always")
CAUGHT = []
def _record(message, category, filename, lineno, file=None, line=None):
    key = f"{category.__name__}: {str(message).splitlines()[0][:200]}"
    if key not in CAUGHT:
        CAUGHT.append(key)
warnings.showwarning = _record

def print_warnings():
    if CAUGHT:
        print("warnings seen:")
        for w in CAUGHT:
            print("   ", w)

def rel_l2(a, b):
    a = np.asarray(jnp.asarray(a, F32), np.float64); b = np.asarray(jnp.asarray(b, F32), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

def finite(x):
    return bool(np.all(np.isfinite(np.asarray(jnp.asarray(x, F32)))))

def up(x):
    return None if x is None else x.astype(F32)

def elapsed():
    return time.time() - T0

def header(title):
    d = jax.devices()[0]
    print(f"# {title} | jax {jax.__version__} | {d.platform} {d.device_kind} | impl={IMPL}")
PY

# ---------------------------------------------------------------------------------------------
cat > "$WORK/check_attention.py" <<'PY'
"""Every pass of flash_triton (fwd, dQ, dK/dV, dbias) vs the f32 reference, on hardware."""
import functools, traceback
from common import *
from kernels_pallas import attention, api
from kernels_pallas.reference import attention_mask

header("attention correctness")
print("dispatch table:", {b: [r for r, _ in routes] for b, routes in api.DISPATCH_TABLE.items()},
      "CUDNN_ROUTING =", api.CUDNN_ROUTING, "backend", jax.default_backend())
BUDGET = float(os.environ.get("STEP_BUDGET", 110))

# name, B, Tq, Tk, H, D, Dv, dtype, bias shape, options
bf, f16, f32 = jnp.bfloat16, jnp.float16, jnp.float32
CASES = [
    ("fa_d64_causal", 2, 1024, 1024, 4, 64, 64, bf, None, dict(causal=True)),
    ("fa_d128", 2, 1024, 1024, 4, 128, 128, bf, None, {}),
    ("ragged_d128_causal_len", 2, 1000, 1000, 2, 128, 128, bf, None,
     dict(causal=True, q_lengths=(1000, 517), kv_lengths=(1000, 333))),
    ("zero_len_rows_keybias_f16", 3, 300, 200, 2, 64, 64, f16, (3, 1, 1, 200),
     dict(q_lengths=(0, 250, 300), kv_lengths=(200, 0, 150))),
    ("rpb_bias_batch_bcast", 4, 256, 256, 4, 64, 64, bf, (1, 4, 256, 256), {}),
    ("full_bias_d72_dv40_f32", 2, 192, 320, 2, 72, 40, f32, (2, 2, 192, 320), {}),
    ("segments_causal", 2, 512, 512, 4, 64, 64, bf, None, dict(causal=True, segments=(100, 333))),
    ("sigmoid_causal_len_2dbias", 2, 768, 768, 4, 64, 64, bf, (768, 768),
     dict(logits="sigmoid", causal=True, kv_lengths=(768, 400))),
    ("swin_49_rpb", 512, 49, 49, 3, 32, 32, bf, (1, 3, 49, 49), {}),
    ("nvist_cross_817x576", 2, 817, 576, 4, 64, 64, bf, None, {}),
    ("d256_causal", 1, 512, 512, 2, 256, 256, bf, None, dict(causal=True)),
    ("d96_rowbias", 2, 384, 384, 2, 96, 96, bf, (2, 2, 384, 1), {}),
    ("grid_axis1_gt_65535", 70000, 16, 16, 1, 16, 16, bf, None, {}),
    ("long_causal_8k_d128", 1, 8192, 8192, 2, 128, 128, bf, None, dict(causal=True)),
]
if DRY:
    CASES = [("dry_causal_len", 2, 40, 40, 2, 32, 32, f32, (1, 2, 40, 40),
              dict(causal=True, kv_lengths=(40, 0))),
             ("dry_sigmoid_seg", 1, 32, 48, 2, 16, 16, bf, None,
              dict(logits="sigmoid", segments=(10,)))]


def make(case, seed=0):
    name, b, tq, tk, h, d, dv, dtype, bias_shape, opts = case
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (b, tq, h, d), dtype)
    k = jax.random.normal(ks[1], (b, tk, h, d), dtype)
    v = jax.random.normal(ks[2], (b, tk, h, dv), dtype)
    bias = None if bias_shape is None else jax.random.normal(ks[3], bias_shape, dtype)
    dout = jax.random.normal(ks[4], (b, tq, h, dv), dtype)
    kw = dict(opts)
    for key in ("q_lengths", "kv_lengths"):
        if key in kw:
            kw[key] = jnp.asarray(kw[key], jnp.int32)
    if "segments" in kw:
        bounds = np.asarray(kw.pop("segments"))
        kw["q_segment_ids"] = jnp.asarray(np.broadcast_to(
            np.searchsorted(bounds, np.arange(tq), side="right"), (b, tq)), jnp.int32)
        kw["kv_segment_ids"] = jnp.asarray(np.broadcast_to(
            np.searchsorted(bounds, np.arange(tk), side="right"), (b, tk)), jnp.int32)
    return q, k, v, bias, dout, kw


def grads_fn(impl, kw, dout, has_bias):
    def loss(q, k, v, bias):
        out = attention(q, k, v, bias, impl=impl, **kw)
        return jnp.sum(out.astype(F32) * dout.astype(F32)), out
    argnums = (0, 1, 2, 3) if has_bias else (0, 1, 2)
    return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))


failures = 0
for case in CASES:
    name, dtype = case[0], jnp.dtype(case[7])
    if elapsed() > BUDGET:
        print(f"SKIP {name}: step budget spent"); continue
    try:
        start = time.time()
        q, k, v, bias, dout, kw = make(case)
        kern = grads_fn(IMPL, kw, dout, bias is not None)
        (_, out), grads = kern(q, k, v, bias)
        jax.block_until_ready(grads)
        t_kernel = time.time() - start
        ref = grads_fn("xla", kw, dout, bias is not None)
        (_, out_r), grads_r = ref(up(q), up(k), up(v), up(bias))
        names = ["out", "dq", "dk", "dv", "dbias"][:1 + len(grads)]
        errs = [rel_l2(out, out_r)] + [rel_l2(g, gr) for g, gr in zip(grads, grads_r)]
        ok_finite = finite(out) and all(finite(g) for g in grads)
        ok = ok_finite and max(errs) < TOL[dtype]
        extra = ""
        # Rows with no valid key must be exactly 0 (output and dq).
        mask = attention_mask(q.shape[0], q.shape[1], k.shape[1], causal=kw.get("causal", False),
                              q_lengths=kw.get("q_lengths"), kv_lengths=kw.get("kv_lengths"),
                              q_segment_ids=kw.get("q_segment_ids"),
                              kv_segment_ids=kw.get("kv_segment_ids"))
        if mask is not None and kw.get("logits", "softmax") == "softmax":
            empty = ~np.asarray(mask[:, 0].any(-1))  # [B, Tq]
            if empty.any():
                zero = (np.all(np.asarray(out, np.float32)[empty] == 0)
                        and np.all(np.asarray(grads[0], np.float32)[empty] == 0))
                extra += f" empty_rows={int(empty.sum())} zero={zero}"
                ok = ok and zero
        if name in ("fa_d64_causal", "dry_causal_len"):  # bitwise determinism (no atomics)
            (_, out2), grads2 = kern(q, k, v, bias)
            same = all(np.array_equal(np.asarray(a), np.asarray(b))
                       for a, b in zip((out, *grads), (out2, *grads2)))
            extra += f" deterministic={same}"
            ok = ok and same
        failures += not ok
        cells = " ".join(f"{n}={e:.1e}" for n, e in zip(names, errs))
        print(f"{'PASS' if ok else 'FAIL'} {name:<28} {dtype.name:<8} {cells} finite={ok_finite}"
              f"{extra}  (tol {TOL[dtype]:.0e}; compile+run {t_kernel:.1f}s)", flush=True)
    except Exception as e:  # noqa: BLE001
        failures += 1
        msg = str(e).strip().splitlines()
        print(f"ERROR {name}: {type(e).__name__}: {msg[0][:300] if msg else ''}", flush=True)
        if "RESOURCE_EXHAUSTED" in str(e) or "shared memory" in str(e).lower():
            print("   -> shared-memory/register limit: shrink default_blocks for this shape")
        traceback.print_exc(limit=2)
print(f"attention correctness: {failures} failing case(s) of {len(CASES)}")

# The cuDNN gate (tests/kernels/test_dispatch.py::test_cudnn_semantics_match_ours_on_gpu):
# impl="cudnn" vs the reference, forward and every gradient, where cuDNN could differ.
GATE = [("cudnn_plain", 2, 128, 128, 4, 64, 64, bf, None, {}),
        ("cudnn_causal_tq_lt_tk", 2, 64, 192, 2, 64, 64, bf, None, dict(causal=True)),
        ("cudnn_causal_tq_gt_tk", 2, 192, 64, 2, 64, 64, bf, None, dict(causal=True)),
        ("cudnn_bias_heads", 2, 96, 160, 4, 128, 128, bf, (1, 4, 96, 160), {}),
        ("cudnn_bias_batch_causal_f16", 2, 128, 128, 2, 64, 64, f16, (2, 1, 128, 128),
         dict(causal=True))]
gate_ok = not DRY
for case in ([] if DRY else GATE):
    name, dtype = case[0], jnp.dtype(case[7])
    try:
        q, k, v, bias, dout, kw = make(case)
        (_, out), grads = grads_fn("cudnn", kw, dout, bias is not None)(q, k, v, bias)
        (_, out_r), grads_r = grads_fn("xla", kw, dout, bias is not None)(
                up(q), up(k), up(v), up(bias))
        errs = [rel_l2(out, out_r)] + [rel_l2(g, r) for g, r in zip(grads, grads_r)]
        ok = finite(out) and max(errs) < TOL[dtype]
        gate_ok = gate_ok and ok
        print(f"{'PASS' if ok else 'FAIL'} {name:<28} {dtype.name:<8} "
              + " ".join(f"{e:.1e}" for e in errs), flush=True)
    except Exception as e:  # noqa: BLE001
        gate_ok = False
        print(f"ERROR {name}: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
print("CUDNN GATE:", "PASS" if gate_ok else ("not run (DRY_RUN)" if DRY else "FAIL"))
print_warnings()
PY

# ---------------------------------------------------------------------------------------------
cat > "$WORK/check_halo.py" <<'PY'
"""Fused halo kernels (fwd, dQ+dRel, dK/dV) vs the f32 unfold reference, on hardware."""
import traceback
from common import *
from kernels_pallas import halo

header("halo correctness")
BUDGET = float(os.environ.get("STEP_BUDGET", 50))
# block, halo, batch, side_h, side_w, heads, dk, dv, stride, scale_relative
CASES = [(8, 3, 2, 16, 24, 2, 16, 16, 1, False), (8, 2, 2, 16, 16, 2, 16, 8, 2, False),
         (4, 1, 2, 8, 12, 2, 12, 20, 1, True), (4, 5, 1, 12, 8, 2, 16, 16, 1, False),
         (8, 3, 4, 64, 64, 8, 16, 16, 1, False), (8, 3, 2, 16, 16, 4, 64, 64, 1, False)]
DTYPES = [jnp.float32, jnp.bfloat16]
if DRY:
    CASES, DTYPES = CASES[:1], [jnp.float32]
failures = 0
for block, hs, b, sh, sw, heads, dk, dv, stride, srel in CASES:
    for dtype in DTYPES:
        label = f"b{block} h{hs} {sh}x{sw} B{b} heads{heads} d{dk}/{dv} s{stride} {jnp.dtype(dtype).name}"
        if elapsed() > BUDGET:
            print(f"SKIP {label}: step budget spent"); continue
        try:
            qs = halo.query_stride(block, stride)
            win = block + 2 * hs
            ks = jax.random.split(jax.random.key(1), 6)
            q = jax.random.normal(ks[0], (b, sh // qs, sw // qs, heads, dk), dtype)
            k = jax.random.normal(ks[1], (b, sh, sw, heads, dk), dtype)
            v = jax.random.normal(ks[2], (b, sh, sw, heads, dv), dtype)
            rh = (0.5 * jax.random.normal(ks[3], (2 * win - 1, dk))).astype(dtype)
            rw = (0.5 * jax.random.normal(ks[4], (2 * win - 1, dk))).astype(dtype)
            opts = dict(block=block, halo=hs, stride=stride, scale_relative=srel)
            out_shape = jax.eval_shape(lambda *a: halo.halo_attention(*a, impl="xla", **opts),
                                       q, k, v, rh, rw).shape
            dout = jax.random.normal(ks[5], out_shape, dtype)

            def make(impl):
                def loss(*a):
                    o = halo.halo_attention(*a, impl=impl, **opts)
                    return jnp.sum(o.astype(F32) * dout.astype(F32)), o
                return jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))
            (_, out), grads = make(IMPL)(q, k, v, rh, rw)
            (_, out_r), grads_r = make("xla")(*(up(x) for x in (q, k, v, rh, rw)))
            errs = [rel_l2(out, out_r)] + [rel_l2(g, r) for g, r in zip(grads, grads_r)]
            ok = finite(out) and all(finite(g) for g in grads) and max(errs) < TOL[jnp.dtype(dtype)]
            failures += not ok
            cells = " ".join(f"{n}={e:.1e}" for n, e in
                             zip(("out", "dq", "dk", "dv", "drel_h", "drel_w"), errs))
            print(f"{'PASS' if ok else 'FAIL'} {label:<44} {cells}", flush=True)
        except Exception as e:  # noqa: BLE001
            failures += 1
            msg = str(e).strip().splitlines()
            print(f"ERROR {label}: {type(e).__name__}: {msg[0][:300] if msg else ''}", flush=True)
            traceback.print_exc(limit=2)
print(f"halo correctness: {failures} failing case(s)")
print_warnings()
PY

# ---------------------------------------------------------------------------------------------
cat > "$WORK/speed_attention.py" <<'PY'
"""Side-by-side fwd and fwd+bwd times: ours vs cuDNN vs XLA vs upstream Pallas (Triton, MGPU)."""
import functools, traceback
from common import *
from kernels_pallas import attention

header("attention speed (bf16; mgpu rows run f16: its SMEM scratch is f16-only)")
BUDGET = float(os.environ.get("STEP_BUDGET", 195))
# name, B, T, H, D, causal  (FA3 grid: B*T = 16k, H*D = 2048)
SHAPES = [("S2k D64", 8, 2048, 32, 64, False), ("S8k D64 causal", 2, 8192, 32, 64, True),
          ("S2k D128", 8, 2048, 16, 128, False), ("S4k D128 causal", 4, 4096, 16, 128, True),
          ("S8k D128", 2, 8192, 16, 128, False), ("S16k D128 causal", 1, 16384, 16, 128, True),
          ("nvist 817x576 D64", 8, (817, 576), 12, 64, False)]
IMPLS = ["cudnn", "ours", "pallas_mha", "mgpu_f16", "xla"]
if os.environ.get("WITH_SIGMOID") == "1":
    IMPLS.insert(2, "ours_sigmoid")
if DRY:
    SHAPES, IMPLS = [("dry S64 D32 causal", 1, 64, 2, 32, True)], ["ours", "xla", "cudnn"]


def impl_fn(name, causal, d):
    if name in ("ours", "ours_sigmoid"):
        logits = "sigmoid" if name == "ours_sigmoid" else "softmax"
        return lambda q, k, v: attention(q, k, v, causal=causal, logits=logits, impl=IMPL)
    if name in ("cudnn", "xla"):
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                            implementation=name)
    if name == "pallas_mha":
        from jax.experimental.pallas.ops.gpu import attention as upstream
        bs = upstream.BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64,
                                 block_q_dq=64, block_kv_dq=64)
        return lambda q, k, v: upstream.mha(q, k, v, None, sm_scale=d ** -0.5, causal=causal,
                                            block_sizes=bs)
    if name == "mgpu_f16":
        from jax.experimental.pallas.ops.gpu import attention_mgpu as mg
        cfg = mg.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal,
                              block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
        return lambda q, k, v: mg.attention(q, k, v, cfg)  # no softmax scale: timing only
    raise ValueError(name)


def timeit(fn, args):
    """Median seconds per call; calls issued back-to-back, one sync per batch (no per-call
    host round trip), compile excluded."""
    t = time.perf_counter(); jax.block_until_ready(fn(*args)); compile_s = time.perf_counter() - t
    t = time.perf_counter(); jax.block_until_ready(fn(*args)); one = time.perf_counter() - t
    inner = max(1, min(10, int(0.05 / max(one, 1e-6))))
    outer = 5 if one < 0.05 else 3
    times = []
    for _ in range(outer):
        t = time.perf_counter()
        for _ in range(inner):
            r = fn(*args)
        jax.block_until_ready(r)
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times), compile_s


def flops(b, tq, tk, h, d, causal):
    f = 4.0 * b * h * tq * tk * d
    return f / 2 if causal else f


breakdown_done = False
for label, b, t, h, d, causal in SHAPES:
    if elapsed() > BUDGET:
        print(f"\nSKIP {label}: step budget spent"); continue
    tq, tk = t if isinstance(t, tuple) else (t, t)
    ks = jax.random.split(jax.random.key(0), 4)
    base = [jax.random.normal(ks[0], (b, tq, h, d), jnp.bfloat16),
            jax.random.normal(ks[1], (b, tk, h, d), jnp.bfloat16),
            jax.random.normal(ks[2], (b, tk, h, d), jnp.bfloat16)]
    dout = jax.random.normal(ks[3], (b, tq, h, d), jnp.bfloat16)
    fl = flops(b, tq, tk, h, d, causal)
    print(f"\n## {label}: B={b} Tq={tq} Tk={tk} H={h} D={d} causal={causal}  "
          f"(fwd {fl / 1e12:.2f} TFLOP, bwd 2.5x, FA convention, /2 causal)")
    print("| impl | fwd ms | fwd TFLOP/s | fwd vs cuDNN | fwd+bwd ms | fwd+bwd TFLOP/s | "
          "fwd+bwd vs cuDNN | max|out-cudnn| | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    ref_out, ref_t = None, {}
    for name in IMPLS:
        if elapsed() > BUDGET:
            print(f"| {name} | skipped: step budget spent |"); continue
        if name == "xla" and tq * tk > 4096 * 4096:
            print(f"| {name} | skipped (dense logits too large) |"); continue
        try:
            dt = jnp.float16 if name == "mgpu_f16" else jnp.bfloat16
            args = [x.astype(dt) for x in base]
            f = impl_fn(name, causal, d)
            fwd = jax.jit(f)
            fb = jax.jit(lambda q, k, v, g: jax.vjp(f, q, k, v)[1](g))
            t_f, c1 = timeit(fwd, args)
            out = fwd(*args)
            if name == "cudnn":
                ref_out = out
            diff = ("" if ref_out is None or name == "cudnn" or name == "mgpu_f16"
                    else f"{float(jnp.max(jnp.abs(out.astype(F32) - ref_out.astype(F32)))):.2e}")
            try:
                t_fb, c2 = timeit(fb, args + [dout.astype(dt)])
            except Exception as e:  # noqa: BLE001 (e.g. mgpu causal bwd, mha cross-attention)
                t_fb, c2 = None, 0.0
                print(f"|   ({name} bwd n/a: {type(e).__name__}: {str(e).splitlines()[0][:100]}) |")
            if name == "cudnn":
                ref_t = dict(fwd=t_f, fb=t_fb)
            vs = lambda key, tt: ("" if tt is None or ref_t.get(key) is None
                                  else f"{ref_t[key] / tt:.2f}x")
            fb_cells = ("n/a | | " if t_fb is None else
                        f"{t_fb * 1e3:.3f} | {3.5 * fl / t_fb / 1e12:.0f} | {vs('fb', t_fb)}")
            print(f"| {name} | {t_f * 1e3:.3f} | {fl / t_f / 1e12:.0f} | {vs('fwd', t_f)} | "
                  f"{fb_cells} | {diff} | {c1 + c2:.1f} |", flush=True)
            if name == "ours" and not breakdown_done and not DRY:
                try:  # per-kernel times (CUPTI): forward / dQ / dK,dV / XLA glue
                    from jax.experimental.mosaic.gpu import profiler
                    _, per_kernel = profiler.measure(fb, aggregate=False)(*args, dout)
                    print("|   ours fwd+bwd per kernel (CUPTI): " + "; ".join(
                        f"{n[:40]} {ms:.3f} ms" for n, ms in (per_kernel or [])) + " |")
                    breakdown_done = True
                except Exception as e:  # noqa: BLE001
                    print(f"|   (CUPTI breakdown unavailable: {type(e).__name__}) |")
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()
            print(f"| {name} | n/a: {type(e).__name__}: {msg[0][:120] if msg else ''} |", flush=True)
print("\nratios: 'vs cuDNN' = t_cudnn / t_impl (1.00x = cuDNN speed, < 1 slower).")
print_warnings()
PY

# ---------------------------------------------------------------------------------------------
cat > "$WORK/speed_halo.py" <<'PY'
"""HaloNet H0 stage-1: fused kernel vs the XLA unfold reference (f32 HIGHEST inside)."""
from common import *
from kernels_pallas import halo

header("halo speed (bf16 inputs; the reference computes in f32 at HIGHEST)")
b, side, block, hs, heads, d = (64, 64, 8, 3, 8, 16) if not DRY else (1, 16, 8, 3, 2, 16)
win = block + 2 * hs
ks = jax.random.split(jax.random.key(0), 5)
arrays = [jax.random.normal(ks[0], (b, side, side, heads, d), jnp.bfloat16),
          jax.random.normal(ks[1], (b, side, side, heads, d), jnp.bfloat16),
          jax.random.normal(ks[2], (b, side, side, heads, d), jnp.bfloat16),
          jax.random.normal(ks[3], (2 * win - 1, d), jnp.bfloat16),
          jax.random.normal(ks[4], (2 * win - 1, d), jnp.bfloat16)]
useful = 4.0 * b * heads * side * side * win * win * d  # QK^T + PV over the window
print(f"B={b} map={side}x{side} block={block} halo={hs} heads={heads} d={d}; "
      f"useful fwd {useful / 1e9:.1f} GFLOP")
print("| impl | mode | ms | peak MiB (compiled) |")
print("|---|---|---|---|")
for impl in ("xla", IMPL):
    f = lambda *a, impl=impl: halo.halo_attention(*a, block=block, halo=hs, impl=impl)
    fns = {"fwd": f, "fwd+bwd": lambda *a, f=f: jax.grad(
        lambda *x: jnp.sum(f(*x).astype(F32)), argnums=range(5))(*a)}
    for mode, fn in fns.items():
        try:
            compiled = jax.jit(fn).lower(*arrays).compile()
            mem = compiled.memory_analysis()
            peak = ("n/a" if mem is None else
                    f"{(mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20:.0f}")
            jax.block_until_ready(compiled(*arrays))
            times = []
            for _ in range(5):
                t = time.perf_counter(); jax.block_until_ready(compiled(*arrays))
                times.append(time.perf_counter() - t)
            print(f"| {impl} | {mode} | {statistics.median(times) * 1e3:.2f} | {peak} |", flush=True)
            if impl == IMPL and mode == "fwd+bwd" and not DRY:
                try:
                    from jax.experimental.mosaic.gpu import profiler
                    _, per_kernel = profiler.measure(compiled, aggregate=False)(*arrays)
                    top = sorted(per_kernel or [], key=lambda x: -x[1])[:6]
                    print("|   fused fwd+bwd top kernels (CUPTI): " + "; ".join(
                        f"{n[:40]} {ms:.3f} ms" for n, ms in top) + " |")
                except Exception as e:  # noqa: BLE001
                    print(f"|   (CUPTI breakdown unavailable: {type(e).__name__}) |")
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()
            print(f"| {impl} | {mode} | n/a: {type(e).__name__}: {msg[0][:120] if msg else ''} |")
print_warnings()
PY

# ---------------------------------------------------------------------------------------------
step() {  # step NAME SECONDS CMD...: run with a hard timeout, report, never abort the script
    local name=$1 secs=$2; shift 2
    echo; echo "=== [$name] timeout ${secs}s, started $(date +%T)"
    STEP_BUDGET=$((secs - 15)) timeout -k 10 "$secs" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "!!! [$name] TIMED OUT (partial output above)"
    elif [ $rc -ne 0 ]; then echo "!!! [$name] exited rc=$rc"
    else echo "=== [$name] done $(date +%T)"; fi
    return 0
}

{
echo "# kernels_pallas device check  $(date -Is)  repo=$REPO  DRY_RUN=$DRY_RUN"
(cd "$REPO" && git log -1 --oneline 2>/dev/null) || true
step env 30 bash -c "nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw --format=csv 2>/dev/null || true; \
  cd '$WORK' && $PY -c 'import jax; print(jax.__version__, jax.devices()); jax.print_environment_info()' 2>&1 | tail -n 25"
step attention_correctness 120 bash -c "cd '$WORK' && exec $PY check_attention.py"
step halo_correctness 60 bash -c "cd '$WORK' && exec $PY check_halo.py"
step attention_speed 210 bash -c "cd '$WORK' && exec $PY speed_attention.py"
step halo_speed 60 bash -c "cd '$WORK' && exec $PY speed_halo.py"
echo; echo "# finished $(date -Is); log: $LOG"
} 2>&1 | tee "$LOG"
rm -rf "$WORK"
