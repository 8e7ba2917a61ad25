"""The training command line: `train.py` in the repository and the `zoo-train` console script
of the installed package run this module's `run()` (its usage is train.py's docstring)."""
from __future__ import annotations

import sys

from absl import flags

from zoo.training import cli, trainer
from zoo.training import mesh as mesh_lib
from zoo.training.errors import CheckpointError, ConfigError, DataError

_RUN = cli.define_run_flags(lock_config=True, step=False)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
_ALLOW_RESTART = flags.DEFINE_bool(
        "allow_restart_from_scratch", False, "When the workdir has checkpoints and none can be "
        "restored, move them to corrupt_checkpoints/ and start from step 0 (without this "
        "flag the run refuses, so nothing saved is overwritten by accident).")
_PROFILE_STEPS = flags.DEFINE_string(
        "profile_steps", "", "first,last: write a jax profiler trace of these steps "
        "(overrides config.logging.profile_steps).")


def main(argv):
    cli.start(argv, _RUN, create_workdir=True)
    mesh_lib.initialize_distributed(coordinator_address=_COORDINATOR.value,
                                    num_processes=_NUM_PROCESSES.value,
                                    process_id=_PROCESS_ID.value)
    config = _RUN.config.value
    try:
        profile = trainer.parse_profile_steps(_PROFILE_STEPS.value,
                                              config.logging.profile_steps)
        trainer.train_and_evaluate(config, _RUN.workdir.value, profile_steps=profile,
                                   allow_restart_from_scratch=_ALLOW_RESTART.value)
    except (ConfigError, CheckpointError, DataError) as error:
        cli.fail(f"{type(error).__name__}: {error}", error)
    except trainer.TrainingDiverged as error:
        print(f"TrainingDiverged: {error}", file=sys.stderr, flush=True)
        sys.exit(3)


def run() -> None:
    """Parses the flags (one-line errors) and trains: the entry point of both commands."""
    cli.run(main)


if __name__ == "__main__":
    run()
