"""Trace collection and trace → SFT dataset, with real generation from the tiny format model."""

import dataclasses

import dspy
import pytest
from conftest import TwoStepIris, tiny_model

from bt_trl.core.runner import ProgramRunner
from bt_trl.serving.engine import GenerationSettings, TransformersBackend, serving_lm
from bt_trl.steps.sft import traces_to_dataset
from bt_trl.tasks import iris

SETTINGS = GenerationSettings(max_tokens=48, max_batch_size=8)


def collect(model, tokenizer, program, metric, examples, name, settings=SETTINGS):
    with serving_lm(TransformersBackend(model.eval(), tokenizer), name, settings) as lm:
        lm.cache = False
        return ProgramRunner(metric, num_threads=8).run(program, examples, lm, with_trace=True)


def always(example, prediction, trace=None):
    return True


def test_single_module_traces_become_chat_examples(format_model, tokenizer):
    train, _, _ = iris.load_splits(0, (8, 0, 0))
    program = dspy.LabeledFewShot(k=2).compile(iris.program(), trainset=train)  # demos must not leak into data
    calls = collect(format_model, tokenizer, program, iris.metric, train, "single")
    data = traces_to_dataset(calls)
    passed = [c for c in calls if c.passed]
    assert data.summary.total == 8 and data.kept == len(passed) > 0
    assert len(data.dataset) == len(passed)  # one module call per program call
    row = data.dataset[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]  # no demo turns
    assert "Given the petal and sepal dimensions" in row["prompt"][0]["content"]
    assert [m["role"] for m in row["completion"]] == ["assistant"]
    completion = row["completion"][0]["content"]
    assert "[[ ## reasoning ## ]]" in completion and "[[ ## completed ## ]]" in completion
    example = passed[0].example
    assert f"[[ ## answer ## ]]\n{example.answer}" in completion
    assert str(example.petal_length) in row["prompt"][1]["content"]


def test_two_module_traces_pool_every_module_call(format_model, tokenizer):
    train, _, _ = iris.load_splits(0, (6, 0, 0))
    calls = collect(format_model, tokenizer, TwoStepIris(), always, train, "two")
    data = traces_to_dataset(calls)
    assert data.kept == 6
    assert len(data.dataset) == 12  # both modules, every passing run
    systems = [row["prompt"][0]["content"] for row in data.dataset]
    assert sum("`size`" in s and "`petal_width`" in s for s in systems) == 6  # judge_size calls
    assert sum("`sepal_length`" in s and "`petal_width`" not in s for s in systems) == 6  # classify calls
    completions = [row["completion"][0]["content"] for row in data.dataset]
    assert sum("[[ ## size ## ]]" in c for c in completions) == 6
    assert sum("[[ ## answer ## ]]" in c for c in completions) == 6


def test_failures_are_counted_and_excluded(format_model, tokenizer):
    train, _, _ = iris.load_splits(0, (12, 0, 0))
    exploding = {id(ex) for ex in train[:3]}

    def fragile_metric(example, prediction, trace=None):
        if id(example) in exploding:
            raise ZeroDivisionError("metric bug")
        return True

    calls = collect(format_model, tokenizer, iris.program(), fragile_metric, train, "fragile")
    data = traces_to_dataset(calls)
    assert data.summary.metric_errors == 3
    assert data.kept == 9 and len(data.dataset) == 9

    # An untrained tiny model answers noise: generated unconstrained, every output is unparseable, counted, and
    # nothing crashes (with structured generation, the default, the same noise parses).
    noise = tiny_model(tokenizer, seed=1)
    unconstrained = dataclasses.replace(SETTINGS, structured=False)
    calls = collect(noise, tokenizer, iris.program(), always, train[:4], "noise", unconstrained)
    data = traces_to_dataset(calls)
    assert data.summary.parse_failures == 4
    assert data.kept == 0 and len(data.dataset) == 0
    assert data.dataset.column_names == ["prompt", "completion"]


def test_runs_that_copied_dspys_missing_field_placeholder_are_counted_and_can_be_left_out(format_model, tokenizer):
    """A ChainOfThought's labeled demos show their missing reasoning as DSPy's placeholder; passing runs whose module
    copied it are counted, trained on by default (as DSPy's BootstrapFinetune does) and left out when asked."""
    train, _, _ = iris.load_splits(0, (6, 0, 0))
    calls = collect(format_model, tokenizer, iris.program(), always, train, "placeholder")
    copied = []
    for call in calls[:2]:
        ((predictor, inputs, outputs),) = call.trace
        written = {**outputs, "reasoning": "Not supplied for this particular example."}
        copied.append(dataclasses.replace(call, trace=[(predictor, inputs, written)]))

    kept = traces_to_dataset(copied + calls[2:])
    assert kept.summary.passed == 6 and kept.copied_placeholder == 2 and kept.kept == 6
    assert sum("Not supplied" in row["completion"][0]["content"] for row in kept.dataset) == 2

    dropped = traces_to_dataset(copied + calls[2:], drop_placeholder=True)
    assert dropped.copied_placeholder == 2 and dropped.kept == 4 and len(dropped.dataset) == 4
    assert not any("Not supplied" in row["completion"][0]["content"] for row in dropped.dataset)


def test_metric_threshold_decides_what_passes(format_model, tokenizer):
    train, _, _ = iris.load_splits(0, (4, 0, 0))

    def half(example, prediction, trace=None):
        return 0.5

    strict = ProgramRunner(half, metric_threshold=0.6)
    loose = ProgramRunner(half, metric_threshold=0.5)
    with serving_lm(TransformersBackend(format_model, tokenizer), "threshold", SETTINGS) as lm:
        assert not any(c.passed for c in strict.run(iris.program(), train, lm, with_trace=True))
        assert all(c.passed for c in loose.run(iris.program(), train, lm, with_trace=True))


@pytest.mark.parametrize("value, expected", [(True, 1.0), (False, 0.0), (0.25, 0.25)])
def test_metric_values_are_scores(value, expected):
    from bt_trl.core.runner import metric_score
    assert metric_score(value, None) == expected
