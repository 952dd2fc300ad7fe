r"""`bt-trl train`: run a BetterTogether strategy on a task, print the results table and the test score.

    bt-trl train --config recipes/iris_quick.yaml
    bt-trl train --task iris --strategy "p -> w" --output_dir out/iris \
        --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct
    bt-trl train --config recipes/iris_quick.yaml --model_name_or_path embedded:qwen2.5-coder-0.5b
    accelerate launch --config_file accelerate_configs/X.yaml -m bt_trl.cli train --config recipe.yaml

Every `BetterTogetherConfig` (and so `SFTConfig`/`TrainingArguments`) field is a flag, and TRL's `ModelConfig` gives
the model and LoRA flags (`--use_peft`, `--lora_r`, ...).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, TrlParser, get_peft_config

from bt_trl.cli.output import QuietConsole
from bt_trl.config import BetterTogetherConfig
from bt_trl.serving.models import EMBEDDED_MODEL, check_model_name_or_path
from bt_trl.steps.strategy import parse_strategy
from bt_trl.tasks import TASKS, Task, load_task
from bt_trl.trainer import BetterTogetherTrainer

SUMMARY_FILE = "summary.json"


@dataclass
class TaskArguments:
    task: str = field(default="iris", metadata={"help": "Task to run.", "choices": list(TASKS)})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/val/test split."})
    train_size: int = field(default=50, metadata={"help": "Training examples (bootstrapping, traces)."})
    val_size: int = field(default=50, metadata={"help": "Validation examples (candidate selection, step scores)."})
    test_size: int = field(default=50, metadata={"help": "Test examples scored with the final program."})
    data_path: str | None = field(
        default=None,
        metadata={"help": "gsm8k, hotpotqa: a local .jsonl file or folder of <split>.jsonl files, or a Hub dataset id "
                          "(default: the task's Hub dataset)."},
    )
    retriever: str | None = field(
        default=None,
        metadata={"help": "hotpotqa: 'bm25' (default; offline, over the loaded records' paragraphs), 'colbertv2' (the "
                          "paper's wiki17_abstracts server) or 'colbertv2:<url>'."},
    )

    def load(self) -> Task:
        for split, size in (("train", self.train_size), ("val", self.val_size)):
            if size < 1:  # a run needs a trainset and a valset; without a test set it reports no test score
                raise ValueError(f"{split}_size must be >= 1 (a number of examples), got {size}")
        return load_task(self.task, self.split_seed, (self.train_size, self.val_size, self.test_size),
                         data_path=self.data_path, retriever=self.retriever)


def build_trainer(task: Task, args: BetterTogetherConfig, model_args: ModelConfig,
                  quiet: QuietConsole) -> BetterTogetherTrainer:
    """The trainer of a run, built inside `quiet.routing()` (loading the model logs to run.log), its display on the
    terminal."""
    trainer = BetterTogetherTrainer(
        model=model_args.model_name_or_path or EMBEDDED_MODEL,
        args=args,
        program=task.program(),
        metric=task.metric,
        trainset=task.train,
        valset=task.val,
        peft_config=get_peft_config(model_args),
    )
    trainer.task_name = task.name  # recorded on push: load_program rebuilds the task's program
    trainer.console.stdout = quiet.stdout
    return trainer


def train_and_test(trainer: BetterTogetherTrainer, task: Task) -> dict | None:
    """Runs the strategy (continuing an interrupted run in `--resume_from_checkpoint`), scores the best program on
    the test set and writes `summary.json`; returns the summary on the main process."""
    args = trainer.args
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    test = trainer.evaluate_program(task.test) if task.test else None
    seconds = time.perf_counter() - started
    if not trainer.is_world_process_zero():
        return None
    test_score = test.score if test else None
    summary = {"task": task.name, "strategy": args.strategy, "test_score": test_score,
               "wall_seconds": round(seconds, 1)}
    Path(args.output_dir, SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    tested = f"test score: {test_score:.1f} ({test.passed}/{test.total} passing)" if test else "no test set"
    trainer.console.print(f"{tested}; wall time {seconds:.0f} s; outputs in {args.output_dir}")
    return summary


def main(task_args: TaskArguments, args: BetterTogetherConfig, model_args: ModelConfig) -> dict | None:
    check_model_name_or_path(model_args.model_name_or_path)  # an unknown embedded: name fails before the data loads
    parse_strategy(args.strategy, prompt_steps=args.prompt_optimizers or {})  # so does an unknown step name
    task = task_args.load()
    quiet = QuietConsole.for_run(args)
    with quiet.routing():
        trainer = build_trainer(task, args, model_args, quiet)
        summary = train_and_test(trainer, task)
        trainer.end()  # under `accelerate launch`, the job exits cleanly (bt_trl.core.ranks.end_job)
    return summary


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((TaskArguments, BetterTogetherConfig, ModelConfig), prog=prog)


def run(argv: list[str], prog: str = "bt-trl train") -> int:
    task_args, args, model_args = make_parser(prog).parse_args_and_config(argv)
    main(task_args, args, model_args)
    return 0
