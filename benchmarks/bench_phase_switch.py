"""B2: phase switch — from the end of a w step to the first token generated with the new weights.

Start state on both sides: the embedded SmolLM2-135M-Instruct with a LoRA adapter (r=32, all linear layers, the
recipe's) whose weights one real optimizer step has just changed.

* bt_trl: a new LM name (fingerprint of the trainable weights), a `dspy.LM` served from the live model, one call
  (the vanilla Iris program's prompt) generating its first token.
* separate inference server: save the adapter (the step's artifact), merge it into a copy of the model
  (`merge_and_unload`), save the merged model, reload it from disk as a server would, generate the first token of
  the same prompt.

Prints the median of `--repeats` switches per side and the ratio.

    python benchmarks/bench_phase_switch.py
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections import defaultdict

import dspy
import torch
from _common import cpu_note, load_embedded, median, no_dspy_cache, timed
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from bt_trl.serving.engine import (
    GenerationSettings,
    SamplingParams,
    TransformersBackend,
    encode_chats,
    eval_mode,
    lm_name,
    serving_lm,
    weights_fingerprint,
)
from bt_trl.tasks import iris


def first_token_prompt() -> list[dict]:
    """The chat prompt of the vanilla Iris program on one flower."""
    example = iris.load_examples()[0]
    predictor = iris.program().predict
    return dspy.ChatAdapter().format(predictor.signature, demos=[], inputs=example.inputs().toDict())


def train_one_step(model, tokenizer, prompt: list[dict]) -> None:
    """One real optimizer step on the adapter: the end of a w step."""
    model.train()
    ids = torch.tensor([encode_chats(tokenizer, [prompt])[0] + tokenizer("[[ ## answer ## ]]\nsetosa")["input_ids"]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    optimizer.step()
    optimizer.zero_grad()


def serve_live(model, tokenizer, base_fingerprint: str, prompt: list[dict], phases: dict) -> str:
    """bt_trl's path: name the new weights, serve them from the live model, generate one token."""
    with timed(phases["name the new weights"]):
        name = lm_name(model, base_fingerprint)
    with timed(phases["serve + first token"]), eval_mode(model), serving_lm(
        TransformersBackend(model, tokenizer), name, GenerationSettings(max_tokens=1)
    ) as lm:
        return lm(messages=prompt)[0]


def serve_after_reload(model, tokenizer, prompt: list[dict], folder: str, phases: dict) -> str:
    """A separate server's path: save adapter, merge, save merged, reload from disk, generate one token."""
    with timed(phases["save adapter, merge a copy, save merged"]):
        model.save_pretrained(f"{folder}/adapter")
        merged = copy.deepcopy(model).merge_and_unload()  # the live model keeps training: merge a copy
        merged.save_pretrained(f"{folder}/merged")
        tokenizer.save_pretrained(f"{folder}/merged")
    with timed(phases["reload from disk"]):
        server_model = AutoModelForCausalLM.from_pretrained(f"{folder}/merged").eval()
    with timed(phases["first token"]):
        return TransformersBackend(server_model, tokenizer).generate([prompt], [SamplingParams(max_tokens=1)])[0].text


def report(title: str, phases: dict) -> float:
    """Prints the median of each phase and of their sum; returns the latter."""
    totals = [sum(runs) for runs in zip(*phases.values())]
    print(f"{title}: {median(totals):.3f} s median (runs: {', '.join(f'{t:.3f}' for t in totals)})")
    for phase, runs in phases.items():
        print(f"    {phase}: {median(runs):.3f} s")
    return median(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    no_dspy_cache()
    base, tokenizer = load_embedded()
    model = get_peft_model(base, LoraConfig(r=32, lora_alpha=64, target_modules="all-linear"))
    base_fingerprint = weights_fingerprint(model, only_trainable=False)
    prompt = first_token_prompt()
    prompt_tokens = len(encode_chats(tokenizer, [prompt])[0])
    print(f"B2: phase switch, embedded model + LoRA r=32 all-linear, prompt of {prompt_tokens} tokens, {cpu_note()}")

    live = defaultdict(list)
    reload = defaultdict(list)
    for _ in range(args.repeats):
        train_one_step(model, tokenizer, prompt)
        live_token = serve_live(model, tokenizer, base_fingerprint, prompt, live)
        with tempfile.TemporaryDirectory() as folder:
            reload_token = serve_after_reload(model, tokenizer, prompt, folder, reload)
        assert live_token == reload_token, (live_token, reload_token)  # same weights, same first token
    ours = report("bt_trl: new name -> serve the live model -> first token", live)
    theirs = report("server: save -> merge -> save merged -> reload -> first token", reload)
    print(f"ratio: {theirs / ours:.1f}x   target >= 20x and bt_trl < 1 s")


if __name__ == "__main__":
    main()
