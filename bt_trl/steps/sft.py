"""The `w` step's data: the program's own passing traces, every module call turned into one chat SFT example."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import dspy
from trl import SFTTrainer

from bt_trl.core.runner import ProgramCall, ProgramRunner, RunSummary, program_adapter

# `SFTTrainer` needs a train dataset at construction and fixes its collator from the first row. Every w step trains
# on conversational prompt/completion rows built from traces; this row declares that format until the first traces.
FORMAT_ROW = {"prompt": [{"role": "user", "content": "?"}], "completion": [{"role": "assistant", "content": "."}]}


# DSPy's adapters write a demo's missing output field (the reasoning of a ChainOfThought's labeled demo: labels have
# none) as "Not supplied for this particular example."; small models copy it into their own outputs, and bootstrapped
# demos then carry it too. Such runs are counted, and left out when asked (`drop_placeholder_traces`).
MISSING_FIELD_PLACEHOLDER = "not supplied for this"


def copies_placeholder(trace: list) -> bool:
    """Whether a module call of `trace` wrote DSPy's missing-field placeholder as an output."""
    return any(str(value).strip().lower().startswith(MISSING_FIELD_PLACEHOLDER)
               for _, _, outputs in trace for value in dict(outputs).values())


@dataclass
class TraceDataset:
    dataset: datasets.Dataset  # conversational prompt/completion rows
    summary: RunSummary  # program runs passed / total, parse failures, metric errors, ...
    copied_placeholder: int = 0  # passing runs that copied DSPy's missing-field placeholder
    placeholder_dropped: bool = False  # whether those runs were left out of `dataset`

    @property
    def kept(self) -> int:
        """Passing runs whose module calls are in `dataset`."""
        return self.summary.passed - (self.copied_placeholder if self.placeholder_dropped else 0)


def chat_row(messages: list[dict]) -> dict:
    """A formatted chat (an adapter's `format_finetune_data` messages, ending with the module's answer) as one
    conversational prompt/completion row: the loss goes on the answer only."""
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def trace_to_rows(trace: list, adapter: dspy.Adapter) -> list[dict]:
    """One conversational prompt/completion row per module call in `trace`, formatted as the program's adapter
    formats it at inference, with the demos left out: the fine-tuned weights must carry what the demos taught."""
    return [
        chat_row(adapter.format_finetune_data(
            signature=predictor.signature, demos=[], inputs=inputs, outputs=dict(outputs)
        )["messages"])
        for predictor, inputs, outputs in trace
    ]


def rows_to_dataset(rows: list[dict]) -> datasets.Dataset:
    """Prompt/completion rows (see `chat_row`) as the dataset a w step's `SFTTrainer` trains on."""
    features = datasets.Features(
        {
            "prompt": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "completion": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        }
    )
    columns = {name: [row[name] for row in rows] for name in features}  # from_dict: zero rows keep the schema
    return datasets.Dataset.from_dict(columns, features=features)


def traces_to_dataset(calls: list[ProgramCall], adapter: dspy.Adapter | None = None,
                      drop_placeholder: bool = False) -> TraceDataset:
    """Pools the module calls of every passing program call into one multitask dataset; with `drop_placeholder`,
    without the runs that copied DSPy's missing-field placeholder (`copies_placeholder`)."""
    adapter = adapter or program_adapter()
    passed = [call for call in calls if call.passed]
    copied = [copies_placeholder(call.trace) for call in passed]
    kept = [call for call, copy in zip(passed, copied) if not (drop_placeholder and copy)]
    rows = [row for call in kept for row in trace_to_rows(call.trace, adapter)]
    return TraceDataset(rows_to_dataset(rows), RunSummary.of(calls), copied_placeholder=sum(copied),
                        placeholder_dropped=drop_placeholder)


def collect_traces(runner: ProgramRunner, program: dspy.Module, trainset: list[dspy.Example], lm: dspy.LM,
                   rounds: int = 1, drop_placeholder: bool = False) -> TraceDataset:
    """The w step's data: runs `program` on the trainset with tracing and keeps the module calls of the runs that pass.
    Each of the `rounds - 1` later rounds reruns the examples without a passing run, sampling (as DSPy's
    bootstrapping rounds do: temperature 1.0, a new rollout id past the cache)."""
    calls = runner.run(program, trainset, lm, with_trace=True)
    for round_index in range(1, rounds):
        failed = [i for i, call in enumerate(calls) if not call.passed]  # the same on every rank
        if not failed:
            break
        sampling_lm = lm.copy(rollout_id=round_index, temperature=1.0)
        retried = runner.run(program, [trainset[i] for i in failed], sampling_lm, with_trace=True)
        for i, call in zip(failed, retried):
            calls[i] = call
    return traces_to_dataset(calls, drop_placeholder=drop_placeholder)


def finetune_on(trainer: SFTTrainer, dataset: datasets.Dataset, output_dir: str) -> list[float]:
    """One fine-tuning run of `trainer` (an `SFTTrainer` built on `FORMAT_ROW`, or one that trained before) on
    `dataset`'s conversational prompt/completion rows (`training_run`). The w step and the DSPy provider's jobs both
    train here. Returns the logged training losses."""
    trainer.train_dataset = tokenized_rows(trainer, dataset)
    return training_run(trainer, output_dir)


def tokenized_rows(trainer: SFTTrainer, dataset: datasets.Dataset) -> datasets.Dataset:
    """`dataset`'s conversational prompt/completion rows tokenized as `SFTTrainer.__init__` tokenizes its dataset
    (`input_ids`, `labels` masking the prompt, truncated to `max_length`; other columns kept)."""
    args = trainer.args
    tokenized = trainer._prepare_dataset(dataset, trainer.processing_class, args, args.packing, None, "train")
    if len(tokenized) == 0 and len(dataset) > 0:
        raise ValueError(too_long_prompts_message(trainer.processing_class, dataset, args.max_length))
    return tokenized


def training_run(trainer: SFTTrainer, output_dir: str) -> list[float]:
    """SFTTrainer's own training of `trainer` on its `train_dataset`, writing to `output_dir`, with a new optimizer
    and LR schedule as a first `train()` makes them. The private API it touches is listed in `core/private_api.py`.
    Returns the logged training losses."""
    args = trainer.args
    trainer.optimizer, trainer.lr_scheduler = None, None
    run_output_dir, args.output_dir = args.output_dir, output_dir
    try:
        SFTTrainer.train(trainer)  # SFTTrainer's, also for a subclass whose train() runs a whole strategy
    finally:
        args.output_dir = run_output_dir
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def too_long_prompts_message(tokenizer, dataset: datasets.Dataset, max_length: int | None) -> str:
    """Why SFTTrainer dropped every row: truncated to `max_length`, no prompt left a completion token to train on."""
    shortest = min(
        len(tokenizer(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"])
        for prompt in dataset["prompt"]
    )
    return (f"max_length={max_length} is shorter than every prompt of the {len(dataset)} training rows (the shortest "
            f"is {shortest} tokens): truncated to max_length, no row keeps a completion token to train on. Set "
            f"max_length above {shortest} plus the completion's length (or None for no truncation)")
