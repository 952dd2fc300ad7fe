"""The batched p step gives DSPy's results: the same demos, in the same order, as DSPy's sequential
`BootstrapFewShot`, and the same candidate scores and choice as its sequential random search."""

import signal

import dspy
import pytest
import torch
import tqdm
from dspy.teleprompt import random_search as dspy_random_search

from bt_trl.core.runner import program_adapter
from bt_trl.serving.engine import GenerationSettings, TransformersBackend, serving_lm
from bt_trl.steps.bootstrap import BatchedBootstrapFewShot
from bt_trl.steps.prompt import as_batched, default_prompt_optimizer, optimize_prompts
from bt_trl.steps.random_search import ConcurrentRandomSearch
from bt_trl.tasks import iris


class IrisFailingOn(dspy.Module):
    """The Iris ChainOfThought program, raising on one flower (a program error, which DSPy's bootstrapping counts)."""

    def __init__(self, flower: dspy.Example):
        super().__init__()
        self.cot = iris.program()
        self.flower = flower.inputs().toDict()

    def forward(self, **inputs):
        if inputs == self.flower:
            raise ValueError("this program cannot classify that flower")
        return self.cot(**inputs)


def decisive(model):
    """`model` with its logits scaled up 1000x: the same greedy answers, and sampling at temperature 1.0 (DSPy's later
    bootstrapping rounds) picks the greedy token too, so that sampled rounds are reproducible."""
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
    return model


def demos(program) -> dict[str, list[dict]]:
    return {name: [d.toDict() for d in p.demos] for name, p in program.named_predictors()}


def compile_with(optimizer, program, model, tokenizer, name, **sets):
    """Compiles with every call served by the model under LM name `name` (DSPy caches by name: one per side)."""
    with serving_lm(TransformersBackend(model, tokenizer), name, GenerationSettings(max_tokens=60)) as lm, \
            dspy.context(lm=lm, adapter=program_adapter(), max_errors=1000):
        return optimizer.compile(program, **sets)


@pytest.mark.parametrize("max_rounds", [1, 2])
def test_batched_bootstrapping_keeps_dspy_demos_in_order(format_model, tokenizer, max_rounds, capsys):
    model = decisive(format_model)
    train, _, _ = iris.load_splits(0, (20, 0, 0))
    # The program raises on one of the teacher's labeled demos (the second flower of the trainset). DSPy then leaves
    # that flower out of the teacher's demos for every later example, so the attempts already made on the full
    # teacher are run again.
    labeled = dspy.LabeledFewShot(k=3).compile(iris.program(), trainset=train).predict.demos
    program = IrisFailingOn(min(labeled, key=train.index))
    settings = dict(metric=iris.metric, max_bootstrapped_demos=3, max_labeled_demos=3, max_rounds=max_rounds)

    dspy_optimizer = dspy.BootstrapFewShot(**settings)
    expected = compile_with(dspy_optimizer, program, model, tokenizer, "sequential", trainset=train)
    batched = BatchedBootstrapFewShot(**settings, examples_at_once=8)
    compiled = compile_with(batched, program, model, tokenizer, "batched", trainset=train)
    # "Bootstrapped 3 full traces after 8 examples for up to 2 rounds, amounting to 14 attempts."
    summary = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("Bootstrapped")]

    assert demos(compiled) == demos(expected)
    assert sum("reasoning" in d for d in demos(compiled)["cot.predict"]) == 3  # three bootstrapped, then labeled
    assert batched.error_count == dspy_optimizer.error_count == max_rounds  # the flower fails in every round
    assert len(batched.teacher.cot.predict.demos) == len(dspy_optimizer.teacher.cot.predict.demos) == 2
    assert summary[0] == summary[1]  # the same examples and attempts counted
    examples, attempts = int(summary[0][5]), int(summary[0][-2])
    assert attempts > examples if max_rounds == 2 else attempts == examples  # the second rounds ran


def test_batched_bootstrapping_stops_at_dspy_error_limit(format_model, tokenizer):
    train, _, _ = iris.load_splits(0, (12, 0, 0))
    program = IrisFailingOn(train[4])
    for optimizer in (dspy.BootstrapFewShot(metric=iris.metric, max_bootstrapped_demos=8, max_errors=1),
                      BatchedBootstrapFewShot(metric=iris.metric, max_bootstrapped_demos=8, max_errors=1)):
        with pytest.raises(ValueError, match="cannot classify"):
            compile_with(optimizer, program, format_model, tokenizer, type(optimizer).__name__, trainset=train)


def test_concurrent_random_search_scores_and_chooses_as_dspy_and_leaves_dspy_untouched(format_model, tokenizer):
    """The concurrent search first, then DSPy's own in the same process: the same candidates, scores and choice, and
    DSPy's module attributes, tqdm's registry and the SIGINT handler are as they were."""
    train, val, _ = iris.load_splits(0, (20, 10, 0))
    program = iris.program()
    settings = dict(metric=iris.metric, max_bootstrapped_demos=3, max_labeled_demos=3, num_candidate_programs=3,
                    num_threads=8)
    untouched = (dspy_random_search.BootstrapFewShot, dspy_random_search.Evaluate, tqdm.tqdm._instances,
                 signal.getsignal(signal.SIGINT))

    concurrent = ConcurrentRandomSearch(**settings, examples_at_once=8)
    chosen = compile_with(concurrent, program, format_model, tokenizer, "concurrent", trainset=train, valset=val)
    assert (dspy_random_search.BootstrapFewShot, dspy_random_search.Evaluate, tqdm.tqdm._instances,
            signal.getsignal(signal.SIGINT)) == untouched
    assert dspy_random_search.BootstrapFewShot is dspy.BootstrapFewShot
    expected = compile_with(dspy.BootstrapFewShotWithRandomSearch(**settings), program, format_model, tokenizer,
                            "sequential", trainset=train, valset=val)

    def candidates(p):
        return [(c["seed"], c["score"], c["subscores"], demos(c["program"])) for c in p.candidate_programs]

    assert candidates(chosen) == candidates(expected)
    assert demos(chosen) == demos(expected)
    assert chosen.dump_state() == expected.dump_state()


def test_p_step_batches_dspy_bootstrapping_optimizers_only():
    search = default_prompt_optimizer(iris.metric)
    assert isinstance(as_batched(search, 4), ConcurrentRandomSearch)
    bootstrap = dspy.BootstrapFewShot(metric=iris.metric, max_bootstrapped_demos=2, max_rounds=3, max_errors=5)
    batched = as_batched(bootstrap, 4)
    assert isinstance(batched, BatchedBootstrapFewShot) and batched.examples_at_once == 4
    assert {k: v for k, v in vars(batched).items() if k not in ("examples_at_once", "error_lock")} == \
        {k: v for k, v in vars(bootstrap).items() if k != "error_lock"}
    labeled = dspy.LabeledFewShot(k=2)
    assert as_batched(labeled, 4) is labeled


def test_optimize_prompts_runs_the_batched_search(format_model, tokenizer):
    train, val, _ = iris.load_splits(0, (8, 4, 0))
    optimizer = default_prompt_optimizer(iris.metric, max_bootstrapped_demos=1, max_labeled_demos=1,
                                         num_candidate_programs=1)
    with serving_lm(TransformersBackend(format_model, tokenizer), "p-step", GenerationSettings(max_tokens=60)) as lm:
        program = optimize_prompts(optimizer, iris.program(), lm, train, val, examples_at_once=4)
        assert lm.engine.stats.batches < lm.engine.stats.requests  # calls were generated together
    assert [c["seed"] for c in sorted(program.candidate_programs, key=lambda c: c["seed"])] == [-3, -2, -1, 0]
    assert program.predict.lm is None
