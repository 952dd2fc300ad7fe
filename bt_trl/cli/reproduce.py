"""`bt-trl reproduce`: the paper's table for your task and model: every strategy × seed, each run in its own folder,
summarized in `RESULTS.md` (mean ± std test score per strategy, per-step times, traces kept) and `RESULTS.png`.

    bt-trl reproduce --task iris --output_dir out/reproduce_iris --config recipes/iris_quick.yaml
    bt-trl reproduce --task hotpotqa --data_path path/to/hotpotqa --retriever bm25 \\
        --train_size 50 --val_size 50 --test_size 100 --strategies vanilla p "p -> w -> p" --seeds 0 1 2 \\
        --output_dir out/reproduce_hotpotqa --use_cpu --use_peft --lora_target_modules all-linear

Every flag of `bt-trl train` applies to every run. Runs go to `<output_dir>/<strategy>/seed_<seed>`; a run with a
`summary.json` is finished and skipped, an interrupted one is resumed after its last completed step, so the grid
can be stopped and started again. A run that fails is reported and the grid goes on.

A run that shares its first steps with a finished run of the same seed starts from a copy of those steps instead of
recomputing them: `p -> w -> p` after `p -> w` runs only its last p step, and `p -> w` after `p -> w -> p` runs no
step (its steps are the first ones of the longer run; only its test score is computed). Every step is seeded by the
run seed and its index, so the steps it reuses are the ones it would have run itself. Its wall time counts the reused
steps' seconds; `summary.json` names the run it started from.

`vanilla` runs no step: the initial program with the initial weights, scored on the test set (the same program every
other run scores on the valset as its step 0). The seed is `BetterTogetherConfig.seed`: it varies the w step (LoRA
init, data order, the sampled trace rounds) and so every step after one. It does not vary a p step on the base
weights: DSPy's random search draws its candidate demo sets with fixed seeds of its own, so the first p step of every
seed is the same computation (up to the order in which concurrent requests are batched). The train/val/test split is
the same for every run (`--split_seed`), so strategies are compared on the same test examples.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, TrlParser

from bt_trl.cli.output import QuietConsole
from bt_trl.cli.train import SUMMARY_FILE, TaskArguments, build_trainer, train_and_test
from bt_trl.config import BetterTogetherConfig
from bt_trl.core.interrupts import raise_if_interrupted
from bt_trl.core.results import RunState, StepResult
from bt_trl.core.runner import ServedProgram
from bt_trl.serving.models import EMBEDDED_MODEL, check_model_name_or_path
from bt_trl.steps.strategy import parse_strategy
from bt_trl.tasks import Task
from bt_trl.trainer import BetterTogetherTrainer

VANILLA = "vanilla"
STRATEGIES = (VANILLA, "p", "w", "p -> w", "w -> p", "p -> w -> p")
RESULTS_FILE = "RESULTS.md"
PLOT_FILE = "RESULTS.png"


@dataclass
class GridArguments:
    strategies: list[str] = field(
        default_factory=lambda: list(STRATEGIES),
        metadata={"help": f"Strategies to run ('{VANILLA}' = no step, the initial program)."},
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds, one run per strategy."})

    def __post_init__(self):
        for strategy in self.strategies:
            if strategy != VANILLA:  # raises, naming the bad step, before any run starts (names: `main`)
                parse_strategy(strategy, prompt_steps=None)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")

    def runs(self) -> list[tuple[str, int]]:
        return [(strategy, seed) for strategy in self.strategies for seed in self.seeds]


@dataclass
class RunRecord:
    """One finished run: its summary and, except for vanilla, the steps it ran."""

    strategy: str
    seed: int
    folder: Path
    test_score: float
    wall_seconds: float
    steps: list[StepResult] = field(default_factory=list)

    @property
    def best_step(self) -> StepResult | None:
        return RunState([], self.steps).best() if self.steps else None


def run_folder(root: str | Path, strategy: str, seed: int) -> Path:
    """`p -> w -> p`, seed 1 → `<root>/p-w-p/seed_1`."""
    name = VANILLA if strategy == VANILLA else "-".join(parse_strategy(strategy, prompt_steps=None))
    return Path(root) / name / f"seed_{seed}"


def load_record(root: str | Path, strategy: str, seed: int) -> RunRecord | None:
    """The run's record if it finished (its summary.json exists), else None."""
    folder = run_folder(root, strategy, seed)
    summary_path = folder / SUMMARY_FILE
    if not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text())
    state = RunState.load(folder)
    return RunRecord(strategy, seed, folder, summary["test_score"], summary["wall_seconds"],
                     state.steps if state else [])


def score_vanilla(trainer: BetterTogetherTrainer, task: Task) -> dict:
    """The initial program with the initial weights on the test set; writes summary.json like a trained run."""
    started = time.perf_counter()
    test_score = trainer.evaluate_program(task.test, task.program()).score
    summary = {"task": task.name, "strategy": VANILLA, "test_score": test_score,
               "wall_seconds": round(time.perf_counter() - started, 1)}
    Path(trainer.args.output_dir).mkdir(parents=True, exist_ok=True)
    Path(trainer.args.output_dir, SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def finished_run_sharing_steps(root: str | Path, strategy: str, seed: int) -> tuple[RunRecord, int] | None:
    """The finished run of the same seed that shares the most leading steps with `strategy`, and how many of its step
    results (vanilla included) this run can take over: all of this run's if the finished run's strategy extends this
    one, else all of the finished run's if its strategy is a proper prefix of this one. None if there is no such run."""
    if strategy == VANILLA:
        return None
    steps = parse_strategy(strategy, prompt_steps=None)
    longer = []
    for folder in Path(root).glob(f"*/seed_{seed}"):
        other = folder.parent.name.split("-")
        if folder.parent.name != VANILLA and len(other) > len(steps) and other[: len(steps)] == steps:
            longer.append(" -> ".join(other))
    for other in sorted(longer, key=len):
        record = load_record(root, other, seed)
        if record is not None:
            return record, len(steps) + 1
    for length in range(len(steps) - 1, 0, -1):
        record = load_record(root, " -> ".join(steps[:length]), seed)
        if record is not None:
            return record, len(record.steps)
    return None


def start_from_steps(run: RunRecord, steps: int, folder: Path, strategy: str) -> None:
    """Copies the first `steps` steps of a finished run (their folders and results) into `folder`, to be resumed there;
    nothing else of it (its summary, best step's files and later steps are its own)."""
    for step in run.steps[:steps]:
        shutil.copytree(run.folder / step.name, folder / step.name, dirs_exist_ok=True)
    RunState(parse_strategy(strategy, prompt_steps=None), run.steps[:steps]).save(folder)


def run_one(task: Task, args: BetterTogetherConfig, model_args: ModelConfig, strategy: str, seed: int) -> None:
    folder = run_folder(args.output_dir, strategy, seed)
    interrupted = RunState.load(folder) is not None
    shared = None if interrupted else finished_run_sharing_steps(args.output_dir, strategy, seed)
    if shared is not None:
        start_from_steps(*shared, folder, strategy)
    resume = str(folder) if interrupted or shared is not None else None
    run_args = dataclasses.replace(args, output_dir=str(folder), seed=seed, resume_from_checkpoint=resume,
                                   strategy=args.strategy if strategy == VANILLA else strategy)
    quiet = QuietConsole.for_run(run_args)
    with quiet.routing():
        trainer = build_trainer(task, run_args, model_args, quiet)
        try:
            summary = score_vanilla(trainer, task) if strategy == VANILLA else train_and_test(trainer, task)
            if shared is not None and summary is not None:
                run, steps = shared
                reused_seconds = sum(s.seconds for s in run.steps[:steps])
                summary["wall_seconds"] = round(summary["wall_seconds"] + reused_seconds, 1)
                summary["started_from"] = str(run.folder.relative_to(args.output_dir))
                (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        finally:
            if isinstance(trainer.program, ServedProgram):
                # Its generation worker holds the model: stopped, this run's model can be freed before the next loads.
                trainer.program.close()
            del trainer
            release_freed_memory()


def release_freed_memory() -> None:
    """Frees the finished run's objects and gives the C heap's free pages back to the OS. glibc keeps freed memory in
    the arena of the thread that used it (generation workers, DSPy's threads, the SFT step), scattered between live
    blocks, so a process that loads model after model grows: a 1.5B-model grid reached 24 GiB after five runs and was
    OOM-killed mid-step; `malloc_trim` took one such process from 12.9 GB to 4.6 GB resident. A no-op off glibc."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:  # another C library (musl): no malloc_trim
            return
        libc.malloc_trim(0)


def run_grid(grid: GridArguments, task: Task, args: BetterTogetherConfig, model_args: ModelConfig,
             header: str) -> tuple[list[RunRecord], dict[tuple[str, int], str]]:
    """Runs what is not finished yet, printing progress; rewrites RESULTS.md and RESULTS.png after every run.
    Returns the finished runs and the error of each run that failed in this call."""
    runs = grid.runs()
    failures: dict[tuple[str, int], str] = {}
    started = time.perf_counter()
    ran = 0
    for position, (strategy, seed) in enumerate(runs, start=1):
        label = f"[{position}/{len(runs)}] {strategy!r} seed {seed}"
        done = load_record(args.output_dir, strategy, seed)
        if done is not None:
            print(f"{label}: finished before (test score {done.test_score:.1f}), skipped", flush=True)
            continue
        print(f"{label}: running in {run_folder(args.output_dir, strategy, seed)}", flush=True)
        try:
            run_one(task, args, model_args, strategy, seed)
        except Exception as exc:  # one failed run must not cost the others; it is reported and can be rerun
            raise_if_interrupted(exc)
            failures[(strategy, seed)] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        ran += 1
        elapsed = time.perf_counter() - started
        left = sum(load_record(args.output_dir, s, k) is None and (s, k) not in failures for s, k in runs)
        record = load_record(args.output_dir, strategy, seed)
        outcome = f"test score {record.test_score:.1f}" if record else f"FAILED ({failures[(strategy, seed)]})"
        print(f"{label}: {outcome}; {elapsed / 60:.1f} min so far, about {elapsed / ran * left / 60:.0f} min left "
              f"for {left} run(s)", flush=True)
        write_report(args.output_dir, grid, header, failures)
    return write_report(args.output_dir, grid, header, failures), failures


def write_report(root: str | Path, grid: GridArguments, header: str,
                 failures: dict[tuple[str, int], str]) -> list[RunRecord]:
    records = [r for strategy, seed in grid.runs() if (r := load_record(root, strategy, seed)) is not None]
    Path(root).mkdir(parents=True, exist_ok=True)
    Path(root, RESULTS_FILE).write_text(results_markdown(records, grid, header, failures))
    if records:
        plot(records, grid, Path(root, PLOT_FILE), header.splitlines()[0].lstrip("# "))
    return records


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _by_strategy(records: list[RunRecord], grid: GridArguments) -> dict[str, list[RunRecord]]:
    return {s: [r for r in records if r.strategy == s] for s in grid.strategies if any(r.strategy == s
                                                                                        for r in records)}


def results_markdown(records: list[RunRecord], grid: GridArguments, header: str,
                     failures: dict[tuple[str, int], str]) -> str:
    lines = [header, "", f"{PLOT_FILE}: mean test score per strategy (bars), one dot per seed, error bars = std.", "",
             "## Test score per strategy", "",
             f"Mean ± sample standard deviation over the finished seeds (of {len(grid.seeds)}: "
             f"{', '.join(map(str, grid.seeds))}). Best step: the step whose program and weights were kept (by "
             "valset score).", "",
             "| strategy | test score | seeds | val score of the kept step | wall time per run (s) |",
             "|---|---:|---:|---:|---:|"]
    for strategy, runs in _by_strategy(records, grid).items():
        mean, std = mean_std([r.test_score for r in runs])
        best_val = [r.best_step.val_score for r in runs if r.best_step]
        val = "{:.1f} ± {:.1f}".format(*mean_std(best_val)) if best_val else ""
        lines.append(f"| {strategy} | {mean:.1f} ± {std:.1f} | {len(runs)} | {val} "
                     f"| {statistics.fmean(r.wall_seconds for r in runs):.0f} |")
    lines += ["", "## Steps", "", "Mean over seeds. Seconds include the step's valset scoring; traces kept / total "
              "are the w step's passing program runs on the trainset that it trained on (not those that copied DSPy's "
              "missing-field placeholder).", "",
              "| strategy | step | val score | seconds | traces kept / total |", "|---|---|---:|---:|---:|"]
    for strategy, runs in _by_strategy(records, grid).items():
        for index in range(max((len(r.steps) for r in runs), default=0)):
            steps = [r.steps[index] for r in runs if index < len(r.steps)]
            traces = [s for s in steps if s.traces_total is not None]
            kept = (f"{statistics.fmean(s.traces_kept for s in traces):.1f} / "
                    f"{statistics.fmean(s.traces_total for s in traces):.0f}") if traces else ""
            val = statistics.fmean(s.val_score for s in steps)
            lines.append(f"| {strategy} | {index} ({steps[0].kind}) | {val:.1f} "
                         f"| {statistics.fmean(s.seconds for s in steps):.1f} | {kept} |")
    lines += ["", "## Runs", "", "| strategy | seed | test score | best step | wall time (s) | folder |",
              "|---|---:|---:|---|---:|---|"]
    for r in records:
        best = f"{r.best_step.index} ({r.best_step.kind})" if r.best_step else ""
        lines.append(f"| {r.strategy} | {r.seed} | {r.test_score:.1f} | {best} | {r.wall_seconds:.0f} "
                     f"| {r.folder.parent.name}/{r.folder.name} |")
    if failures:
        lines += ["", "## Failed runs (rerun the same command to retry them)", "", "| strategy | seed | error |",
                  "|---|---:|---|"]
        lines += [f"| {s} | {k} | {error.splitlines()[0]} |" for (s, k), error in failures.items()]
    return "\n".join(lines) + "\n"


def plot(records: list[RunRecord], grid: GridArguments, path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: files only, no backend or global state changed

    groups = _by_strategy(records, grid)
    fig = Figure(figsize=(1.4 * len(groups) + 2, 4))
    ax = fig.add_subplot()
    for x, runs in enumerate(groups.values()):
        scores = [r.test_score for r in runs]
        mean, std = mean_std(scores)
        ax.bar(x, mean, yerr=std, capsize=4, color="tab:blue", alpha=0.6)
        ax.scatter([x] * len(scores), scores, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(groups)), list(groups), rotation=20)
    ax.set_ylabel("test score")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def grid_header(task_args: TaskArguments, args: BetterTogetherConfig, model_args: ModelConfig) -> str:
    model = model_args.model_name_or_path or EMBEDDED_MODEL
    lora = f"LoRA r={model_args.lora_r}" if model_args.use_peft else "full fine-tuning"
    return "\n".join([
        f"# BetterTogether strategies: {task_args.task}, {model}", "",
        f"train / val / test: {task_args.train_size} / {task_args.val_size} / {task_args.test_size} examples "
        f"(split seed {task_args.split_seed}); data: {task_args.data_path or 'the task default'}"
        + (f"; retriever: {task_args.retriever}" if task_args.retriever else ""),
        f"p step: {args.max_bootstrapped_demos} bootstrapped + {args.max_labeled_demos} labeled demos, "
        f"{args.num_candidate_programs} random candidates; w step: {lora}, learning rate {args.learning_rate}, "
        f"{args.num_train_epochs} epoch(s), w_step_init={args.w_step_init}, trace_rounds={args.trace_rounds}; "
        f"generation: {args.generation_max_tokens} new tokens, temperature {args.generation_temperature}; "
        # bf16 changes the answers as well as the speed, so a table says which precision made it
        f"weights {(args.model_init_kwargs or {}).get('dtype', 'float32')}, bf16 training {bool(args.bf16)}.",
    ])


def main(grid: GridArguments, task_args: TaskArguments, args: BetterTogetherConfig, model_args: ModelConfig):
    check_model_name_or_path(model_args.model_name_or_path)  # before the data, and before any run is started
    for strategy in grid.strategies:
        if strategy != VANILLA:
            parse_strategy(strategy, prompt_steps=args.prompt_optimizers or {})
    task = task_args.load()  # data and retriever problems surface here, before any model is loaded
    return run_grid(grid, task, args, model_args, grid_header(task_args, args, model_args))


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((GridArguments, TaskArguments, BetterTogetherConfig, ModelConfig), prog=prog)


def run(argv: list[str], prog: str = "bt-trl reproduce") -> int:
    grid_args, task_args, bt_args, model_args = make_parser(prog).parse_args_and_config(argv)
    records, failures = main(grid_args, task_args, bt_args, model_args)
    print(f"{len(records)} run(s) finished, {len(failures)} failed; {RESULTS_FILE} and {PLOT_FILE} are in "
          f"{bt_args.output_dir}")
    return 1 if failures else 0
