"""B10: GRPO rollout generation — bt_trl's engine against TRL `GRPOTrainer`'s own generation (transformers, no vLLM).

Both sides sample `--generations` completions of each of `--prompts` prompts — the Iris ChainOfThought module's
prompts with 3 labeled demos, chat-templated — on the same model, `--max-tokens` new tokens at temperature 1.0, in
batches of `--batch-size` rows (whole groups), generating to the token limit or EOS (no stop strings on either side):

* bt_trl: `TransformersBackend.generate` on each batch, as the grpo step's rollouts reach it (a group's rows in one
  batch): the batch's shared prefix and each distinct prompt are encoded once;
* TRL: `GRPOTrainer._generate_single_turn` (its regular generation path: left-padded prompt ids, one
  `model.generate`) on the same batches, each prompt repeated `--generations` times as its sampler repeats them.

Prints the seconds of both sides, interleaved over `--repeats` rounds (median), and the ratio.

    python benchmarks/bench_rollouts.py                       # embedded SmolLM2-135M, fp32
    python benchmarks/bench_rollouts.py --model embedded:qwen2.5-coder-0.5b --bf16
"""

from __future__ import annotations

import argparse
import tempfile

import datasets
import dspy
import torch
from _common import cpu_note, iris_examples, iris_program_with_demos, median, timed
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from bt_trl.serving.engine import SamplingParams, TransformersBackend, encode_chats
from bt_trl.serving.models import EMBEDDED_MODEL, resolve_model_name_or_path


def module_prompts(count: int) -> list[list[dict]]:
    """The Iris module's chat prompts (3 labeled demos) for `count` flowers."""
    predictor = iris_program_with_demos(3).predictors()[0]
    adapter = dspy.ChatAdapter()
    return [adapter.format(predictor.signature, demos=predictor.demos, inputs=example.inputs().toDict())
            for example in iris_examples(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights on both sides")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8, help="the group size (num_generations)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per generate() call on both sides")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.batch_size % args.generations:
        raise ValueError("--batch-size must be a multiple of --generations (whole groups per batch)")

    path = resolve_model_name_or_path(args.model)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = module_prompts(args.prompts)
    rows = [prompt for prompt in prompts for _ in range(args.generations)]
    batches = [rows[i : i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
    print(f"B10: {args.prompts} prompts x {args.generations} samples, {args.max_tokens} new tokens, batches of "
          f"{args.batch_size}, {args.model} ({dtype}), {cpu_note()}")

    backend = TransformersBackend(model, tokenizer, stop_strings=())
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0)

    def bt_trl_rollouts() -> int:
        return sum(g.completion_tokens for batch in batches for g in backend.generate(batch, [params] * len(batch)))

    config = GRPOConfig(
        tempfile.mkdtemp(), num_generations=args.generations, per_device_train_batch_size=args.batch_size,
        max_completion_length=args.max_tokens, temperature=1.0, use_cpu=True, report_to="none",
        bf16=args.bf16, logging_steps=1,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=config,
                          train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)
    batch_ids = [encode_chats(tokenizer, batch) for batch in batches]

    def trl_rollouts() -> int:
        # GRPOTrainer's own generation of one batch of prompt ids (private: the benchmark's baseline, not the product).
        with torch.no_grad():
            return sum(len(ids) for prompt_ids in batch_ids
                       for ids in trainer._generate_single_turn(prompt_ids, None, {}, args.generations)[0])

    seconds = {"bt_trl": [], "trl": []}
    tokens = {}
    for _ in range(args.repeats):
        torch.manual_seed(0)
        with timed(seconds["bt_trl"]):
            tokens["bt_trl"] = bt_trl_rollouts()
        torch.manual_seed(0)
        with timed(seconds["trl"]):
            tokens["trl"] = trl_rollouts()
    for side in ("bt_trl", "trl"):
        print(f"{side:7} {median(seconds[side]):7.1f} s (median of {args.repeats}; {seconds[side]}), "
              f"{tokens[side]} new tokens")
    print(f"ratio (TRL seconds / bt_trl seconds): {median(seconds['trl']) / median(seconds['bt_trl']):.2f}x"
          "   target >= 3x")


if __name__ == "__main__":
    main()
