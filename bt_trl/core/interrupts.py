"""Ctrl-C that always stops a run.

DSPy's `ParallelExecutor` (under `Evaluate` and the optimizers' threads) catches the `KeyboardInterrupt` of a Ctrl-C and
raises a plain `Exception("Execution cancelled ...")` instead, which any `except Exception` on the way up (a runtime
fault counted and survived) would absorb. Inside `interruptible()`, a SIGINT is recorded before it is raised, and
`raise_if_interrupted` turns whatever exception carried it back into the `KeyboardInterrupt` it was.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_interrupted = threading.Event()
_depth = 0  # nested blocks share the outermost one's handler


@contextmanager
def interruptible() -> Iterator[None]:
    """For the block, in the main thread: a SIGINT is recorded, then handled as before (a `KeyboardInterrupt` by
    default). Elsewhere, or where SIGINT is ignored, nothing changes."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN or _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return

    def record_then_raise(signum, frame):
        _interrupted.set()
        if callable(previous):
            previous(signum, frame)
        else:  # SIG_DFL
            signal.default_int_handler(signum, frame)

    _interrupted.clear()
    signal.signal(signal.SIGINT, record_then_raise)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        signal.signal(signal.SIGINT, previous)
        _interrupted.clear()


def interrupted() -> bool:
    """Whether a SIGINT arrived inside the current `interruptible()` block."""
    return _interrupted.is_set()


def raise_if_interrupted(cause: BaseException | None = None) -> None:
    """In an `except` clause that survives faults: re-raises a Ctrl-C that a library turned into another exception."""
    if _interrupted.is_set():
        raise KeyboardInterrupt from cause
