"""What the command lines share (train.py, eval.py, sample.py, render.py): the run flags, the
checks before a run, and one way to fail (a one-line message on stderr, exit status 2).

A script defines the run flags with `define_run_flags` (and its own flags), then hands a
function of (config, workdir, step) to `main`, which `absl.app.run` calls.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Mapping

import jax
from absl import app, flags
from ml_collections import config_flags

from zoo.training import evaluate, reporting, tasks


@dataclasses.dataclass(frozen=True)
class RunFlags:
    config: Any  # the --config flag holder (and its --config.x=y overrides)
    workdir: flags.FlagHolder
    step: flags.FlagHolder | None  # --step, for the scripts that read a checkpoint


def define_run_flags(*, lock_config: bool, step: bool) -> RunFlags:
    """Defines --config, --workdir and (with `step`) --step. A locked config (train.py) rejects
    --config.x=y overrides of keys the config file does not have."""
    return RunFlags(
            config=config_flags.DEFINE_config_file(
                    "config", None, "Config file and variant, e.g. configs/vit.py:smoke.",
                    lock_config=lock_config),
            workdir=flags.DEFINE_string("workdir", None,
                                        "Run directory (checkpoints, metrics, logs)."),
            step=(flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
                  if step else None))


def start(argv, run: RunFlags) -> None:
    """The checks and settings every script starts with."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if run.config.value is None or not run.workdir.value:
        raise app.UsageError("--config and --workdir are required")
    # The same numbers on any mesh: random bits must not depend on how arrays are sharded.
    jax.config.update("jax_threefry_partitionable", True)
    reporting.quiet_library_logs()


def main(run: RunFlags, body: Callable[[Any, str, int | None], None]
         ) -> Callable[[list[str]], None]:
    """An absl main calling `body(config, workdir, step)`; a ValueError (config errors
    included) or a missing checkpoint exits with status 2 and one line on stderr."""

    def run_main(argv):
        start(argv, run)
        try:
            body(run.config.value, run.workdir.value,
                 run.step.value if run.step is not None else None)
        except (ValueError, FileNotFoundError) as error:  # bad flags/config, no checkpoint
            print(f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
            sys.exit(2)

    return run_main


def write_samples(option_flags: Mapping[str, flags.FlagHolder]
                  ) -> Callable[[Any, str, int | None], None]:
    """The body of the sampling CLIs: restores the model of the checkpoint and calls its task's
    `write_samples` with the options the task takes (`Task.sample_options`), then prints any
    text samples and, as the last line, the summary."""

    def body(config, workdir: str, step: int | None) -> None:
        task = tasks.get_task(config)
        if not task.sample_options:
            raise ValueError(f"config.task={config.task!r} writes no samples")
        options = {name: holder.value for name, holder in option_flags.items()
                   if name in task.sample_options}
        task.check_sample_options(**options)  # before the (slow) restore
        step, model = evaluate.load_model(config, workdir, step)
        result = task.write_samples(model, workdir, step, **options)
        for i, text in enumerate(result.pop("texts", [])):
            print(f"----- sample {i} -----\n{text}", flush=True)
        print(result, flush=True)

    return body
