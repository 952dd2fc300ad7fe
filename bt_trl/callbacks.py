"""BetterTogether's two steps as `TrainerCallback`s for an existing script built on a plain `SFTTrainer`.

    prompts = PromptOptimizationCallback(program, metric, trainset, valset, tokenizer, every_n_epochs=2)
    traces = TraceDatasetCallback(lambda: prompts.program, metric, trainset, model, tokenizer, every_n_epochs=2)
    trainer = SFTTrainer(model=model, args=SFTConfig(..., max_steps=...), train_dataset=traces.train_dataset,
                         processing_class=tokenizer, callbacks=[prompts, traces])

Every `every_n_epochs` epochs the prompt callback re-optimizes the prompts with the weights being trained, and the
trace callback regenerates the training rows from the program's passing traces; the following epochs train on them.
`traces.train_dataset` is a `datasets.IterableDataset` that reads the current rows at the start of every epoch, so
the trainer needs `max_steps` (and, to stop after a number of epochs, `TraceDatasetCallback(max_epochs=...)`).
Register the prompt callback first: callbacks run in order, so the traces then come from the new prompts.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Callable
from contextlib import contextmanager

import datasets
import dspy
from transformers import TrainerCallback

from .data import check_examples, check_metric, to_examples
from .engine import GenerationSettings, TransformersBackend, eval_mode, lm_name, serving_lm, weights_fingerprint
from .prompt_step import default_prompt_optimizer, optimize_prompts
from .runner import ProgramRunner
from .weight_step import traces_to_dataset

logger = logging.getLogger(__name__)


@contextmanager
def live_lm(model, tokenizer, base_fingerprint: str, settings: GenerationSettings, gradient_checkpointing_kwargs=None):
    """A `dspy.LM` on the model a plain Trainer is training (as callbacks receive it: unwrapped)."""
    checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:  # it disables the KV cache: generation would be many times slower
        model.gradient_checkpointing_disable()
    try:
        with eval_mode(model), serving_lm(TransformersBackend(model, tokenizer), lm_name(model, base_fingerprint),
                                          settings) as lm:
            yield lm
    finally:
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)


class _EveryNEpochs(TrainerCallback):
    """Counts epochs itself: with an iterable train dataset `state.epoch` is not an epoch count."""

    def __init__(self, every_n_epochs: int):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.epochs_done = 0

    def _due(self) -> bool:
        self.epochs_done += 1
        return self.epochs_done % self.every_n_epochs == 0


class PromptOptimizationCallback(_EveryNEpochs):
    """The p step every `every_n_epochs` epochs: optimizes the original program's prompts with the current weights
    and scores the result on the valset. `callback.program` is the latest program; `callback.history` holds
    `(epoch, val_score)` pairs."""

    def __init__(self, program: dspy.Module, metric, trainset, valset, processing_class, prompt_optimizer=None,
                 every_n_epochs: int = 1, generation: GenerationSettings = GenerationSettings(),
                 num_threads: int = 8, max_bootstrapped_demos: int = 3, max_labeled_demos: int = 3,
                 num_candidate_programs: int = 6):
        super().__init__(every_n_epochs)
        check_metric(metric)
        self.trainset, self.valset = to_examples(trainset, None, "trainset"), to_examples(valset, None, "valset")
        check_examples(program, self.trainset, "trainset")
        check_examples(program, self.valset, "valset")
        self.student = program.deepcopy()
        self.program = program.deepcopy()
        self.tokenizer, self.generation = processing_class, generation
        self.runner = ProgramRunner(metric, num_threads)
        self.prompt_optimizer = prompt_optimizer or default_prompt_optimizer(
            metric, max_bootstrapped_demos=max_bootstrapped_demos, max_labeled_demos=max_labeled_demos,
            num_candidate_programs=num_candidate_programs, num_threads=num_threads)
        self.history: list[tuple[int, float]] = []
        self._base_fingerprint: str | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._base_fingerprint = self._base_fingerprint or weights_fingerprint(model, only_trainable=False)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if not self._due():
            return
        with live_lm(model, self.tokenizer, self._base_fingerprint, self.generation,
                     args.gradient_checkpointing_kwargs) as lm:
            self.program = optimize_prompts(self.prompt_optimizer, self.student, lm, self.trainset, self.valset,
                                            examples_at_once=self.runner.num_threads)
            score = self.runner.evaluate(self.program, self.valset, lm).score
        self.history.append((self.epochs_done, score))
        logger.info("Epoch %d: prompts re-optimized, val score %.1f", self.epochs_done, score)


class _RowPool:
    """The current training rows. `datasets` fingerprints a generator and its arguments by pickling them, so the
    generator gets this small holder rather than the callback (whose program does not pickle)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows


def _pool_rows(pool: _RowPool):
    yield from pool.rows  # read at the start of every epoch, so rows swapped in on_epoch_end are used next


class TraceDatasetCallback(_EveryNEpochs):
    """The w step's data every `every_n_epochs` epochs: the program's passing traces on the trainset, generated with
    the current weights, become the training rows of the following epochs.

    `program` is a `dspy.Module` or a function returning the current one (e.g. `lambda: prompts.program`). The first
    rows are generated at construction with `model`, since `SFTTrainer` reads the first row when it is built.
    `max_epochs` stops training after that many epochs (an iterable dataset has no length to count them from).
    """

    def __init__(self, program: dspy.Module | Callable[[], dspy.Module], metric, trainset, model, processing_class,
                 every_n_epochs: int = 1, max_epochs: int | None = None, seed: int = 0,
                 generation: GenerationSettings = GenerationSettings(), num_threads: int = 8):
        super().__init__(every_n_epochs)
        check_metric(metric)
        self.program_source = program if callable(program) and not isinstance(program, dspy.Module) else (
            lambda: program)
        self.trainset = to_examples(trainset, None, "trainset")
        check_examples(self.program_source(), self.trainset, "trainset")
        self.tokenizer, self.generation, self.seed, self.max_epochs = processing_class, generation, seed, max_epochs
        self.runner = ProgramRunner(metric, num_threads)
        self.history: list[dict] = []  # one entry per regeneration: epoch, traces kept / total, rows
        self._base_fingerprint = weights_fingerprint(model, only_trainable=False)
        self._pool = _RowPool(self._regenerate(model))
        if not self.rows:
            raise ValueError("no trace of the program passed the metric on the trainset: nothing to train on")
        self.train_dataset = datasets.IterableDataset.from_generator(_pool_rows, gen_kwargs={"pool": self._pool})

    @property
    def rows(self) -> list[dict]:
        return self._pool.rows

    def _regenerate(self, model, gradient_checkpointing_kwargs=None) -> list[dict]:
        with live_lm(model, self.tokenizer, self._base_fingerprint, self.generation,
                     gradient_checkpointing_kwargs) as lm:
            calls = self.runner.run(self.program_source(), self.trainset, lm, with_trace=True)
        traces = traces_to_dataset(calls)
        rows = traces.dataset.to_list()
        random.Random(self.seed + self.epochs_done).shuffle(rows)
        self.history.append({"epoch": self.epochs_done, "traces_kept": traces.kept,
                             "traces_total": traces.summary.total, "rows": len(rows)})
        return rows

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.max_epochs is not None and self.epochs_done + 1 >= self.max_epochs:
            self.epochs_done += 1
            control.should_training_stop = True
            return
        if not self._due():
            return
        rows = self._regenerate(model, args.gradient_checkpointing_kwargs)
        if rows:
            self._pool.rows = rows
        else:
            warnings.warn(f"epoch {self.epochs_done}: no passing trace; training goes on with the previous rows",
                          stacklevel=2)
