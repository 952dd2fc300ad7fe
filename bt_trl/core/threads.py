"""Concurrent calls that see the caller's DSPy settings, without DSPy's `ParallelExecutor`.

DSPy's executor empties tqdm's registry of bars each time it starts and owns SIGINT while it runs, which is only safe
from one thread at a time; bt_trl runs candidates, bootstrapping attempts and program calls concurrently, so it uses
this instead. DSPy's settings (`dspy.context(lm=...)`) are context variables: each call runs in a copy of the caller's
context and so sees them.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def map_in_threads(function: Callable[[Item], Result], items: Sequence[Item], max_workers: int) -> list[Result]:
    """`[function(item) for item in items]`, at most `max_workers` at a time. An exception is raised as the loop would
    meet it (the first in item order); then, and on Ctrl-C, the calls not started yet are dropped."""
    if not items:
        return []
    pool = ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(items))))
    try:
        futures = [pool.submit(contextvars.copy_context().run, function, item) for item in items]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
