"""How long `zoo.create_model(name)` takes for every registered model at full size, the way a
notebook user meets it: the first call in a fresh Python process (imports excluded), and the
same call again in that process. Each model runs in its own subprocess, twice:
  cold   no persistent compilation cache (what a new user gets today)
  cached a persistent compilation cache that an earlier process filled (JAX_COMPILATION_CACHE_DIR,
         min compile time 0: eager initialisation compiles many small programs)
Prints a markdown table (issue 20's goal: every model under 3 s on a 2-core CPU).

  .venv/bin/python bench/create_model.py [--models swin_t,vit_b16]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import jax
import zoo
name = sys.argv[1]
start = time.perf_counter()
model = zoo.create_model(name)
jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
first = time.perf_counter() - start
start = time.perf_counter()
model = zoo.create_model(name)
jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
again = time.perf_counter() - start
print(json.dumps({"first": first, "again": again, "params": zoo.count_params(model)}))
"""


def _child(name: str, cache: str | None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    result = subprocess.run([sys.executable, "-c", CHILD, name], env=env, capture_output=True,
                            text=True, timeout=900)
    if result.returncode:
        raise RuntimeError(f"{name}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="", help="comma-separated; default: all registered")
    args = parser.parse_args()
    import zoo
    names = [n for n in args.models.split(",") if n] or zoo.list_models()
    print("| model | params | cold first call (s) | same process again (s) | "
          "cached, new process (s) |")
    print("|---|---|---|---|---|")
    for name in names:
        cold = _child(name, None)
        with tempfile.TemporaryDirectory() as cache:
            _child(name, cache)  # fills the cache
            cached = _child(name, cache)
        print(f"| {name} | {cold['params']:,} | {cold['first']:.1f} | {cold['again']:.2f} | "
              f"{cached['first']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
