"""Concurrent candidates: DSPy's `BootstrapFewShotWithRandomSearch` with all its candidate programs built and scored
at once.

DSPy builds and scores its candidates (zero-shot, labeled only, unshuffled and shuffled bootstrapped demos) one after
another. Each candidate depends only on its seed, so here DSPy's own `compile` runs once per seed (`restrict={seed}`),
all seeds concurrently: their bootstrapping and valset calls reach the engine together. The best candidate is then
chosen from the seeds' scores in DSPy's order with DSPy's rule (the first to beat every earlier score, stopping at the
first that reaches `stop_at_score`), and carries all candidates in `candidate_programs`, best first, as in DSPy.

Inside each candidate, bootstrapping is batched (`BatchedBootstrapFewShot`): while the search runs, DSPy's
random-search module builds its bootstrapping optimizers from that class (its `compile` creates them itself and has
no parameter for it).
"""

from __future__ import annotations

import copy
import sys
import threading
from contextlib import contextmanager
from functools import partial
from weakref import WeakSet

import dspy
import tqdm
from dspy.teleprompt import BootstrapFewShotWithRandomSearch
from dspy.teleprompt import random_search as dspy_random_search
from dspy.utils.parallelizer import ParallelExecutor

from bt_trl.steps.bootstrap import BatchedBootstrapFewShot

_SEED_OF_FIRST_CANDIDATE = -3  # DSPy's seeds: -3 zero-shot, -2 labeled only, -1 unshuffled, 0.. shuffled
_bootstrapping_class_lock = threading.Lock()


class ConcurrentRandomSearch:
    """Runs a configured `dspy.BootstrapFewShotWithRandomSearch` with its candidates concurrently and its
    bootstrapping batched over `examples_at_once` training examples. Same `compile` arguments and result."""

    def __init__(self, search: BootstrapFewShotWithRandomSearch, examples_at_once: int = 8):
        self.search = search
        self.examples_at_once = examples_at_once

    def compile(self, student, *, teacher=None, trainset, valset=None, restrict=None, labeled_sample=True):
        seeds = [seed for seed in range(_SEED_OF_FIRST_CANDIDATE, self.search.num_candidate_sets)
                 if restrict is None or seed in set(restrict)]
        if not seeds:  # DSPy's own error for it
            return self.search.compile(student, teacher=teacher, trainset=trainset, valset=valset, restrict=restrict)

        def candidate(seed: int) -> dspy.Module | Exception:
            try:  # a copy per seed: compile stores its sets on the optimizer
                return copy.copy(self.search).compile(student, teacher=teacher, trainset=trainset, valset=valset,
                                                      restrict={seed}, labeled_sample=labeled_sample)
            except Exception as exc:  # raised below in seed order, as DSPy's loop would meet it
                return exc

        with _batched_bootstrapping(self.examples_at_once), _progress_bars_tolerate_concurrent_clears():
            executor = ParallelExecutor(num_threads=len(seeds), max_errors=sys.maxsize, disable_progress_bar=True,
                                        timeout=0)
            per_seed = executor.execute(candidate, seeds)

        # DSPy's selection, over the per-seed results in seed order.
        score_data, best_program = [], None
        for result in per_seed:
            if isinstance(result, Exception):
                raise result
            entry = result.candidate_programs[0]
            del entry["program"].candidate_programs  # each seed's compile attached its own one-entry list
            if not score_data or entry["score"] > max(d["score"] for d in score_data):
                best_program = entry["program"]
            score_data.append(entry)
            if self.search.stop_at_score is not None and entry["score"] >= self.search.stop_at_score:
                break
        best_program.candidate_programs = sorted(score_data, key=lambda x: x["score"], reverse=True)
        return best_program


@contextmanager
def _batched_bootstrapping(examples_at_once: int):
    """DSPy's random search builds its bootstrapping optimizers as `BatchedBootstrapFewShot` for the block."""
    with _bootstrapping_class_lock:
        dspy_class = dspy_random_search.BootstrapFewShot
        dspy_random_search.BootstrapFewShot = partial(BatchedBootstrapFewShot, examples_at_once=examples_at_once)
        try:
            yield
        finally:
            dspy_random_search.BootstrapFewShot = dspy_class


class _DiscardingWeakSet(WeakSet):
    """tqdm's registry of live bars, where removing a bar that is not there (any more) is not an error."""

    def remove(self, item) -> None:
        self.discard(item)


@contextmanager
def _progress_bars_tolerate_concurrent_clears():
    """DSPy empties tqdm's registry of bars, without tqdm's lock, each time an `Evaluate` or `ParallelExecutor` starts
    (`tqdm.tqdm._instances.clear()`). With the candidates scored concurrently, one thread's clear can fall between
    another's bar registering itself (`tqdm.__new__`) and removing itself (`tqdm.__init__` of a disabled bar), which
    then raises KeyError and ends the p step. For the block the registry tolerates that removal."""
    registry = tqdm.tqdm._instances
    tqdm.tqdm._instances = _DiscardingWeakSet(registry)
    try:
        yield
    finally:
        tqdm.tqdm._instances = registry
