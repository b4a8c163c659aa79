"""A hang guard for tests of hostile inputs: what a catastrophic pattern (exponential backtracking, an
unbounded loop) would never finish fails the test after ``seconds``; it is not a speed target (machines
are noisy: speed is measured in bench/)."""

from __future__ import annotations

import signal
from contextlib import contextmanager


@contextmanager
def finishes_within(seconds: int, what: str):
    def hang(signum, frame):
        raise AssertionError(f"{what} did not finish in {seconds} s: something in it does not end or backtracks")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
