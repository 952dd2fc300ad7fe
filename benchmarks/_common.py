"""Shared set-up of the benchmarks: the embedded model, the Iris program with 3 demos, timing."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import dspy
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bt_trl.serving.models import embedded_model_path
from bt_trl.tasks import iris


def load_embedded():
    """The embedded SmolLM2-135M-Instruct in eval mode (float32 on CPU) and its tokenizer."""
    path = embedded_model_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def iris_program_with_demos(demos: int = 3, seed: int = 0) -> dspy.Module:
    """The paper's Iris ChainOfThought with `demos` labeled demos from the training split."""
    train, _, _ = iris.load_splits(seed)
    return dspy.LabeledFewShot(k=demos).compile(iris.program(), trainset=train)


def iris_examples(count: int, seed: int = 0) -> list[dspy.Example]:
    """`count` flowers (at most 100) from the validation and test splits."""
    _, val, test = iris.load_splits(seed)
    examples = val + test
    if not 1 <= count <= len(examples):
        raise ValueError(f"count must be between 1 and {len(examples)}, got {count}")
    return examples[:count]


def no_dspy_cache() -> None:
    """Every call is generated: both sides of a comparison must do the work."""
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)


@contextmanager
def timed(seconds: list[float]):
    """Appends the block's wall time to `seconds`."""
    start = time.perf_counter()
    yield
    seconds.append(time.perf_counter() - start)


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_note() -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"
