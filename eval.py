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


from zoo.training import cli
from zoo.training.evaluate import evaluate_checkpoint

_RUN = cli.define_run_flags(lock_config=False, step=True)


def _evaluate(config, workdir: str, step: int | None) -> None:
    print(json.dumps(evaluate_checkpoint(config, workdir, step)), flush=True)


if __name__ == "__main__":
    cli.run(cli.main(_RUN, _evaluate))
