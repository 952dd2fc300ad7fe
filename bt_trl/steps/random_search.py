"""Concurrent candidates: DSPy's `BootstrapFewShotWithRandomSearch` with all its candidate programs built and scored
at once.

DSPy builds and scores its candidates (zero-shot, labeled only, unshuffled and shuffled bootstrapped demos) one after
another. Each candidate depends only on its seed, so here every seed's candidate is built as DSPy builds it and scored
as DSPy's `Evaluate` scores it, all seeds concurrently: their bootstrapping and valset calls reach the engine
together. The best candidate is then chosen from the seeds' scores in DSPy's order with DSPy's rule (the first to beat
every earlier score, stopping at the first that reaches `stop_at_score`), and carries all candidates in
`candidate_programs`, best first, as in DSPy. Inside each candidate, bootstrapping is batched
(`BatchedBootstrapFewShot`). Nothing of DSPy's is patched.
"""

from __future__ import annotations

import logging
import random

import dspy
from dspy.teleprompt import BootstrapFewShotWithRandomSearch, LabeledFewShot

from bt_trl.core.runner import MetricValueError
from bt_trl.core.threads import map_in_threads
from bt_trl.steps.bootstrap import BatchedBootstrapFewShot, ExamplesAtOnce

logger = logging.getLogger(__name__)

SEEDS_BEFORE_SHUFFLED = (-3, -2, -1)  # DSPy's seeds: -3 zero-shot, -2 labeled only, -1 unshuffled, 0.. shuffled


class ConcurrentRandomSearch(ExamplesAtOnce, BootstrapFewShotWithRandomSearch):
    """`dspy.BootstrapFewShotWithRandomSearch` with its candidates built and scored concurrently and its bootstrapping
    batched over `examples_at_once` training examples. Same arguments (plus `examples_at_once`) and results."""

    @classmethod
    def like(cls, search: BootstrapFewShotWithRandomSearch, examples_at_once: int = 8) -> ConcurrentRandomSearch:
        """The concurrent equivalent of a configured `dspy.BootstrapFewShotWithRandomSearch`."""
        return cls(
            metric=search.metric, teacher_settings=search.teacher_settings,
            max_bootstrapped_demos=search.max_num_samples, max_labeled_demos=search.max_labeled_demos,
            max_rounds=search.max_rounds, num_candidate_programs=search.num_candidate_sets,
            num_threads=search.num_threads, max_errors=search.max_errors, stop_at_score=search.stop_at_score,
            metric_threshold=search.metric_threshold, examples_at_once=examples_at_once,
        )

    def compile(self, student, *, teacher=None, trainset, valset=None, restrict=None, labeled_sample=True):
        self.trainset = trainset
        self.valset = valset or trainset  # as DSPy
        seeds = [seed for seed in range(SEEDS_BEFORE_SHUFFLED[0], self.num_candidate_sets)
                 if restrict is None or seed in set(restrict)]
        if not seeds:  # DSPy's error for it
            raise ValueError(f"`restrict` {set(restrict)!r} does not match any candidate seed in "
                             f"range(-3, {self.num_candidate_sets}); no candidate programs would be evaluated.")
        max_errors = self.max_errors if self.max_errors is not None else dspy.settings.max_errors
        candidates = map_in_threads(
            lambda seed: self._candidate(seed, student, teacher, labeled_sample, max_errors), seeds, len(seeds)
        )

        # DSPy's selection, over the candidates in seed order.
        score_data, best_program = [], None
        for seed, (program, score, subscores) in zip(seeds, candidates):
            if not score_data or score > max(d["score"] for d in score_data):
                best_program = program
            score_data.append({"score": score, "subscores": subscores, "seed": seed, "program": program})
            if self.stop_at_score is not None and score >= self.stop_at_score:
                break
        best_program.candidate_programs = sorted(score_data, key=lambda x: x["score"], reverse=True)
        return best_program

    def _candidate(self, seed: int, student, teacher, labeled_sample: bool, max_errors: int):
        """DSPy's candidate of `seed` and its valset score and subscores."""
        trainset = list(self.trainset)
        if seed == -3:
            program = student.reset_copy()
        elif seed == -2:
            program = LabeledFewShot(k=self.max_labeled_demos).compile(student, trainset=trainset,
                                                                       sample=labeled_sample)
        else:
            size = self.max_num_samples
            if seed >= 0:
                random.Random(seed).shuffle(trainset)
                size = random.Random(seed).randint(self.min_num_samples, self.max_num_samples)
            optimizer = BatchedBootstrapFewShot(
                metric=self.metric, metric_threshold=self.metric_threshold, max_bootstrapped_demos=size,
                max_labeled_demos=self.max_labeled_demos, teacher_settings=self.teacher_settings,
                max_rounds=self.max_rounds, max_errors=max_errors, examples_at_once=self.examples_at_once,
            )
            program = optimizer.compile(student, teacher=teacher, trainset=trainset)
        score, subscores = self._score(program, max_errors)
        logger.info("Candidate of seed %d: average metric %s / %d (%.1f%%) on the valset", seed, sum(subscores),
                    len(subscores), score)
        return program, score, subscores

    def _score(self, program, max_errors: int) -> tuple[float, list]:
        """DSPy's `Evaluate` score of `program` on the valset: the mean metric value in percent (rounded to 2
        places), a call that raises scoring 0.0; more than `max_errors` such calls end the search, and so does a metric
        value that is not a score."""
        errors = []

        def score(example):
            try:
                return self.metric(example, program(**example.inputs()))
            except MetricValueError:
                raise
            except Exception as exc:
                errors.append(exc)
                if len(errors) >= max_errors:
                    raise
                logger.warning("Error for %s: %r", example, exc)
                return 0.0

        subscores = map_in_threads(score, self.valset, self.num_threads or 1)
        return round(100 * sum(subscores) / len(self.valset), 2), subscores
