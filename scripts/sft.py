"""TRL's `sft.py` script (`trl/scripts/sft.py`) with BetterTogether added as one callback.

The training set is the callback's: when training begins and every `--every_n_epochs` epochs, the Iris program's
prompts are re-optimized on the weights being trained and the SFT rows regenerated from its passing traces; after the
last epoch the prompts are re-optimized once more. Everything else is TRL's: flags, model loading, PEFT, saving.

    python scripts/sft.py --model_name_or_path embedded:smollm2-135m --output_dir out/sft_bettertogether --use_cpu \
        --num_train_epochs 2 --max_steps 10000 --every_n_epochs 1 --train_size 8 --val_size 6 \
        --use_peft --lora_r 16 --lora_alpha 32 --lora_target_modules all-linear --report_to none

`--num_train_epochs` sets the training: the callback runs that many epochs and plans the learning-rate schedule over
the steps they take on each round's rows. `--max_steps` is only a cap, which transformers requires of the callback's
iterable train dataset when the trainer is built. The config is `BetterTogetherConfig`, an `SFTConfig` whose
BetterTogether fields (`--max_bootstrapped_demos`, `--generation_max_tokens`, ...) the callback reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, SFTTrainer, TrlParser, get_peft_config

from bt_trl import BetterTogetherCallback, BetterTogetherConfig, end_job, resolve_model_name_or_path
from bt_trl.integrations.hub import PROGRAM_FILE, save_program
from bt_trl.tasks import iris


@dataclass
class ScriptArguments:
    every_n_epochs: int = field(default=1, metadata={"help": "Epochs trained on one set of rows between rounds."})
    train_size: int = field(default=8, metadata={"help": "Iris training examples (demos and traces)."})
    val_size: int = field(default=6, metadata={"help": "Iris validation examples (candidate choice, scores)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the Iris split."})


def main(script_args: ScriptArguments, training_args: BetterTogetherConfig, model_args: ModelConfig) -> None:
    training_args.model_init_kwargs = dict(revision=model_args.model_revision, dtype=model_args.dtype,
                                           attn_implementation=model_args.attn_implementation,
                                           **(training_args.model_init_kwargs or {}))
    train, val, _ = iris.load_splits(script_args.split_seed, (script_args.train_size, script_args.val_size, 0))
    callback = BetterTogetherCallback(
        iris.program(), iris.metric, train, val, every_n_epochs=script_args.every_n_epochs)

    trainer = SFTTrainer(
        model=resolve_model_name_or_path(model_args.model_name_or_path),  # a Hub id, a path or embedded:<name>
        args=training_args,
        train_dataset=callback.train_dataset,
        peft_config=get_peft_config(model_args),
        callbacks=[callback],
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed. BetterTogether rounds:")
    for entry in callback.history:
        trainer.accelerator.print(f"  {entry}")

    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        save_program(callback.program, Path(training_args.output_dir) / PROGRAM_FILE)
    trainer.accelerator.print(f"Model and {PROGRAM_FILE} saved to {training_args.output_dir}.")
    end_job(trainer)  # Trainer.end() in the order that lets a gloo job exit cleanly


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, BetterTogetherConfig, ModelConfig))
    main(*parser.parse_args_and_config())
