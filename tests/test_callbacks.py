"""The p step and the trace-dataset regeneration as callbacks on a plain TRL SFTTrainer."""

import dspy
import torch
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from bt_trl.callbacks import PromptOptimizationCallback, TraceDatasetCallback
from bt_trl.engine import GenerationSettings
from bt_trl.tasks import iris


def test_callbacks_regenerate_prompts_and_data_on_plain_sft_trainer(format_model, tokenizer, tmp_path):
    train, val, _ = iris.load_splits(0, (8, 6, 0))
    generation = GenerationSettings(max_tokens=48)
    # BootstrapFewShot keeps its bootstrapped demos (random search would keep zero-shot: the tiny model scores the
    # same either way).
    optimizer = dspy.BootstrapFewShot(metric=iris.metric, max_bootstrapped_demos=2, max_labeled_demos=0)
    prompts = PromptOptimizationCallback(iris.program(), iris.metric, train, val, tokenizer, every_n_epochs=2,
                                         generation=generation, prompt_optimizer=optimizer)
    traces = TraceDatasetCallback(lambda: prompts.program, iris.metric, train, format_model, tokenizer,
                                  every_n_epochs=2, max_epochs=4, generation=generation)
    first_rows = list(traces.rows)
    assert traces.history[0]["traces_kept"] == len(first_rows) > 0

    args = SFTConfig(str(tmp_path), max_steps=1000, per_device_train_batch_size=2, learning_rate=1e-3,
                     logging_steps=1, save_strategy="no", report_to="none", bf16=False,
                     gradient_checkpointing=True, max_length=1024)
    trainer = SFTTrainer(model=format_model, args=args, train_dataset=traces.train_dataset,
                         processing_class=tokenizer, peft_config=LoraConfig(r=4, target_modules="all-linear"),
                         callbacks=[prompts, traces])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()

    # Four epochs, then the trace callback stopped training (an iterable dataset has no epoch count).
    assert traces.epochs_done == 4
    assert trainer.state.global_step < 1000
    # Prompts re-optimized at epochs 2 and 4 with the live weights: demos were bootstrapped and scored.
    assert [epoch for epoch, _ in prompts.history] == [2, 4]
    assert all(len(p.demos) > 0 for p in prompts.program.predictors())
    # The training set was regenerated at epoch 2, from the prompt callback's program on the trained weights.
    assert [h["epoch"] for h in traces.history] == [0, 2]
    assert traces.history[1]["rows"] == len(traces.rows) > 0
    # The completion-only loss trained the adapter; gradient checkpointing was back on after each generation.
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert trainer.model.is_gradient_checkpointing
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
