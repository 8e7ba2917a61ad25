"""What the command lines share (train.py, eval.py, sample.py, render.py): the run flags, the
checks before a run, and one way to fail (a one-line message on stderr, exit status 2).

A script defines the run flags with `define_run_flags` (and its own flags), then starts with
`run(main)` instead of `absl.app.run(main)`; `main(run_flags, body)` builds the usual main
calling `body(config, workdir, step)`.

Everything wrong with what the user gave is one line on stderr and exit status 2, before any
compilation: flags absl rejects, a config file that is missing, does not parse or whose
variant is unknown, a `--config.<field>` the config does not have, a `--workdir` that is a file
or cannot be written. absl's and ml_collections' own exceptions are translated here, never
leaked. `--verbose` shows the traceback as well.

`--config.model.overrides.<kwarg>=<value>` may name any argument of the model's builder, not
only the ones the config file sets (train.py locks the config against new fields elsewhere):
such flags are taken out before absl parses the rest and set afterwards, the value read as a
Python literal (else a string); the schema check then builds the model, so an argument the
builder does not take is a one-line error listing the ones it does.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import logging
import os
import re
import sys
import tempfile
import traceback
from typing import Any, Callable, Mapping

import jax
from absl import app, flags
from ml_collections import config_flags

from zoo import storage
from zoo.training import evaluate, reporting, tasks

USAGE_EXIT = 2
_OVERRIDE_FLAG = re.compile(r"--config\.model\.overrides\.([A-Za-z_][A-Za-z0-9_]*)=(.*)",
                            re.DOTALL)
# --config.model.overrides.<kwarg>=<value> flags taken out of argv by `_parse_flags`.
_MODEL_OVERRIDES: dict[str, Any] = {}


def fail(message: str, error: BaseException | None = None) -> None:
    """One line on stderr (the traceback too under --verbose), exit status 2.

    The line stays the last one: without --verbose, what libraries would still print while the
    interpreter shuts down (asyncio's "Task exception was never retrieved" for an orbax write
    that failed, "Exception ignored in" coroutine notes) is dropped, as it repeats the error."""
    verbose = "--verbose" in sys.argv
    if error is not None and verbose:
        traceback.print_exception(error)
    print(" ".join(str(message).split()), file=sys.stderr, flush=True)
    if not verbose:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
        sys.unraisablehook = lambda _unraisable: None
    sys.exit(USAGE_EXIT)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _config_argument(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg[len("--config="):]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _load_config(config_arg: str | None) -> Any:
    """The config the --config flag names, loaded again to describe an error (None if that
    fails too): ml_collections validates overrides before it stores the loaded config."""
    if not config_arg:
        return None
    path, _, variant = config_arg.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("_config_for_error_message", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(variant) if variant else module.get_config()
    except Exception:  # noqa: BLE001 - only used to word a message; the parse error stands
        return None


def _unknown_field_message(argv: list[str], error: BaseException) -> str:
    """'--config.a.b=v: config.a has no field 'b'; allowed: [...]' for the flag at fault."""
    missing = str(error).strip("\"'")
    config = _load_config(_config_argument(argv))
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0].split(".")
        node, parents = config, []
        for key in path:
            if key == missing or not hasattr(node, "keys") or key not in node:
                allowed = sorted(node.keys()) if hasattr(node, "keys") else []
                where = ".".join(["config"] + parents)
                return (f"{arg}: {where} has no field {key!r}; allowed: {allowed}"
                        + (" (config.model.overrides accepts any builder argument)"
                           if parents == ["model"] else ""))
            node, parents = node[key], parents + [key]
    return f"a --config.<field> flag names a field the config does not have: {missing}"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every failure turned into one line (`fail`)."""
    kept = []
    for arg in argv:
        match = _OVERRIDE_FLAG.fullmatch(arg)
        if match:
            _MODEL_OVERRIDES[match.group(1)] = _literal(match.group(2))
        else:
            kept.append(arg)
    # ml_collections reads its override flags from sys.argv itself.
    sys.argv[:] = [arg for arg in sys.argv if not _OVERRIDE_FLAG.fullmatch(arg)]
    config_arg = _config_argument(kept)
    if config_arg is not None:
        path = config_arg.split(":", 1)[0]
        if not os.path.isfile(path):
            fail(f"--config={config_arg}: no config file {path!r}; allowed: a Python config "
                 f"file with get_config(), then ':' and its variant (configs/vit.py:smoke)")
    try:
        return flags.FLAGS(kept)
    except flags.Error as error:  # unknown flags, bad values, a get_config that raised
        lines = [line for line in str(error).splitlines() if line.strip()]
        if "Traceback (most recent call last)" in str(error):  # keep the exception's own line
            lines = [lines[0].split(":")[0], lines[-1]]
        fail(": ".join(line.strip() for line in lines), error)
    except (AttributeError, KeyError) as error:  # --config.<path> naming no field
        fail(_unknown_field_message(kept, error), error)
    except SyntaxError as error:  # the config file itself
        fail(f"--config={config_arg}: {error.filename}:{error.lineno}: {error.msg}", error)
    except (OSError, ImportError, ValueError, TypeError) as error:
        fail(f"--config={config_arg}: the config file cannot be loaded: "
             f"{type(error).__name__}: {error}", error)
    raise AssertionError("unreachable")


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)` with the one-line flag errors of this module."""
    app.run(main, flags_parser=_parse_flags)


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


flags.DEFINE_bool("verbose", False, "Show tracebacks with the one-line errors.")


def _check_remote_workdir(workdir: str, *, create: bool) -> None:
    """A bucket workdir (gs://...) must be reachable; one to read must hold a run. Writes are
    checked when the run writes config.json, before any compilation."""
    try:
        found = storage.isdir(workdir)
        has_run = found and storage.exists(storage.join(workdir, "config.json"))
    except ImportError as error:
        fail(f"--workdir={workdir}: {error}", error)
    except Exception as error:  # noqa: BLE001 - any client error: name the workdir and cause
        fail(f"--workdir={workdir} cannot be reached: {type(error).__name__}: "
             f"{' '.join(str(error).split())[:300]}; allowed: a bucket path these credentials "
             f"can read and write", error)
    if not create and not has_run:
        fail(f"--workdir={workdir} holds no config.json; allowed: the workdir of a train.py run")


def _check_workdir(workdir: str, *, create: bool) -> None:
    """A local --workdir must be a directory this process can create files in (`create`: it may
    be missing, train.py makes it; otherwise it must exist: a run to read)."""
    if storage.is_remote(workdir):
        _check_remote_workdir(workdir, create=create)
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        fail(f"--workdir={workdir} is an existing file; allowed: a directory (created if "
             f"missing)")
    if not create and not os.path.isdir(workdir):
        fail(f"--workdir={workdir} does not exist; allowed: the directory of a train.py run")
    # Nothing is created here (a run that fails its config check leaves no empty workdir): the
    # workdir, or the nearest existing folder above it, must take a new file. A real write,
    # not os.access: it also catches read-only mounts, and it holds for root, which os.access
    # waves through.
    existing = os.path.abspath(workdir)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as error:
        where = "" if existing == os.path.abspath(workdir) else f" (in {existing})"
        fail(f"--workdir={workdir} cannot be written{where}: {error.strerror or error}; "
             f"allowed: a directory the run can create files in", error)


def _apply_model_overrides(config) -> None:
    if not _MODEL_OVERRIDES:
        return
    try:
        with config.unlocked():
            for key, value in _MODEL_OVERRIDES.items():
                config.model.overrides[key] = value
    except (TypeError, ValueError, AttributeError, KeyError) as error:
        fail(f"--config.model.overrides: {error}", error)


def start(argv, run: RunFlags, *, create_workdir: bool = False) -> None:
    """The checks and settings every script starts with (`create_workdir`: train.py)."""
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}; flags are --name=value")
    try:
        config = run.config.value
    except (OSError, ImportError, ValueError, TypeError) as error:
        fail(f"--config: the config file cannot be loaded: {error}", error)
    if config is None or not run.workdir.value:
        fail("--config and --workdir are required, e.g. --config configs/vit.py:smoke "
             "--workdir /tmp/run")
    _apply_model_overrides(config)
    _check_workdir(run.workdir.value, create=create_workdir)
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
            fail(f"{type(error).__name__}: {error}", error)

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
