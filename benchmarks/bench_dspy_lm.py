"""B8: the same small Iris `p -> w -> p` run two ways with the embedded model: DSPy's own `dspy.BetterTogether` on
`bt_trl.lm` (the README's "Using bt_trl from DSPy" snippet, run as it is) vs `BetterTogetherTrainer`
(`scripts/train.py --config recipes/iris_quick.yaml`, the demo's run: same sizes, demos, LoRA and SFT settings).

Prints, side by side: the valset score after each step, the test score of the returned program (10 test flowers) and
seconds (the optimization itself, and the whole run with model loading and test scoring), with the ratio.

    DSPY_CACHEDIR=$(mktemp -d) python benchmarks/bench_dspy_lm.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dspy
from _common import timed

import bt_trl
from bt_trl.tasks import iris

REPO = Path(__file__).resolve().parent.parent
TEST_SIZE = 10


def readme_snippet() -> str:
    section = (REPO / "README.md").read_text().split("## Using bt_trl from DSPy", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def dspy_side(folder: Path) -> dict:
    """The README's snippet, timed; then its best program on the test flowers."""
    os.chdir(folder)
    os.environ["DSPY_FINETUNEDIR"] = str(folder / "finetune")
    compile_seconds: list[float] = []  # the optimization itself, apart from loading the model
    optimize = dspy.BetterTogether.compile

    def timed_compile(self, *args, **kwargs):
        with timed(compile_seconds):
            return optimize(self, *args, **kwargs)

    dspy.BetterTogether.compile = timed_compile
    start = time.perf_counter()
    namespace: dict = {}
    try:
        exec(compile(readme_snippet(), "README.md", "exec"), namespace)
    finally:
        dspy.BetterTogether.compile = optimize
    total = time.perf_counter() - start
    _, _, test = iris.load_splits(0, (10, 10, TEST_SIZE))
    with dspy.context(lm=namespace["lm"], adapter=bt_trl.structured_adapter(dspy.ChatAdapter())):
        test_score = dspy.Evaluate(devset=test, metric=iris.metric, num_threads=8)(namespace["best"]).score
    scores = {c["strategy"]: c["score"] for c in namespace["best"].candidate_programs}
    return {"val": [scores.get(s) for s in ("", "p", "p -> w", "p -> w -> p")], "test": test_score,
            "optimization_seconds": compile_seconds[0], "seconds": total,
            "errors": namespace["best"].flag_compilation_error_occurred}


def trainer_side(folder: Path) -> dict:
    """`scripts/train.py` with the demo's recipe, in its own process; its results and summary files."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "scripts/train.py", "--config", "recipes/iris_quick.yaml", "--output_dir",
                    str(folder), "--test_size", str(TEST_SIZE)], cwd=REPO, check=True)
    total = time.perf_counter() - start
    steps = json.loads((folder / "results.json").read_text())["steps"]
    summary = json.loads((folder / "summary.json").read_text())
    return {"val": [s["val_score"] for s in steps], "test": summary["test_score"],
            "optimization_seconds": sum(s["seconds"] for s in steps), "seconds": total}


def main() -> None:
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)  # both sides generate everything once
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_side(Path(tmp) / "trainer")
        bt = dspy_side(Path(tmp))
    print(json.dumps({"dspy": bt, "trainer": trainer}, indent=2, default=str))
    print("\n| | dspy.BetterTogether on bt_trl.lm | BetterTogetherTrainer |\n|---|---:|---:|")
    for i, name in enumerate(("val: original", "val: p", "val: p -> w", "val: p -> w -> p")):
        print(f"| {name} | {bt['val'][i]} | {trainer['val'][i]} |")
    print(f"| test score | {bt['test']} | {trainer['test']} |")
    for key, name in (("optimization_seconds", "seconds, the 4 scorings and 3 steps"),
                      ("seconds", "seconds, whole run (+ model load, test)")):
        print(f"| {name} | {bt[key]:.0f} | {trainer[key]:.0f} (x{trainer[key] / bt[key]:.2f}) |")


if __name__ == "__main__":
    main()
