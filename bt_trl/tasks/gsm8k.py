"""The paper's GSM8K task: ChainOfThought `question -> answer` on grade-school math word problems.

Data: `openai/gsm8k` (config `main`) from the Hub, or a local copy: a folder with the official `train.jsonl` and
`test.jsonl` (as in openai/grade-school-math) or a single JSONL file. Every gold answer is a worked solution ending in
`#### <number>`; the example's `answer` is that number and `gold_reasoning` the solution before it.

Metric: DSPy's `gsm8k_metric`, the one the paper used — the last number on the first line of the predicted answer
(thousands separators and decimals dropped) equals the gold number.
"""

from __future__ import annotations

import dspy
from dspy.datasets.gsm8k import gsm8k_metric

from bt_trl.tasks.sources import read_records, split_examples

HUB_ID = "openai/gsm8k"
HUB_CONFIG = "main"
ANSWER_MARKER = "####"


def program() -> dspy.Module:
    return dspy.ChainOfThought("question -> answer")


def metric(example: dspy.Example, prediction, trace=None) -> bool:
    return bool(gsm8k_metric(example, prediction, trace))


def to_example(record: dict) -> dspy.Example:
    reasoning, marker, number = record["answer"].rpartition(ANSWER_MARKER)
    if not marker:
        raise ValueError(f"GSM8K answer without a final '{ANSWER_MARKER} <number>' line: {record['answer']!r}")
    return dspy.Example(
        question=record["question"], gold_reasoning=reasoning.strip(), answer=number.strip().replace(",", "")
    ).with_inputs("question")


def load_splits(seed: int = 0, sizes: tuple[int, int, int] = (200, 300, 1319), data_path: str = HUB_ID):
    """Seeded train/val examples from the official train split; test examples from the official test split (all
    1,319 by default)."""
    return split_examples(read_records(data_path, HUB_CONFIG), seed, sizes, "test", to_example)
