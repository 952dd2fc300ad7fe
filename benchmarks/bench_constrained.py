"""B7: structured generation — decode overhead of grammar-constrained vs free generation, and what it buys.

Part 1, `overhead`: the same rows decoded free and constrained (the Iris ChainOfThought output grammar) by
`TransformersBackend`, at batch 1 and 16, up to `--tokens` new tokens (the completion marker is not a stop string
here; a constrained row ends at the end of turn its grammar allows after the marker). Prints seconds per decode step
of both (whole calls over the steps decoded, the shared prompt prefix cached as in real use), the overhead, and the
seconds spent inside the grammar processor per step (measured in the constrained run itself, so that figure holds
even on a busy machine).

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

from bt_trl.core.runner import ProgramRunner
from bt_trl.serving import engine, structured
from bt_trl.serving.engine import GenerationSettings, SamplingParams, TransformersBackend, serving_lm
from bt_trl.serving.models import resolve_model_name_or_path
from bt_trl.serving.structured import chat_fields_format, output_grammar
from bt_trl.tasks import iris, load_task


def load(model: str):
    path = resolve_model_name_or_path(model)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


class _TimedConstraint(structured.GrammarConstraint):
    """The engine's grammar processor, adding up the seconds spent in it (what constraining adds to a decode step)."""

    seconds = 0.0

    def __call__(self, input_ids, scores):
        start = time.perf_counter()
        try:
            return super().__call__(input_ids, scores)
        finally:
            _TimedConstraint.seconds += time.perf_counter() - start


def overhead(args) -> None:
    model, tokenizer = load(args.model)
    program = iris_program_with_demos(3)
    predictor = program.predict
    prompts = [dspy.ChatAdapter().format(predictor.signature, demos=predictor.demos, inputs=ex.inputs().toDict())
               for ex in iris.load_examples()[::9][:16]]
    grammar = output_grammar(chat_fields_format(predictor.signature))
    # No stop string: rows decode until their end of turn (a constrained row: the one its grammar allows after the
    # completion marker) or --tokens.
    backend = TransformersBackend(model, tokenizer, stop_strings=())
    engine.GrammarConstraint = _TimedConstraint
    print(f"{args.model}, {cpu_note()}, up to {args.tokens} new tokens per row, best of {args.repeats}")
    print("| batch | free s/step | constrained s/step | overhead | grammar s/step | grammar share of a step |\n"
          "|---:|---:|---:|---:|---:|---:|")
    for batch in (1, 16):
        rows = prompts[:batch]
        step_seconds, grammar_seconds = {}, 0.0
        for repeat in range(args.repeats + 1):  # interleaved; repeat 0 warms up (prefix cache, grammar compilation)
            for constrained in (False, True):
                params = [SamplingParams(max_tokens=args.tokens, grammar=grammar if constrained else None)] * batch
                _TimedConstraint.seconds = 0.0
                start = time.perf_counter()
                generations = backend.generate(rows, params)
                steps = max(g.completion_tokens for g in generations)
                per_step = (time.perf_counter() - start) / steps
                if repeat and per_step < step_seconds.get(constrained, float("inf")):
                    step_seconds[constrained] = per_step
                    if constrained:
                        grammar_seconds = _TimedConstraint.seconds / steps
        free, constrained = step_seconds[False], step_seconds[True]
        print(f"| {batch} | {free:.4f} | {constrained:.4f} | {100 * (constrained / free - 1):+.1f} % | "
              f"{grammar_seconds:.4f} | {100 * grammar_seconds / constrained:.1f} % |", flush=True)


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
        for constrained in (False, True):
            no_dspy_cache()
            start = time.perf_counter()
            with serving_lm(TransformersBackend(model, tokenizer), f"{args.model}-{constrained}",
                            GenerationSettings(max_tokens=args.max_tokens, structured=constrained)) as lm:
                calls = ProgramRunner(task.metric, num_threads=8).run(program, task.test, lm)
            failures = sum(call.error == "parse" for call in calls)
            accuracy = 100 * sum(call.passed for call in calls) / len(calls)
            print(f"| {title} | {'on' if constrained else 'off'} | {failures}/{len(calls)} | {accuracy:.0f} % | "
                  f"{time.perf_counter() - start:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["overhead", "parse"])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--tokens", type=int, default=48, help="overhead: new tokens per row")
    parser.add_argument("--repeats", type=int, default=3, help="overhead: runs per side (the best counts)")
    parser.add_argument("--examples", type=int, default=20, help="parse: examples per task")
    parser.add_argument("--max-tokens", type=int, default=200, help="parse: max new tokens per call")
    parser.add_argument("--tasks", nargs="*", help="parse: only these tasks (iris, gsm8k, hotpotqa)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = parser.parse_args()
    torch.manual_seed(0)
    overhead(args) if args.part == "overhead" else parse(args)


if __name__ == "__main__":
    main()
