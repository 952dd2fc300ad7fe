"""The prompt steps (`p`, `gepa`, ...): optimize the program's prompts with a DSPy teleprompter, generating with the
current weights.

DSPy's bootstrapping optimizers run their LM calls one at a time; the p step runs them as batches
(`as_batched`): `BootstrapFewShot` bootstraps many training examples at once (`bootstrap.py`) and
`BootstrapFewShotWithRandomSearch` also builds and scores its candidates concurrently (`random_search.py`), with
the results DSPy's sequential run gives under greedy decoding. Other teleprompters run unchanged.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import dspy
from dspy.teleprompt import GEPA, BootstrapFewShot, BootstrapFewShotWithRandomSearch, LabeledFewShot, Teleprompter

from bt_trl.core.interrupts import raise_if_interrupted
from bt_trl.core.ranks import Ranks
from bt_trl.core.runner import program_adapter
from bt_trl.serving.engine import EngineStats, GenerationBackend, serving_lm
from bt_trl.serving.settings import GenerationSettings
from bt_trl.steps.bootstrap import BatchedBootstrapFewShot
from bt_trl.steps.optimizers import NO_ERROR_LIMIT, PromptOptimizer, TeleprompterSpec
from bt_trl.steps.random_search import ConcurrentRandomSearch


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


def expected_program_calls(optimizer: PromptOptimizer, train_size: int, val_size: int) -> int | None:
    """At most how many program calls `optimizer.compile` makes (for the progress display), or None when unknown.

    `BootstrapFewShotWithRandomSearch` scores `num_candidate_programs` + 3 candidates on the valset and bootstraps
    all but the zero-shot and labeled-only ones, each through the trainset at most once per round (it stops at
    enough passing traces); `BootstrapFewShot` bootstraps once; `LabeledFewShot` calls nothing; for others and for
    factories (built at the step) it is unknown."""
    if isinstance(optimizer, BootstrapFewShotWithRandomSearch):
        bootstraps = (optimizer.num_candidate_sets + 1) if optimizer.max_num_samples else 0
        return ((optimizer.num_candidate_sets + 3) * val_size
                + bootstraps * train_size * optimizer.max_rounds)
    if isinstance(optimizer, BootstrapFewShot):
        return train_size * optimizer.max_rounds if optimizer.max_bootstrapped_demos else 0
    if isinstance(optimizer, LabeledFewShot):
        return 0
    return None


def as_batched(optimizer: Teleprompter, examples_at_once: int):
    """The batched equivalent of DSPy's `BootstrapFewShot` and `BootstrapFewShotWithRandomSearch` (exactly these
    classes: a subclass may change what they do), running `examples_at_once` training examples together; any other
    optimizer as it is."""
    if type(optimizer) is BootstrapFewShot:
        return BatchedBootstrapFewShot.like(optimizer, examples_at_once)
    if type(optimizer) is BootstrapFewShotWithRandomSearch:
        return ConcurrentRandomSearch.like(optimizer, examples_at_once)
    return optimizer


def optimize_prompts(optimizer: Teleprompter, student: dspy.Module, lm: dspy.LM, trainset, valset,
                     teacher: dspy.Module | None = None, examples_at_once: int = 8,
                     compile_kwargs: dict | None = None) -> dspy.Module:
    """Compiles `student` with `optimizer` (batched, see `as_batched`), every LM call served by `lm`.

    Teleprompters reset the predictors' LMs and then call the global `dspy.settings.lm`, so the LM is installed with
    `dspy.context`, not on the program. `valset` and `teacher` are passed to optimizers whose `compile` takes them
    (BootstrapFewShotWithRandomSearch, MIPROv2, GEPA, ...; BootstrapFewShot takes no valset), with `compile_kwargs`
    (a spec's arguments that only `compile` takes). Optimizers that read `dspy.settings.max_errors` get no error
    limit.
    """
    optimizer = as_batched(optimizer, examples_at_once)
    accepted = inspect.signature(optimizer.compile).parameters
    kwargs = {"trainset": trainset}
    if "valset" in accepted:
        kwargs["valset"] = valset
    if teacher is not None and "teacher" in accepted:
        kwargs["teacher"] = teacher
    kwargs |= compile_kwargs or {}
    with dspy.context(lm=lm, adapter=program_adapter(), max_errors=NO_ERROR_LIMIT):
        try:
            program = optimizer.compile(student.deepcopy(), **kwargs)
        except Exception as exc:  # DSPy's executors raise a Ctrl-C as "Execution cancelled"
            raise_if_interrupted(exc)
            raise
    program.set_lm(None)  # keep the program unbound: each step serves it with the LM of the weights in force
    return program


def compiled_and_teacher(optimizer: Teleprompter, original: dspy.Module, current: dspy.Module,
                         after_prompt_step: bool) -> tuple[dspy.Module, dspy.Module | None]:
    """What a prompt step compiles, and its teacher. An optimizer that bootstraps demos with a teacher (its `compile`
    takes one: BootstrapFewShot, random search, MIPROv2, ...) compiles the original program, right after a prompt step
    with the current program as teacher, as the paper's p step does: demos bootstrapped with older weights are not
    kept. The others (GEPA, SIMBA, LabeledFewShot, ...) compile the current program, refining the prompts it has."""
    # GEPA's compile has a `teacher` argument but refuses any teacher.
    if "teacher" in inspect.signature(optimizer.compile).parameters and not isinstance(optimizer, GEPA):
        return original, current if after_prompt_step else None
    return current, None


def prompt_step(optimizer: PromptOptimizer, original: dspy.Module, current: dspy.Module, trainset, valset, *,
                backend: GenerationBackend, lm_name: str, settings: GenerationSettings, ranks: Ranks,
                after_prompt_step: bool = False, examples_at_once: int = 8) -> tuple[dspy.Module, EngineStats]:
    """A prompt step on every rank (all call it together): `optimize_prompts` with `backend` serving the current
    weights, on what `compiled_and_teacher` picks from the `original` and `current` programs (a factory `optimizer`
    is built around the LM serving the step). A DSPy optimizer decides its own calls, so with several ranks it runs on
    the main rank, each of its generation batches is split across all ranks, and the optimized program is broadcast:
    every rank returns the same program, and what it generated itself."""
    if not ranks.is_main:
        generated = ranks.serve_generation(backend)
        program = original.deepcopy()
        program.load_state(ranks.broadcast(None))
        return program, generated
    split = ranks.world_size > 1
    with (ranks.main_generates_for_all(backend) if split else nullcontext(backend)) as generating, \
            serving_lm(generating, lm_name, settings) as lm:
        teleprompter = optimizer if isinstance(optimizer, Teleprompter) else optimizer(lm)
        if not isinstance(teleprompter, Teleprompter):
            raise TypeError(f"a prompt optimizer factory returned {type(teleprompter).__name__}, not a DSPy "
                            "Teleprompter")
        student, teacher = compiled_and_teacher(teleprompter, original, current, after_prompt_step)
        program = optimize_prompts(teleprompter, student, lm, trainset, valset, teacher,
                                   examples_at_once=examples_at_once,
                                   compile_kwargs=optimizer.compile_kwargs if isinstance(optimizer, TeleprompterSpec)
                                   else None)
    ranks.broadcast(program.dump_state())
    return program, generating.local_stats if split else lm.engine.stats
