"""Ctrl-C is a preemption like SIGTERM (save at the step boundary, exit 0); a second Ctrl-C
interrupts at once; the loop's handlers are put back afterwards. The end-to-end SIGTERM path
(signal -> checkpoint -> exit 0 -> bit-exact resume) is tests/training/test_train_cli.py's."""
from __future__ import annotations

import os
import signal
import time

import pytest

from zoo.training import checkpoint as ckpt_lib


def _deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # Python runs the handler at the next bytecode boundary


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_sets_the_flag_and_handlers_are_restored(signum):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    flag = ckpt_lib.PreemptionFlag()
    try:
        assert not flag.is_set()
        _deliver(signum)
        assert flag.is_set() and flag.signal_name == signal.Signals(signum).name
    finally:
        flag.restore()
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_ctrl_c_interrupts_immediately():
    flag = ckpt_lib.PreemptionFlag()
    try:
        _deliver(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGINT)
    finally:
        flag.restore()
