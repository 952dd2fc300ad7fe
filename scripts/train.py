"""Run a BetterTogether strategy on a task and print the results table.

    python scripts/train.py --config recipes/iris_quick.yaml
    python scripts/train.py --task iris --strategy "p -> w" --output_dir out/iris --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct
    accelerate launch --config_file accelerate_configs/X.yaml scripts/train.py --config recipe.yaml

Every `BetterTogetherConfig` (and so `SFTConfig`/`TrainingArguments`) field is a flag, and TRL's `ModelConfig` gives
the model and LoRA flags (`--use_peft`, `--lora_r`, ...).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, TrlParser, get_peft_config

from bt_trl import EMBEDDED_MODEL, BetterTogetherConfig, BetterTogetherTrainer
from bt_trl.tasks import TASKS, get_task


@dataclass
class TaskArguments:
    task: str = field(default="iris", metadata={"help": "Task to run.", "choices": list(TASKS)})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/val/test split."})
    train_size: int = field(default=50, metadata={"help": "Training examples (bootstrapping, traces)."})
    val_size: int = field(default=50, metadata={"help": "Validation examples (candidate selection, step scores)."})
    test_size: int = field(default=50, metadata={"help": "Test examples scored with the final program."})


def main(task_args: TaskArguments, args: BetterTogetherConfig, model_args: ModelConfig) -> None:
    task = get_task(task_args.task)
    train, val, test = task.load_splits(task_args.split_seed, (task_args.train_size, task_args.val_size,
                                                               task_args.test_size))
    started = time.perf_counter()
    trainer = BetterTogetherTrainer(
        model=model_args.model_name_or_path or EMBEDDED_MODEL,
        args=args,
        program=task.program(),
        metric=task.metric,
        trainset=train,
        valset=val,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    test_score = trainer.evaluate_program(test).score if test else None
    seconds = time.perf_counter() - started
    if trainer.is_world_process_zero():
        summary = {"task": task_args.task, "strategy": args.strategy, "test_score": test_score,
                   "wall_seconds": round(seconds, 1)}
        Path(args.output_dir, "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"test score: {test_score}  wall time: {seconds:.0f} s  outputs: {args.output_dir}")


if __name__ == "__main__":
    parser = TrlParser((TaskArguments, BetterTogetherConfig, ModelConfig))
    task_args, bt_args, model_args = parser.parse_args_and_config()
    main(task_args, bt_args, model_args)
