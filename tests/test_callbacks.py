"""BetterTogetherCallback on a plain TRL SFTTrainer: prompt re-optimization and dataset regeneration in one callback,
with the model and tokenizer taken from the trainer."""

import math

import dspy
import pytest
import torch
from conftest import tiny_model
from peft import LoraConfig
from trl import SFTTrainer

from bt_trl import BetterTogetherCallback, BetterTogetherConfig
from bt_trl.tasks import iris


def sft_config(output_dir, **overrides):
    """The SFTTrainer's config: a BetterTogetherConfig (an SFTConfig), whose BetterTogether fields the callback
    reads. `max_steps` is only the cap transformers requires of an iterable dataset: the epochs decide."""
    values = {"num_train_epochs": 4, "max_steps": 1_000_000, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
              "logging_steps": 1, "save_strategy": "no", "report_to": "none", "bf16": False, "max_length": 1024,
              "generation_max_tokens": 48}
    return BetterTogetherConfig(str(output_dir), **{**values, **overrides})


def test_callback_re_optimizes_prompts_and_regenerates_rows_on_plain_sft_trainer(format_model, tokenizer, tmp_path):
    train, val, _ = iris.load_splits(0, (8, 6, 0))
    # BootstrapFewShot keeps its bootstrapped demos (random search would keep zero-shot: the tiny model scores the
    # same either way).
    optimizer = dspy.BootstrapFewShot(metric=iris.metric, max_bootstrapped_demos=2, max_labeled_demos=0)
    callback = BetterTogetherCallback(iris.program(), iris.metric, train, val, every_n_epochs=2,
                                      prompt_optimizer=optimizer)
    trainer = SFTTrainer(model=format_model, args=sft_config(tmp_path, gradient_checkpointing=True),
                         train_dataset=callback.train_dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, target_modules="all-linear"), callbacks=[callback])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()

    # Rounds when training began and every two epochs; the last one (epoch 4) only re-optimizes the prompts.
    assert callback.epochs_done == 4
    assert [h["epoch"] for h in callback.history] == [0, 2, 4]
    first, second, last = callback.history
    assert 0 < first["traces_kept"] == first["rows"] <= first["traces_total"] == len(train)
    assert 0 < second["rows"] == len(callback.rows)
    assert "rows" not in last and all("val_score" in h for h in callback.history)
    # Each round's rows were trained on for two epochs (the format row SFTTrainer read at construction never was),
    # and no more; the linear learning-rate schedule was planned over those steps, whatever the cap: it ends at 0.
    batches = [math.ceil(h["rows"] / 2) for h in (first, second)]
    assert trainer.state.global_step == trainer.state.max_steps == 2 * sum(batches)
    rates = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert len(rates) == trainer.state.global_step and rates[0] == pytest.approx(1e-3)
    assert rates[-1] == pytest.approx(1e-3 / trainer.state.global_step)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    # Demos were bootstrapped from the live model's passing answers; the adapter trained; gradient checkpointing was
    # back on after every round of generation.
    assert all(len(p.demos) == 2 for p in callback.program.predictors())
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert trainer.model.is_gradient_checkpointing
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    # The final program is served from the trained model as the rounds ran it.
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    assert callback.program(**val[0].inputs()).answer
    assert callback.program.predict.lm.engine.stats.requests == 1


def test_callback_refuses_bad_input_and_a_start_with_nothing_to_train_on(tokenizer, tmp_path):
    train, val, _ = iris.load_splits(0, (4, 3, 0))
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1"):
        BetterTogetherCallback(iris.program(), iris.metric, train, val, every_n_epochs=0)
    with pytest.raises(ValueError, match=r"trainset\[0\] lacks the program's input"):
        BetterTogetherCallback(iris.program(), iris.metric, [dspy.Example(x=1).with_inputs("x")], val)

    # A random model never gets the species right: no row to train on, said before any training step.
    callback = BetterTogetherCallback(iris.program(), iris.metric, train, val,
                                      prompt_optimizer=dspy.LabeledFewShot(k=1))
    trainer = SFTTrainer(model=tiny_model(tokenizer), args=sft_config(tmp_path, generation_max_tokens=16),
                         train_dataset=callback.train_dataset,
                         processing_class=tokenizer, callbacks=[callback])
    with pytest.raises(ValueError, match="no trace of the program passed the metric on the trainset"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_callback_steps_need_max_steps_only_as_a_cap(format_model, tokenizer, tmp_path):
    train, val, _ = iris.load_splits(0, (4, 3, 0))

    def callback():
        return BetterTogetherCallback(iris.program(), iris.metric, train, val,
                                      prompt_optimizer=dspy.LabeledFewShot(k=1))

    # transformers refuses a dataset without a length and no max_steps when the trainer is built, before any callback
    # event: the message names max_steps.
    no_cap = callback()
    with pytest.raises(ValueError, match="max_steps has to be specified"):
        SFTTrainer(model=format_model, args=sft_config(tmp_path, max_steps=-1), train_dataset=no_cap.train_dataset,
                   processing_class=tokenizer, callbacks=[no_cap])

    # A cap below the epochs' steps stops training there, with a last prompt round, the schedule planned to the cap,
    # and a warning naming the cap, since a cap meant as a formality would otherwise cut the epochs silently.
    capped = callback()
    trainer = SFTTrainer(model=format_model, args=sft_config(tmp_path, max_steps=3), processing_class=tokenizer,
                         train_dataset=capped.train_dataset, callbacks=[capped],
                         peft_config=LoraConfig(r=4, target_modules="all-linear"))
    with pytest.warns(UserWarning, match=r"max_steps=3 ends training before num_train_epochs=4 does") as caught:
        trainer.train()
    assert sum("ends training before" in str(w.message) for w in caught) == 1  # once, not at every round
    assert trainer.state.global_step == 3 and capped.epochs_done < 4
    assert "rows" not in capped.history[-1]
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
