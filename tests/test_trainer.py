"""BetterTogetherTrainer end to end on the tiny format model: real DSPy optimizer, real SFT, real generation."""

import json
import os

import dspy
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import TrainerCallback

from bt_trl import BetterTogetherConfig, BetterTogetherTrainer
from bt_trl.core.results import STATE_FILE
from bt_trl.tasks import iris


def config(output_dir, strategy="p -> w -> p", **overrides):
    values = dict(
        strategy=strategy, report_to="none", num_candidate_programs=1, max_bootstrapped_demos=2,
        max_labeled_demos=2, generation_max_tokens=48, num_threads=8, num_train_epochs=2,
        per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_strategy="no",
        gradient_checkpointing=False, max_length=1024, seed=0,
    )
    values.update(overrides)
    return BetterTogetherConfig(str(output_dir), **values)


def make_trainer(model, tokenizer, args, metric=iris.metric, program=None, callbacks=None, prompt_optimizer=None):
    train, val, _ = iris.load_splits(0, (10, 8, 0))
    return BetterTogetherTrainer(
        model=model, args=args, program=program or iris.program(), metric=metric, trainset=train, valset=val,
        processing_class=tokenizer, peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        callbacks=callbacks, prompt_optimizer=prompt_optimizer,
    )


def adapter(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_p_w_p_end_to_end(format_model, tokenizer, tmp_path):
    # A user-supplied DSPy optimizer as the p step (BootstrapFewShot's compile takes no valset): the tiny model answers
    # the same with or without demos, so the default random search would keep its zero-shot candidate.
    optimizer = dspy.BootstrapFewShot(metric=iris.metric, max_bootstrapped_demos=2, max_labeled_demos=0)
    # The w step keeps its best epoch even below its start (weight_step_keep_start=False): the weights change.
    trainer = make_trainer(format_model, tokenizer, config(tmp_path, weight_step_keep_start=False),
                           prompt_optimizer=optimizer)
    output = trainer.train()

    results = json.loads((tmp_path / "results.json").read_text())
    steps = results["steps"]
    assert [s["kind"] for s in steps] == ["vanilla", "p", "w", "p"]
    assert results["best_step"] == output.metrics["best_step"]
    assert max(s["val_score"] for s in steps) == output.metrics["best_val_score"]
    assert "| 2 | w |" in (tmp_path / "results.md").read_text()

    # p steps bootstrapped demos from the live model's own passing answers.
    for step in ("step_1_p", "step_3_p"):
        demos = json.loads((tmp_path / step / "program.json").read_text())["predict"]["demos"]
        assert len(demos) == 2 and all(d["reasoning"] == "The petals decide it." for d in demos)
    assert steps[1]["program_calls"] > 0 and steps[1]["completion_tokens"] > 0
    # The model's forward passes took part of every step's time, measured (the model time share).
    assert all(0 < step["model_seconds"] < step["seconds"] for step in steps)

    # The w step trained on the program's passing traces, and the loss went down.
    w = steps[2]
    assert 0 < w["traces_kept"] <= w["traces_total"] == 10
    assert w["sft_examples"] == w["traces_kept"]
    assert w["last_loss"] < w["first_loss"]
    # Scored on the valset at the start and after each of its 2 epochs; it ends on the best epoch's weights.
    assert [epoch for _, epoch, _ in w["val_curve"]] == [0, 1, 2] and w["val_curve"][0][2] == steps[1]["val_score"]
    best_epoch = max(reversed(w["val_curve"][1:]), key=lambda point: point[2])  # the latest among equal scores
    assert w["kept_checkpoint"] == f"epoch {best_epoch[1]:g}" and w["val_score"] == best_epoch[2]
    rows = (tmp_path / "step_2_w" / "sft_dataset.jsonl").read_text().splitlines()
    assert len(rows) == w["traces_kept"]
    assert "demos" not in rows[0] and json.loads(rows[0])["completion"][0]["role"] == "assistant"

    # New weights: a new adapter, served under a new LM name; p steps keep the weights they found.
    assert steps[2]["weights_dir"] == "step_2_w" and steps[3]["weights_dir"] == "step_2_w"
    assert steps[1]["weights_dir"] == "step_0_vanilla"
    assert steps[0]["lm_name"] == steps[1]["lm_name"] != steps[2]["lm_name"] == steps[3]["lm_name"]
    before, after = adapter(tmp_path / "step_0_vanilla"), adapter(tmp_path / "step_2_w")
    assert any(not torch.equal(before[k], after[k]) for k in before)

    # The output folder holds the best step's adapter and program; trainer.program is that program, bound.
    best = steps[results["best_step"]]
    final = adapter(tmp_path)
    chosen = adapter(tmp_path / best["weights_dir"])
    assert all(torch.equal(final[k], chosen[k]) for k in final)
    assert json.loads((tmp_path / "program.json").read_text()) == json.loads(
        (tmp_path / f"step_{best['index']}_{best['kind']}" / "program.json").read_text())
    prediction = trainer.program(petal_length=1.4, petal_width=0.2, sepal_length=5.1, sepal_width=3.5)
    assert isinstance(prediction, dspy.Prediction)
    assert trainer.evaluate_program(iris.load_splits(0, (0, 0, 6))[2]).total == 6


def test_zero_passing_traces_skip_the_w_step(format_model, tokenizer, tmp_path):
    def never(example, prediction, trace=None):
        return False

    trainer = make_trainer(format_model, tokenizer, config(tmp_path, strategy="w"), metric=never)
    with pytest.warns(UserWarning, match="no trace to train on"):
        trainer.train()
    steps = json.loads((tmp_path / "results.json").read_text())["steps"]
    assert steps[1]["traces_kept"] == 0 and steps[1]["traces_total"] == 10
    assert steps[1]["skipped"].startswith("no trace to train on")
    assert steps[1]["weights_dir"] == "step_0_vanilla"
    assert steps[1]["lm_name"] == steps[0]["lm_name"]


def test_trace_rounds_rerun_only_failed_examples_past_the_cache(format_model, tokenizer, tmp_path):
    def small_petals(example, prediction, trace=None):  # passes the setosa examples whatever the answer
        return example.petal_length < 2.5

    trainer = make_trainer(format_model, tokenizer, config(tmp_path, strategy="w", trace_rounds=3, max_rounds=2),
                           metric=small_petals)
    assert trainer.prompt_optimizer.max_rounds == 2
    setosa = sum(example.petal_length < 2.5 for example in trainer.trainset)
    assert 0 < setosa < len(trainer.trainset)

    trainer._begin_step(1, "w")
    traces = trainer.collect_traces(trainer.student)
    # Round 1 runs all 10 examples; rounds 2 and 3 rerun the failing ones, each call generated anew (a cached answer
    # would not reach the engine).
    failing = len(trainer.trainset) - setosa
    assert trainer.runner.local_calls == len(trainer.trainset) + 2 * failing
    assert trainer._step_stats.requests == len(trainer.trainset) + 2 * failing
    assert (traces.summary.total, traces.kept, len(traces.dataset)) == (10, setosa, setosa)


class Interrupt(Exception):
    pass


class InterruptTraining(TrainerCallback):
    """Kills the run in the middle of the n-th fine-tuning run."""

    def __init__(self, nth):
        self.nth, self.runs = nth, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.runs += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.runs == self.nth:
            raise Interrupt


def test_resume_continues_after_the_last_completed_step(format_model, format_model_state, tokenizer, tmp_path):
    from conftest import tiny_model

    strategy = "p -> w -> w"
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    make_trainer(format_model, tokenizer, config(reference_dir, strategy)).train()

    def fresh_model():
        model = tiny_model(tokenizer)
        model.load_state_dict(format_model_state)
        return model

    with pytest.raises(Interrupt):
        make_trainer(fresh_model(), tokenizer, config(resumed_dir, strategy),
                     callbacks=[InterruptTraining(nth=2)]).train()
    state = json.loads((resumed_dir / STATE_FILE).read_text())
    assert [s["kind"] for s in state["steps"]] == ["vanilla", "p", "w"]  # step 3 was interrupted
    completed = {p: p.stat().st_mtime_ns for p in resumed_dir.glob("step_[012]_*/*")}

    resumed = make_trainer(fresh_model(), tokenizer, config(resumed_dir, strategy))
    resumed.train(resume_from_checkpoint=True)
    assert {p: p.stat().st_mtime_ns for p in completed} == completed  # nothing completed was redone

    reference = json.loads((reference_dir / "results.json").read_text())
    result = json.loads((resumed_dir / "results.json").read_text())
    assert [s["kind"] for s in result["steps"]] == ["vanilla", "p", "w", "w"]
    for ours, theirs in zip(result["steps"], reference["steps"]):
        assert ours["val_score"] == theirs["val_score"]
        assert ours["lm_name"] == theirs["lm_name"]  # bit-identical weights at every step
        assert ours["traces_kept"] == theirs["traces_kept"]
    assert (resumed_dir / "program.json").read_text() == (reference_dir / "program.json").read_text()


def test_resume_checks(format_model, tokenizer, tmp_path):
    trainer = make_trainer(format_model, tokenizer, config(tmp_path, "p"))
    with pytest.raises(ValueError, match="no BetterTogether run state"):
        trainer.train(resume_from_checkpoint=True)
    trainer.train()
    other = make_trainer(format_model, tokenizer, config(tmp_path, "w -> p"))
    with pytest.raises(ValueError, match="ran strategy p"):
        other.train(resume_from_checkpoint=True)
