"""What limits BetterTogether on Iris with a small model: the answers its program gives, and what its weights can learn.

    python scripts/probe_iris.py answers    # species answered on the 50 training flowers, per module/demos/temperature
    python scripts/probe_iris.py ceiling    # the w step trained on the 50 gold labels instead of passing traces

Both steps of BetterTogether learn only from the program's own passing runs: bootstrapped demos and the w step's
traces. `answers` shows which species the program ever answers (a species it never answers never yields a passing
trace); `ceiling` runs the trainer's own w step (`finetune_weights`, same SFT config) on traces made from the gold
labels, which no strategy can do better than with these data, and scores the result on the valset and test set.
`--model_name_or_path` picks another model (default: the embedded SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import dspy
from peft import LoraConfig

from bt_trl import EMBEDDED_MODEL, BetterTogetherConfig, BetterTogetherTrainer
from bt_trl.core.runner import ProgramCall
from bt_trl.steps.sft import traces_to_dataset
from bt_trl.tasks import iris

MODULES = {"predict": dspy.Predict, "chain_of_thought": dspy.ChainOfThought}
# (module, labeled demos, temperature): demos are balanced across the species, the first flowers of each.
DEFAULT_SETTINGS = ["predict:0:0", "predict:3:0", "predict:9:0", "predict:9:0.6", "predict:9:1",
                    "chain_of_thought:3:0", "chain_of_thought:9:1"]


def balanced_demos(train: list[dspy.Example], count: int) -> list[dspy.Example]:
    by_species = [[e for e in train if e.answer == species] for species in iris.SPECIES]
    return [e for group in zip(*by_species) for e in group][:count]


def trainer_for(module: str, args: argparse.Namespace, output_dir: str, **config) -> BetterTogetherTrainer:
    train, val, _ = iris.load_splits(args.split_seed)
    return BetterTogetherTrainer(
        model=args.model_name_or_path, program=MODULES[module](iris.IrisSignature), metric=iris.metric,
        trainset=train, valset=val,
        args=BetterTogetherConfig(output_dir, report_to="none", num_threads=16, generation_batch_size=16,
                                  save_strategy="no", **config),
        peft_config=LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear"),
    )


def describe(calls: list[ProgramCall]) -> str:
    answered = Counter(str(getattr(c.prediction, "answer", "unparsed")) if c.error is None else c.error for c in calls)
    passed = Counter(c.example.answer for c in calls if c.passed)
    return (f"accuracy {100 * sum(c.passed for c in calls) / len(calls):.0f}%  answered {dict(answered)}  "
            f"passing per species {dict(passed)}")


def answers(args: argparse.Namespace) -> None:
    trainers = {}
    for setting in args.settings:
        module, demos, temperature = setting.split(":")
        if module not in trainers:  # one model load per module; the LM name below keeps DSPy's cache apart
            trainers[module] = trainer_for(module, args, "out/probe_iris", generation_max_tokens=120)
        trainer = trainers[module]
        trainer.args.generation_temperature = float(temperature)
        program = trainer.student.deepcopy()
        for predictor in program.predictors():
            predictor.demos = balanced_demos(trainer.trainset, int(demos))
        started = time.perf_counter()
        with trainer.serving() as lm:
            calls = trainer.runner.run(program, trainer.trainset, lm)
        print(f"{setting:>24}  {describe(calls)}  ({time.perf_counter() - started:.0f} s)", flush=True)


def ceiling(args: argparse.Namespace) -> None:
    trainer = trainer_for(args.module, args, "out/probe_iris_ceiling", learning_rate=args.learning_rate,
                          num_train_epochs=args.epochs, per_device_train_batch_size=4, generation_max_tokens=120)
    predictor = trainer.student.predictors()[0]
    gold = [ProgramCall(e, trace=[(predictor, e.inputs().toDict(), {"answer": e.answer})], score=1.0)
            for e in trainer.trainset]
    started = time.perf_counter()
    trainer.finetune_weights(traces_to_dataset(gold), index=1)
    print(f"w step on {len(gold)} gold labels ({args.module}, lr {args.learning_rate}, {args.epochs} epochs, "
          f"LoRA r={args.lora_r}): {time.perf_counter() - started:.0f} s", flush=True)
    _, _, test = iris.load_splits(args.split_seed)
    for name, examples in (("val", trainer.valset), ("test", test)):
        with trainer.serving() as lm:
            print(f"{name:>5}  {describe(trainer.runner.run(trainer.student, examples, lm))}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=["answers", "ceiling"])
    parser.add_argument("--model_name_or_path", default=EMBEDDED_MODEL)
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS,
                        help="answers: module:demos:temperature, module in " + ", ".join(MODULES))
    parser.add_argument("--module", choices=list(MODULES), default="predict", help="ceiling: the program's module")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lora_r", type=int, default=32)
    args = parser.parse_args()
    if args.probe == "answers":
        answers(args)
    else:
        ceiling(args)


if __name__ == "__main__":
    main()
