from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets
import dspy
from peft import PeftModel, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file
from transformers import PreTrainedModel, set_seed
from transformers.integrations.integration_utils import TensorBoardCallback, default_logdir
from transformers.trainer_utils import TrainOutput
from trl import SFTTrainer
from trl.distributed import DistributedBackend

from bt_trl.config import BetterTogetherConfig
from bt_trl.console import RunConsole
from bt_trl.core.data import checked_inputs, to_examples
from bt_trl.core.interrupts import interruptible
from bt_trl.core.live import gathered_parameters, model_for_generation, serve_program
from bt_trl.core.ranks import Ranks, end_job
from bt_trl.core.results import (
    RESULTS_FILES,
    STATE_FILE,
    RunState,
    StepResult,
    step_dir_name,
    step_dirs,
    write_results,
)
from bt_trl.core.runner import ProgramRunner, RunSummary, ServedProgram, configured_adapter
from bt_trl.integrations import hub
from bt_trl.serving.engine import (
    LM_PREFIX,
    EngineStats,
    GenerationBackend,
    TransformersBackend,
    lm_name,
    serving_lm,
    weights_fingerprint,
)
from bt_trl.serving.models import check_model_name_or_path, resolve_model_name_or_path
from bt_trl.serving.vllm import VLLMBackend, check_vllm_usable
from bt_trl.steps.grpo import collect_rollouts, group_rollouts, reinforce_on
from bt_trl.steps.optimizers import bound, built_in_specs, describe, named_prompt_optimizers
from bt_trl.steps.prompt import PromptOptimizer, default_prompt_optimizer, expected_program_calls, prompt_step
from bt_trl.steps.sft import FORMAT_ROW, TraceDataset, collect_traces, finetune_on
from bt_trl.steps.strategy import GRPO_STEP, PROMPT_STEP, VANILLA, is_prompt_step, is_weight_step, parse_strategy
from bt_trl.steps.validation import ValidationGuard, validation_examples

logger = logging.getLogger(__name__)

PROGRAM_FILE = hub.PROGRAM_FILE  # the file load_program reads
SFT_DATASET_FILE = "sft_dataset.jsonl"
VALIDATION_CHECKPOINT_DIR = "best_checkpoint"  # in a w step's folder while it trains: its best weights so far
GRPO_ROLLOUTS_FILE = "grpo_rollouts.jsonl"  # every module call in a group, with its reward and advantage
GRPO_STATS_FILE = "grpo_stats.json"  # each round's group statistics and losses
# What a run writes at the top of output_dir besides its step folders (and run.log, which every run appends to):
# `overwrite_output_dir` removes them, so that no weights of the old run stay beside the new run's.
RUN_FILES = (STATE_FILE, *RESULTS_FILES, PROGRAM_FILE, hub.METADATA_FILE, hub.ADAPTER_WEIGHTS_FILE,
             "adapter_config.json", "model.safetensors", "model.safetensors.index.json")


@dataclass
class WeightStepOutcome:
    """What a w step's fine-tuning did: no training (`losses` None), or its first and last logged loss and, when
    validated while training, the checkpoints' val scores and which one it kept."""

    losses: tuple[float, float] | None = None
    kept_start: bool = False  # no checkpoint scored above the starting weights: they were put back
    val_curve: list[list[float]] | None = None
    kept_checkpoint: str | None = None
    validation_seconds: float | None = None

    @classmethod
    def of(cls, losses: list[float]) -> WeightStepOutcome:
        """A step that trained, with its logged training losses (NaN when none was logged)."""
        return cls(losses=(losses[0], losses[-1]) if losses else (float("nan"), float("nan")))


class BetterTogetherTrainer(SFTTrainer):
    """BetterTogether (Soylu, Potts, Khattab, 2024): alternate prompt and weight optimization of a DSPy program on the
    model this trainer trains.

    Example:

    ```python
    import dspy
    from peft import LoraConfig
    from bt_trl import BetterTogetherConfig, BetterTogetherTrainer

    trainer = BetterTogetherTrainer(
        model="embedded:smollm2-135m",
        args=BetterTogetherConfig("out/iris", strategy="p -> w -> p", use_cpu=True),
        program=dspy.Predict("sepal_length, sepal_width, petal_length, petal_width -> species"),
        metric=lambda example, prediction, trace=None: prediction.species == example.species,
        trainset=trainset, valset=valset,
        peft_config=LoraConfig(target_modules="all-linear"),
    )
    trainer.train()
    trainer.program(sepal_length=5.1, sepal_width=3.5, petal_length=1.4, petal_width=0.2)
    ```

    Args:
        model: as for `SFTTrainer` (Hub id, local path, `PreTrainedModel` or `PeftModel`); `None` is the embedded
            SmolLM2-135M-Instruct.
        args: a `BetterTogetherConfig`.
        program: the DSPy program (any `dspy.Module`; all its modules run on this model).
        metric: DSPy-style `metric(example, prediction, trace=None)`.
        trainset, valset: lists of `dspy.Example` (inputs marked), or `datasets.Dataset`s with
            `args.input_columns`. The p step bootstraps demos from `trainset` and picks the best candidate on `valset`;
            the w step collects traces on `trainset`; every step is scored on `valset`.
        prompt_optimizer: what the `p` step runs: any DSPy teleprompter (BootstrapFewShot, MIPROv2, ...) or a factory
            `lm -> Teleprompter` given the LM serving the step. Defaults to the paper's
            `BootstrapFewShotWithRandomSearch` configured from `args`.
        prompt_optimizers: prompt steps by name, for the strategy to use (`"mine -> w -> mine"`) or to replace a
            built-in one (`gepa`, `mipro`, `simba`): name → teleprompter, factory `lm -> Teleprompter`, or a mapping
            `{"class": "GEPA", <argument>: <value>}` as in `args.prompt_optimizers` (`steps/optimizers.py`).
        Remaining arguments are `SFTTrainer`'s (`processing_class`, `peft_config`, `callbacks`, ...).

    After `train()`, `trainer.program` is the best program on the valset, bound to an LM served from the trained model
    with the weights of that same step.
    """

    _tag_names = ["trl", "sft", "dspy", "bettertogether"]
    _name = "BetterTogether"

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel | None = None,
        args: BetterTogetherConfig | None = None,
        program: dspy.Module | None = None,
        metric: Callable[..., Any] | None = None,
        trainset: Sequence[dspy.Example] | datasets.Dataset | None = None,
        valset: Sequence[dspy.Example] | datasets.Dataset | None = None,
        prompt_optimizer: PromptOptimizer | None = None,
        prompt_optimizers: dict[str, PromptOptimizer | dict[str, Any]] | None = None,
        **kwargs,
    ):
        # Everything the user gave is checked before the model is loaded or anything is generated.
        if args is None:
            args = BetterTogetherConfig("BetterTogether")
        if not isinstance(args, BetterTogetherConfig):
            raise TypeError(f"args must be a BetterTogetherConfig, got {type(args).__name__}")
        trainset, valset = checked_inputs(program, metric, trainset, valset, args.input_columns)
        if "train_dataset" in kwargs:
            raise TypeError("train_dataset is built by each w step from the program's traces; pass trainset instead")
        if args.generation_backend == "vllm":
            check_vllm_usable()
        named_optimizers = named_prompt_optimizers(args.prompt_optimizers, prompt_optimizers,
                                                   built_in_specs(len(trainset)), prompt_optimizer)
        parse_strategy(args.strategy, prompt_steps=named_optimizers)  # the config let any well-formed name through

        if model is None or isinstance(model, str):
            check_model_name_or_path(model)
            model = resolve_model_name_or_path(model)
        super().__init__(model=model, args=args, train_dataset=datasets.Dataset.from_list([FORMAT_ROW]), **kwargs)
        self.console = RunConsole.for_trainer(args)  # what train() and evaluate_program() show (bt_trl/console.py)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.accelerator.num_processes == 1:
            # Without a GPU, accelerate gives each process a world of its own: N copies of the whole job.
            raise ValueError(f"launched as {launched} processes, but they do not form one process group; on a "
                             "machine without a GPU pass --use_cpu (use_cpu=True) to join them over gloo")
        if DistributedBackend(self.accelerator).fsdp_version == 2:
            # FSDP2 all-gathers inside every forward: ranks making different numbers of generate calls would hang.
            raise ValueError("FSDP version 2 is not supported: generation needs the full parameters materialized "
                             "once per step (FSDP version 1, as in accelerate_configs/fsdp.yaml, or DeepSpeed ZeRO-3)")

        # The program's calls and the metric's verdicts feed the progress display; the w steps' fine-tuning reports
        # to it instead of transformers' progress bar.
        self.console.replace_progress_callbacks(self.callback_handler)
        self._log_tensorboard_to_output_dir()
        metric = self.console.counting_passes(metric, args.metric_threshold)
        self.student = program.deepcopy()
        self.student.set_lm(None)
        self.trainset, self.valset, self.metric = trainset, valset, metric
        # Every prompt step name → its optimizer; `p` is `prompt_optimizer`, a `p` of prompt_optimizers, or the paper's.
        self.prompt_optimizers = bound(named_optimizers, metric, args.num_threads, args.metric_threshold)
        self.prompt_optimizer = self.prompt_optimizers.setdefault(PROMPT_STEP, default_prompt_optimizer(
            metric, max_bootstrapped_demos=args.max_bootstrapped_demos, max_labeled_demos=args.max_labeled_demos,
            num_candidate_programs=args.num_candidate_programs, num_threads=args.num_threads,
            max_rounds=args.max_rounds, metric_threshold=args.metric_threshold,
        ))
        self.ranks = Ranks(self.accelerator.state)
        self.runner = ProgramRunner(metric, args.num_threads, args.metric_threshold, self.ranks)
        self.program: dspy.Module | None = None
        self.run_state: RunState | None = None
        self._weights_version = 0
        with gathered_parameters(self.model):
            self._base_fingerprint = weights_fingerprint(self.model, only_trainable=False)
        self._step_stats = EngineStats()  # generated on this rank in the current step

    # ------------------------------------------------------------------------------------------------------------
    # Algorithm 1
    # ------------------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: bool | str | None = None, trial=None, **kwargs) -> TrainOutput:
        """Runs the strategy: score the initial program, then each prompt or weight step in turn, each scored on the
        valset and saved in its folder (`step_<index>_<name>`); ends on the best step. `resume_from_checkpoint` (True
        or an output folder) continues an interrupted run after its last completed step. (`trial`, for
        `Trainer.hyperparameter_search`, is not supported.)"""
        if trial is not None:
            raise ValueError("BetterTogetherTrainer.train does not take a hyperparameter-search trial: "
                             "hyperparameter_search is not supported")
        if kwargs:
            raise TypeError(f"BetterTogetherTrainer.train got unexpected keyword arguments {sorted(kwargs)}")
        if not resume_from_checkpoint:
            self._claim_output_dir()
        with interruptible(), self.console.session():
            state = self._resume(resume_from_checkpoint) if resume_from_checkpoint else self._start()
            for index, kind in enumerate(self.args.steps, start=1):
                if index < len(state.steps):
                    continue  # completed before the interruption
                set_seed(self.args.seed + index)
                started = self._begin_step(index, kind)
                if not is_weight_step(kind):
                    # What it compiles and with which teacher: `steps.prompt.compiled_and_teacher`.
                    self.program = self.optimize_program_prompts(kind, after_prompt_step=is_prompt_step(
                        state.steps[-1].kind))
                    result = self._finish_step(index, kind, started, state)
                elif kind == GRPO_STEP:
                    result = self._finish_step(index, kind, started, state, outcome=self.reinforce_weights(index))
                else:
                    traces = self.collect_traces(self.program)
                    self._save_dataset(traces, index)
                    outcome = self.finetune_weights(traces, index)
                    result = self._finish_step(index, kind, started, state, traces, outcome)
                state.steps.append(result)
                self._checkpoint(state)
            return self._end(state)

    def optimize_program_prompts(self, name: str, after_prompt_step: bool) -> dspy.Module:
        """The prompt step `name`: its optimizer compiles the original or the current program on the current weights
        (on every rank: `steps.prompt.prompt_step`)."""
        with self.generation_mode() as model:
            program, generated = prompt_step(
                self.prompt_optimizers[name], self.student, self.program, self.trainset, self.valset,
                backend=self._backend(model), lm_name=self.lm_name(), settings=self.args.generation_settings(),
                ranks=self.ranks, after_prompt_step=after_prompt_step, examples_at_once=self.args.num_threads,
            )
        self._step_stats.add(generated)
        return program

    def collect_traces(self, program: dspy.Module) -> TraceDataset:
        """The w step's data: the module calls of `program`'s passing runs on the trainset, over `trace_rounds`
        attempts (`steps.sft.collect_traces`)."""
        with self.serving() as lm:
            return collect_traces(self.runner, program, self.trainset, lm, self.args.trace_rounds,
                                  self.args.drop_placeholder_traces)

    def finetune_weights(self, traces: TraceDataset, index: int) -> WeightStepOutcome:
        """One SFT run on the traces (its own output folder, optimizer and LR schedule). With `weight_step_eval`, the
        program is scored on the valset at checkpoints while it trains and the step ends on the best checkpoint's
        weights (`steps.validation.ValidationGuard`)."""
        if traces.copied_placeholder:
            treated = ("left out (drop_placeholder_traces)" if traces.placeholder_dropped else
                       "trained on as they are (drop_placeholder_traces=True leaves them out)")
            warnings.warn(
                f"w step {index}: {traces.copied_placeholder} of {traces.summary.passed} passing runs copied DSPy's "
                f"placeholder for a demo's missing field ('Not supplied for this particular example.'): {treated}",
                stacklevel=2,
            )
        if traces.kept == 0:
            s = traces.summary
            warnings.warn(
                f"w step {index}: no trace to train on ({s.total} tried, {s.passed} passed the metric, "
                f"{s.parse_failures} unparseable, {s.metric_errors} metric errors, {s.program_errors} program errors; "
                "the errors are in run.log); the weights are left unchanged",
                stacklevel=2,
            )
            return WeightStepOutcome()
        step_dir = Path(self.args.output_dir) / step_dir_name(index, self.args.steps[index - 1])
        if self.args.w_step_init == "base":
            self._load_weights(self.run_state.steps[0].weights_dir)
        return self._validated_training(step_dir, lambda guard: finetune_on(self, traces.dataset, str(step_dir)))

    def _validated_training(self, step_dir: Path,
                            train: Callable[[ValidationGuard | None], list[float] | None]) -> WeightStepOutcome:
        """A weight step's training: `train(guard)` runs it and returns the logged losses (None when it trained
        nothing). With `weight_step_eval`, `guard` scores the program on the valset at checkpoints while it trains
        (`steps.validation.ValidationGuard`) and the step ends on the best checkpoint's weights."""
        start = self.run_state.steps[-1]
        guard = self._validation_guard(start, step_dir) if self.args.weight_step_eval != "no" else None
        if guard is not None:
            self.add_callback(guard)
        try:
            losses = train(guard)
        finally:
            if guard is not None:
                self.remove_callback(guard)
        if losses is None:
            return WeightStepOutcome()
        outcome = WeightStepOutcome.of(losses)
        if guard is not None:
            outcome.kept_start = guard.kept is guard.start
            self.accelerator.wait_for_everyone()  # the main process has written the best checkpoint
            if outcome.kept_start:
                self._load_weights(start.weights_dir)
            elif guard.best_saved:
                self._load_weights(VALIDATION_CHECKPOINT_DIR, str(step_dir))
            self.accelerator.wait_for_everyone()  # every rank has read it
            if self.is_world_process_zero():
                guard.remove_checkpoint()
            outcome.val_curve = [[c.step, c.epoch, c.score] for c in guard.curve]
            outcome.kept_checkpoint, outcome.validation_seconds = guard.kept.label, guard.seconds
        if not outcome.kept_start:
            self._weights_version += 1
        return outcome

    def _validation_guard(self, start: StepResult, step_dir: Path) -> ValidationGuard:
        """Scores `self.program` on the valset (or its `weight_step_eval_size` sample) at the w step's checkpoints;
        the start's score is the last step's on the same examples."""
        examples = validation_examples(self.valset, self.args.weight_step_eval_size, self.args.seed)
        start_score = start.val_score if len(examples) == len(self.valset) else self._score(examples)
        return ValidationGuard(
            lambda: self._score(examples), self.save_model, step_dir / VALIDATION_CHECKPOINT_DIR, start_score,
            self.args.weight_step_eval, self.args.weight_step_eval_steps, self.args.weight_step_keep_start,
        )

    def _score(self, examples: list[dspy.Example]) -> float:
        with self.serving() as lm:
            return self.runner.evaluate(self.program, examples, lm).score

    def reinforce_weights(self, index: int) -> WeightStepOutcome:
        """The grpo step: `grpo_rounds` rounds, each sampling `grpo_num_generations` rollouts of the program on every
        trainset example from the current weights, grouping their module calls as mmGRPO does and training on the
        groups with TRL's GRPO loss (`steps.grpo`). Saves the grouped calls (`GRPO_ROLLOUTS_FILE`) and each round's
        group statistics and losses (`GRPO_STATS_FILE`) in the step's folder. Validated as the SFT step is, over all
        rounds (the next round samples the last weights; the step ends on the best checkpoint's). No losses when no
        group had reward variance (the weights are then unchanged)."""
        args = self.args
        step_dir = Path(args.output_dir) / step_dir_name(index, GRPO_STEP)
        rows, rounds = [], []

        def train(guard: ValidationGuard | None) -> list[float] | None:
            losses, trained = [], False
            for round_index in range(args.grpo_rounds):
                first_rollout_id = (index * args.grpo_rounds + round_index) * args.grpo_num_generations  # run-unique
                with self.serving() as lm:
                    rollouts = collect_rollouts(self.runner, self.program, self.trainset, lm,
                                                args.grpo_num_generations, args.grpo_temperature, first_rollout_id)
                grouped = group_rollouts(self.program, rollouts, args.grpo_format_failure_score)
                stats, round_losses = grouped.stats, []
                if stats.trained:
                    if guard is not None:
                        if trained:
                            guard.next_run(self.state)
                        guard.final_run = round_index == args.grpo_rounds - 1
                    round_losses = reinforce_on(self, grouped.training_rows(), str(step_dir), args.grpo_temperature,
                                                args.grpo_num_iterations)
                    trained = True
                else:
                    warnings.warn(
                        f"grpo step {index}, round {round_index + 1}: no group with reward variance ({stats.groups} "
                        f"groups from {stats.rollouts} rollouts, {stats.format_failures} unparseable, "
                        f"{stats.unscored} unscored); the weights are left unchanged this round",
                        stacklevel=3,
                    )
                rows.extend({"round": round_index, **row} for row in grouped.rows)
                rounds.append({"round": round_index, **asdict(stats), "losses": round_losses})
                losses += round_losses
            return losses if trained else None

        outcome = self._validated_training(step_dir, train)
        if self.is_world_process_zero():
            step_dir.mkdir(parents=True, exist_ok=True)
            (step_dir / GRPO_ROLLOUTS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
            (step_dir / GRPO_STATS_FILE).write_text(json.dumps(rounds, indent=1))
        return outcome

    def evaluate_program(self, examples, program: dspy.Module | None = None) -> RunSummary:
        """Scores `program` (default: `trainer.program`) on `examples` with the current weights."""
        program = program or self.program
        if program is None:
            raise ValueError("evaluate_program: no program to score yet; call train() first, or pass program=")
        examples = to_examples(examples, self.args.input_columns, "examples")
        with interruptible(), self.console.session(), self.serving() as lm:
            self.console.begin("evaluation", len(examples))
            summary = self.runner.evaluate(program, examples, lm)
            self.console.end()
        return summary

    # ------------------------------------------------------------------------------------------------------------
    # Serving the live model to DSPy
    # ------------------------------------------------------------------------------------------------------------

    @contextmanager
    def generation_mode(self):
        """The unwrapped model ready to generate: eval mode (no dropout), no gradient checkpointing (which silently
        disables the KV cache), parameters gathered under ZeRO-3 and FSDP. With every parameter materialized, each
        rank generates on its own (no collective inside `generate`), however many calls it makes. Training state is
        restored on exit."""
        wrapped = self.model_wrapped if self.model_wrapped is not None else self.model
        with model_for_generation(wrapped, self.optimizer, self.args.gradient_checkpointing_kwargs) as model:
            yield model

    def lm_name(self) -> str:
        return lm_name(self.model, self._base_fingerprint)

    @contextmanager
    def serving(self):
        """A `dspy.LM` generating from the current weights, for the duration of the block."""
        with self.generation_mode() as model, serving_lm(self._backend(model), self.lm_name(),
                                                         self.args.generation_settings()) as lm:
            try:
                yield lm
            finally:
                self._step_stats.add(lm.engine.stats)

    def _backend(self, model) -> GenerationBackend:
        """What generates from `model` (the unwrapped model being trained), per `args.generation_backend`."""
        if self.args.generation_backend == "vllm":
            self.vllm.load_weights(model, self.lm_name())  # a new adapter id when the weights changed, else nothing
            return self.vllm
        return TransformersBackend(model, self.processing_class)

    @cached_property
    def vllm(self) -> VLLMBackend:
        """The vLLM engine colocated with training (`generation_backend="vllm"`), started on first use."""
        return VLLMBackend(self.accelerator.unwrap_model(self.model), self.processing_class,
                           self.args.vllm_gpu_memory_utilization, self.args.vllm_max_model_length, self.args.seed)

    def bind_program(self, program: dspy.Module) -> dspy.Module:
        """`program` served from this trainer's model (left in eval mode) as the steps ran it: same adapter, same
        generation settings (`core.live.serve_program`). `trainer.end()` or `program.close()` stops its engine."""
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        return serve_program(program, self._backend(model), self.lm_name(), self.args.generation_settings())

    # ------------------------------------------------------------------------------------------------------------
    # Step bookkeeping: scoring, artifacts, logging, resume
    # ------------------------------------------------------------------------------------------------------------

    def _begin_step(self, index: int, kind: str) -> float:
        self._step_stats = EngineStats()
        self.console.begin(f"step {index}/{len(self.args.steps)} {kind}", self._expected_program_calls(kind))
        return time.perf_counter()

    def _expected_program_calls(self, kind: str) -> int | None:
        """At most how many program calls a step of `kind` makes, its valset scoring included (None: unknown)."""
        if is_weight_step(kind):
            args = self.args
            if args.weight_step_eval == "steps":
                return None  # the number of checkpoints depends on the traces
            if kind == GRPO_STEP:
                runs, epochs = args.grpo_num_generations * args.grpo_rounds, args.grpo_num_iterations * args.grpo_rounds
            else:
                runs, epochs = args.trace_rounds, math.ceil(args.num_train_epochs)
            checkpoints = epochs if args.weight_step_eval == "epoch" else 0
            examples = len(validation_examples(self.valset, args.weight_step_eval_size, args.seed))
            return len(self.trainset) * runs + len(self.valset) + checkpoints * examples
        if is_prompt_step(kind):
            optimizer_calls = expected_program_calls(self.prompt_optimizers[kind], len(self.trainset),
                                                     len(self.valset))
            return None if optimizer_calls is None else optimizer_calls + len(self.valset)
        return len(self.valset)

    def _start(self) -> RunState:
        self.program = self.student.deepcopy()
        self.run_state = state = RunState(self.args.steps)
        self.console.start_run(self.args.strategy, len(self.trainset), len(self.valset), resumed_after=None)
        started = self._begin_step(0, VANILLA)
        state.steps.append(self._finish_step(0, VANILLA, started, state))
        self._checkpoint(state)
        return state

    def _finish_step(self, index: int, kind: str, started: float, state: RunState,
                     traces: TraceDataset | None = None, outcome: WeightStepOutcome | None = None) -> StepResult:
        """Scores the program on the valset with the current weights, saves the step's artifacts, logs it."""
        with self.serving() as lm:
            summary = self.runner.evaluate(self.program, self.valset, lm)
            served_as = lm.model.removeprefix(LM_PREFIX)
        name = step_dir_name(index, kind)
        step_dir = Path(self.args.output_dir) / name
        new_weights = kind == "vanilla" or (outcome is not None and outcome.losses is not None
                                            and not outcome.kept_start)
        stats_per_rank = self.ranks.per_rank(self._step_stats)  # one gather for calls and tokens
        calls_per_rank = [stats.requests for stats in stats_per_rank]
        result = StepResult(
            index=index, kind=kind, val_score=summary.score, weights_version=self._weights_version,
            weights_dir=name if new_weights else state.steps[-1].weights_dir, lm_name=served_as,
            seconds=time.perf_counter() - started,
            completion_tokens=sum(stats.completion_tokens for stats in stats_per_rank),
            program_calls=sum(calls_per_rank), lm_calls_per_rank=calls_per_rank,
            model_seconds=sum(stats.forward_seconds for stats in stats_per_rank),
        )
        if traces is not None:
            s = traces.summary
            result.traces_kept, result.traces_total = traces.kept, s.total
            result.copied_placeholder = traces.copied_placeholder
            result.parse_failures, result.metric_errors, result.program_errors = (
                s.parse_failures, s.metric_errors, s.program_errors
            )
            result.sft_examples = len(traces.dataset)
        if outcome is not None and outcome.losses is not None:
            result.first_loss, result.last_loss = outcome.losses
            result.val_curve, result.kept_checkpoint = outcome.val_curve, outcome.kept_checkpoint
            result.validation_seconds = outcome.validation_seconds
        elif outcome is not None:
            reason = "no trace to train on" if traces is not None else "no group with reward variance"
            result.skipped = f"{reason}: weights unchanged"
        if self.is_world_process_zero():
            step_dir.mkdir(parents=True, exist_ok=True)
            self.program.save(str(step_dir / PROGRAM_FILE))
        if new_weights:
            self.save_model(str(step_dir))
        # Logged against the BetterTogether step (TensorBoard's x axis, log_history's "step"), not the SFT step counter,
        # which every w step restarts.
        global_step, self.state.global_step = self.state.global_step, index
        try:
            self.log({f"bettertogether/{k}": v for k, v in {
                "step": index, "val_score": result.val_score, "traces_kept": result.traces_kept,
                "traces_total": result.traces_total, "pass_rate": result.pass_rate,
                "completion_tokens": result.completion_tokens, "program_calls": result.program_calls,
                "step_seconds": result.seconds, "model_time_share": result.model_time_share,
            }.items() if v is not None})
        finally:
            self.state.global_step = global_step
        logger.info("BetterTogether step %d (%s): val score %.1f; model time share %.0f%% (forward passes %.1f s of "
                    "%.1f s)", index, kind, result.val_score, result.model_time_share, result.model_seconds,
                    result.seconds)
        self.console.end_step(result)
        return result

    def _checkpoint(self, state: RunState) -> None:
        if self.is_world_process_zero():
            state.save(self.args.output_dir)
            write_results(state, self.args.output_dir)
        self.accelerator.wait_for_everyone()  # other ranks read the step's folder (weights, program) after this

    def _claim_output_dir(self) -> None:
        """A new run must not mix its steps with another run's in `output_dir`: refused, or with
        `overwrite_output_dir` that run's files are removed first."""
        output_dir = Path(self.args.output_dir)
        other = RunState.load(output_dir)
        if other is None:
            return
        if not self.args.overwrite_output_dir:
            raise ValueError(
                f"output_dir {output_dir} holds a BetterTogether run ({' -> '.join(other.strategy)}, "
                f"{len(other.steps) - 1} step(s) done); a new run there would mix with it. Resume it with "
                "resume_from_checkpoint=True (bt-trl: --resume_from_checkpoint True), pick another output_dir, or set "
                "overwrite_output_dir=True (--overwrite_output_dir True) to remove it first"
            )
        if self.is_world_process_zero():
            for folder in step_dirs(output_dir):
                shutil.rmtree(folder)
            for name in RUN_FILES:
                (output_dir / name).unlink(missing_ok=True)
            for shard in output_dir.glob("model-*-of-*.safetensors"):
                shard.unlink()
            logger.info("Removed the run in %s (overwrite_output_dir)", output_dir)
        self.accelerator.wait_for_everyone()

    def _resume(self, resume_from_checkpoint: bool | str) -> RunState:
        # "True" is how the CLI flag (`TrainingArguments.resume_from_checkpoint`, a string) says "this output_dir".
        in_place = resume_from_checkpoint is True or str(resume_from_checkpoint).lower() == "true"
        folder = self.args.output_dir if in_place else resume_from_checkpoint
        state = RunState.load(folder)
        if state is None:
            raise ValueError(f"resume_from_checkpoint: no BetterTogether run state in {folder}")
        if state.strategy[: len(state.steps) - 1] != self.args.steps[: len(state.steps) - 1]:
            raise ValueError(
                f"resume_from_checkpoint: {folder} ran strategy {' -> '.join(state.strategy)}, "
                f"not {self.args.strategy}"
            )
        state.strategy = self.args.steps
        last = state.steps[-1]
        self._load_weights(last.weights_dir, folder)
        self._weights_version = last.weights_version
        self.program = self._load_program(Path(folder) / last.name / PROGRAM_FILE)
        self.run_state = state
        logger.info("Resuming after step %d (%s) of %s", last.index, last.kind, folder)
        self.console.start_run(self.args.strategy, len(self.trainset), len(self.valset), resumed_after=last.index)
        return state

    def _end(self, state: RunState) -> TrainOutput:
        best = state.best()
        self._load_weights(best.weights_dir)
        program = self._load_program(Path(self.args.output_dir) / best.name / PROGRAM_FILE)
        self.save_model(self.args.output_dir)
        if self.is_world_process_zero():
            program.save(str(Path(self.args.output_dir) / PROGRAM_FILE))
            self._run_metadata().save(self.args.output_dir)  # how load_program serves the program as the steps did
            write_results(state, self.args.output_dir)
            self.console.finish(state, self.args.output_dir)
        if isinstance(self.program, ServedProgram):
            self.program.close()
        self.program = self.bind_program(program)
        if self.args.push_to_hub:
            self.push_to_hub()
        last_loss = next((s.last_loss for s in reversed(state.steps) if s.last_loss is not None), 0.0)
        return TrainOutput(self.state.global_step, last_loss,
                           {"best_step": best.index, "best_val_score": best.val_score})

    def _load_program(self, path: Path) -> dspy.Module:
        program = self.student.deepcopy()
        program.load(str(path))
        program.set_lm(None)
        return program

    def _save_dataset(self, traces: TraceDataset, index: int) -> None:
        if self.is_world_process_zero():
            step_dir = Path(self.args.output_dir) / step_dir_name(index, self.args.steps[index - 1])
            step_dir.mkdir(parents=True, exist_ok=True)
            traces.dataset.to_json(str(step_dir / SFT_DATASET_FILE))

    def _load_weights(self, weights_dir: str, output_dir: str | None = None) -> None:
        """Puts the weights saved in `weights_dir` (a step folder) back into the model being trained."""
        folder = Path(output_dir or self.args.output_dir) / weights_dir
        model = self.accelerator.unwrap_model(self.model)
        with gathered_parameters(self.model, modifier_rank=0):
            self._load_state_dict(model, folder)

    @staticmethod
    def _load_state_dict(model, folder: Path) -> None:
        if isinstance(model, PeftModel):
            set_peft_model_state_dict(model, load_peft_weights(str(folder), device=str(model.device)))
        else:
            state = load_file(str(folder / "model.safetensors"), device=str(model.device))
            missing, unexpected = model.load_state_dict(state, strict=False)
            tied = set(getattr(model, "_tied_weights_keys", None) or ())
            if unexpected or set(missing) - tied:
                raise RuntimeError(f"weights in {folder} do not match the model: missing {missing}, "
                                   f"unexpected {unexpected}")

    def _log_tensorboard_to_output_dir(self) -> None:
        """With `report_to=["tensorboard"]`: event files in `output_dir/runs/<date>_<host>` from the first log on.
        transformers picks that folder at the first `on_train_begin`, which here is the first w step's, with
        `output_dir` set to the step's folder; the steps logged before it would write to `./runs` of the working
        directory."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = os.path.join(self.args.output_dir, default_logdir())


    # ------------------------------------------------------------------------------------------------------------
    # Hugging Face Hub: the run's result is pushed once, when it is complete (layout and loading: integrations/hub.py)
    # ------------------------------------------------------------------------------------------------------------

    # The `bt_trl.tasks` name the program comes from (scripts/train.py sets it). Pushed repositories record it, so that
    # `load_program` can rebuild the program without being given one.
    task_name: str | None = None

    def end(self) -> None:
        """Stops the trained program's engine, finishes the trackers and destroys the process group so that a
        multi-process job exits cleanly (`bt_trl.end_job`); call it last, after `train()`, `evaluate_program()` and
        `push_to_hub()`."""
        if isinstance(self.program, ServedProgram):
            self.program.close()
        end_job(self)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model` without its push on every save: a run saves after every step, before its result is
        known. It pushes once, when `train()` ends (with `push_to_hub=True`) or on `push_to_hub()`."""
        super().save_model(output_dir, _internal_call=True)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """No checkpoint pushes: during a w step `output_dir` is the step's folder, and transformers would push that
        folder as the repository, replacing the run's result."""

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Creates (or finds) the repository `hub_model_id`. With `push_to_hub=True` this runs at construction, so a
        missing token or an unreachable Hub is reported before any training (`hub.HubError`)."""
        if not self.is_world_process_zero():
            return
        token = hub.resolve_token(token if token is not None else self.args.hub_token, self.args.output_dir)
        private = private if private is not None else self.args.hub_private_repo
        repo_name = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        self.hub_model_id = hub.create_repo(repo_name, token, private, self.args.output_dir)
        self.push_in_progress = None

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None) -> None:
        """Writes the BetterTogether model card to `output_dir/README.md`: base model, strategy, every step's valset
        score and pass rate, the key configuration and how to load the program. (`dataset_name` is TRL's argument;
        the results table names the sets.)"""
        if not self.is_world_process_zero() or self.run_state is None:
            return
        metadata = self._run_metadata()
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [t for t in ["bettertogether", "dspy", *self._tag_names] if t not in tags]
        if metadata.weights == "adapter":
            tags.append("peft")
        model_name = model_name or Path(self.args.hub_model_id or self.args.output_dir).name
        card = hub.model_card(metadata, self.run_state, self.hub_model_id or model_name, model_name,
                              self._card_config_rows(), tags)
        card.save(str(Path(self.args.output_dir) / hub.CARD_FILE))

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """Uploads the run's result to `hub_model_id`, in one commit: the weights (adapter or full model) and the
        tokenizer, `program.json` (the optimized program, DSPy JSON), `results.md`/`results.json`,
        `bettertogether.json` (what `bt_trl.load_program` reads) and the model card (`kwargs` go to
        `create_model_card`). They are first written to `output_dir`.

        Every rank calls it (saving may gather weights); only the main process writes and uploads. A missing token,
        an unreachable Hub or a failed upload raise `hub.HubError` naming the cause, with `output_dir` intact.
        Returns huggingface_hub's `CommitInfo` (a `Future` of it when not `blocking`).
        """
        if self.program is None or self.run_state is None:
            raise ValueError("push_to_hub: nothing to push yet; train() produces the program and results it pushes")
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = Path(self.args.output_dir)
        # Checked on every rank (it only reads the environment), before anything is written: saving would replace
        # the card in output_dir (PEFT writes its own) and a push that cannot happen must leave output_dir as it was.
        token = hub.resolve_token(token if token is not None else self.args.hub_token, output_dir)
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(self.args.output_dir)
        if not self.is_world_process_zero():
            return None
        hub.save_program(self.program, output_dir / hub.PROGRAM_FILE)
        write_results(self.run_state, output_dir)
        self._run_metadata().save(output_dir)
        self.create_model_card(**kwargs)

        def upload():
            return hub.upload_run(output_dir, self.hub_model_id, token, commit_message or "End of training",
                                  revision or self.args.hub_revision)

        return upload() if blocking else hub.hub_api().run_as_future(upload)

    def _run_metadata(self) -> hub.RunMetadata:
        model = self.accelerator.unwrap_model(self.model)
        best = self.run_state.best()
        return hub.RunMetadata(
            weights="adapter" if isinstance(model, PeftModel) else "full",
            base_model=hub.portable_model_id(getattr(model.config, "_name_or_path", None)),
            task=self.task_name, strategy=" -> ".join(self.run_state.strategy), best_step=best.index,
            best_val_score=best.val_score, max_tokens=self.args.generation_max_tokens,
            temperature=self.args.generation_temperature, structured_generation=self.args.structured_generation,
            adapter=type(configured_adapter()).__name__,
        )

    def _card_config_rows(self) -> list[tuple[str, object]]:
        args = self.args
        rows = [(name, getattr(args, name)) for name in (
            "strategy", "w_step_init", "max_bootstrapped_demos", "max_labeled_demos", "num_candidate_programs",
            "max_rounds", "metric_threshold", "trace_rounds", "learning_rate", "num_train_epochs",
            "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "generation_max_tokens",
            "generation_temperature", "seed",
        )]
        rows += [("trainset / valset", f"{len(self.trainset)} / {len(self.valset)} examples"),
                 ("prompt optimizers", ", ".join(f"{name}: {describe(self.prompt_optimizers[name])}"
                                                 for name in dict.fromkeys(args.steps) if not is_weight_step(name)))]
        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, PeftModel):
            peft_config = model.peft_config[model.active_adapter]
            modules = peft_config.target_modules
            modules = modules if isinstance(modules, str) or modules is None else ", ".join(sorted(modules))
            rows.append(("PEFT", f"{peft_config.peft_type.value}, r={getattr(peft_config, 'r', None)}, "
                                 f"alpha={getattr(peft_config, 'lora_alpha', None)}, target modules: {modules}"))
        return rows

