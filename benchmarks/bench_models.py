"""The embedded models' cost on this machine: load time from the cache, prefill and decode speed through the engine.

For each model named (`embedded:<name>`, converted first if needed): the seconds `from_pretrained` takes to load the
cached safetensors folder (fp32) and its tokenizer, and the process's resident memory after it; then the project's
`TransformersBackend` (greedy, the trainer's path without DSPy) on the Iris ChainOfThought prompt with 3 labeled demos
(`batch` different flowers, the demos a shared prefix), with no stop string, so every row generates its full budget:

* prefill s: a 1-token generation, after a warm-up call that filled the backend's prefix cache (as the engine runs:
  the demos are encoded once per candidate program);
* decode tok/s: `batch * (max_tokens - 1)` extra tokens over the extra seconds of a `max_tokens` generation.

    python benchmarks/bench_models.py                                   # every embedded model
    python benchmarks/bench_models.py embedded:qwen2.5-coder-0.5b --max-tokens 16
"""

from __future__ import annotations

import argparse
import os

import dspy
from _common import cpu_note, iris_examples, iris_program_with_demos, timed
from transformers import AutoModelForCausalLM, AutoTokenizer

from bt_trl.serving.engine import SamplingParams, TransformersBackend
from bt_trl.serving.models import EMBEDDED_MODELS, EMBEDDED_PREFIX, embedded_model, embedded_model_path


def iris_prompts(count: int) -> list[list[dict]]:
    predict = iris_program_with_demos(3).predict
    adapter = dspy.ChatAdapter()
    return [adapter.format(predict.signature, demos=predict.demos, inputs=example.inputs().toDict())
            for example in iris_examples(count)]


def resident_gib() -> float:
    with open("/proc/self/statm") as statm:  # Linux: pages; the second field is resident
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def measure(name: str, batches: list[int], max_tokens: int) -> None:
    model_info = embedded_model(name)
    folder = embedded_model_path(name)
    seconds: list[float] = []
    with timed(seconds):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    print(f"{name} ({model_info.source}, {model_info.quantization} de-quantized to fp32): load {seconds[0]:.1f} s, "
          f"process RSS {resident_gib():.1f} GiB")
    backend = TransformersBackend(model, tokenizer, stop_strings=())
    prompts = iris_prompts(max(batches))
    for batch in batches:
        rows = prompts[:batch]
        backend.generate(rows, [SamplingParams(max_tokens=1)] * batch)  # warm-up: fills the prefix cache
        seconds = []
        with timed(seconds):
            backend.generate(rows, [SamplingParams(max_tokens=1)] * batch)
        with timed(seconds):
            out = backend.generate(rows, [SamplingParams(max_tokens=max_tokens)] * batch)
        prefill, full = seconds
        generated = min(g.completion_tokens for g in out)
        note = "" if generated == max_tokens else f"  (a row ended at {generated} tokens: rate overestimated)"
        print(f"  batch {batch}: prompt {out[0].prompt_tokens} tokens, prefill {prefill:.2f} s, "
              f"decode {batch * (max_tokens - 1) / (full - prefill):.1f} tok/s ({max_tokens} tokens in "
              f"{full:.1f} s){note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", default=[EMBEDDED_PREFIX + name for name in EMBEDDED_MODELS])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    for name in args.models:
        embedded_model(name)  # an unknown name fails before the first model loads
    print(f"{cpu_note()}; Iris ChainOfThought prompt, 3 labeled demos, greedy, {args.max_tokens} new tokens")
    for name in args.models:
        measure(name, args.batches, args.max_tokens)


if __name__ == "__main__":
    main()
