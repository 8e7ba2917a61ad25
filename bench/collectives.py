r"""Collectives of one training step per config and mesh: what the shardings really communicate.

  python bench/collectives.py                       # every smoke config, 3 meshes, 8 CPU devices
  python bench/collectives.py --configs configs/vit.py:smoke --impl xla

For each config (the smoke variants of every config file, model and task as `train.py` builds
them, global batch 8), the real train step (`zoo.training.step.make_train_step`) is compiled
ahead of time on the (8,1,1) data, (2,4,1) data x FSDP and (4,1,2) data x tensor meshes. Nothing
runs. The table counts the collectives in the compiled HLO (`zoo.training.hlo`) and names
the largest all-gather. The last column says whether any all-gather or all-to-all moves a kernel
operand or result (q, k, v, attention output): "no" is the goal on every mesh.

On a machine without accelerators, the script fakes 8 CPU devices and the kernels run in the
Pallas interpreter (`--impl interpret`, the default). The partitioning is the same as on GPU and
TPU; the collective algorithms and their cost are not.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402

from bench.timing import compile_train_step  # noqa: E402
from zoo.training import hlo  # noqa: E402

CONFIGS = ("configs/vit.py:smoke", "configs/halonet.py:smoke", "configs/swin.py:smoke",
           "configs/vsa.py:smoke", "configs/ssa.py:smoke", "configs/fit.py:encoder_smoke",
           "configs/fit.py:ar_smoke", "configs/fit.py:denoiser_smoke",
           "configs/nvist.py:smoke", "configs/nvist.py:mae_smoke")
MESHES = {"data8": (8, 1, 1), "data2_fsdp4": (2, 4, 1), "data4_tensor2": (4, 1, 2)}
BATCH = 8


def load_config(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    namespace: dict = {}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), namespace)  # noqa: S102  (a config file)
    return namespace["get_config"](arg or None)


def step_collectives(spec: str, mesh_shape, impl: str):
    """(collectives, kernel calls, parameter shapes) of the compiled train step."""
    config = load_config(spec)
    config.model.attn_impl = impl
    config.batch_size = BATCH
    config.grad_accum_steps = 1
    config.mesh_shape = mesh_shape
    compiled, parts = compile_train_step(config)
    params, calls = parts["params"], parts["kernel_calls"]
    param_shapes = [leaf.shape for leaf in jax.tree.leaves(params)]
    return hlo.collectives(compiled.as_text()), calls, param_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--impl", default="interpret", choices=("interpret", "xla", "pallas",
                                                                  "auto"))
    args = parser.parse_args()
    print(f"# {datetime.date.today()} · jax {jax.__version__} · "
          f"{jax.device_count()} x {jax.devices()[0].device_kind} · attn_impl={args.impl} · "
          f"global batch {BATCH}\n")
    kinds = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter", "collective-permute")
    print("| config | mesh | kernel calls | " + " | ".join(kinds)
          + " | largest all-gather | kernel operand gathered |")
    print("|---|---|---:|" + "---:|" * len(kinds) + "---|---|")
    for spec in args.configs:
        for mesh_name, shape in MESHES.items():
            impl = args.impl
            try:
                try:
                    found, calls, param_shapes = step_collectives(spec, shape, impl)
                except ValueError as error:
                    if "does not support" not in str(error):
                        raise
                    # No fused kernel for this configuration (e.g. a tiny halo block): the
                    # XLA reference is what impl="auto" runs for it on GPU/TPU too.
                    impl = "xla"
                    found, calls, param_shapes = step_collectives(spec, shape, impl)
            except ValueError as error:  # e.g. heads the tensor axis cannot split
                print(f"| {spec} | {mesh_name} | – | {' | '.join('–' for _ in kinds)} | – | "
                      f"error: {' '.join(str(error).split())[:160]} |")
                continue
            counts = hlo.counts(found)
            gathers = [c for c in found if c.kind == "all-gather"]
            largest = max(gathers, key=lambda c: c.elements, default=None)
            arrays = hlo.kernel_arrays(calls)
            bad = [c for c in found if c.kind in ("all-gather", "all-to-all")
                   and hlo.gathers_kernel_array(c, arrays, param_shapes, jax.device_count())]
            largest_text = (f"{largest.dtypes[0]}{list(largest.shapes[0])}" if largest
                            else "–")
            label = spec if impl == args.impl else f"{spec} ({impl}: no fused kernel)"
            print(f"| {label} | {mesh_name} | {len(calls)} | "
                  + " | ".join(str(counts[k]) for k in kinds)
                  + f" | {largest_text} | {'YES: ' + str(bad[0]) if bad else 'no'} |",
                  flush=True)


if __name__ == "__main__":
    main()
