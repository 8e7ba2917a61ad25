r"""Evaluates a checkpoint of a train.py run on the eval split, on whatever devices are here.

  python eval.py --config configs/vit.py:smoke --workdir /tmp/vit_smoke [--step 100]

Only the model's variables are read from the checkpoint (no optimizer state), placed on a mesh
built from the local devices, so a run trained on a pod slice can be evaluated on one GPU or on
a laptop CPU. The metrics are printed as one JSON line, the last line of stdout, and written to
<workdir>/eval_<step>.json.

The eval mesh puts all devices used on the batch (the first data axis); the number used is the
largest that divides config.eval.batch_size. Single-process only.
"""
from __future__ import annotations

import json
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from zoo.training import reporting
from zoo.training.evaluate import evaluate_checkpoint

_CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Config file and variant the run was trained with.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.py.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: latest).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    jax.config.update("jax_threefry_partitionable", True)
    reporting.quiet_library_logs()
    try:
        result = evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _STEP.value)
    except (ValueError, FileNotFoundError) as error:  # ConfigError, bad --step, no ckpt
        print(f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
