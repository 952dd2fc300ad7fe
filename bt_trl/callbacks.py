"""BetterTogether as one `TrainerCallback` on a plain TRL `SFTTrainer`.

    callback = BetterTogetherCallback(program, metric, trainset, valset, every_n_epochs=2)
    trainer = SFTTrainer(model=model_id, args=BetterTogetherConfig(..., num_train_epochs=4, max_steps=10_000),
                         train_dataset=callback.train_dataset, callbacks=[callback])
    trainer.train()
    callback.program(**inputs)

The callback owns both halves of the algorithm. When training begins, and then every `every_n_epochs` epochs, it
re-optimizes the prompts of the original program on the weights being trained (the p step) and regenerates the
training rows from the new program's passing traces on the trainset (the w step's data); the following epochs train
on them. After the last epoch (`args.num_train_epochs`, counted by the callback) it re-optimizes the prompts once more,
so the strategy is `p -> w -> p -> ... -> w -> p`.

Its settings (demos, candidates, generation, threads, metric threshold, trace rounds) are the trainer's `args` when
they are a `BetterTogetherConfig` (an `SFTConfig`), else `BetterTogetherConfig`'s defaults. The model and tokenizer
are the trainer's: the callback receives them with every event. It generates and splits the work across ranks with
the pieces `BetterTogetherTrainer` uses (`core.live`, `steps.prompt.prompt_step`, `steps.sft.collect_traces`).

The steps: `callback.train_dataset` is a `datasets.IterableDataset` that reads the current rows at the start of every
epoch, since the rows change between rounds. transformers refuses a dataset without a length unless `max_steps` is set,
when the trainer is built (before any callback runs), so `max_steps` is required; it is a cap, not a plan. The callback
ends each epoch when its rows are done, stops after `num_train_epochs` epochs (or at `max_steps`, whichever comes
first, with a warning when the cap comes first), and plans `state.max_steps` and the learning-rate schedule over the
steps the epochs take on the current rows, again at each round: the schedule ends on the last step actually run.

Why not a dataset with a length, so that `num_train_epochs` alone would do: `SFTTrainer` takes only a `datasets.Dataset`
or `IterableDataset` (anything else is a TypeError), and tokenizes a `Dataset` into a new one when it is built, with
no model output to train on yet (the callback first sees the model at `on_init_end`, after transformers' length
check); a `Dataset`'s rows are fixed Arrow rows, and the one way to read them through a function (`with_transform`)
is refused by `SFTTrainer`. transformers also fixes an epoch's steps from the dataset's length when `train()` begins.
The rows that change each round therefore need an `IterableDataset`, which has no length.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from collections.abc import Sequence

import datasets
import dspy
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import extract_model_from_parallel
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback, get_scheduler

from bt_trl.config import bettertogether_settings, check_demo_counts
from bt_trl.core.data import checked_inputs
from bt_trl.core.live import model_for_generation, serve_program
from bt_trl.core.ranks import Ranks
from bt_trl.core.runner import ProgramRunner, ServedProgram, checked_metric
from bt_trl.serving.engine import TransformersBackend, lm_name, serving_lm, weights_fingerprint
from bt_trl.steps.optimizers import bound, built_in_specs, named_prompt_optimizers
from bt_trl.steps.prompt import PromptOptimizer, default_prompt_optimizer, prompt_step
from bt_trl.steps.sft import FORMAT_ROW, collect_traces
from bt_trl.steps.strategy import PROMPT_STEP, check_prompt_step

logger = logging.getLogger(__name__)


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
        prompt_optimizer: what the `p` step runs: any DSPy teleprompter, or a factory `lm -> Teleprompter` given the
            LM serving the round; default the paper's `BootstrapFewShotWithRandomSearch` built from the trainer's
            `args` (`max_bootstrapped_demos`, `max_labeled_demos`, `num_candidate_programs`, ...).
        prompt_optimizers: prompt steps by name (name → teleprompter, factory or `{"class": ..., <argument>: ...}`
            mapping), as `BetterTogetherTrainer` takes them.
        prompt_step: the prompt step each round runs: `p`, `gepa`, `mipro`, `simba` or a name of `prompt_optimizers`.
        input_columns: with `datasets.Dataset`s, the columns that are the program's inputs.

    Pass `callback.train_dataset` as the trainer's `train_dataset`. After training, `callback.program` is the last
    optimized program, served from the trained model as the rounds ran it (adapter and generation settings;
    `callback.program.close()` stops its engine); `callback.history` holds one entry per round: epoch, val score,
    traces kept / total, rows.
    """

    def __init__(self, program: dspy.Module, metric, trainset, valset, every_n_epochs: int = 1,
                 prompt_optimizer: PromptOptimizer | None = None, input_columns: Sequence[str] | None = None,
                 prompt_optimizers: dict[str, PromptOptimizer | dict] | None = None, prompt_step: str = PROMPT_STEP):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.trainset, self.valset = checked_inputs(program, metric, trainset, valset, input_columns)
        self.prompt_optimizers = named_prompt_optimizers(None, prompt_optimizers, built_in_specs(len(self.trainset)),
                                                         prompt_optimizer)
        check_prompt_step(prompt_step, self.prompt_optimizers, "prompt_step")
        self.student = program.deepcopy()
        self.student.set_lm(None)
        self.program = self.student.deepcopy()
        self.metric = checked_metric(metric)  # DSPy's optimizers would take a string "no" as a pass
        self.every_n_epochs, self.prompt_step = every_n_epochs, prompt_step
        self.history: list[dict] = []
        self.epochs_done = 0
        self._epoch_steps = 0  # optimizer steps an epoch on the current rows takes
        self._epoch_ends_at = 0  # the global step the current epoch ends at
        self._cap_warned = False  # whether max_steps was found to end training before the epochs do
        # SFTTrainer reads the first row when it is built, before any generation: until the first round (at
        # on_train_begin) the dataset holds one row declaring the format of the rows to come.
        self._pool = _RowPool([FORMAT_ROW])
        self.train_dataset = datasets.IterableDataset.from_generator(_pool_rows, gen_kwargs={"pool": self._pool})
        self._settings = None
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

    def on_train_begin(self, args, state, control, model=None, processing_class=None, optimizer=None,
                       lr_scheduler=None, **kwargs):
        settings = self._settings = bettertogether_settings(args)
        if self.prompt_step == PROMPT_STEP and PROMPT_STEP not in self.prompt_optimizers:
            check_demo_counts(settings.max_bootstrapped_demos, settings.max_labeled_demos)
            self.prompt_optimizers[PROMPT_STEP] = default_prompt_optimizer(
                self.metric, max_bootstrapped_demos=settings.max_bootstrapped_demos,
                max_labeled_demos=settings.max_labeled_demos, num_candidate_programs=settings.num_candidate_programs,
                num_threads=settings.num_threads, max_rounds=settings.max_rounds,
                metric_threshold=settings.metric_threshold)
        self.prompt_optimizers = bound(self.prompt_optimizers, self.metric, settings.num_threads,
                                       settings.metric_threshold)
        self._ranks = Ranks(AcceleratorState())  # the trainer's processes (its accelerator state is shared)
        self._runner = ProgramRunner(self.metric, settings.num_threads, settings.metric_threshold, self._ranks)
        with model_for_generation(model, optimizer, args.gradient_checkpointing_kwargs) as live:
            self._base_fingerprint = weights_fingerprint(live, only_trainable=False)
        self._round(args, model, processing_class, optimizer, regenerate=True)
        if not self.history[-1]["traces_kept"]:
            raise ValueError("no trace of the program passed the metric on the trainset with the initial weights: "
                             "nothing to train on (a larger model, more demos or a larger trainset may help)")
        if not isinstance(lr_scheduler, LambdaLR):
            warnings.warn(f"the {type(lr_scheduler).__name__} learning-rate schedule is not re-planned over the "
                          f"epochs: it runs over max_steps={args.max_steps}", stacklevel=2)
        self._plan_steps(args, state, lr_scheduler)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch_ends_at = state.global_step + self._epoch_steps

    def on_step_end(self, args, state, control, **kwargs):
        # transformers' loop over an iterable dataset would run each epoch on to max_steps over the spent rows.
        if state.global_step >= self._epoch_ends_at:
            control.should_epoch_stop = True

    def on_epoch_end(self, args, state, control, model=None, processing_class=None, optimizer=None,
                     lr_scheduler=None, **kwargs):
        # Counted here: with an iterable train dataset, `state.epoch` is not an epoch count.
        self.epochs_done += 1
        last = control.should_training_stop or self.epochs_done >= args.num_train_epochs
        if last:
            control.should_training_stop = True
        if last or self.epochs_done % self.every_n_epochs == 0:
            self._round(args, model, processing_class, optimizer, regenerate=not last)
            if not last:
                self._plan_steps(args, state, lr_scheduler)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        # Served as the rounds ran it, from the trained model (left in eval mode), as `trainer.program` is.
        live = extract_model_from_parallel(model).eval()
        if isinstance(self.program, ServedProgram):
            self.program.close()
        self.program = serve_program(self.program, TransformersBackend(live, processing_class),
                                     lm_name(live, self._base_fingerprint), self._settings.generation)

    # ------------------------------------------------------------------------------------------------------------
    # The steps the epochs take on the current rows, and the learning rate over them
    # ------------------------------------------------------------------------------------------------------------

    def _plan_steps(self, args, state, lr_scheduler) -> None:
        """The remaining epochs on the current rows: their steps in `state.max_steps` (capped by `args.max_steps`)
        and the learning-rate schedule re-planned over the whole run's steps."""
        rows_per_batch = args.per_device_train_batch_size * args.world_size  # (accelerate shards an iterable dataset)
        batches = (len(self.rows) // rows_per_batch if args.dataloader_drop_last
                   else math.ceil(len(self.rows) / rows_per_batch))
        # An iterable epoch's last, partial gradient accumulation makes no optimizer step in transformers' loop.
        self._epoch_steps = batches // args.gradient_accumulation_steps
        epochs_left = math.ceil(args.num_train_epochs) - self.epochs_done
        planned = state.global_step + epochs_left * self._epoch_steps
        if args.max_steps < planned and not self._cap_warned:
            self._cap_warned = True
            warnings.warn(f"max_steps={args.max_steps} ends training before num_train_epochs="
                          f"{args.num_train_epochs} does: on the current rows the epochs end at step {planned}. "
                          "max_steps is only the cap transformers requires of the callback's iterable dataset: set it "
                          "above the epochs' steps to train them all", stacklevel=2)
        state.max_steps = min(planned, args.max_steps)
        if isinstance(lr_scheduler, LambdaLR):
            _replan_learning_rate(lr_scheduler, args, state.max_steps)

    # ------------------------------------------------------------------------------------------------------------
    # One round: p step, valset score, and (unless training ends) the next rows
    # ------------------------------------------------------------------------------------------------------------

    def _round(self, args, model, tokenizer, optimizer, regenerate: bool) -> None:
        settings, entry = self._settings, {"epoch": self.epochs_done}
        with model_for_generation(model, optimizer, args.gradient_checkpointing_kwargs) as live:
            backend, name = TransformersBackend(live, tokenizer), lm_name(live, self._base_fingerprint)
            self.program, _ = prompt_step(self.prompt_optimizers[self.prompt_step], self.student, self.program,
                                          self.trainset, self.valset, backend=backend, lm_name=name,
                                          settings=settings.generation, ranks=self._ranks,
                                          examples_at_once=settings.num_threads)
            with serving_lm(backend, name, settings.generation) as lm:
                entry["val_score"] = self._runner.evaluate(self.program, self.valset, lm).score
                if regenerate:
                    traces = collect_traces(self._runner, self.program, self.trainset, lm, settings.trace_rounds,
                                            settings.drop_placeholder_traces)
        if regenerate:
            rows = traces.dataset.to_list()
            random.Random(args.seed + self.epochs_done).shuffle(rows)  # the same order on every rank
            entry.update(traces_kept=traces.kept, traces_total=traces.summary.total, rows=len(rows))
            if rows:
                self._pool.rows = rows
            elif self.history:
                warnings.warn(f"epoch {self.epochs_done}: no passing trace; training goes on with the previous rows",
                              stacklevel=2)
        self.history.append(entry)
        logger.info("BetterTogether round at epoch %d: prompts re-optimized, val score %.1f%s", self.epochs_done,
                    entry["val_score"], f", {entry['rows']} training rows" if regenerate else "")


def _replan_learning_rate(lr_scheduler: LambdaLR, args, total_steps: int) -> None:
    """Gives the trainer's schedule the shape transformers builds for `args.lr_scheduler_type` over `total_steps`,
    from the step it is at on."""
    # Built on a stand-in optimizer: a scheduler built on the trainer's would reset its learning rate.
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    planned = get_scheduler(args.lr_scheduler_type, stand_in, num_warmup_steps=args.get_warmup_steps(total_steps),
                            num_training_steps=total_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    factor = planned.lr_lambdas[0]
    lr_scheduler.lr_lambdas = [factor] * len(lr_scheduler.optimizer.param_groups)
    for group, base_lr in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs, strict=True):
        group["lr"] = base_lr * factor(lr_scheduler.last_epoch)
