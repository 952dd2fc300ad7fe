"""B1: program calls per second through bt_trl's engine vs sequential Hugging Face `generate`.

Both sides run the same DSPy calls — the Iris ChainOfThought with 3 labeled demos on `--calls` flowers, the embedded
SmolLM2-135M-Instruct, greedy, `--max-tokens` new tokens — through the same `ProgramRunner` (the trainer's path):

* engine: `--threads` DSPy threads -> `BatchingEngine` (micro-batches) -> `TransformersBackend` (left padding,
  shared-prefix KV reuse, stop at the completion marker);
* sequential: one DSPy thread; each call is one plain `model.generate` on one prompt (same chat template, same max
  tokens, `stop_strings` at the completion marker as HF offers it).

Prints calls/s of both, the ratio, and how many answers agree (greedy on both sides: they should be identical up to
floating-point differences between batched and single-row kernels).

    python benchmarks/bench_engine.py             # the 64 calls of RESULTS.md
    python benchmarks/bench_engine.py --calls 16  # a quick check
"""

from __future__ import annotations

import argparse

import dspy
import torch
from _common import cpu_note, iris_examples, iris_program_with_demos, load_embedded, no_dspy_cache, timed

from bt_trl.core.runner import ProgramRunner
from bt_trl.serving.engine import (
    COMPLETION_MARKER,
    Generation,
    GenerationSettings,
    TransformersBackend,
    chat_messages,
    response,
    serving_lm,
)
from bt_trl.tasks import iris


class SequentialGenerateEngine:
    """The baseline: a DSPy custom engine where each call is one `model.generate` on one prompt."""

    def __init__(self, model, tokenizer, max_tokens: int):
        self.model, self.tokenizer, self.max_tokens = model, tokenizer, max_tokens

    def __deepcopy__(self, memo):
        return self

    def complete(self, request):
        tok = self.tokenizer
        text = tok.apply_chat_template(chat_messages(request), tokenize=False, add_generation_prompt=True)
        inputs = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_tokens, do_sample=False, top_k=None,
                                      stop_strings=[COMPLETION_MARKER], tokenizer=tok, pad_token_id=tok.pad_token_id)
        new = out[0, inputs["input_ids"].shape[1]:]
        answer = tok.decode(new, skip_special_tokens=True)
        stopped = COMPLETION_MARKER in answer
        return response(request, Generation(answer.split(COMPLETION_MARKER)[0], inputs["input_ids"].shape[1],
                                            len(new), "stop" if stopped else "length"))

    def stream(self, request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))


class DecodeOccupancy:
    """Wraps a backend to count decode row-steps: a static batch runs every row until its longest row ends, so
    `used / run` bounds what continuous batching (rows leaving and joining mid-batch) could recover in decoding."""

    def __init__(self, backend):
        self.backend, self.used, self.run = backend, 0, 0

    def generate(self, prompts, params):
        generations = self.backend.generate(prompts, params)
        self.used += sum(g.completion_tokens for g in generations)
        self.run += len(generations) * max(g.completion_tokens for g in generations)
        return generations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--threads", type=int, default=8, help="DSPy threads (the trainer's num_threads)")
    parser.add_argument("--batch-size", type=int, default=8, help="the trainer's generation_batch_size")
    parser.add_argument("--batch-wait", type=float, default=0.02, help="the trainer's generation_batch_wait")
    args = parser.parse_args()

    no_dspy_cache()
    model, tokenizer = load_embedded()
    program = iris_program_with_demos(3)
    examples = iris_examples(args.calls)
    print(f"B1: {args.calls} Iris ChainOfThought calls (3 demos), embedded model, {args.max_tokens} max tokens, "
          f"{cpu_note()}")

    seconds: list[float] = []
    settings = GenerationSettings(max_tokens=args.max_tokens, max_batch_size=args.batch_size,
                                  batch_wait=args.batch_wait)
    backend = DecodeOccupancy(TransformersBackend(model, tokenizer))
    with serving_lm(backend, "bench-engine", settings) as lm, timed(seconds):
        batched = ProgramRunner(iris.metric, num_threads=args.threads).run(program, examples, lm)
    stats = lm.engine.stats
    print(f"engine:     {seconds[0]:7.1f} s  {args.calls / seconds[0]:6.3f} calls/s  ({stats.batches} batches, "
          f"{stats.requests / max(stats.batches, 1):.1f} requests/batch, {stats.completion_tokens} new tokens)")
    print(f"            decode occupancy of the static batches: {backend.used}/{backend.run} row-steps "
          f"({100 * backend.used / max(backend.run, 1):.0f}%)", flush=True)
    sequential_lm = dspy.LM("bt_trl/bench-sequential", engine=SequentialGenerateEngine(model, tokenizer,
                            args.max_tokens), max_tokens=args.max_tokens, temperature=0.0, num_retries=0)
    with timed(seconds):
        sequential = ProgramRunner(iris.metric, num_threads=1).run(program, examples, sequential_lm)
    engine_s, sequential_s = seconds

    def answers(calls):
        return [getattr(c.prediction, "answer", None) for c in calls]

    agree = sum(a == b for a, b in zip(answers(batched), answers(sequential)))
    print(f"sequential: {sequential_s:7.1f} s  {args.calls / sequential_s:6.3f} calls/s")
    print(f"ratio (engine / sequential calls/s): {sequential_s / engine_s:.2f}x   target >= 5x")
    print(f"same answer on {agree}/{args.calls} calls; accuracy engine {sum(c.passed for c in batched)}, "
          f"sequential {sum(c.passed for c in sequential)}")


if __name__ == "__main__":
    main()
