r"""Context parallelism: per-device memory and FLOPs of one SSA-LM training step vs context length.

  python bench/context_parallel.py                       # 8 CPU devices, compile only
  python bench/context_parallel.py --contexts 8192,32768 --sequence 1,8 --strategies ring
  python bench/context_parallel.py --time --impl pallas  # on a GPU/TPU host: times steps too

For each context length and `sequence` axis size, the real platform train step
(`zoo.training.step.make_train_step`: SSA GPT, AdamW, the LM task's loss) is built from
configs/ssa.py with `configs.common.with_context_parallelism` and compiled ahead of time for
the devices at hand (the data axis takes the devices the sequence axis leaves; one sequence per
data shard). The table reports, per device, XLA's compiled memory analysis (arguments:
parameters, optimizer state and the batch; temporaries: activations and everything the
backward keeps) and the compiled FLOPs, next to the collectives the step runs.

Nothing runs unless --time is given: on a CPU host the numbers are those of the partitioned
program, which is what sizes a TPU/GPU run (with the XLA attention reference on CPU; on an
accelerator the kernels' own working sets replace its per-block score matrices). Without
context parallelism (sequence 1) the reference materialises the [T, T] scores of every head:
the quadratic term the ring removes. With --time, each configuration runs warm-up + timed steps
and the median step time is added.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from configs import ssa as ssa_configs  # noqa: E402
from bench.timing import compile_train_step  # noqa: E402
from zoo.training import hlo  # noqa: E402
from zoo.training import mesh as mesh_lib  # noqa: E402

GB = 1024 ** 3


def build_config(context: int, sequence: int, strategy: str, *, width: int, depth: int,
                 heads: int, impl: str, dtype: str) -> ml_collections.ConfigDict:
    c = ssa_configs.get_config("smoke")
    c.lm.seq_len = context
    c.model.overrides = ml_collections.ConfigDict(dict(
            vocab_size=256, max_seq_len=context, width=width, depth=depth, num_heads=heads,
            **{k: v for k, v in c.model.overrides.items() if k.startswith("ssa_")}))
    c.model.attn_impl = impl
    c.precision.compute_dtype = dtype
    c.mesh_shape = (-1, 1, 1)
    if sequence > 1:
        common.with_context_parallelism(c, sequence, strategy=strategy)
    sizes = dict(zip(c.mesh_axes, mesh_lib.resolve_mesh_shape(c.mesh_shape,
                                                              jax.device_count())))
    c.batch_size = sizes["data"]  # one sequence per data shard
    return c


def time_step(compiled, parts, steps: int) -> float:
    """Median seconds of `steps` train steps after one warm-up (the state is donated, so each
    step consumes the previous one's output)."""
    skeleton, tx, shardings = parts["skeleton"], parts["tx"], parts["shardings"]
    data_sharding, spec = parts["data_sharding"], parts["batch_spec"]
    model = skeleton.init_pure()
    params, _ = skeleton.split(model)
    state = jax.device_put({"model": model, "optimizer": tx.init(params),
                            "step": np.int32(0)}, shardings)
    rng = np.random.default_rng(0)
    batch = jax.device_put({k: rng.integers(0, 256, v.shape).astype(v.dtype)
                            for k, v in spec.items()}, data_sharding)
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default="8192,16384,32768,65536,131072")
    parser.add_argument("--sequence", default="1,2,4,8")
    parser.add_argument("--strategies", default="ring,all_to_all")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--impl", default="xla", choices=("xla", "pallas", "interpret", "auto"))
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--time", action="store_true", help="also run and time the steps")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    sequences = [int(x) for x in args.sequence.split(",")]
    strategies = args.strategies.split(",")
    print(f"# {datetime.date.today()} · jax {jax.__version__} · {jax.device_count()} x "
          f"{jax.devices()[0].device_kind} · SSA GPT width {args.width}, depth {args.depth}, "
          f"{args.heads} heads · {args.dtype} · attn_impl={args.impl} · one sequence per data "
          f"shard\n")
    cols = "| context | sequence | strategy | data | args GB/dev | temp GB/dev | TFLOP/dev | " \
           "collective-permute | all-to-all | all-gather | compile s |"
    if args.time:
        cols += " step ms |"
    print(cols)
    print("|" + "---:|" * 2 + "---|" + "---:|" * (8 + args.time))
    for context in contexts:
        for sequence in sequences:
            for strategy in (strategies if sequence > 1 else ["–"]):
                config = build_config(context, sequence, strategy if sequence > 1 else "ring",
                                      width=args.width, depth=args.depth, heads=args.heads,
                                      impl=args.impl, dtype=args.dtype)
                start = time.perf_counter()
                try:
                    compiled, parts = compile_train_step(config)
                except ValueError as error:
                    print(f"| {context} | {sequence} | {strategy} | – | error: "
                          f"{' '.join(str(error).split())[:140]} |", flush=True)
                    continue
                seconds = time.perf_counter() - start
                memory = compiled.memory_analysis()
                cost = compiled.cost_analysis()
                cost = cost[0] if isinstance(cost, (list, tuple)) else cost
                counts = hlo.counts(hlo.collectives(compiled.as_text()))
                data = dict(zip(config.mesh_axes, mesh_lib.resolve_mesh_shape(
                        config.mesh_shape, jax.device_count())))["data"]
                row = (f"| {context} | {sequence} | {strategy} | {data} | "
                       f"{memory.argument_size_in_bytes / GB:.3f} | "
                       f"{memory.temp_size_in_bytes / GB:.3f} | "
                       f"{cost.get('flops', float('nan')) / 1e12:.3f} | "
                       f"{counts.get('collective-permute', 0)} | {counts.get('all-to-all', 0)} | "
                       f"{counts.get('all-gather', 0)} | {seconds:.1f} |")
                if args.time:
                    row += f" {time_step(compiled, parts, args.steps) * 1e3:.1f} |"
                print(row, flush=True)


if __name__ == "__main__":
    main()
