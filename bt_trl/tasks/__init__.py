"""Tasks of the BetterTogether paper: each module has `program()`, `metric` and `load_splits(seed, sizes)`.

Tasks read their data from the Hub by default; `load_splits(..., data_path=...)` reads a local copy instead, and the
HotPotQA program takes a retriever (`program(retriever=..., data_path=...)`). `load_task` binds those options once for
scripts, checking them before any model work.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import ModuleType

import dspy

TASKS = ("iris", "iris_predict", "gsm8k", "hotpotqa")
SPLITS = ("train", "val", "test")


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return importlib.import_module(f"{__name__}.{name}")


@dataclass
class Task:
    """A task with its data split and its options bound."""

    name: str
    program: Callable[[], dspy.Module]  # a fresh initial program on every call
    metric: Callable
    train: list[dspy.Example]
    val: list[dspy.Example]
    test: list[dspy.Example]


def load_task(name: str, split_seed: int, sizes: tuple[int, int, int], **options) -> Task:
    """Loads task `name`: its splits (`sizes` = train/val/test examples, drawn with `split_seed`) and its program.

    Each split must get its size: 0 or more examples, never more than the task has. `options` (those not None) go
    to whichever of the task's `load_splits` and `program` take them (`data_path`, `retriever`); an option neither
    takes is an error. The program is built once here, so that a bad retriever or a
    missing corpus fails now.
    """
    module = get_task(name)
    for split, size in zip(SPLITS, sizes):
        if size < 0:
            raise ValueError(f"{split}_size must be >= 0 (a number of examples), got {size}")
    options = {key: value for key, value in options.items() if value is not None}

    def taken_by(function) -> dict:
        return {key: value for key, value in options.items() if key in inspect.signature(function).parameters}

    split_options, program_options = taken_by(module.load_splits), taken_by(module.program)
    unused = options.keys() - split_options.keys() - program_options.keys()
    if unused:
        raise ValueError(f"task {name!r} takes no option {', '.join(sorted(unused))}")
    build_program = partial(module.program, **program_options)
    build_program()
    splits = module.load_splits(split_seed, sizes, **split_options)
    for split, size, examples in zip(SPLITS, sizes, splits):
        if len(examples) < size:  # a task slicing a fixed split would silently give fewer
            raise ValueError(f"{split}_size {size}: task {name!r} has {len(examples)} {split} examples with split "
                             f"seed {split_seed}; ask for at most {len(examples)}")
    return Task(name, build_program, module.metric, *splits)
