"""B4: end-to-end `p -> w -> p` on Iris with the embedded model, broken down by step.

Runs `scripts/train.py` with `recipes/iris_quick.yaml` (extra flags are passed on, e.g. `--strategy "p -> w"`), then
reads the run's `results.json` and prints, per step: seconds and share of the run, program calls, generated tokens,
calls/s, and for w steps the traces kept and SFT examples. The run's own wall time (model load, steps, test scoring)
comes from `summary.json`.

    DSPY_CACHEDIR=$(mktemp -d) python benchmarks/bench_end_to_end.py --output_dir out/bench_end_to_end
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "iris_quick.yaml"


def output_dir(flags: list[str]) -> Path:
    """The run's output folder: `--output_dir X` if given, else the recipe's."""
    if "--output_dir" in flags:
        path = Path(flags[flags.index("--output_dir") + 1])
    else:
        line = next(line for line in RECIPE.read_text().splitlines() if line.startswith("output_dir:"))
        path = Path(line.split(":", 1)[1].strip())
    return path if path.is_absolute() else REPO / path  # train.py runs in the repository root


def breakdown(folder: Path) -> str:
    steps = json.loads((folder / "results.json").read_text())["steps"]
    total = sum(s["seconds"] for s in steps)
    lines = ["| step | kind | seconds | share | program calls | tokens | calls/s | traces kept / total | SFT rows |",
             "|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    for s in steps:
        kept = f"{s['traces_kept']} / {s['traces_total']}" if s.get("traces_total") is not None else ""
        lines.append(
            f"| {s['index']} | {s['kind']} | {s['seconds']:.1f} | {100 * s['seconds'] / total:.0f}% | "
            f"{s['program_calls']} | {s['completion_tokens']} | {s['program_calls'] / max(s['seconds'], 1e-9):.2f} | "
            f"{kept} | {s.get('sft_examples') or ''} |"
        )
    lines.append(f"| all | | {total:.1f} | 100% | {sum(s['program_calls'] for s in steps)} | "
                 f"{sum(s['completion_tokens'] for s in steps)} | | | |")
    return "\n".join(lines)


def main() -> None:
    flags = sys.argv[1:]
    folder = output_dir(flags)
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(RECIPE), *flags]
    print("B4:", " ".join(command))
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    wall = time.perf_counter() - start
    summary = json.loads((folder / "summary.json").read_text())
    print(f"\nprocess wall time {wall:.0f} s (train + test scoring inside: {summary['wall_seconds']:.0f} s), "
          f"test score {summary['test_score']}\n")
    print(breakdown(folder))


if __name__ == "__main__":
    main()
