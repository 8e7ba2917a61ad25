"""What a bucket workdir costs a run: the goodput breakdown of the same train.py run with its
workdir on the local disk, in a local GCS emulator, and in the emulator with latency added to
every request (a slow or distant bucket). The emulator serves one request at a time, so the
latency rows are an upper bound for a real bucket, which serves requests in parallel.

Each run is a fresh `train.py` process on 8 fake CPU devices (configs/vit.py:smoke shortened to
--steps), with a checkpoint every --checkpoint_every steps; the figures are the last train
record's `perf/goodput/*` (zoo/training/goodput.py). Prints a markdown table.

  .venv/bin/python bench/bucket_goodput.py [--steps 60] [--checkpoint_every 10]
      [--latencies 0,0.02]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

KINDS = ("compile", "checkpoint_restore", "data_wait", "checkpoint_save", "eval", "other")


def _run(workdir: str, env: dict, steps: int, checkpoint_every: int) -> dict:
    command = [sys.executable, "train.py", "--config", "configs/vit.py:smoke", "--workdir",
               workdir, f"--config.total_steps={steps}",
               f"--config.checkpoint_every={checkpoint_every}", "--config.log_every=10",
               f"--config.eval_every={steps}", "--config.logging.progress_bar=False"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{workdir}: train.py failed:\n{result.stderr[-3000:]}")
    from zoo import storage
    lines = storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines()
    return [r for r in map(json.loads, lines) if "train/loss" in r][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--checkpoint_every", type=int, default=10)
    parser.add_argument("--latencies", default="0,0.02",
                        help="seconds added per emulator request, comma-separated")
    args = parser.parse_args()
    import gcs_emulator

    base = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                XLA_FLAGS="--xla_force_host_platform_device_count=8")
    rows = []
    with tempfile.TemporaryDirectory() as local:
        rows.append(("local disk", _run(os.path.join(local, "run"), base, args.steps,
                                        args.checkpoint_every)))
    for latency in (float(x) for x in args.latencies.split(",")):
        server, url = gcs_emulator.start("bench", latency=latency)
        try:
            env = {**base, **gcs_emulator.environment(url)}
            os.environ.update(gcs_emulator.environment(url))  # this process reads the metrics
            import fsspec
            fsspec.AbstractFileSystem.clear_instance_cache()
            rows.append((f"emulator, +{latency * 1e3:.0f} ms/request",
                         _run("gs://bench/run", env, args.steps, args.checkpoint_every)))
        finally:
            server.stop()
    prefix = "perf/goodput/"
    print(f"train.py configs/vit.py:smoke, {args.steps} steps, a checkpoint every "
          f"{args.checkpoint_every}; seconds (fraction of wall)\n")
    print("| workdir | wall s | goodput | " + " | ".join(k.replace("_", " ") for k in KINDS)
          + " |")
    print("|---|---|---|" + "---|" * len(KINDS))
    for name, record in rows:
        cells = [f"{record[prefix + k + '_s']:.1f} ({100 * record[prefix + k + '_fraction']:.0f}%)"
                 for k in KINDS]
        print(f"| {name} | {record[prefix + 'wall_s']:.1f} | "
              f"{100 * record[prefix + 'fraction']:.1f}% | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
