"""B9: bf16 vs fp32 on CPU — the p step's program calls and the w step's LoRA SFT, side by side, on one model.

On a CPU with bf16 instructions (AVX512-BF16 or AMX), loading the weights in bf16 (`model_init_kwargs={"dtype":
"bfloat16"}`) and training with `bf16=True` (CPU: with `use_cpu=True`) is what TRL and transformers offer for speed.
This measures what it buys inside BetterTogetherTrainer, and what it changes, for each precision in turn:

* program calls: the Iris `Predict` program with 3 labeled demos (a p step's candidate) on `--flowers` flowers,
  through the trainer's own serving path (engine, structured generation, DSPy), seconds and accuracy;
* the w step's SFT: `trainer.finetune_weights` on `--rows` traces made from gold labels (LoRA r=16, batch 4,
  one epoch), seconds per optimizer step and the logged loss.

Prints both rows and the fp32 / bf16 time ratios, and how many flowers the two precisions answer differently.

    python benchmarks/bench_precision.py                                      # the embedded SmolLM2-135M
    python benchmarks/bench_precision.py --model embedded:qwen2.5-coder-1.5b  # ~12 min on 2 cores
"""

from __future__ import annotations

import argparse
import tempfile
import time

import dspy
from _common import cpu_note, no_dspy_cache
from peft import LoraConfig

from bt_trl import BetterTogetherConfig, BetterTogetherTrainer
from bt_trl.core.runner import ProgramCall
from bt_trl.serving.models import EMBEDDED_MODEL
from bt_trl.steps.sft import traces_to_dataset
from bt_trl.tasks import iris_predict

PRECISIONS = {"fp32": dict(bf16=False), "bf16": dict(bf16=True, model_init_kwargs={"dtype": "bfloat16"})}
BATCH = 4


def measure(model: str, precision: str, flowers: list[dspy.Example], rows: list[dspy.Example]) -> dict:
    trainer = BetterTogetherTrainer(
        model=model, program=iris_predict.program(), metric=iris_predict.metric, trainset=rows, valset=flowers,
        args=BetterTogetherConfig(tempfile.mkdtemp(), report_to="none", use_cpu=True, num_threads=16,
                                  generation_batch_size=16, generation_max_tokens=32, save_strategy="no",
                                  per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=1e-4,
                                  logging_steps=1, **PRECISIONS[precision]),
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    )
    program = dspy.LabeledFewShot(k=3).compile(iris_predict.program(), trainset=rows)
    started = time.perf_counter()
    with trainer.serving() as lm:
        calls = trainer.runner.run(program, flowers, lm)
    call_seconds = time.perf_counter() - started
    predictor = trainer.student.predictors()[0]
    gold = [ProgramCall(e, trace=[(predictor, e.inputs().toDict(), {"answer": e.answer})], score=1.0) for e in rows]
    started = time.perf_counter()
    losses = trainer.finetune_weights(traces_to_dataset(gold), index=1)
    steps = -(-len(rows) // BATCH)
    return dict(calls=call_seconds, accuracy=100 * sum(c.passed for c in calls) / len(calls),
                answers=[str(getattr(c.prediction, "answer", c.error)) for c in calls],
                step=(time.perf_counter() - started) / steps, losses=losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--flowers", type=int, default=32, help="program calls timed (Iris val + test flowers)")
    parser.add_argument("--rows", type=int, default=12, help="gold traces the SFT run trains on (one epoch)")
    args = parser.parse_args()
    no_dspy_cache()
    train, val, test = iris_predict.load_splits(0)
    flowers, rows = (val + test)[: args.flowers], train[: args.rows]
    print(f"{cpu_note()}; {args.model}; {len(flowers)} program calls (Predict, 3 labeled demos), "
          f"{len(rows)} SFT rows, LoRA r=16, batch {BATCH}")
    results = {}
    for precision in PRECISIONS:
        results[precision] = r = measure(args.model, precision, flowers, rows)
        first, last = r["losses"]
        print(f"  {precision}: program calls {r['calls']:.1f} s (accuracy {r['accuracy']:.1f}), "
              f"SFT {r['step']:.1f} s per step (loss {first:.3f} -> {last:.3f})", flush=True)
    fp32, bf16 = results["fp32"], results["bf16"]
    differ = sum(a != b for a, b in zip(fp32["answers"], bf16["answers"]))
    print(f"fp32 / bf16 time: program calls {fp32['calls'] / bf16['calls']:.2f}x, SFT step "
          f"{fp32['step'] / bf16['step']:.2f}x; {differ} of {len(flowers)} flowers answered differently")


if __name__ == "__main__":
    main()
