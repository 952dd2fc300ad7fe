"""The `p` step: optimize the program's prompts with a DSPy teleprompter, generating with the current weights."""

from __future__ import annotations

import inspect
import sys

import dspy
from dspy.teleprompt import BootstrapFewShotWithRandomSearch, Teleprompter

from .runner import program_adapter

# DSPy's Evaluate cancels a whole evaluation after `max_errors` failed calls (10 by default). A small model's
# unparseable answers are ordinary failures here: they score 0 and the search goes on.
NO_ERROR_LIMIT = sys.maxsize


def default_prompt_optimizer(metric, *, max_bootstrapped_demos: int = 3, max_labeled_demos: int = 3,
                             num_candidate_programs: int = 6, num_threads: int = 8, max_rounds: int = 1,
                             metric_threshold: float | None = None) -> Teleprompter:
    """The paper's prompt step: bootstrapped + labeled few-shot demos, random search over candidate sets."""
    return BootstrapFewShotWithRandomSearch(
        metric=metric,
        metric_threshold=metric_threshold,
        max_bootstrapped_demos=max_bootstrapped_demos,
        max_labeled_demos=max_labeled_demos,
        num_candidate_programs=num_candidate_programs,
        num_threads=num_threads,
        max_rounds=max_rounds,
        max_errors=NO_ERROR_LIMIT,
    )


def optimize_prompts(optimizer: Teleprompter, student: dspy.Module, lm: dspy.LM, trainset, valset,
                     teacher: dspy.Module | None = None) -> dspy.Module:
    """Compiles `student` with `optimizer`, every LM call served by `lm`.

    Teleprompters reset the predictors' LMs and then call the global `dspy.settings.lm`, so the LM is installed with
    `dspy.context`, not on the program. `valset` and `teacher` are passed to optimizers whose `compile` takes them
    (BootstrapFewShotWithRandomSearch, MIPROv2, GEPA, ...; BootstrapFewShot takes no valset). Optimizers that read
    `dspy.settings.max_errors` get no error limit.
    """
    accepted = inspect.signature(optimizer.compile).parameters
    kwargs = {"trainset": trainset}
    if "valset" in accepted:
        kwargs["valset"] = valset
    if teacher is not None and "teacher" in accepted:
        kwargs["teacher"] = teacher
    with dspy.context(lm=lm, adapter=program_adapter(), max_errors=NO_ERROR_LIMIT):
        program = optimizer.compile(student.deepcopy(), **kwargs)
    program.set_lm(None)  # keep the program unbound: each step serves it with the LM of the weights in force
    return program
