"""Checkpoints (orbax) and preemption.

Each checkpoint step holds two items: "state", the train-state dict {"model", "optimizer",
"step"}, and "data_iter", the grain iterator position, so a resumed run sees exactly the
batches an uninterrupted run would have seen. Orbax writes each step into a temporary directory
and renames it when complete, so a process killed mid-save leaves no half checkpoint behind.

Restoring is always against an abstract target that carries the shardings of the current mesh,
which is what lets a checkpoint written on one mesh (or host count of devices) load on another.
If the newest checkpoint cannot be read (files truncated or deleted by hand), the loop falls
back to the newest readable one and moves the broken step aside, since orbax would otherwise
refuse to write that step number again.
"""
from __future__ import annotations

import errno
import json
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from zoo import storage
from zoo.training.errors import CheckpointError

STATE, DATA_ITER = "state", "data_iter"


class _IteratorSnapshot:
    """The data iterator's position captured when `save` is called.

    Saves may complete in a background thread after the loop has moved on; the saved position
    must be the one that matches the saved train state, not wherever the iterator is by then.
    grain's checkpoint handler stores the bytes `get_state` returns for objects that are not
    grain DatasetIterators (JSON here).
    """

    def __init__(self, state: Any):
        self._encoded = json.dumps(state, indent=4).encode()

    def get_state(self) -> bytes:
        return self._encoded


class _IteratorRestorer:
    """Hands a restored position to the loop's iterator through its own `set_state`, so the
    iterator can drop anything it had already prefetched."""

    def __init__(self, iterator):
        self._iterator = iterator

    def set_state(self, encoded: bytes) -> None:
        self._iterator.set_state(json.loads(encoded))

    def start_prefetch(self) -> None:
        """grain's handler calls this after set_state; prefetching is the iterator's business."""


class Checkpointer:
    """Periodic, final and preemption saves plus restore-with-fallback for one run directory."""

    def __init__(self, directory: str, *, keep: int, async_save: bool,
                 quarantine_dir: str | None = None):
        self.directory = storage.abspath(directory)  # orbax writes buckets itself
        self.quarantine_dir = quarantine_dir or storage.join(storage.dirname(self.directory),
                                                             "corrupt_checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
                self.directory, item_names=(STATE, DATA_ITER), options=options,
                item_handlers={STATE: ocp.StandardCheckpointHandler(),
                               DATA_ITER: grain.checkpoint.CheckpointHandler()})
        self._in_flight: int | None = None  # step of the last save started
        self._failed: CheckpointError | None = None  # a write that failed

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iterator) -> None:
        """Starts writing `state` and the position of `data_iterator` (anything with
        get_state() -> JSON-able dict) as checkpoint `step`.

        A write that fails (a full disk, a lost mount) raises CheckpointError naming the step,
        the reason and the checkpoints that are intact, here or, for an asynchronous save, from
        the next save/wait/close. Orbax writes into a temporary folder and renames it on
        success, so a failed write never damages an earlier checkpoint."""
        self._raise_if_failed()
        # Orbax finishes the previous asynchronous save before starting this one anyway;
        # waiting here first attributes a failure to the step that failed.
        self._finish_in_flight()
        snapshot = _IteratorSnapshot(data_iterator.get_state())
        try:
            self.manager.save(step, args=ocp.args.Composite(**{
                    STATE: ocp.args.StandardSave(state),
                    DATA_ITER: grain.checkpoint.CheckpointSave(snapshot)}), force=True)
        except Exception as error:  # noqa: BLE001  (any write failure, named with its step)
            self._failed = self._write_error(step, error)
            raise self._failed from error
        self._in_flight = step

    def _write_error(self, step: int | None, error: BaseException) -> CheckpointError:
        text = " ".join(str(error).split())
        reason = ("the disk is full (No space left on device)" if "No space left" in text
                  or getattr(error, "errno", None) == errno.ENOSPC
                  else f"{type(error).__name__}: {text[:300]}")
        try:
            intact = [s for s in self.all_steps() if s != step]
        except Exception:  # noqa: BLE001  (listing may fail on the same broken disk)
            intact = []
        resume = f"step {intact[-1]}" if intact else "scratch"
        return CheckpointError(
                f"could not write the checkpoint of step {step} to {self.directory}: {reason}. "
                f"The checkpoints already there ({intact or 'none'}) are untouched; fix the "
                f"cause and run the same command to resume from {resume}")

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            raise self._failed

    def _finish_in_flight(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001  (an asynchronous write that failed)
            self._failed = self._write_error(self._in_flight, error)
            raise self._failed from error

    def restore_latest(self, target, data_iterator) -> tuple[int, Any] | None:
        """Restores the newest readable checkpoint onto `target`'s shardings.

        `data_iterator.set_state` receives the saved position. Returns (step, state), or None
        when the directory has no checkpoint. Unreadable newer
        checkpoints are reported with a warning and moved to `quarantine_dir`. If none is
        readable the first error is raised and nothing is moved (that usually means the config
        no longer matches the checkpoints, not that all of them are corrupt).
        """
        failed: list[tuple[int, BaseException]] = []
        for step in reversed(self.all_steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**{
                        STATE: ocp.args.StandardRestore(target),
                        DATA_ITER: grain.checkpoint.CheckpointRestore(
                                _IteratorRestorer(data_iterator))}))
            except Exception as error:  # noqa: BLE001  (any read failure: fall back)
                failed.append((step, error))
                continue
            for bad_step, error in failed:
                logging.warning("checkpoint at step %d in %s cannot be restored (%s: %s); "
                                "falling back to step %d and moving it to %s", bad_step,
                                self.directory, type(error).__name__,
                                " ".join(str(error).split())[:300], step, self.quarantine_dir)
                self._quarantine(bad_step)
            return step, restored[STATE]
        if failed:
            raise CheckpointError(
                    f"no checkpoint in {self.directory} can be restored: "
                    f"{describe_failures(failed)}. Either the config no longer matches the "
                    f"run (model, optimizer or EMA settings changed), or every checkpoint is "
                    f"damaged; nothing was moved or overwritten") from failed[0][1]
        return None

    def quarantine_all(self) -> list[int]:
        """Moves every checkpoint to `quarantine_dir` (a deliberate restart from scratch)."""
        steps = self.all_steps()
        for step in steps:
            self._quarantine(step)
        return steps

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            storage.makedirs(self.quarantine_dir)
            source = storage.join(self.directory, str(step))
            destination = storage.join(self.quarantine_dir, str(step))
            if storage.exists(destination):
                storage.rmtree(destination)
            # in a bucket a copy and a delete: a step half moved is still never loaded (its
            # commit marker goes with the copy; the rest of the source is unreadable)
            storage.move(source, destination)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True when orbax's multi-host preemption notice says to save at `step`."""
        return bool(self.manager.reached_preemption(step))

    def wait(self) -> None:
        self._raise_if_failed()
        self._finish_in_flight()

    def close(self) -> None:
        """Waits for the save in flight and releases orbax; after a failed write it only
        releases (the error has been raised already)."""
        try:
            if self._failed is None:
                self._finish_in_flight()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001
                if self._failed is None:
                    raise


def describe_failures(failed: list[tuple[int, BaseException]]) -> str:
    """'step 8: UnicodeDecodeError: ...; step 4: ...' (each reason cut to 200 characters)."""
    return "; ".join(f"step {step}: {type(error).__name__}: "
                     f"{' '.join(str(error).split())[:200]}" for step, error in failed)


def restore_model_only(directory: str, model_target, step: int | None = None, *,
                       subtree: str = "model") -> tuple[int, Any]:
    """Reads only the "model" subtree (or "ema", the moving average of its variables) of
    checkpoint `step` (default: newest) onto `model_target`'s shardings: no optimizer state is
    read, and any mesh can load it."""
    reader = ocp.CheckpointManager(
            storage.abspath(directory), item_names=(STATE,),
            item_handlers={STATE: ocp.PyTreeCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        steps = sorted(reader.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoint found in {directory}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ValueError(f"--step={step} has no checkpoint in {directory}; available: "
                             f"{steps}")
        target = {subtree: model_target}
        try:
            restored = reader.restore(step, args=ocp.args.Composite(**{
                    STATE: ocp.args.PyTreeRestore(
                            item=target, partial_restore=True,
                            restore_args=ocp.checkpoint_utils.construct_restore_args(target))}))
        except Exception as error:  # noqa: BLE001  (any read failure, named with its step)
            raise CheckpointError(
                    f"the checkpoint at step {step} in {directory} cannot be read: "
                    f"{describe_failures([(step, error)])}; steps present: {steps} (--step "
                    f"picks another). Either the config no longer matches the run, or the "
                    f"checkpoint is damaged") from error
        return step, restored[STATE][subtree]
    finally:
        reader.close()


class PreemptionFlag:
    """Set by SIGTERM or SIGINT (Ctrl-C); the loop checks it at step boundaries, saves, and
    exits cleanly (status 0, "stopped at step N on SIGINT; resume with the same command").

    The handler only sets a flag: saving from inside a signal handler would race the step in
    flight. A second SIGINT while the first is pending is the user insisting: the default
    handler comes back and KeyboardInterrupt is raised at once (the last saved checkpoint
    stands; the current step's work is lost).
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self._event = threading.Event()
        self.signal_name = ""
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Puts back the handlers that were installed before (the loop has ended)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        del frame
        if signum == signal.SIGINT and self._event.is_set():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()
