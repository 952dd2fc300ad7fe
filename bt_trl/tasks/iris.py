"""The paper's Iris task: a ChainOfThought classifier from four measurements to the species.

Data: Fisher's Iris (150 flowers, 50 per species), shipped as `data/iris.csv` (exported from scikit-learn's copy).
`load_splits(seed)` shuffles it with the seed and returns the paper's 50/50/50 train/val/test split.
"""

from __future__ import annotations

import csv
import random
from importlib import resources
from typing import Literal

import dspy

FEATURES = ("petal_length", "petal_width", "sepal_length", "sepal_width")
SPECIES = ("setosa", "versicolor", "virginica")


class IrisSignature(dspy.Signature):
    """Given the petal and sepal dimensions in cm, predict the iris species."""

    petal_length: float = dspy.InputField()
    petal_width: float = dspy.InputField()
    sepal_length: float = dspy.InputField()
    sepal_width: float = dspy.InputField()
    answer: Literal["setosa", "versicolor", "virginica"] = dspy.OutputField()


def program() -> dspy.Module:
    return dspy.ChainOfThought(IrisSignature)


def metric(example: dspy.Example, prediction, trace=None) -> bool:
    return str(getattr(prediction, "answer", "")).strip().lower() == example.answer


def load_examples() -> list[dspy.Example]:
    with resources.files("bt_trl.tasks").joinpath("data/iris.csv").open() as f:
        rows = list(csv.DictReader(f))
    return [
        dspy.Example(**{k: float(row[k]) for k in FEATURES}, answer=row["species"]).with_inputs(*FEATURES)
        for row in rows
    ]


def load_splits(seed: int = 0, sizes: tuple[int, int, int] = (50, 50, 50)):
    """Seeded train/val/test split; `sizes` smaller than 50/50/50 take the first rows of each part."""
    examples = load_examples()
    random.Random(seed).shuffle(examples)
    train, val, test = examples[:50], examples[50:100], examples[100:]
    return train[: sizes[0]], val[: sizes[1]], test[: sizes[2]]
