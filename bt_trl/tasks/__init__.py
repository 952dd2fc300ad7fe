"""Tasks of the BetterTogether paper: each module has `program()`, `metric` and `load_splits(seed, sizes)`."""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = ("iris",)


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return importlib.import_module(f"{__name__}.{name}")
