"""Batched bootstrapping: DSPy's `BootstrapFewShot` with the teacher running on many training examples at once.

DSPy bootstraps one training example after another, so each of its LM calls reaches the engine alone. Here the
teacher runs DSPy's own per-example code (`BootstrapFewShot._bootstrap_one_example`) on a window of examples
concurrently — their calls arrive together and the engine batches them (and, with several ranks, splits each batch
across the ranks) — and the results are then taken in trainset order with DSPy's rules: an example is retried for up
to `max_rounds` rounds, bootstrapping stops once `max_bootstrapped_demos` examples passed, errors count towards
`max_errors` in the same order. Under greedy decoding the demos kept are exactly those of DSPy's sequential run.

Two things make the attempts of one window independent of each other, as they are not in DSPy's loop:

* Each attempt runs on its own copy of the teacher. DSPy's attempt takes the example out of the teacher's demos while
  the teacher runs on it, and puts it back only when the teacher returns: when the teacher raises (an output the
  adapter cannot parse, say), the example stays out of the shared teacher's demos for every later example. An
  attempt that leaves its teacher copy changed is taken over into the teacher when it is consumed, and the attempts
  that ran on the teacher as it was before are run again.
* An attempt's demos and errors are held back until it is consumed, so the attempts past DSPy's stopping point
  (speculative work) leave no trace.

Attempts that sample (rounds after the first run at temperature 1.0) keep DSPy's rules but draw their own samples.
"""

from __future__ import annotations

import copy
import logging
import random
import threading
from dataclasses import dataclass

import dspy
from dspy.teleprompt import BootstrapFewShot

from bt_trl.core.runner import MetricValueError
from bt_trl.core.threads import map_in_threads

# DSPy's own bootstrapping logger: the failures it reports are DSPy's messages, handled as DSPy's are (by the user's
# logging; by bt-trl: to run.log).
logger = logging.getLogger(BootstrapFewShot.__module__)


@dataclass
class _Attempt:
    """One run of DSPy's `_bootstrap_one_example`, held until its turn in DSPy's order."""

    success: bool
    name2traces: dict[str, list[dspy.Example]]  # the demos it would add
    teacher_demos: list[list]  # each teacher predictor's demos after it (changed only if the teacher raised)
    teacher_version: int  # the teacher it ran on (see BatchedBootstrapFewShot._teacher_version)
    counted_error: Exception | None = None  # an error DSPy counts towards max_errors
    crash: Exception | None = None  # an error DSPy does not catch: it ends compile()


class ExamplesAtOnce:
    """Mixin of the batched optimizers: `examples_at_once`, how many training examples run together (the batch the
    engine sees), after the DSPy optimizer's own arguments."""

    def __init__(self, *args, examples_at_once: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        if examples_at_once < 1:
            raise ValueError(f"examples_at_once must be at least 1, got {examples_at_once}")
        self.examples_at_once = examples_at_once


class BatchedBootstrapFewShot(ExamplesAtOnce, BootstrapFewShot):
    """`dspy.BootstrapFewShot` with the teacher run on `examples_at_once` training examples concurrently.

    Same arguments and results as DSPy's optimizer (see the module docstring); `examples_at_once` is how many
    training examples the teacher runs on together: the batch the engine sees. Attempts past the point where DSPy
    would stop are wasted work, so it need not be larger than the engine's batch.
    """

    @classmethod
    def like(cls, optimizer: BootstrapFewShot, examples_at_once: int = 8) -> BatchedBootstrapFewShot:
        """The batched equivalent of a configured `dspy.BootstrapFewShot`."""
        return cls(
            metric=optimizer.metric, metric_threshold=optimizer.metric_threshold,
            teacher_settings=optimizer.teacher_settings, max_bootstrapped_demos=optimizer.max_bootstrapped_demos,
            max_labeled_demos=optimizer.max_labeled_demos, max_rounds=optimizer.max_rounds,
            max_errors=optimizer.max_errors, examples_at_once=examples_at_once,
        )

    def _bootstrap(self, *, max_bootstraps=None):
        # DSPy's `_bootstrap` loop, with each attempt's result computed ahead (in `_attempts`) instead of in place.
        max_bootstraps = max_bootstraps or self.max_bootstrapped_demos
        bootstrap_attempts = 0
        bootstrapped = {}
        self.name2traces = {name: [] for name in self.name2predictor}
        self._teacher_version = 0  # bumped whenever a consumed attempt leaves the teacher's demos changed

        example_idx, round_idx = 0, 0  # the next attempt in DSPy's order
        while example_idx < len(self.trainset) and len(bootstrapped) < max_bootstraps:
            attempts = self._attempts(example_idx, round_idx)
            while (example_idx, round_idx) in attempts and len(bootstrapped) < max_bootstraps:
                attempt = attempts[(example_idx, round_idx)]
                if attempt.teacher_version != self._teacher_version:
                    break  # ran on an outdated teacher: run again from here
                bootstrap_attempts += 1
                if self._consume(self.trainset[example_idx], attempt):
                    bootstrapped[example_idx] = True
                if example_idx in bootstrapped or round_idx + 1 == self.max_rounds:
                    example_idx, round_idx = example_idx + 1, 0
                else:
                    round_idx += 1

        print(
            f"Bootstrapped {len(bootstrapped)} full traces after {min(example_idx, len(self.trainset) - 1)} examples "
            f"for up to {self.max_rounds} rounds, amounting to {bootstrap_attempts} attempts."
        )
        self.validation = [x for idx, x in enumerate(self.trainset) if idx not in bootstrapped]
        random.Random(0).shuffle(self.validation)

    def _attempts(self, first_example: int, first_round: int) -> dict[tuple[int, int], _Attempt]:
        """Attempts from (`first_example`, `first_round`) on, for the next `examples_at_once` examples, on the
        current teacher: each round's attempts run together, the next round only for the examples that failed."""
        examples = range(first_example, min(first_example + self.examples_at_once, len(self.trainset)))
        todo = [(i, first_round if i == first_example else 0) for i in examples]
        attempts = {}
        while todo:
            done = map_in_threads(lambda key: self._attempt(self.trainset[key[0]], key[1]), todo, len(todo))
            attempts.update(zip(todo, done))
            todo = [(i, r + 1) for (i, r), a in zip(todo, done)
                    if not a.success and a.crash is None and r + 1 < self.max_rounds]
        return attempts

    def _attempt(self, example: dspy.Example, round_idx: int) -> _Attempt:
        """DSPy's `_bootstrap_one_example` on a private copy of this optimizer's state: its own teacher copy, its own
        traces, and an error limit of 1 so that a counted error comes back raised (it is counted when consumed)."""
        attempt = copy.copy(self)
        attempt.teacher = self.teacher.deepcopy()
        attempt.predictor2name = {
            **self.predictor2name, **{id(p): name for name, p in attempt.teacher.named_predictors()}
        }
        attempt.name2traces = {name: [] for name in self.name2predictor}
        attempt.max_errors, attempt.error_count, attempt.error_lock = 1, 0, threading.Lock()
        result = _Attempt(False, attempt.name2traces, [], self._teacher_version)
        try:
            result.success = bool(BootstrapFewShot._bootstrap_one_example(attempt, example, round_idx))
        except Exception as exc:
            if attempt.error_count and not isinstance(exc, MetricValueError):  # DSPy counts it; it ends the run here
                result.counted_error = exc
            else:
                result.crash = exc
        result.teacher_demos = [p.demos for _, p in attempt.teacher.named_predictors()]
        return result

    def _consume(self, example: dspy.Example, attempt: _Attempt) -> bool:
        """Applies `attempt` as DSPy's loop would have at this point. Returns whether the example was bootstrapped."""
        if attempt.crash is not None:
            raise attempt.crash
        if attempt.counted_error is not None:
            # DSPy's error accounting in `_bootstrap_one_example`
            with self.error_lock:
                self.error_count += 1
                current_error_count = self.error_count
            effective_max_errors = self.max_errors if self.max_errors is not None else dspy.settings.max_errors
            if current_error_count >= effective_max_errors:
                raise attempt.counted_error
            logger.error(f"Failed to run or to evaluate example {example} with {self.metric} due to "
                         f"{attempt.counted_error}.")
        for (_, predictor), demos in zip(self.teacher.named_predictors(), attempt.teacher_demos):
            if predictor.demos != demos:  # the teacher raised with the example taken out of its demos
                predictor.demos = demos
                self._teacher_version += 1
        if attempt.success:
            for name, demos in attempt.name2traces.items():
                self.name2traces[name].extend(demos)
        return attempt.success
