"""B6: the default p step (batched bootstrapping, concurrent candidates) vs the same DSPy optimizer calling the LM one
request at a time.

Both sides compile the Iris ChainOfThought with `BootstrapFewShotWithRandomSearch` configured as the trainer's default
p step (`--bootstrapped` + `--labeled` demos, `--candidates` candidate programs) on the embedded SmolLM2-135M-Instruct,
greedy, `--max-tokens` new tokens, every call served by the same engine (`serving_lm` on `TransformersBackend`):

* p step: `steps.prompt.optimize_prompts` (what `BetterTogetherTrainer` runs): `--threads` examples bootstrapped at
  once, all candidates built and scored concurrently;
* sequential: DSPy's optimizer itself with `num_threads=1`: one request at a time.

Prints the seconds of both, the ratio, each candidate's score on both sides and whether the same program was chosen.

    python benchmarks/bench_p_step.py                                   # the issue's size: 20 / 20, 6 candidates
    python benchmarks/bench_p_step.py --train 10 --val 10 --candidates 2  # reduced size (RESULTS.md, B6)
"""

from __future__ import annotations

import argparse

import dspy
from _common import cpu_note, load_embedded, no_dspy_cache, timed

from bt_trl.core.runner import program_adapter
from bt_trl.serving.engine import GenerationSettings, TransformersBackend, serving_lm
from bt_trl.steps.prompt import NO_ERROR_LIMIT, default_prompt_optimizer, optimize_prompts
from bt_trl.tasks import iris


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=20)
    parser.add_argument("--val", type=int, default=20)
    parser.add_argument("--bootstrapped", type=int, default=3)
    parser.add_argument("--labeled", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--threads", type=int, default=8, help="the trainer's num_threads")
    parser.add_argument("--batch-size", type=int, default=8, help="the trainer's generation_batch_size")
    args = parser.parse_args()

    no_dspy_cache()
    model, tokenizer = load_embedded()
    train, val, _ = iris.load_splits(0, (args.train, args.val, 0))
    settings = GenerationSettings(max_tokens=args.max_tokens, max_batch_size=args.batch_size)
    print(f"B6: default p step on Iris {args.train} train / {args.val} val, {args.bootstrapped}+{args.labeled} demos, "
          f"{args.candidates} candidates, embedded model, {args.max_tokens} max tokens, {cpu_note()}")

    def optimizer(num_threads: int):
        return default_prompt_optimizer(iris.metric, max_bootstrapped_demos=args.bootstrapped,
                                        max_labeled_demos=args.labeled, num_candidate_programs=args.candidates,
                                        num_threads=num_threads)

    seconds: list[float] = []
    with serving_lm(TransformersBackend(model, tokenizer), "bench-p-step", settings) as lm, timed(seconds):
        batched = optimize_prompts(optimizer(args.threads), iris.program(), lm, train, val,
                                   examples_at_once=args.threads)
    batched_stats = lm.engine.stats
    print(f"p step:     {seconds[0]:7.1f} s  ({batched_stats.requests} requests in {batched_stats.batches} batches)",
          flush=True)

    with serving_lm(TransformersBackend(model, tokenizer), "bench-p-step-sequential", settings) as lm, \
            dspy.context(lm=lm, adapter=program_adapter(), max_errors=NO_ERROR_LIMIT), timed(seconds):
        sequential = optimizer(1).compile(iris.program(), trainset=train, valset=val)
    sequential_stats = lm.engine.stats
    print(f"sequential: {seconds[1]:7.1f} s  ({sequential_stats.requests} requests in {sequential_stats.batches} "
          f"batches)")

    def scores(program):
        return {c["seed"]: c["score"] for c in program.candidate_programs}

    print(f"ratio (sequential / p step seconds): {seconds[1] / seconds[0]:.2f}x   target >= 3x")
    print(f"candidate scores by seed, p step:     {scores(batched)}")
    print(f"candidate scores by seed, sequential: {scores(sequential)}")
    sequential.set_lm(None)
    print(f"same program chosen: {batched.dump_state() == sequential.dump_state()}")


if __name__ == "__main__":
    main()
