"""Iris with a `Predict` classifier: the paper's Iris task (same data, split and metric) without the reasoning field.

The paper's program is a ChainOfThought. Small models copy the reasoning of the demos they are shown, and a labeled
ChainOfThought demo has none (DSPy writes "Not supplied for this particular example." in its place), so their runs,
and the w step's traces made from them, carry that placeholder instead of reasoning (`results/iris_qwen15`). A
`Predict` program has no such field: every passing run is the flower and its species, and the w step trains on
exactly that. Measured on the 50 training flowers with 3 labeled demos (`scripts/probe_iris.py`): the embedded
Qwen2.5-Coder-1.5B answers 80 % of them right, in all three species, where its ChainOfThought answers 33 % zero-shot.
"""

from __future__ import annotations

import dspy

from bt_trl.tasks.iris import IrisSignature, load_examples, load_splits, metric

__all__ = ["IrisSignature", "load_examples", "load_splits", "metric", "program"]


def program() -> dspy.Module:
    return dspy.Predict(IrisSignature)
