"""How long `zoo.create_model(name)` takes for every registered model at full size, the way a
notebook user meets it: the first call in a fresh Python process (imports excluded), and the
same call again in that process. Each model runs in its own subprocesses:
  first   create_model as shipped (bucketed host draws, zoo/fast_init.py)
  again   the same call repeated in that process
  plain   the builder under plain eager jax (what create_model did before zoo/fast_init.py)
and the "identical" column compares a sha256 of every parameter between `first` and `plain`.
No persistent compilation cache is used. Prints a markdown table (issue 20's goal: every model
under 3 s on a 2-core CPU).

  .venv/bin/python bench/create_model.py [--models swin_t,vit_b16]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import hashlib, json, sys, time
import jax
import numpy as np
from flax import nnx
import zoo
from zoo import registry
name, mode = sys.argv[1], sys.argv[2]

def build():
    if mode == "plain":
        return registry._entry(name).builder(rngs=nnx.Rngs(0))
    return zoo.create_model(name)

def timed():
    start = time.perf_counter()
    model = build()
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    return model, time.perf_counter() - start

model, first = timed()
digest = hashlib.sha256()
for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(nnx.state(model)), key=str):
    array = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}{array.dtype}{array.shape}".encode())
    digest.update(array.tobytes())
again = timed()[1] if mode == "fast" else None
print(json.dumps({"first": first, "again": again, "params": zoo.count_params(model),
                  "sha256": digest.hexdigest()}))
"""


def _child(name: str, mode: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    for variable in ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE"):
        env.pop(variable, None)
    result = subprocess.run([sys.executable, "-c", CHILD, name, mode], env=env,
                            capture_output=True, text=True, timeout=900)
    if result.returncode:
        raise RuntimeError(f"{name}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="", help="comma-separated; default: all registered")
    args = parser.parse_args()
    import zoo
    names = [n for n in args.models.split(",") if n] or zoo.list_models()
    print("| model | params | create_model, first call (s) | same process again (s) | "
          "plain eager init (s) | bit-identical |")
    print("|---|---|---|---|---|---|")
    for name in names:
        fast = _child(name, "fast")
        plain = _child(name, "plain")
        same = "yes" if fast["sha256"] == plain["sha256"] else "NO"
        print(f"| {name} | {fast['params']:,} | {fast['first']:.1f} | {fast['again']:.2f} | "
              f"{plain['first']:.1f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
