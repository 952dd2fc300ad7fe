"""B3: SFT samples/s inside BetterTogetherTrainer (its w-step fine-tuning) vs a plain TRL `SFTTrainer`.

Same dataset (Iris ChainOfThought answers as conversational prompt/completion rows, formatted by DSPy's ChatAdapter
as a w step formats traces), same model (a small random Llama with the real SmolLM2 tokenizer, so the run takes
minutes on CPU), same LoRA config, same training arguments. The two sides alternate `--repeats` times, each on a fresh
copy of the same initial weights.

* BetterTogetherTrainer: `trainer.finetune_weights(traces, index)` — the w step's SFT run (dataset preparation,
  fresh optimizer and schedule, `SFTTrainer.train`);
* SFTTrainer: `SFTTrainer(..., train_dataset=rows).train()`.

Prints the Trainer's own `train_samples_per_second` of each side (median) and the ratio, plus wall seconds of
dataset preparation + training.

    python benchmarks/bench_sft.py
"""

from __future__ import annotations

import argparse
import tempfile
import time

import dspy
import torch
from _common import cpu_note, median, no_dspy_cache
from peft import LoraConfig
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from bt_trl import BetterTogetherConfig, BetterTogetherTrainer
from bt_trl.core.runner import ProgramCall
from bt_trl.serving.models import embedded_model_path
from bt_trl.steps.sft import traces_to_dataset
from bt_trl.tasks import iris


def small_model(tokenizer, hidden: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


def iris_traces(count: int):
    """A w step's `TraceDataset`: passing ChainOfThought traces of `count` flowers, with their gold answers."""
    predictor = iris.program().predict
    calls = []
    for example in iris.load_examples()[:count]:
        outputs = {"reasoning": "The petal length decides it.", "answer": example.answer}
        calls.append(ProgramCall(example, dspy.Prediction(**outputs), [(predictor, example.inputs().toDict(),
                                                                       outputs)], score=1.0))
    return traces_to_dataset(calls)


def training_arguments(output_dir: str, batch_size: int) -> dict:
    return dict(output_dir=output_dir, per_device_train_batch_size=batch_size, num_train_epochs=1,
                learning_rate=1e-4, max_length=1024, logging_steps=1, save_strategy="no", report_to="none",
                use_cpu=True, bf16=False, completion_only_loss=True, seed=0, dataloader_num_workers=0)


def samples_per_second(log_history: list[dict]) -> float:
    return next(e["train_samples_per_second"] for e in reversed(log_history) if "train_samples_per_second" in e)


def run_bettertogether(tokenizer, traces, args, peft_config, hidden: int) -> tuple[float, float]:
    train, val, _ = iris.load_splits(0, (2, 2, 0))
    trainer = BetterTogetherTrainer(model=small_model(tokenizer, hidden), args=BetterTogetherConfig(**args),
                                    program=iris.program(), metric=iris.metric, trainset=train, valset=val,
                                    processing_class=tokenizer, peft_config=peft_config)
    start = time.perf_counter()
    trainer.finetune_weights(traces, index=1)
    return samples_per_second(trainer.state.log_history), time.perf_counter() - start


def run_sft(tokenizer, traces, args, peft_config, hidden: int) -> tuple[float, float]:
    start = time.perf_counter()
    trainer = SFTTrainer(model=small_model(tokenizer, hidden), args=SFTConfig(**args), train_dataset=traces.dataset,
                         processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    return samples_per_second(trainer.state.log_history), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    no_dspy_cache()
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    traces = iris_traces(args.rows)
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    print(f"B3: {len(traces.dataset)} rows, batch {args.batch_size}, 1 epoch, Llama hidden {args.hidden} x 2 layers "
          f"+ LoRA r=16, {cpu_note()}")
    results = {"BetterTogetherTrainer": [], "SFTTrainer": []}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            # alternate which side goes first, so that drifting machine load does not favour one side
            sides = [("BetterTogetherTrainer", run_bettertogether), ("SFTTrainer", run_sft)]
            for name, run in sides if repeat % 2 == 0 else sides[::-1]:
                train_args = training_arguments(f"{folder}/{name}-{repeat}", args.batch_size)
                results[name].append(run(tokenizer, traces, train_args, peft_config, args.hidden))
                print(f"  {name}: {results[name][-1][0]:.2f} samples/s, {results[name][-1][1]:.1f} s wall")
    bt = median([r[0] for r in results["BetterTogetherTrainer"]])
    sft = median([r[0] for r in results["SFTTrainer"]])
    bt_wall = median([r[1] for r in results["BetterTogetherTrainer"]])
    sft_wall = median([r[1] for r in results["SFTTrainer"]])
    print(f"BetterTogetherTrainer w step: {bt:.2f} samples/s (median), {bt_wall:.1f} s wall with dataset preparation")
    print(f"SFTTrainer:                   {sft:.2f} samples/s (median), {sft_wall:.1f} s wall with dataset preparation")
    print(f"ratio (BetterTogether / SFTTrainer samples/s): {bt / sft:.3f}   target >= 0.97;  wall ratio "
          f"{sft_wall / bt_wall:.3f}")


if __name__ == "__main__":
    main()
