"""BetterTogether as one `TrainerCallback` on a plain TRL `SFTTrainer`.

    callback = BetterTogetherCallback(program, metric, trainset, valset, every_n_epochs=2)
    trainer = SFTTrainer(model=model_id, args=SFTConfig(..., num_train_epochs=4, max_steps=10_000),
                         train_dataset=callback.train_dataset, callbacks=[callback])
    trainer.train()
    callback.program(**inputs)

The callback owns both halves of the algorithm. When training begins, and then every `every_n_epochs` epochs, it
re-optimizes the prompts of the original program on the weights being trained (the p step) and regenerates the
training rows from the new program's passing traces on the trainset (the w step's data); the following epochs train
on them. After the last epoch (`args.num_train_epochs`, counted by the callback) it re-optimizes the prompts once more,
so the strategy is `p -> w -> p -> ... -> w -> p`.

The model and tokenizer are the trainer's: the callback receives them with every event (`model`, `processing_class`).
It generates as `BetterTogetherTrainer` does: the batching engine, structured generation, eval mode with gradient
checkpointing off, every parameter materialized (ZeRO-3 gathered with DeepSpeed's hooks lifted, FSDP v1 summoned), and
the work split across ranks (`bt_trl/core/ranks.py`): scoring and trace collection by shares of the examples, the prompt
optimizer's generation batches across all ranks, its program broadcast from the main rank.

`callback.train_dataset` is a `datasets.IterableDataset` that reads the current rows at the start of every epoch, so
the trainer needs `max_steps` (an upper bound; training stops after `num_train_epochs` epochs).
"""

from __future__ import annotations

import logging
import random
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from types import SimpleNamespace

import datasets
import dspy
from accelerate.state import AcceleratorState
from accelerate.utils import extract_model_from_parallel
from transformers import TrainerCallback
from trl.distributed import DistributedBackend
from trl.models.utils import add_hooks, remove_hooks

from bt_trl.core.data import check_examples, check_metric, to_examples
from bt_trl.core.ranks import Ranks
from bt_trl.core.runner import ProgramRunner, program_adapter, served_program
from bt_trl.serving.engine import (
    GenerationSettings,
    TransformersBackend,
    eval_mode,
    lm_name,
    serving_lm,
    weights_fingerprint,
)
from bt_trl.steps.prompt import default_prompt_optimizer, optimize_prompts
from bt_trl.steps.sft import FORMAT_ROW, traces_to_dataset

logger = logging.getLogger(__name__)


@contextmanager
def trained_model_for_generation(model, optimizer, gradient_checkpointing_kwargs=None):
    """The model a `Trainer` trains, as its callbacks receive it, ready to generate as
    `BetterTogetherTrainer.generation_mode` makes it: eval mode, no gradient checkpointing (it disables the KV cache),
    every parameter materialized, so that ranks may make different numbers of `generate` calls. Under ZeRO-3 the
    parameters are gathered and DeepSpeed's forward hooks are lifted for the block, as TRL's
    `unwrap_model_for_generation` does with the engine: they are held by the engine's optimizer, which the callbacks
    receive (wrapped by accelerate) as `optimizer`. Under FSDP v1 (where the trainer's model is the FSDP wrapper) the
    full parameters are summoned."""
    # DistributedBackend reads only `accelerator.state`: the trainer's accelerator state, a shared singleton.
    distributed = DistributedBackend(SimpleNamespace(state=AcceleratorState()))
    unwrapped = extract_model_from_parallel(model)
    checkpointing = getattr(unwrapped, "is_gradient_checkpointing", False)
    with ExitStack() as stack:
        if checkpointing:
            unwrapped.gradient_checkpointing_disable()
            stack.callback(unwrapped.gradient_checkpointing_enable,
                           gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if distributed.is_zero3:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(list(unwrapped.parameters())))
            if optimizer is not None:
                remove_hooks(optimizer)
                stack.callback(add_hooks, optimizer)
        stack.enter_context(distributed.summon_full_params(model, recurse=True, writeback=False))
        yield stack.enter_context(eval_mode(unwrapped))


class _RowPool:
    """The current training rows. `datasets` fingerprints a generator and its arguments by pickling them, so the
    generator gets this small holder rather than the callback (whose program does not pickle)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows


def _pool_rows(pool: _RowPool):
    yield from pool.rows  # read at the start of every epoch, so rows swapped in on_epoch_end are used next


class BetterTogetherCallback(TrainerCallback):
    """BetterTogether (Soylu, Potts, Khattab, 2024) on a plain `SFTTrainer`: prompt optimization of `program` and the
    regeneration of the SFT rows from its passing traces, every `every_n_epochs` epochs, on the model being trained.

    Args:
        program: the DSPy program (any `dspy.Module`; all its modules run on the trained model).
        metric: DSPy-style `metric(example, prediction, trace=None)`.
        trainset, valset: lists of `dspy.Example` (inputs marked), or `datasets.Dataset`s with `input_columns`. The
            p step bootstraps demos from `trainset` and picks its candidate on `valset`; traces come from `trainset`;
            each round is scored on `valset`.
        every_n_epochs: epochs trained on one set of rows before the next round.
        prompt_optimizer: any DSPy teleprompter; default the paper's `BootstrapFewShotWithRandomSearch` built from
            `max_bootstrapped_demos`, `max_labeled_demos`, `num_candidate_programs`.
        generation: how program calls are generated (max tokens, temperature, batching, structured generation).
        num_threads, metric_threshold, seed: as in `BetterTogetherConfig` (`seed` orders the rows of each round).

    Pass `callback.train_dataset` as the trainer's `train_dataset`. After training, `callback.program` is the last
    optimized program, served from the trained model as the rounds ran it (adapter and generation settings);
    `callback.history` holds one entry per round: epoch, val score, traces kept / total, rows.
    """

    def __init__(self, program: dspy.Module, metric, trainset, valset, every_n_epochs: int = 1,
                 prompt_optimizer=None, generation: GenerationSettings = GenerationSettings(), num_threads: int = 8,
                 metric_threshold: float | None = None, max_bootstrapped_demos: int = 3, max_labeled_demos: int = 3,
                 num_candidate_programs: int = 6, input_columns: list[str] | None = None, seed: int = 0):
        if not isinstance(program, dspy.Module):
            raise TypeError(f"program must be a dspy.Module, got {type(program).__name__}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        check_metric(metric)
        self.trainset = to_examples(trainset, input_columns, "trainset")
        self.valset = to_examples(valset, input_columns, "valset")
        check_examples(program, self.trainset, "trainset")
        check_examples(program, self.valset, "valset")
        self.student = program.deepcopy()
        self.student.set_lm(None)
        self.program = self.student.deepcopy()
        self.metric, self.metric_threshold, self.num_threads = metric, metric_threshold, num_threads
        self.every_n_epochs, self.generation, self.seed = every_n_epochs, generation, seed
        self.prompt_optimizer = prompt_optimizer or default_prompt_optimizer(
            metric, max_bootstrapped_demos=max_bootstrapped_demos, max_labeled_demos=max_labeled_demos,
            num_candidate_programs=num_candidate_programs, num_threads=num_threads, metric_threshold=metric_threshold)
        self.history: list[dict] = []
        self.epochs_done = 0
        # SFTTrainer reads the first row when it is built, before any generation: until the first round (at
        # on_train_begin) the dataset holds one row declaring the format of the rows to come.
        self._pool = _RowPool([FORMAT_ROW])
        self.train_dataset = datasets.IterableDataset.from_generator(_pool_rows, gen_kwargs={"pool": self._pool})
        self._ranks: Ranks | None = None
        self._runner: ProgramRunner | None = None
        self._base_fingerprint: str | None = None

    @property
    def rows(self) -> list[dict]:
        """The training rows of the current round."""
        return self._pool.rows

    # ------------------------------------------------------------------------------------------------------------
    # Trainer events
    # ------------------------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, processing_class=None, optimizer=None, **kwargs):
        self._ranks = Ranks(AcceleratorState())  # the trainer's processes (its accelerator state is shared)
        self._runner = ProgramRunner(self.metric, self.num_threads, self.metric_threshold, self._ranks)
        with trained_model_for_generation(model, optimizer, args.gradient_checkpointing_kwargs) as live:
            self._base_fingerprint = weights_fingerprint(live, only_trainable=False)
        self._round(args, model, processing_class, optimizer, regenerate=True)
        if not self.history[-1]["traces_kept"]:
            raise ValueError("no trace of the program passed the metric on the trainset with the initial weights: "
                             "nothing to train on (a larger model, more demos or a larger trainset may help)")

    def on_epoch_end(self, args, state, control, model=None, processing_class=None, optimizer=None, **kwargs):
        # Counted here: with an iterable train dataset, `state.epoch` is not an epoch count.
        self.epochs_done += 1
        last = control.should_training_stop or self.epochs_done >= args.num_train_epochs
        if last:
            control.should_training_stop = True
        if last or self.epochs_done % self.every_n_epochs == 0:
            self._round(args, model, processing_class, optimizer, regenerate=not last)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        # Served as the rounds ran it, from the trained model (left in eval mode), as `trainer.program` is.
        live = extract_model_from_parallel(model).eval()
        lm = serving_lm(TransformersBackend(live, processing_class), lm_name(live, self._base_fingerprint),
                        self.generation).__enter__()  # lives as long as the program; its worker is a daemon thread
        self.program = served_program(self.program, lm, program_adapter())

    # ------------------------------------------------------------------------------------------------------------
    # One round: p step, valset score, and (unless training ends) the next rows
    # ------------------------------------------------------------------------------------------------------------

    def _round(self, args, model, tokenizer, optimizer, regenerate: bool) -> None:
        entry = {"epoch": self.epochs_done}
        with trained_model_for_generation(model, optimizer, args.gradient_checkpointing_kwargs) as live:
            backend, name = TransformersBackend(live, tokenizer), lm_name(live, self._base_fingerprint)
            self.program = self._optimize_prompts(backend, name)
            with serving_lm(backend, name, self.generation) as lm:
                entry["val_score"] = self._runner.evaluate(self.program, self.valset, lm).score
                if regenerate:
                    traces = traces_to_dataset(self._runner.run(self.program, self.trainset, lm, with_trace=True))
        if regenerate:
            rows = traces.dataset.to_list()
            random.Random(self.seed + self.epochs_done).shuffle(rows)  # the same order on every rank
            entry.update(traces_kept=traces.kept, traces_total=traces.summary.total, rows=len(rows))
            if rows:
                self._pool.rows = rows
            elif self.history:
                warnings.warn(f"epoch {self.epochs_done}: no passing trace; training goes on with the previous rows",
                              stacklevel=2)
        self.history.append(entry)
        logger.info("BetterTogether round at epoch %d: prompts re-optimized, val score %.1f%s", self.epochs_done,
                    entry["val_score"], f", {entry['rows']} training rows" if regenerate else "")

    def _optimize_prompts(self, backend, name: str) -> dspy.Module:
        """The p step on the original program. A DSPy optimizer decides its own calls, so it runs on the main rank,
        each of its generation batches split across all ranks; its program is broadcast to every rank."""
        ranks = self._ranks
        if not ranks.is_main:
            ranks.serve_generation(backend)
            program = self.student.deepcopy()
            program.load_state(ranks.broadcast(None))
            return program
        split = ranks.main_generates_for_all(backend) if ranks.world_size > 1 else nullcontext(backend)
        with split as all_ranks, serving_lm(all_ranks, name, self.generation) as lm:
            program = optimize_prompts(self.prompt_optimizer, self.student, lm, self.trainset, self.valset,
                                       examples_at_once=self.num_threads)
        ranks.broadcast(program.dump_state())
        return program
