"""B6, merged adapter: generating with the LoRA adapter merged (`merged_adapter.merged_adapter`) vs unmerged.

The embedded SmolLM2-135M-Instruct with a LoRA adapter (r=32, all linear layers, B drawn at random so that the merge
changes the weights), `--rounds` batches of `--batch` Iris ChainOfThought prompts (3 labeled demos), greedy,
`--max-tokens` new tokens, the trainer's `TransformersBackend`. The merged side includes the merge and the exact
restore of the base weights (once, as the trainer does per generation block). The sides alternate for `--repeats`
rounds; prints the median times, the ratio, the merge + restore time alone, whether the answers agree, and whether
the parameters are bit-identical after the block.

    python benchmarks/bench_merged_adapter.py
"""

from __future__ import annotations

import argparse

import dspy
import torch
from _common import cpu_note, iris_examples, iris_program_with_demos, load_embedded, median, timed
from peft import LoraConfig, get_peft_model

from bt_trl.engine import SamplingParams, TransformersBackend
from bt_trl.merged_adapter import merged_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = load_embedded()
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules="all-linear")).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.002)
    predictor = iris_program_with_demos(3).predict
    adapter = dspy.ChatAdapter()
    prompts = [adapter.format(predictor.signature, demos=predictor.demos, inputs=ex.inputs().toDict())
               for ex in iris_examples(args.batch * args.rounds)]
    batches = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    params = SamplingParams(max_tokens=args.max_tokens)
    print(f"B6 merged adapter: {args.rounds} batches of {args.batch} Iris prompts, LoRA r=32 all-linear, "
          f"{args.max_tokens} max tokens, {cpu_note()}")

    def generate_all():
        backend = TransformersBackend(model, tokenizer)
        return [g.text for batch in batches for g in backend.generate(batch, [params] * len(batch))]

    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    unmerged_s: list[float] = []
    merged_s: list[float] = []
    merge_only_s: list[float] = []
    generate_all()  # warm-up (allocator, kernels), not timed
    for _ in range(args.repeats):
        with timed(unmerged_s):
            unmerged = generate_all()
        with timed(merged_s), merged_adapter(model):
            merged = generate_all()
        with timed(merge_only_s), merged_adapter(model):
            pass
    identical = all(torch.equal(param, before[name]) for name, param in model.named_parameters())
    print(f"unmerged: {median(unmerged_s):7.2f} s  (runs: {', '.join(f'{s:.2f}' for s in unmerged_s)})")
    print(f"merged:   {median(merged_s):7.2f} s  (runs: {', '.join(f'{s:.2f}' for s in merged_s)}; merge and exact "
          f"restore included, alone {median(merge_only_s):.2f} s)")
    print(f"ratio (unmerged / merged): {median(unmerged_s) / median(merged_s):.2f}x; same answers "
          f"{sum(a == b for a, b in zip(unmerged, merged))}/{len(merged)}; parameters bit-identical after: {identical}")


if __name__ == "__main__":
    main()
