from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Any

import torch
from trl import SFTConfig

from bt_trl.serving.settings import GenerationSettings
from bt_trl.steps.strategy import PROMPT_STEP, check_step_name, parse_strategy
from bt_trl.steps.validation import WEIGHT_STEP_EVALS

W_STEP_INITS = ("continue", "base")
GENERATION_BACKENDS = ("transformers", "vllm")
MAX_TEMPERATURE = 2.0  # DSPy refuses a call sampled above it (every call of the step would fail)


@dataclass
class BetterTogetherConfig(SFTConfig):
    r"""
    Configuration class for the [`BetterTogetherTrainer`].

    BetterTogether (Soylu, Potts, Khattab, 2024, arXiv:2407.10930) alternates prompt optimization (`p`) and weight
    optimization (`w`) of one DSPy program on one LM. This class holds the parameters specific to that loop; every
    [`~trl.SFTConfig`] field applies to the fine-tuning done by each weight step. Defaults follow the paper.

    Parameters:
        > Parameters that control the strategy

        strategy (`str`, *optional*, defaults to `"p -> w -> p"`):
            Chain of named steps separated by `->`. Prompt steps: `p` (few-shot demos bootstrapped with the current
            weights, or the trainer's `prompt_optimizer`), `gepa` (`dspy.GEPA`), `mipro` (`dspy.MIPROv2`), `simba`
            (`dspy.SIMBA`), or a name of `prompt_optimizers`. Weight steps: `w` (or `sft`) fine-tunes the weights on
            the program's own passing traces; `grpo` trains them with GRPO on the program's metric. Any chain is
            allowed: `"p"`, `"w -> p"`, `"gepa -> w -> gepa"`, `"p -> grpo -> p"`, ...
        prompt_optimizers (`dict[str, dict]`, *optional*):
            Prompt steps of one's own, or new arguments for the built-in ones: name → `{class: <dspy.teleprompt
            class>, <argument>: <value>, ...}` (without `class`, the arguments change a built-in step's), e.g.
            `{gepa: {max_metric_calls: 200}, mine: {class: MIPROv2, auto: medium}}`. Read by the trainer.
        w_step_init (`str`, *optional*, defaults to `"continue"`):
            Where a `w` step starts training from: `"continue"` trains the current weights (adapter) further;
            `"base"` restarts from the initial weights, so that every `w` step is one fine-tuning run of the base
            model on traces produced by the current program.

        > Parameters that control the prompt step (DSPy `BootstrapFewShotWithRandomSearch`, unless the trainer is
        given another `prompt_optimizer`)

        max_bootstrapped_demos (`int`, *optional*, defaults to `3`):
            Maximum number of demos per module bootstrapped from the program's own passing traces.
        max_labeled_demos (`int`, *optional*, defaults to `3`):
            Maximum number of demos per module taken directly from labeled training examples.
        num_candidate_programs (`int`, *optional*, defaults to `6`):
            Number of random candidate demo sets tried, on top of DSPy's three fixed candidates (zero-shot, labeled
            only, unshuffled bootstrap); the best on the valset is kept.
        max_rounds (`int`, *optional*, defaults to `1`):
            Bootstrapping attempts per training example in the p step (DSPy's `max_rounds`): rounds after the first
            sample at temperature 1.0 with a new rollout id.
        metric_threshold (`float`, *optional*):
            A trace passes when the metric is at least this value. When unset, any truthy (non-zero) metric passes.

        > Parameters that control the weight step's data

        trace_rounds (`int`, *optional*, defaults to `1`):
            Attempts per trainset example when the w step collects traces. Round 1 runs the program as configured;
            each later round reruns only the examples without a passing trace yet, at temperature 1.0 with a new
            rollout id (so DSPy's cache cannot return the failed answer), as DSPy's `max_rounds` does for demos. They
            add traces only where sampling finds a passing answer that greedy decoding missed.
        drop_placeholder_traces (`bool`, *optional*, defaults to `False`):
            Leave out of the w step's data the passing runs in which a module wrote DSPy's placeholder for a demo's
            missing field ("Not supplied for this particular example.": what a ChainOfThought's labeled demos show as
            their reasoning, and what a small model copies). They are counted and warned about either way. Kept (the
            default, as DSPy's `BootstrapFinetune` keeps them), they teach the model to answer as the program does;
            dropped, a model that copies the placeholder in most runs leaves the step little to train on
            (`results/iris_qwen05`, `results/iris_qwen15`).

        > Parameters that control the weight step's validation

        weight_step_eval (`str`, *optional*, defaults to `"epoch"`):
            When a weight step (`w`, `grpo`) scores the program, served from the weights it is training, on the
            valset: `"epoch"` (after every epoch), `"steps"` (every `weight_step_eval_steps` optimizer steps and at the
            end) or `"no"`. The step keeps the weights of its best checkpoint; with `"no"` those of its last one.
        weight_step_eval_steps (`int`, *optional*, defaults to `10`):
            With `weight_step_eval="steps"`: optimizer steps between two checkpoints.
        weight_step_eval_size (`int`, *optional*):
            Score the checkpoints on a seeded sample of this many valset examples (default: the whole valset).
        weight_step_keep_start (`bool`, *optional*, defaults to `True`):
            When every checkpoint scores below the weights the weight step started from, end the step on those (its
            results row says so). `False` keeps the best checkpoint even then. Among equal scores the latest
            checkpoint is kept.

        > Parameters that control the grpo step (GRPO with mmGRPO's per-module groups; it trains with the SFTConfig
        fields as the w step does, with `grpo_num_iterations` passes over each round's rollouts in place of
        `num_train_epochs`)

        grpo_num_generations (`int`, *optional*, defaults to `8`):
            Rollouts (sampled program runs) per trainset example; the calls of one module at one invocation index in
            an example's rollouts form a group.
        grpo_temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of the rollouts (and of the log-probabilities in the loss, as in TRL's GRPO), in
            (0, 2] (DSPy's limit).
        grpo_format_failure_score (`float`, *optional*, defaults to `-1.0`):
            Reward of a rollout whose output did not parse; keep it below every value the metric returns.
        grpo_num_iterations (`int`, *optional*, defaults to `1`):
            Passes over each round's rollouts (TRL's `num_iterations`): the first is on the sampling policy, later
            ones clip the ratio to it.
        grpo_rounds (`int`, *optional*, defaults to `1`):
            Rounds per grpo step: each samples rollouts on the whole trainset with the current weights and trains on
            its groups.

        > Parameters that control generation (program calls served from the live model)

        num_threads (`int`, *optional*, defaults to `8`):
            Concurrent program calls (DSPy threads). Concurrent calls are generated together in batches.
        generation_batch_size (`int`, *optional*, defaults to `8`):
            Maximum number of requests generated in one batch.
        generation_batch_wait (`float`, *optional*, defaults to `0.02`):
            A batch starts once no new request has arrived for this many seconds (or `generation_batch_size` are
            waiting).
        generation_max_tokens (`int`, *optional*, defaults to `256`):
            Maximum new tokens per LM call. Generation also stops at the adapter's completion marker.
        generation_temperature (`float`, *optional*, defaults to `0.0`):
            Sampling temperature of the program's LM, in [0, 2]; `0.0` is greedy decoding.
        structured_generation (`bool`, *optional*, defaults to `True`):
            Generate every program call inside its adapter's output format (grammar-constrained decoding with
            llguidance): ChatAdapter's `[[ ## field ## ]]` sections in order, `Literal`/enum outputs restricted to
            their values, numbers and booleans to their forms, free text closed in time for the fields after it;
            JSONAdapter's JSON schema. Outputs then always parse, so traces are lost to wrong answers only. Applies to
            the p step, trace collection, valset scoring and `trainer.program`. The w step's SFT rows stay in the
            adapter's plain format: the weights learn to write it unaided. Adapters with other formats (XMLAdapter,
            custom ones) are generated unconstrained.
        generation_backend (`str`, *optional*, defaults to `"transformers"`):
            What generates the program's LM calls: `"transformers"` batches `generate` on the live model being
            trained (any device); `"vllm"` runs a vLLM engine colocated with training on the same GPU, which serves
            each new LoRA adapter (or, for full fine-tuning, weights copied in place) without reloading the model.
            `"vllm"` needs `pip install 'bt_trl[vllm]'` and a CUDA GPU; without them the config raises at once.
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.3`):
            With `generation_backend="vllm"`: share of the GPU's memory vLLM reserves for its weights and KV cache;
            training uses the rest.
        vllm_max_model_length (`int`, *optional*):
            With `generation_backend="vllm"`: longest prompt + completion vLLM plans for (default: the model's).

        > Parameters that control the data

        input_columns (`list[str]`, *optional*):
            When `trainset`/`valset` are `datasets.Dataset`s: the columns that are the program's inputs. The other
            columns are labels the metric may read.

        > Parameters that control the output folder

        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Let a new run (not resuming) start in an `output_dir` that holds another run, removing that run's step
            folders, state, results, program and weights first. Otherwise such a run is refused.
    """

    strategy: str = field(
        default="p -> w -> p",
        metadata={"help": "Chain of named steps separated by '->': prompt steps 'p', 'gepa', 'mipro', 'simba' or a "
                          "name of prompt_optimizers; weight steps 'w' (or 'sft') fine-tune the weights."},
    )
    prompt_optimizers: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Prompt steps of one's own or new arguments for built-in ones, as JSON: "
                          "'{\"mine\": {\"class\": \"MIPROv2\", \"auto\": \"medium\"}}'."},
    )
    w_step_init: str = field(
        default="continue",
        metadata={
            "help": "Where a w step starts training from: 'continue' (current weights) or 'base' (initial weights).",
            "choices": list(W_STEP_INITS),
        },
    )
    max_bootstrapped_demos: int = field(
        default=3, metadata={"help": "Maximum demos per module bootstrapped from passing traces."}
    )
    max_labeled_demos: int = field(default=3, metadata={"help": "Maximum demos per module from labeled examples."})
    num_candidate_programs: int = field(
        default=6, metadata={"help": "Random candidate demo sets tried by the prompt step."}
    )
    max_rounds: int = field(
        default=1, metadata={"help": "p step: bootstrapping attempts per example (later ones at temperature 1.0)."}
    )
    metric_threshold: float | None = field(
        default=None, metadata={"help": "A trace passes when the metric is at least this value."}
    )
    trace_rounds: int = field(
        default=1,
        metadata={"help": "w step: attempts per trainset example to get a passing trace (later ones at temperature "
                          "1.0, only for examples without one yet)."},
    )
    drop_placeholder_traces: bool = field(
        default=False,
        metadata={"help": "w step: leave out passing runs that copied DSPy's missing-field placeholder "
                          "('Not supplied for this particular example.')."},
    )
    weight_step_eval: str = field(
        default="epoch",
        metadata={"help": "When a weight step scores the program on the valset while training: 'epoch', 'steps', 'no'.",
                  "choices": list(WEIGHT_STEP_EVALS)},
    )
    weight_step_eval_steps: int = field(
        default=10, metadata={"help": "With weight_step_eval='steps': optimizer steps between two checkpoints."}
    )
    weight_step_eval_size: int | None = field(
        default=None, metadata={"help": "Score weight step checkpoints on a sample of this many valset examples."}
    )
    weight_step_keep_start: bool = field(
        default=True,
        metadata={"help": "A weight step ends on its starting weights when every checkpoint scores below them."},
    )
    grpo_num_generations: int = field(
        default=8, metadata={"help": "grpo step: rollouts per trainset example (a group's size)."}
    )
    grpo_temperature: float = field(default=1.0, metadata={"help": "grpo step: sampling temperature of rollouts."})
    grpo_format_failure_score: float = field(
        default=-1.0,
        metadata={"help": "grpo step: reward of a rollout whose output did not parse (below the metric's values)."},
    )
    grpo_num_iterations: int = field(
        default=1, metadata={"help": "grpo step: passes over each round's rollouts (TRL's num_iterations)."}
    )
    grpo_rounds: int = field(
        default=1, metadata={"help": "grpo step: rounds of rollouts on the trainset, each followed by training."}
    )
    num_threads: int = field(default=8, metadata={"help": "Concurrent program calls (DSPy threads)."})
    generation_batch_size: int = field(default=8, metadata={"help": "Maximum requests generated in one batch."})
    generation_batch_wait: float = field(
        default=0.02, metadata={"help": "A batch starts once no new request has arrived for this many seconds."}
    )
    generation_max_tokens: int = field(default=256, metadata={"help": "Maximum new tokens per LM call."})
    generation_temperature: float = field(default=0.0, metadata={"help": "Sampling temperature; 0.0 is greedy."})
    structured_generation: bool = field(
        default=True,
        metadata={"help": "Generate program calls inside their adapter's output format (grammar-constrained "
                          "decoding), so that every output parses."},
    )
    generation_backend: str = field(
        default="transformers",
        metadata={
            "help": "What generates program calls: 'transformers' (batched generate on the live model) or 'vllm' "
            "(vLLM colocated on the GPU, new adapters served without reloading; needs bt_trl[vllm] and CUDA).",
            "choices": list(GENERATION_BACKENDS),
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "With generation_backend='vllm': share of GPU memory vLLM reserves."}
    )
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "With generation_backend='vllm': longest prompt + completion (tokens)."}
    )
    input_columns: list[str] | None = field(
        default=None, metadata={"help": "Columns of a datasets.Dataset trainset/valset that are program inputs."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a new run in an output_dir that holds another run, removing that run's files first."},
    )

    # Overridden SFTConfig defaults (bf16 too: see __post_init__): every w step trains on conversational
    # prompt/completion data built from traces, with the loss on the completions (the module's outputs) only.
    completion_only_loss: bool | None = field(
        default=True,
        metadata={"help": "Loss on the completion (module outputs) only; the prompt (instructions, inputs) is masked."},
    )
    learning_rate: float = field(
        default=1e-4, metadata={"help": "Initial learning rate of each w step (suited to LoRA)."}
    )

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["prompt_optimizers"]  # JSON on the command line

    def generation_settings(self) -> GenerationSettings:
        return bettertogether_settings(self).generation

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:
            # SFTConfig turns bf16 on unconditionally, which fails on machines without bf16 support (CPU-only
            # included); here it is on where the GPU supports it.
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        super().__post_init__()
        # Names the trainer or callback is given are checked there: here any well-formed name may be one of them.
        self.steps = parse_strategy(self.strategy, prompt_steps=None)
        if self.prompt_optimizers is not None and not isinstance(self.prompt_optimizers, dict):
            raise ValueError(f"prompt_optimizers must be a mapping name -> {{class: ..., <argument>: ...}}, got "
                             f"{self.prompt_optimizers!r}")
        for name in self.prompt_optimizers or {}:
            check_step_name(name, "prompt_optimizers")
        if self.w_step_init not in W_STEP_INITS:
            raise ValueError(f"w_step_init must be one of {W_STEP_INITS}, got {self.w_step_init!r}")
        for name in ("max_bootstrapped_demos", "max_labeled_demos", "num_candidate_programs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if PROMPT_STEP in self.steps and PROMPT_STEP not in (self.prompt_optimizers or {}):
            check_demo_counts(self.max_bootstrapped_demos, self.max_labeled_demos)
        if self.weight_step_eval not in WEIGHT_STEP_EVALS:
            raise ValueError(f"weight_step_eval must be one of {WEIGHT_STEP_EVALS}, got {self.weight_step_eval!r}")
        if self.weight_step_eval_size is not None and self.weight_step_eval_size < 1:
            raise ValueError(f"weight_step_eval_size must be >= 1 (or None for the whole valset), got "
                             f"{self.weight_step_eval_size}")
        for name in ("num_threads", "generation_batch_size", "generation_max_tokens", "max_rounds", "trace_rounds",
                     "weight_step_eval_steps", "grpo_rounds", "grpo_num_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.grpo_num_generations < 2:
            raise ValueError(f"grpo_num_generations must be >= 2 (a group compares rollouts), got "
                             f"{self.grpo_num_generations}")
        if not 0 < self.grpo_temperature <= MAX_TEMPERATURE:
            raise ValueError(f"grpo_temperature must be > 0 (greedy rollouts are all alike) and <= {MAX_TEMPERATURE} "
                             f"(DSPy's limit), got {self.grpo_temperature}")
        if not 0 <= self.generation_temperature <= MAX_TEMPERATURE:
            raise ValueError(f"generation_temperature must be in [0, {MAX_TEMPERATURE}] (DSPy's limits), got "
                             f"{self.generation_temperature}")
        if self.generation_backend not in GENERATION_BACKENDS:
            raise ValueError(
                f"generation_backend must be one of {GENERATION_BACKENDS}, got {self.generation_backend!r}"
            )
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")


def check_demo_counts(max_bootstrapped_demos: int, max_labeled_demos: int) -> None:
    """The default prompt optimizer only chooses few-shot demos: a p step allowed none cannot change the program."""
    if max_bootstrapped_demos == 0 and max_labeled_demos == 0:
        raise ValueError(
            "max_bootstrapped_demos=0 and max_labeled_demos=0: the p step chooses few-shot demos, so with none allowed "
            "it cannot change the program; allow at least one (e.g. max_labeled_demos=3) or drop p from the strategy"
        )


# The fields BetterTogetherConfig adds to SFTConfig (and the two defaults it overrides).
BETTERTOGETHER_FIELDS = tuple(f.name for f in fields(BetterTogetherConfig) if f.name not in
                              {f.name for f in fields(SFTConfig)})


def bettertogether_settings(args: SFTConfig) -> SimpleNamespace:
    """The BetterTogether settings of a trainer's `args`: its own when it is a `BetterTogetherConfig`, else that
    class's defaults (a callback on a plain `SFTConfig`); `generation` is the `GenerationSettings` they make."""
    if isinstance(args, BetterTogetherConfig):
        values = {name: getattr(args, name) for name in BETTERTOGETHER_FIELDS}
    else:
        values = {f.name: f.default for f in fields(BetterTogetherConfig) if f.name in BETTERTOGETHER_FIELDS}
    settings = SimpleNamespace(**values)
    settings.generation = GenerationSettings(
        settings.generation_max_tokens, settings.generation_temperature, settings.generation_batch_size,
        settings.generation_batch_wait, settings.structured_generation)
    return settings
