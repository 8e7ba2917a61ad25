"""The goodput accumulator (zoo/training/goodput.py) on a fake clock: badput kinds add up, step
time is the loop's time minus the badput inside it, and nothing after the loop counts as steps.
The figures a real run writes are checked in test_train_cli.py and test_ema.py."""
from __future__ import annotations

import pytest

from zoo.training import goodput


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fractions_of_wall_time_with_step_time_measured_inside_the_loop():
    clock = FakeClock()
    recorder = goodput.GoodputRecorder(clock)
    recorder.add("compile", 3.0)
    clock.now += 3.0
    with recorder.measure("checkpoint_restore"):
        clock.now += 1.0
    clock.now += 1.0  # set-up outside the loop: neither a badput kind nor step time
    recorder.start_steps()
    with recorder.measure("data_wait"):
        clock.now += 0.5
    clock.now += 2.5  # steps
    with recorder.measure("eval"):
        clock.now += 1.0
    with recorder.measure("checkpoint_save"):
        clock.now += 1.0
    values = recorder.metrics()
    p = goodput.PREFIX
    assert values[p + "wall_s"] == pytest.approx(10.0)
    assert values[p + "step_s"] == pytest.approx(2.5)
    assert values[p + "fraction"] == pytest.approx(0.25)
    assert values[p + "compile_fraction"] == pytest.approx(0.3)
    assert values[p + "data_wait_s"] == pytest.approx(0.5)
    assert values[p + "checkpoint_restore_s"] == pytest.approx(1.0)
    assert values[p + "eval_s"] == pytest.approx(1.0)
    accounted = values[p + "fraction"] + sum(values[f"{p}{kind}_fraction"]
                                             for kind in goodput.KINDS)
    assert accounted == pytest.approx(0.9)
    assert values[p + "other_s"] == pytest.approx(1.0)  # the set-up

    recorder.stop_steps()
    with recorder.measure("checkpoint_save"):  # the final wait for an async save
        clock.now += 2.0
    clock.now += 8.0  # closing the pipeline
    values = recorder.metrics()
    assert values[p + "step_s"] == pytest.approx(2.5)
    assert values[p + "checkpoint_save_s"] == pytest.approx(3.0)
    assert values[p + "fraction"] == pytest.approx(0.125)
    assert recorder.summary().startswith(
            "goodput 12.5% of 20.0 s wall in train steps; compile 3.0 s (15.0%), "
            "checkpoint restore 1.0 s (5.0%), data wait 0.5 s (2.5%), checkpoint save 3.0 s")
    assert recorder.summary().endswith("eval 1.0 s (5.0%), other 9.0 s (45.0%)")


def test_a_block_that_raises_is_still_counted_and_no_loop_means_no_step_time():
    clock = FakeClock()
    recorder = goodput.GoodputRecorder(clock)
    with pytest.raises(OSError):
        with recorder.measure("checkpoint_restore"):
            clock.now += 2.0
            raise OSError("unreadable")
    values = recorder.metrics()
    assert values[goodput.PREFIX + "checkpoint_restore_s"] == pytest.approx(2.0)
    assert values[goodput.PREFIX + "step_s"] == 0.0
