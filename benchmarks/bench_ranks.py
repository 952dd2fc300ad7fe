"""Trace collection (the w step's program calls) with 2 ranks vs 1 on CPU, measured side by side.

    python benchmarks/bench_ranks.py                 # embedded SmolLM2-135M-Instruct, 16 Iris examples
    python benchmarks/bench_ranks.py --examples 8 --model /path/to/model

Launches this file twice with `accelerate launch` (accelerate_configs/cpu_2proc.yaml): once with one process using
every core, once with two processes sharing them (gloo). Each launch builds a BetterTogetherTrainer, collects traces
once to warm up (model load, first-call overheads) and then times a second collection of the same examples under a
new DSPy cache. Prints both times and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def collect(args) -> None:
    """One launch: time trace collection on this job's ranks."""
    import dspy

    from bt_trl import EMBEDDED_MODEL, BetterTogetherConfig, BetterTogetherTrainer
    from bt_trl.tasks import iris

    train, _, _ = iris.load_splits(0, (args.examples, 0, 0))
    labeled = dspy.LabeledFewShot(k=3).compile(iris.program(), trainset=iris.load_splits(1, (3, 0, 0))[0])
    trainer = BetterTogetherTrainer(
        model=args.model or EMBEDDED_MODEL,
        args=BetterTogetherConfig(tempfile.mkdtemp(), use_cpu=True, report_to="none", generation_max_tokens=80,
                                  num_threads=8),
        program=labeled, metric=iris.metric, trainset=train, valset=train,
    )
    seconds = []
    for _ in range(2):
        dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
        trainer.accelerator.wait_for_everyone()
        started = time.perf_counter()
        traces = trainer.collect_traces(labeled)
        seconds.append(time.perf_counter() - started)
    if trainer.is_world_process_zero():
        result = {"ranks": trainer.ranks.world_size, "seconds": seconds[-1], "warmup_seconds": seconds[0],
                  "traces_kept": traces.kept, "traces_total": traces.summary.total}
        Path(args.report).write_text(json.dumps(result))
    trainer.end()


def launch(processes: int, args, report: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs" / "cpu_2proc.yaml"), "--num_processes", str(processes),
               "--main_process_port", str(port), __file__, "--worker", "--report", str(report),
               "--examples", str(args.examples)] + (["--model", args.model] if args.model else [])
    # One process gets every core; two processes split them.
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, os.cpu_count() // processes)))
    subprocess.run(command, check=True, env=env, cwd=REPO)
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--model", help="model id or path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return collect(args)
    with tempfile.TemporaryDirectory() as folder:
        one = launch(1, args, Path(folder, "one.json"))
        two = launch(2, args, Path(folder, "two.json"))
    print(f"trace collection, {args.examples} Iris calls, {os.cpu_count()} CPU cores")
    for result in (one, two):
        print(f"  {result['ranks']} rank(s): {result['seconds']:.1f} s  (warm-up run {result['warmup_seconds']:.1f} s, "
              f"traces kept {result['traces_kept']}/{result['traces_total']})")
    print(f"speed-up 2 ranks vs 1: {one['seconds'] / two['seconds']:.2f}x")


if __name__ == "__main__":
    main()
