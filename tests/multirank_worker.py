"""One rank of the multi-process test (`tests/test_multirank.py` launches it with `accelerate launch`).

Runs a tiny `p -> w -> p` (or `--strategy`) with the real trainer and writes what this rank ended up with to
`<report_dir>/rank<i>.json`: a hash of the program after every step, a hash of every w step's SFT dataset, the program
calls it made and a hash of its trained weights.
`--die_after_step K --die_rank R` makes rank R exit abruptly once step K is checkpointed (a crashed rank).
`--callback` runs `BetterTogetherCallback` on a plain `SFTTrainer` instead and reports its rounds, rows and program.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import dspy
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTTrainer

from bt_trl import BetterTogetherConfig, BetterTogetherTrainer
from bt_trl.callbacks import BetterTogetherCallback
from bt_trl.core.ranks import end_job
from bt_trl.serving.engine import weights_fingerprint
from bt_trl.serving.models import embedded_model_path
from bt_trl.tasks import iris


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def program_digest(program: dspy.Module) -> str:
    unbound = program.deepcopy()
    unbound.set_lm(None)  # the LM served from this process's model is not part of the program's state
    return digest(unbound.dump_state())


class RecordingTrainer(BetterTogetherTrainer):
    def __init__(self, *args, die_after_step: int | None, die_rank: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.die_after_step, self.die_rank = die_after_step, die_rank
        self.program_hashes: dict[int, str] = {}
        self.dataset_hashes: dict[int, str] = {}

    def finetune_weights(self, traces, index):
        self.dataset_hashes[index] = digest(traces.dataset.to_list())
        return super().finetune_weights(traces, index)

    def _checkpoint(self, state):
        super()._checkpoint(state)
        index = state.steps[-1].index
        self.program_hashes[index] = program_digest(self.program)
        if index == self.die_after_step and self.ranks.index == self.die_rank:
            os._exit(3)  # no cleanup, no exception: as if the process were killed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--report_dir", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--die_after_step", type=int)
    parser.add_argument("--die_rank", type=int, default=1)
    parser.add_argument("--deepspeed_on_cpu", action="store_true",
                        help="for DeepSpeed configs with DS_ACCELERATOR=cpu: use_cpu would make accelerate skip "
                        "DeepSpeed")
    parser.add_argument("--optimizer", choices=("random_search", "bootstrap"), default="random_search",
                        help="random_search: the default p step (concurrent candidate scoring, so its batches are "
                             "split across ranks); bootstrap: BootstrapFewShot, whose programs get the model's "
                             "own demos (the tiny model scores the same with and without demos, so random search "
                             "keeps the zero-shot program)")
    parser.add_argument("--callback", action="store_true", help="BetterTogetherCallback on a plain SFTTrainer")
    parser.add_argument("--strategy", default="p -> w -> p")
    parser.add_argument("--grpo_num_generations", type=int, default=2)
    cli = parser.parse_args()

    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    if cli.callback:
        return run_callback(cli, tokenizer)
    args = BetterTogetherConfig(
        cli.output_dir, strategy=cli.strategy, use_cpu=not cli.deepspeed_on_cpu, report_to="none",
        num_candidate_programs=1,
        max_bootstrapped_demos=2, max_labeled_demos=2, generation_max_tokens=48, num_threads=8, num_train_epochs=2,
        per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, save_strategy="no",
        gradient_checkpointing=False, max_length=1024, seed=0, weight_step_keep_start=False,
        grpo_num_generations=cli.grpo_num_generations,
    )
    train, val, _ = iris.load_splits(0, (10, 8, 0))
    trainer = RecordingTrainer(
        model=AutoModelForCausalLM.from_pretrained(cli.model), args=args, program=iris.program(),
        metric=graded if "grpo" in cli.strategy else iris.metric,
        trainset=train, valset=val, processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        die_after_step=cli.die_after_step, die_rank=cli.die_rank,
        prompt_optimizer=dspy.BootstrapFewShot(metric=iris.metric, max_bootstrapped_demos=2, max_labeled_demos=0)
        if cli.optimizer == "bootstrap" else None,
    )
    trainer.train(resume_from_checkpoint=cli.resume or None)
    report = {
        "world_size": trainer.ranks.world_size,
        "program_hashes": trainer.program_hashes,
        "dataset_hashes": trainer.dataset_hashes,
        "final_program": program_digest(trainer.program),
        "program_calls": trainer.runner.local_calls,
        "weights": weights_fingerprint(trainer.accelerator.unwrap_model(trainer.model), only_trainable=True),
    }
    Path(cli.report_dir, f"rank{trainer.ranks.index}.json").write_text(json.dumps(report))
    trainer.end()


def graded(example, prediction, trace=None):
    """Iris's metric, and for a grpo step's rollouts (traced) a reward that also prefers shorter reasoning, so that
    the tiny model's groups have reward variance."""
    if trace is None:
        return iris.metric(example, prediction)
    return iris.metric(example, prediction) - len(prediction.reasoning) / 1000


def run_callback(cli, tokenizer) -> None:
    """Two rounds of data (when training begins and after epoch 1) and a final p step, on two ranks."""
    train, val, _ = iris.load_splits(0, (10, 8, 0))
    callback = BetterTogetherCallback(
        iris.program(), iris.metric, train, val, every_n_epochs=1,
        prompt_optimizer=dspy.BootstrapFewShot(metric=iris.metric, max_bootstrapped_demos=2, max_labeled_demos=0),
    )
    args = BetterTogetherConfig(cli.output_dir, use_cpu=True, num_train_epochs=2, max_steps=1000,
                                per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                                report_to="none", max_length=1024, generation_max_tokens=48)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(cli.model), args=args,
                         train_dataset=callback.train_dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), callbacks=[callback])
    trainer.train()
    report = {
        "world_size": trainer.accelerator.num_processes,
        "history": callback.history,
        "rows": digest(callback.rows),
        "final_program": program_digest(callback.program),
        "demos": [len(p.demos) for p in callback.program.predictors()],
        "program_calls": callback._runner.local_calls,
        "global_step": trainer.state.global_step,
    }
    Path(cli.report_dir, f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(report))
    end_job(trainer)


if __name__ == "__main__":
    main()
