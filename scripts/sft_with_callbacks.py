"""An existing plain-TRL SFT script, made BetterTogether-style with two callbacks.

Every `--every_n_epochs` epochs the prompts are re-bootstrapped with the weights being trained, and the training set
is regenerated from the program's passing traces (under the new prompts); the next epochs train on it.

    python scripts/sft_with_callbacks.py --output_dir out/sft_callbacks --max_steps 60 --every_n_epochs 2 --use_cpu \
        --max_epochs 4 --use_peft --lora_r 16 --lora_alpha 32 --lora_target_modules all-linear
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dspy
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from bt_trl import EMBEDDED_MODEL, resolve_model_name_or_path
from bt_trl.callbacks import PromptOptimizationCallback, TraceDatasetCallback
from bt_trl.engine import GenerationSettings
from bt_trl.tasks import iris


@dataclass
class CallbackArguments:
    every_n_epochs: int = field(default=2, metadata={"help": "Re-optimize prompts and regenerate data this often."})
    max_epochs: int = field(default=4, metadata={"help": "Stop after this many epochs."})
    train_size: int = field(default=16, metadata={"help": "Iris training examples."})
    val_size: int = field(default=12, metadata={"help": "Iris validation examples."})
    generation_max_tokens: int = field(default=96, metadata={"help": "Maximum new tokens per LM call."})


def main(cb_args: CallbackArguments, sft_args: SFTConfig, model_args: ModelConfig) -> None:
    path = resolve_model_name_or_path(model_args.model_name_or_path or EMBEDDED_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    train, val, _ = iris.load_splits(0, (cb_args.train_size, cb_args.val_size, 0))
    generation = GenerationSettings(max_tokens=cb_args.generation_max_tokens)

    # A small model answers in DSPy's format only with demos: start from labeled demos so the first traces pass.
    program = dspy.LabeledFewShot(k=3).compile(iris.program(), trainset=train)
    prompts = PromptOptimizationCallback(program, iris.metric, train, val, tokenizer,
                                         every_n_epochs=cb_args.every_n_epochs, generation=generation,
                                         num_candidate_programs=0)
    # The first rows come from the initial program; later ones from the prompt callback's latest program.
    traces = TraceDatasetCallback(lambda: prompts.program, iris.metric, train, model, tokenizer,
                                  every_n_epochs=cb_args.every_n_epochs, max_epochs=cb_args.max_epochs,
                                  generation=generation)
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=traces.train_dataset, processing_class=tokenizer,
                         peft_config=get_peft_config(model_args), callbacks=[prompts, traces])
    trainer.train()
    trainer.save_model()
    print("prompt re-optimizations (epoch, val score):", prompts.history)
    print("training-set regenerations:", traces.history)


if __name__ == "__main__":
    parser = TrlParser((CallbackArguments, SFTConfig, ModelConfig))
    main(*parser.parse_args_and_config())
