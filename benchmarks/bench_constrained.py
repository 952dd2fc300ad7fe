"""B7: structured generation — decode overhead of grammar-constrained vs free generation, and what it buys.

Part 1, `overhead`: the same rows decoded free and constrained (the Iris ChainOfThought output grammar) by
`TransformersBackend`, at batch 1 and 16, a fixed number of new tokens (`--tokens`, the completion marker is not a
stop string here, so both sides decode exactly as many steps; the grammar forces the marker and then only the end of
turn, so the constrained rows keep decoding under the mask). Prints seconds per decode step of both and the overhead.

Part 2, `parse`: parse failures and accuracy of real program runs with structured generation off and on, through
the trainer's `ProgramRunner`: Iris zero-shot and with 3 labeled demos, GSM8K and HotPotQA (BM25), `--examples` each.

    python benchmarks/bench_constrained.py overhead
    python benchmarks/bench_constrained.py parse --model embedded:qwen2.5-coder-0.5b --data ../shared/data
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import dspy
import torch
from _common import cpu_note, iris_program_with_demos, no_dspy_cache
from transformers import AutoModelForCausalLM, AutoTokenizer

from bt_trl.engine import GenerationSettings, SamplingParams, TransformersBackend, serving_lm
from bt_trl.models import resolve_model_name_or_path
from bt_trl.runner import ProgramRunner
from bt_trl.structured import chat_fields_format, output_grammar
from bt_trl.tasks import load_task, iris


def load(model: str):
    path = resolve_model_name_or_path(model)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def overhead(args) -> None:
    model, tokenizer = load(args.model)
    program = iris_program_with_demos(3)
    predictor = program.predict
    prompts = [dspy.ChatAdapter().format(predictor.signature, demos=predictor.demos, inputs=ex.inputs().toDict())
               for ex in iris.load_examples()[::9][:16]]
    grammar = output_grammar(chat_fields_format(predictor.signature))
    # No stop string: both sides decode exactly --tokens steps, so the difference is the constraint's cost.
    backend = TransformersBackend(model, tokenizer, stop_strings=())
    print(f"{args.model}, {cpu_note()}, {args.tokens} new tokens per row")
    print("| batch | free s/step | constrained s/step | overhead |\n|---:|---:|---:|---:|")
    for batch in (1, 16):
        rows = prompts[:batch]
        seconds = {}
        for constrained in (False, True, False, True):  # interleaved, best of two each
            params = [SamplingParams(max_tokens=args.tokens, grammar=grammar if constrained else None)] * batch
            backend.generate(rows, [SamplingParams(max_tokens=1)] * batch)  # the prefix cache warm for both sides
            start = time.perf_counter()
            generations = backend.generate(rows, params)
            elapsed = time.perf_counter() - start
            steps = max(g.completion_tokens for g in generations)
            seconds[constrained] = min(seconds.get(constrained, float("inf")), elapsed / steps)
        print(f"| {batch} | {seconds[False]:.4f} | {seconds[True]:.4f} | "
              f"{100 * (seconds[True] / seconds[False] - 1):+.1f} % |", flush=True)


def parse(args) -> None:
    model, tokenizer = load(args.model)
    data = Path(args.data)
    settings = [
        ("Iris, zero-shot", "iris", {}, 0),
        ("Iris, 3 labeled demos", "iris", {}, 3),
        ("GSM8K", "gsm8k", {"data_path": str(data / "gsm8k")}, 0),
        ("HotPotQA (BM25)", "hotpotqa", {"data_path": str(data / "hotpotqa")}, 0),
    ]
    print(f"{args.model}, {cpu_note()}, {args.examples} examples per task, max tokens {args.max_tokens}, greedy")
    print("| task | structured | parse failures | accuracy | seconds |\n|---|---|---:|---:|---:|")
    for title, name, options, demos in settings:
        if args.tasks and name not in args.tasks:
            continue
        task = load_task(name, 0, (max(demos, 1), 1, args.examples), **options)
        program = task.program()
        if demos:
            program = dspy.LabeledFewShot(k=demos).compile(program, trainset=task.train)
        for structured in (False, True):
            no_dspy_cache()
            start = time.perf_counter()
            with serving_lm(TransformersBackend(model, tokenizer), f"{args.model}-{structured}",
                            GenerationSettings(max_tokens=args.max_tokens, structured=structured)) as lm:
                calls = ProgramRunner(task.metric, num_threads=8).run(program, task.test, lm)
            failures = sum(call.error == "parse" for call in calls)
            accuracy = 100 * sum(call.passed for call in calls) / len(calls)
            print(f"| {title} | {'on' if structured else 'off'} | {failures}/{len(calls)} | {accuracy:.0f} % | "
                  f"{time.perf_counter() - start:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["overhead", "parse"])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--tokens", type=int, default=48, help="overhead: new tokens per row")
    parser.add_argument("--examples", type=int, default=20, help="parse: examples per task")
    parser.add_argument("--max-tokens", type=int, default=200, help="parse: max new tokens per call")
    parser.add_argument("--tasks", nargs="*", help="parse: only these tasks (iris, gsm8k, hotpotqa)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = parser.parse_args()
    torch.manual_seed(0)
    overhead(args) if args.part == "overhead" else parse(args)


if __name__ == "__main__":
    main()
