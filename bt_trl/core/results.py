"""What each step of a BetterTogether run produced, the results table, and the state a resumed run continues from."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bt_trl.core.data import read_json_file

STATE_FILE = "bettertogether_state.json"
RESULTS_FILES = ("results.md", "results.json", "results.png")  # what `write_results` writes
_STEP_DIR = re.compile(r"step_\d+_[A-Za-z][A-Za-z0-9_]*")  # `step_<index>_<step name>`, as `step_dir_name` writes


def step_dir_name(index: int, kind: str) -> str:
    """The folder of step `index` (`kind`: "vanilla" or the step's name in the strategy) in a run's output_dir."""
    return f"step_{index}_{kind}"


def step_dirs(output_dir: str | Path) -> list[Path]:
    """The step folders in a run's output_dir."""
    return [path for path in Path(output_dir).iterdir() if path.is_dir() and _STEP_DIR.fullmatch(path.name)]


@dataclass
class StepResult:
    index: int  # 0 is the initial ("vanilla") program, then one per strategy step
    kind: str  # "vanilla" or the step's name in the strategy ("p", "w", "gepa", ...)
    val_score: float  # percent
    weights_version: int  # how many w steps have changed the weights
    weights_dir: str  # folder (relative to output_dir) holding this step's weights
    lm_name: str  # the DSPy LM name the program was served under
    seconds: float = 0.0
    completion_tokens: int = 0  # generated in this step (optimization + valset scoring), all ranks
    program_calls: int = 0  # LM calls generated in this step, all ranks
    lm_calls_per_rank: list[int] | None = None  # the same, per rank
    model_seconds: float = 0.0  # in the model's forward passes while generating this step's calls, all ranks
    # w steps only
    traces_kept: int | None = None
    traces_total: int | None = None
    parse_failures: int | None = None
    metric_errors: int | None = None
    program_errors: int | None = None
    copied_placeholder: int | None = None  # passing runs that copied DSPy's missing-field placeholder
    sft_examples: int | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    skipped: str | None = None  # why the step left the weights unchanged
    # w steps scored while they train (`weight_step_eval`): [optimizer step, epoch, val score] per checkpoint, the
    # start first; the checkpoint kept ("start", "epoch 2", "step 20"); seconds spent scoring and saving checkpoints
    val_curve: list[list[float]] | None = None
    kept_checkpoint: str | None = None
    validation_seconds: float | None = None

    @property
    def name(self) -> str:
        return step_dir_name(self.index, self.kind)

    @property
    def model_time_share(self) -> float:
        """The share of the step's time (on each rank) that the model's forward passes took, in percent."""
        ranks = len(self.lm_calls_per_rank or [None])
        return 100.0 * self.model_seconds / (self.seconds * ranks) if self.seconds else 0.0

    @property
    def pass_rate(self) -> float | None:
        return None if not self.traces_total else 100.0 * self.traces_kept / self.traces_total


@dataclass
class RunState:
    strategy: list[str]
    steps: list[StepResult] = field(default_factory=list)

    def save(self, output_dir: str | Path) -> None:
        path = Path(output_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"strategy": self.strategy, "steps": [asdict(s) for s in self.steps]}, indent=2))
        tmp.replace(path)  # atomic: an interruption leaves the previous state, never half a file

    @classmethod
    def load(cls, output_dir: str | Path) -> RunState | None:
        path = Path(output_dir) / STATE_FILE
        if not path.exists():
            return None
        data = read_json_file(path, "the state of a BetterTogether run, a JSON file the trainer writes after each step")
        return cls(data["strategy"], [StepResult(**s) for s in data["steps"]])

    def best(self) -> StepResult:
        """The step with the best valset score; among ties the earliest (the cheapest program and weights)."""
        return max(self.steps, key=lambda s: (s.val_score, -s.index))


def _fmt(value, spec: str = "") -> str:
    return "" if value is None else format(value, spec)


def results_header() -> str:
    return (
        "| step | kind | val score | traces kept / total | pass rate | SFT examples | loss first → last "
        "| tokens | seconds | note |\n"
        "|---:|---|---:|---:|---:|---:|---|---:|---:|---|"
    )


def results_row(s: StepResult, best_index: int | None, note: str = "") -> str:
    """One step's row of the results table; `best_index` marks the best step (None while the run goes on), `note`
    is added to the note column."""
    traces = f"{s.traces_kept} / {s.traces_total}" if s.traces_total is not None else ""
    loss = f"{s.first_loss:.3f} → {s.last_loss:.3f}" if s.first_loss is not None else ""
    copied = f"{s.copied_placeholder} passing runs copied DSPy's placeholder" if s.copied_placeholder else ""
    note = "; ".join(x for x in ("best" if s.index == best_index else "", s.skipped or "", validation_note(s), copied,
                                 note) if x)
    return (f"| {s.index} | {s.kind} | {s.val_score:.1f} | {traces} | {_fmt(s.pass_rate, '.1f')} "
            f"| {_fmt(s.sft_examples)} | {loss} | {s.completion_tokens} | {s.seconds:.1f} | {note} |")


def validation_note(s: StepResult) -> str:
    """How a validation-guided w step's checkpoints scored and which one it kept."""
    if not s.val_curve:
        return ""
    start, *checkpoints = s.val_curve
    scores = ", ".join(f"{score:.1f}" for _, _, score in checkpoints)
    kept = ("kept its start weights (every checkpoint scored below them)" if s.kept_checkpoint == "start"
            else f"kept {s.kept_checkpoint}")
    return f"val while training {start[2]:.1f} → {scores}: {kept} ({s.validation_seconds:.0f} s)"


def results_markdown(state: RunState) -> str:
    best = state.best().index
    return "\n".join([results_header(), *(results_row(s, best) for s in state.steps)]) + "\n"


def plot_results(state: RunState, path: str | Path) -> None:
    """`results.png`: the val score of every step (the best one starred) and, for w steps, the traces kept of those
    collected. Drawn on a bare matplotlib `Figure` (no pyplot): no backend or global state of the caller's changes."""
    from matplotlib.figure import Figure

    steps = state.steps
    x = list(range(len(steps)))
    best = state.best()
    fig = Figure(figsize=(max(5.0, 1.1 * len(steps) + 2), 4.0))
    score_axis = fig.add_subplot()
    traces_axis = score_axis.twinx()
    w_steps = [s for s in steps if s.traces_total is not None]
    if w_steps:
        positions = [steps.index(s) for s in w_steps]
        traces_axis.bar(positions, [s.traces_total for s in w_steps], width=0.5, color="lightgray",
                        label="traces collected")
        traces_axis.bar(positions, [s.traces_kept for s in w_steps], width=0.5, color="tab:green", alpha=0.7,
                        label="traces kept")
    traces_axis.set_ylabel("w step: traces")
    traces_axis.set_ylim(0, max([s.traces_total for s in w_steps] or [1]) * 1.25)
    score_axis.set_zorder(traces_axis.get_zorder() + 1)  # the score line above the bars
    score_axis.patch.set_visible(False)
    score_axis.plot(x, [s.val_score for s in steps], marker="o", color="tab:blue", label="val score")
    curves = [(position, s.val_curve) for position, s in enumerate(steps) if s.val_curve]
    for number, (position, curve) in enumerate(curves):
        # A w step's checkpoints between the previous step and its own (where the kept one's score is drawn), spaced
        # by optimizer steps.
        last_step = max(curve[-1][0], 1)
        score_axis.plot([position - 1 + 0.8 * step / last_step for step, _, _ in curve],
                        [score for _, _, score in curve],
                        marker=".", linestyle=":", color="tab:purple",
                        label="val while training (w)" if number == 0 else None)
    score_axis.plot([best.index], [best.val_score], marker="*", markersize=16, color="tab:orange", linestyle="",
                    label=f"best (step {best.index})")
    score_axis.set_ylim(0, 105)
    score_axis.set_ylabel("val score")
    score_axis.set_xticks(x, [f"{s.index}\n{s.kind}" for s in steps])
    handles = [h for axis in (score_axis, traces_axis) for h in axis.get_legend_handles_labels()[0]]
    score_axis.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8,
                      frameon=False)  # above the plot: the curve often runs along the top
    fig.suptitle(f"BetterTogether {' -> '.join(state.strategy)}")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)


def write_results(state: RunState, output_dir: str | Path) -> None:
    output_dir = Path(output_dir)
    markdown, as_json, plot = (output_dir / name for name in RESULTS_FILES)
    markdown.write_text(f"# BetterTogether results: {' -> '.join(state.strategy)}\n\n{results_markdown(state)}")
    as_json.write_text(
        json.dumps(
            {"strategy": " -> ".join(state.strategy), "best_step": state.best().index,
             "steps": [asdict(s) | {"name": s.name, "pass_rate": s.pass_rate} for s in state.steps]},
            indent=2,
        )
    )
    plot_results(state, plot)
