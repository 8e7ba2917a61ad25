"""The evaluation command line: `eval.py` in the repository and the `zoo-eval` console script of
the installed package run this module's `run()` (its usage is eval.py's docstring)."""
from __future__ import annotations

import json

from zoo.training import cli
from zoo.training.evaluate import evaluate_checkpoint

_RUN = cli.define_run_flags(lock_config=False, step=True)


def _evaluate(config, workdir: str, step: int | None) -> None:
    print(json.dumps(evaluate_checkpoint(config, workdir, step)), flush=True)


def run() -> None:
    """Parses the flags (one-line errors) and evaluates: the entry point of both commands."""
    cli.run(cli.main(_RUN, _evaluate))


if __name__ == "__main__":
    run()
