"""Turning user data into DSPy examples, and checking it against the program before any model work; reading the JSON
files a user points bt_trl at."""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import datasets
import dspy


def to_examples(data, input_columns: Sequence[str] | None, name: str) -> list[dspy.Example]:
    """A list of `dspy.Example` (inputs marked with `with_inputs`) or a `datasets.Dataset` plus its input columns."""
    if isinstance(data, datasets.Dataset):
        if not input_columns:
            raise ValueError(f"{name} is a datasets.Dataset: set `input_columns` to the columns that are inputs")
        missing = [c for c in input_columns if c not in data.column_names]
        if missing:
            raise ValueError(f"{name}: input columns {missing} not in the dataset's columns {data.column_names}")
        examples = [dspy.Example(**row).with_inputs(*input_columns) for row in data]
    elif isinstance(data, Sequence) and not isinstance(data, str):
        examples = list(data)
        bad = next((i for i, e in enumerate(examples) if not isinstance(e, dspy.Example)), None)
        if bad is not None:
            raise TypeError(f"{name}[{bad}] is a {type(examples[bad]).__name__}, not a dspy.Example")
    else:
        raise TypeError(f"{name} must be a list of dspy.Example or a datasets.Dataset, got {type(data).__name__}")
    if not examples:
        raise ValueError(f"{name} is empty")
    return examples


def check_examples(program: dspy.Module, examples: list[dspy.Example], name: str) -> None:
    """Every example must carry the program's required inputs, marked as inputs."""
    required = _required_inputs(program)
    for i, example in enumerate(examples):
        if example._input_keys is None:
            raise ValueError(f"{name}[{i}] has no inputs marked: build it with .with_inputs(...)")
        missing = [k for k in required if k not in example.inputs()]
        if missing:
            raise ValueError(
                f"{name}[{i}] lacks the program's input(s) {missing}; its inputs are {sorted(example.inputs().keys())}"
            )


def _required_inputs(program: dspy.Module) -> list[str]:
    """Names the program cannot run without: its forward's required arguments or, for a module whose forward takes
    `**kwargs` (Predict, ChainOfThought, ...), the input fields of its single predictor."""
    params = list(inspect.signature(type(program).forward).parameters.values())[1:]  # without self
    named = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    predictors = program.predictors()
    if named or len(predictors) != 1:
        return named
    return list(predictors[0].signature.input_fields)


def check_metric(metric) -> None:
    if not callable(metric):
        raise TypeError(f"metric must be callable as metric(example, prediction, trace=None), got {metric!r}")
    try:
        inspect.signature(metric).bind(None, None, None)
    except TypeError as exc:
        raise TypeError(
            f"metric {getattr(metric, '__name__', metric)!r} must accept (example, prediction, trace=None): {exc}"
        ) from None
    except ValueError:  # builtins without an introspectable signature
        pass


def warn_shared_examples(trainset: list[dspy.Example], valset: list[dspy.Example]) -> int:
    """Warns when examples of the valset are also in the trainset (same fields, same values): the valset picks the
    p step's candidate and the best step, and scores measured on training examples overrate both. Returns how many
    valset examples are shared."""
    train_keys = {_example_key(example) for example in trainset}
    shared = sum(_example_key(example) in train_keys for example in valset)
    if shared:
        warnings.warn(
            f"{shared} of the {len(valset)} valset examples are also in the trainset: the valset chooses the prompt "
            "step's candidate and the best step, and scores on examples trained on overrate them; pass disjoint sets",
            UserWarning, stacklevel=3,
        )
    return shared


def _example_key(example: dspy.Example) -> str:
    return json.dumps(example.toDict(), sort_keys=True, default=repr)


def checked_inputs(program, metric, trainset, valset, input_columns: Sequence[str] | None
                   ) -> tuple[list[dspy.Example], list[dspy.Example]]:
    """Everything a BetterTogether run is given, checked before any model work: `program` a `dspy.Module`, `metric`
    callable as DSPy's, `trainset`/`valset` examples with the program's inputs. Returns the two sets as examples."""
    if not isinstance(program, dspy.Module):
        raise TypeError(f"program must be a dspy.Module, got {type(program).__name__}")
    check_metric(metric)
    trainset = to_examples(trainset, input_columns, "trainset")
    valset = to_examples(valset, input_columns, "valset")
    check_examples(program, trainset, "trainset")
    check_examples(program, valset, "valset")
    warn_shared_examples(trainset, valset)
    return trainset, valset


def read_json_file(path: Path, expected: str):
    """The JSON value in `path`; a file that is not JSON text (a pickle, a truncated file) raises ValueError naming
    the file and `expected`, what it should be."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        reason = "it is not text (a pickle or another binary file?); bt_trl reads JSON only and never unpickles"
    except json.JSONDecodeError as exc:
        reason = f"it is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
    raise ValueError(f"{path} should be {expected}, but {reason}")
