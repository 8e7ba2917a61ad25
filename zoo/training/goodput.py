"""Goodput: where a run's wall time went, in the spirit of MaxText's goodput reporting.

All figures are seconds of this process's wall clock, accumulated from the moment the run
started (`trainer.train_and_evaluate` was entered; for train.py that is after Python's imports
and the distributed runtime's start-up):

  wall                time since the run started.
  compile             tracing, lowering and compiling the train step (ahead of time).
  checkpoint_restore  looking for and restoring the latest checkpoint (with its fall-backs).
  data_wait           time blocked in `next(train_iterator)`: the input pipeline had no batch
                      ready (the first call also starts grain's workers).
  checkpoint_save     time the loop is blocked in `Checkpointer.save` (finishing the previous
                      asynchronous save, then copying the state off the devices) and waiting
                      for the last save at the end. The background write of an asynchronous
                      save overlaps training and is not counted.
  eval                evaluations, with their data and the eval step's first compilation.
  step                productive time: wall time inside the training loop minus the data
                      waits, saves and evaluations in it. That is the train steps' device time
                      as the host sees it at the loop's existing syncs (metrics fetched at log
                      and save steps), plus the host's per-step work (dispatch, logging, the
                      preemption check, stopping a profiler trace).
  other               the rest, wall - step - all of the above: set-up and tear-down (model
                      summary, state init and its compilation or pretrained weights, building
                      the data pipeline, closing it).

goodput = step / wall, and `<kind>_fraction` = kind / wall. The kinds and the step time are
disjoint spans of the wall clock, so goodput plus the measured kinds' fractions is at most 1,
and exactly 1 with other_fraction.

A resumed run measures from its own start (a new process, or a new call): its restore is
counted, and the steps the previous run lost (done after its last checkpoint) appear nowhere.
In a multi-process run each process measures itself; only process 0's figures are written.

Cheap by construction: host clocks (`time.perf_counter`) around calls that block anyway; no
device sync is added. Every train log record of metrics.jsonl (and so TensorBoard) carries the
totals so far under PREFIX, written before that step's eval and save; the run's last line
summarises the final totals. `perf/` is where run-dependent timing lives (tests/cli_runs.py
drops it before comparing runs exactly).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

PREFIX = "perf/goodput/"
# The badput kinds, in the order the summary line names them.
KINDS = ("compile", "checkpoint_restore", "data_wait", "checkpoint_save", "eval")


class GoodputRecorder:
    """Accumulates seconds per kind and the productive step time of one run (see the module
    docstring for the definitions). `clock` is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._started = clock()
        self.seconds = dict.fromkeys(KINDS, 0.0)
        self._loop_started: float | None = None
        self._badput_at_loop_start = 0.0
        self._frozen_step_seconds: float | None = None  # set when the loop has ended

    def add(self, kind: str, seconds: float) -> None:
        self.seconds[kind] += seconds

    @contextlib.contextmanager
    def measure(self, kind: str) -> Iterator[None]:
        """Adds the time spent in the block to `kind` (also when it raises)."""
        start = self._clock()
        try:
            yield
        finally:
            self.add(kind, self._clock() - start)

    def start_steps(self) -> None:
        """The training loop begins: from here, time not spent in a badput kind is step time."""
        self._loop_started = self._clock()
        self._badput_at_loop_start = sum(self.seconds.values())

    def stop_steps(self) -> None:
        """The training loop has ended: what follows (closing, the final wait for a save) is
        not step time."""
        self._frozen_step_seconds = self._step_seconds(self._clock())

    def _step_seconds(self, now: float) -> float:
        if self._frozen_step_seconds is not None:
            return self._frozen_step_seconds
        if self._loop_started is None:
            return 0.0
        in_loop_badput = sum(self.seconds.values()) - self._badput_at_loop_start
        # max(): clock granularity must never make a tiny loop report negative step time.
        return max(0.0, now - self._loop_started - in_loop_badput)

    def metrics(self) -> dict[str, float]:
        """The totals so far, as metrics.jsonl keys: PREFIX + wall_s, step_s, fraction (the
        goodput), and <kind>_s and <kind>_fraction for each kind and for "other"."""
        now = self._clock()
        wall = max(now - self._started, 1e-9)
        step = self._step_seconds(now)
        record = {PREFIX + "wall_s": wall, PREFIX + "step_s": step,
                  PREFIX + "fraction": step / wall}
        other = max(0.0, wall - step - sum(self.seconds.values()))
        for kind, seconds in (*self.seconds.items(), ("other", other)):
            record[f"{PREFIX}{kind}_s"] = seconds
            record[f"{PREFIX}{kind}_fraction"] = seconds / wall
        return record

    def summary(self) -> str:
        """'goodput 81.3% of 62.0 s wall in train steps; compile 5.1 s (8.2%), ...'."""
        values = self.metrics()
        parts = [f"{kind.replace('_', ' ')} {values[f'{PREFIX}{kind}_s']:.1f} s "
                 f"({100 * values[f'{PREFIX}{kind}_fraction']:.1f}%)"
                 for kind in (*KINDS, "other")]
        return (f"goodput {100 * values[PREFIX + 'fraction']:.1f}% of "
                f"{values[PREFIX + 'wall_s']:.1f} s wall in train steps; " + ", ".join(parts))
