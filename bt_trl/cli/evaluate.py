"""`bt-trl evaluate`: score a trained program on a task split.

    bt-trl evaluate out/iris_quick --task iris --split test
    bt-trl evaluate you/iris-bt --task iris --split test --test_size 50

The program and its weights come from a run folder (a finished run's `output_dir`) or a pushed Hub repository
(`bt_trl.load_program`); the examples from the task, split as `bt-trl train` splits it (same `--split_seed` and sizes:
the same examples). Prints the score and writes it to `<output_dir>/evaluation_<task>_<split>.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from trl import TrlParser

from bt_trl.cli.output import QuietConsole
from bt_trl.cli.train import TaskArguments
from bt_trl.console import RUN_LOG_FILE, RunConsole
from bt_trl.core.runner import ProgramRunner
from bt_trl.integrations.hub import load_program
from bt_trl.serving.engine import GenerationSettings
from bt_trl.tasks import SPLITS


@dataclass
class EvaluateArguments:
    run: str = field(metadata={"help": "A run folder (a finished run's output_dir) or a Hub model id."})
    split: str = field(default="test", metadata={"help": "Which split of the task to score.", "choices": list(SPLITS)})
    num_threads: int = field(default=8, metadata={"help": "Concurrent program calls (batched by the engine)."})
    generation_max_tokens: int | None = field(
        default=None, metadata={"help": "Maximum new tokens per LM call (default: what the run recorded, else 256)."}
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where the score (evaluation_<task>_<split>.json) and run.log go; default: the run folder, "
                          "or ./evaluation/<repository name> for a Hub id."},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})


def evaluate(eval_args: EvaluateArguments, task_args: TaskArguments) -> dict:
    task = task_args.load()  # the data (and a task option the task does not take) fail before the model loads
    examples = getattr(task, eval_args.split)
    if not examples:
        raise ValueError(f"the {eval_args.split} split is empty: set --{eval_args.split}_size")
    output_dir = Path(eval_args.output_dir or (
        eval_args.run if Path(eval_args.run).is_dir() else Path("evaluation") / Path(eval_args.run).name))
    quiet = QuietConsole(output_dir / RUN_LOG_FILE)
    with quiet.routing(), RunConsole(output_dir, stdout=quiet.stdout).session() as console:
        settings = None if eval_args.generation_max_tokens is None else GenerationSettings(
            max_tokens=eval_args.generation_max_tokens)
        program = load_program(eval_args.run, program=task.program(), revision=eval_args.revision, settings=settings)
        lm = program.predictors()[0].lm  # every module runs on the one LM load_program serves
        console.begin(f"{task.name} {eval_args.split}", len(examples))
        summary = ProgramRunner(console.counting_passes(task.metric, None), eval_args.num_threads).evaluate(
            program, examples, lm)
        console.end()
    result = {"run": eval_args.run, "task": task.name, "split": eval_args.split, "split_seed": task_args.split_seed,
              "examples": summary.total, "score": summary.score, "passed": summary.passed,
              "parse_failures": summary.parse_failures, "metric_errors": summary.metric_errors,
              "program_errors": summary.program_errors}
    path = output_dir / f"evaluation_{task.name}_{eval_args.split}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"{task.name} {eval_args.split} score: {summary.score:.1f} ({summary.passed}/{summary.total} passing, "
          f"{summary.parse_failures} unparseable); written to {path}")
    return result


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((EvaluateArguments, TaskArguments), prog=prog)


def run(argv: list[str], prog: str = "bt-trl evaluate") -> int:
    if argv and not argv[0].startswith("-"):
        argv = ["--run", *argv]  # the run is positional: bt-trl evaluate <run folder or Hub id> ...
    eval_args, task_args = make_parser(prog).parse_args_and_config(argv)
    evaluate(eval_args, task_args)
    return 0
