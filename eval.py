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

from zoo.training import eval_main

if __name__ == "__main__":
    eval_main.run()
