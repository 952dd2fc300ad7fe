"""The grpo step: rollouts from the tiny format model, mmGRPO's groups, TRL's GRPO loss, and a trainer run."""

import dataclasses
import json
import os

import datasets
import dspy
import pytest
import torch
from conftest import TwoStepIris, tiny_model
from peft import LoraConfig
from safetensors.torch import load_file
from test_trainer import config, make_trainer
from test_weight_step_validation import CheckpointRecorder, indexed
from trl import GRPOConfig, GRPOTrainer

from bt_trl import BetterTogetherConfig, BetterTogetherTrainer
from bt_trl.core.runner import ProgramRunner
from bt_trl.serving.engine import GenerationSettings, TransformersBackend, serving_lm
from bt_trl.steps.grpo import collect_rollouts, completion_logps, group_advantages, group_rollouts, grpo_compute_loss
from bt_trl.tasks import iris

SETTINGS = GenerationSettings(max_tokens=48, max_batch_size=8)


class RepeatingTwoStep(TwoStepIris):
    """TwoStepIris whose second module runs once in even-numbered rollouts and twice in odd ones: a module called a
    variable number of times."""

    def forward(self, petal_length, petal_width, sepal_length, sepal_width):
        size = self.judge_size(petal_length=petal_length, petal_width=petal_width).size
        for _ in range(1 + dspy.settings.lm.kwargs["rollout_id"] % 2):
            prediction = self.classify(size=size, sepal_length=sepal_length)
        return prediction


def rollouts(model, tokenizer, program, metric, examples, num_generations, settings=SETTINGS):
    with serving_lm(TransformersBackend(model.eval(), tokenizer), "grpo-test", settings) as lm:
        return collect_rollouts(ProgramRunner(metric), program, examples, lm, num_generations, temperature=1.0)


def test_groups_per_module_and_invocation_truncated_to_the_fewest_calls(format_model, tokenizer):
    train, _, _ = iris.load_splits(0, (3, 0, 0))
    program = RepeatingTwoStep()

    def calls_made(example, prediction, trace=None):  # 2 in even rollouts, 3 in odd ones: variance in every group
        return len(trace)

    grouped = group_rollouts(program, rollouts(format_model, tokenizer, program, calls_made, train, 4), -1.0)
    stats = grouped.stats
    # Per example: judge_size at invocation 0, classify at invocation 0; the odd rollouts' second classify call is
    # past the fewest (one) and left out.
    assert (stats.rollouts, stats.groups, stats.no_variance, stats.truncated_calls) == (12, 6, 0, 6)
    assert len(grouped.rows) == 6 * 4 and len(grouped.training_rows()) == 24
    keys = [(row["example"], row["module"], row["invocation"]) for row in grouped.rows]
    assert sorted(set(keys)) == [(e, m, 0) for e in range(3) for m in ("classify", "judge_size")]
    assert all(keys.count(key) == 4 for key in set(keys))

    expected = group_advantages([2.0, 3.0, 2.0, 3.0])
    assert expected[0] == pytest.approx(-expected[1]) and expected[0] < 0
    for row in grouped.rows:
        assert row["reward"] == 2 + row["rollout"] % 2
        assert row["advantage"] == pytest.approx(expected[row["rollout"]])
        system, completion = row["prompt"][0]["content"], row["completion"][0]["content"]
        if row["module"] == "judge_size":
            assert "`petal_width`" in system and "[[ ## size ## ]]" in completion
        else:
            assert "`petal_width`" not in system and "[[ ## answer ## ]]" in completion
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]  # no demos


def test_groups_without_reward_variance_are_skipped_and_counted(format_model, tokenizer):
    train, _, _ = iris.load_splits(0, (3, 0, 0))
    first = train[0]

    def varies_on_first(example, prediction, trace=None):
        return len(prediction.answer) if example is first else 1.0

    program = TwoStepIris()  # its answer is free text: samples of different lengths
    grouped = group_rollouts(program, rollouts(format_model, tokenizer, program, varies_on_first, train, 4), -1.0)
    stats = grouped.stats
    assert stats.format_failures == 0, "the format model writes DSPy's format"
    lengths = {row["reward"] for row in grouped.rows if row["example"] == 0}
    assert len(lengths) > 1, f"4 samples of one answer at temperature 1 were all {lengths}"
    assert (stats.groups, stats.no_variance, stats.trained) == (6, 4, 2)
    assert all((row["advantage"] is None) == (row["example"] != 0) for row in grouped.rows)
    assert len(grouped.training_rows()) == 2 * 4


def test_format_failures_are_rewarded_below_wrong_answers(format_model, tokenizer):
    train, _, _ = iris.load_splits(0, (2, 0, 0))
    program = TwoStepIris()

    def never(example, prediction, trace=None):
        return False

    wrong = rollouts(format_model, tokenizer, program, never, train, 2)
    # An untrained model generating freely writes noise that DSPy cannot parse.
    noise = tiny_model(tokenizer, seed=1)
    unparsed = rollouts(noise, tokenizer, program, never, train, 2, dataclasses.replace(SETTINGS, structured=False))
    grouped = group_rollouts(program, [w + u for w, u in zip(wrong, unparsed)], format_failure_score=-1.0)

    stats = grouped.stats
    assert stats.format_failures == 4 and stats.unscored == 0
    # The noise stopped each program at judge_size: classify has no call in half the rollouts, so no group.
    assert stats.groups == 2 and stats.trained == 2 and stats.truncated_calls == 4
    for example in range(2):
        rows = {row["rollout"]: row for row in grouped.rows if row["example"] == example}
        assert [rows[k]["reward"] for k in range(4)] == [0.0, 0.0, -1.0, -1.0]
        assert min(rows[k]["advantage"] for k in (0, 1)) > 0 > max(rows[k]["advantage"] for k in (2, 3))
        # The failing call is trained on as the module saw it, with the text it wrote.
        assert rows[2]["module"] == "judge_size" and rows[2]["prompt"] == rows[0]["prompt"]
        assert rows[2]["completion"][0]["content"] == unparsed[example][0].unparsed_output
        assert "[[ ## completed ## ]]" not in rows[2]["completion"][0]["content"]


def test_loss_and_advantages_are_grpo_trainers(tokenizer, tmp_path):
    """On one batch generated and scored by a real `GRPOTrainer` (default loss type, β = 0): the same advantages,
    per-token log-probs, loss and gradients, with the ratio clipped on some tokens."""
    temperature = 0.7
    rewards = [1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 2.0, 2.0]  # the second group has no variance
    prompts = [[{"role": "user", "content": "Name a flower."}], [{"role": "user", "content": "Name a colour."}]]
    args = GRPOConfig(str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                      temperature=temperature, use_cpu=True, bf16=False, report_to="none")
    assert (args.loss_type, args.beta, args.scale_rewards) == ("dapo", 0.0, "group")
    trainer = GRPOTrainer(model=tiny_model(tokenizer), reward_funcs=lambda completions, **kwargs: rewards,
                          args=args, train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
                          processing_class=tokenizer)
    model = trainer.model.eval()
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(4)])

    assert batch["advantages"][:4].tolist() == pytest.approx(group_advantages(rewards[:4]), abs=1e-6)
    assert group_advantages(rewards[4:]) is None and batch["advantages"][4:].tolist() == [0.0] * 4

    mask = batch["completion_mask"]
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], mask], dim=1)
    with torch.no_grad():
        trl_logps, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, mask.size(1))
        logps = completion_logps(model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], mask,
                                 temperature)
    assert torch.allclose(logps * mask, trl_logps * mask, atol=1e-5)

    # Rollout-time log-probs away from the current ones, so that the clipping range matters.
    shift = (torch.rand(mask.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * 1.0
    batch["old_per_token_logps"] = logps + shift
    assert ((shift.abs() > 0.2) & (mask == 1)).any()

    def loss_and_gradients(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    trl_loss, trl_grads = loss_and_gradients(lambda: trainer._compute_loss(model, batch))
    loss, grads = loss_and_gradients(lambda: grpo_compute_loss(trainer, temperature, model, batch,
                                                               num_items_in_batch=batch["num_items_in_batch"]))
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-7) and trl_loss.item() != 0
    assert len(grads) == len(trl_grads) > 0
    assert all(torch.allclose(g, t, rtol=1e-4, atol=1e-7) for g, t in zip(grads, trl_grads))


def test_grpo_strategy_trains_the_weights_and_saves_the_rollouts(format_model, tokenizer, tmp_path):
    train, val, _ = iris.load_splits(0, (3, 2, 0))

    def graded(example, prediction, trace=None):  # right answers first; among them, shorter reasoning better
        return dspy.Prediction(score=iris.metric(example, prediction) - len(prediction.reasoning) / 1000)

    args = BetterTogetherConfig(
        str(tmp_path), strategy="grpo", report_to="none", generation_max_tokens=48, num_threads=8,
        grpo_num_generations=4, num_train_epochs=1, per_device_train_batch_size=6, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", max_length=1024, seed=0, weight_step_eval="no",
    )
    trainer = BetterTogetherTrainer(
        model=format_model, args=args, program=iris.program(), metric=graded, trainset=train, valset=val,
        processing_class=tokenizer, peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    trainer.train()

    steps = json.loads((tmp_path / "results.json").read_text())["steps"]
    assert [s["kind"] for s in steps] == ["vanilla", "grpo"]
    assert steps[1]["weights_dir"] == "step_1_grpo" and steps[0]["lm_name"] != steps[1]["lm_name"]
    assert steps[1]["first_loss"] is not None and steps[1]["last_loss"] is not None
    before = load_file(os.path.join(tmp_path, "step_0_vanilla", "adapter_model.safetensors"))
    after = load_file(os.path.join(tmp_path, "step_1_grpo", "adapter_model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)

    rows = [json.loads(line) for line in (tmp_path / "step_1_grpo" / "grpo_rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4  # one module, 3 examples, 4 rollouts
    assert {(row["example"], row["rollout"]) for row in rows} == {(e, k) for e in range(3) for k in range(4)}
    assert all(row["module"] == "predict" and row["round"] == 0 for row in rows)
    assert any(row["advantage"] is not None for row in rows)
    (round_stats,) = json.loads((tmp_path / "step_1_grpo" / "grpo_stats.json").read_text())
    assert round_stats["rollouts"] == 12 and round_stats["groups"] == 3 and len(round_stats["losses"]) == 2


def test_grpo_step_validated_over_its_rounds_ends_on_the_best_checkpoint(format_model, tokenizer, tmp_path):
    recorder = CheckpointRecorder()
    passing_share = {0: 2, 1: 6, 2: 3}  # of 8 val examples, per checkpoint: round 1's epoch is the best

    def metric(example, prediction, trace=None):
        if trace is not None:  # a rollout: shorter reasoning is better, so that groups have reward variance
            return -len(prediction.reasoning) / 1000
        return example.index < passing_share.get(recorder.current(), 0)

    # At temperature 2 the tiny model's samples differ, so that both rounds have groups with reward variance.
    trainer = make_trainer(format_model, tokenizer, config(tmp_path, strategy="grpo", grpo_rounds=2,
                                                           grpo_num_generations=4, grpo_temperature=2.0,
                                                           num_train_epochs=1),
                           metric=metric, callbacks=[recorder])
    trainer.trainset = trainer.trainset[:4]
    trainer.valset = indexed(trainer.valset)
    trainer.train()

    grpo = json.loads((tmp_path / "results.json").read_text())["steps"][1]
    stats = json.loads((tmp_path / "step_1_grpo" / "grpo_stats.json").read_text())
    assert [r["round"] for r in stats] == [0, 1] and all(r["losses"] for r in stats)
    assert [score for _, _, score in grpo["val_curve"]] == [25.0, 75.0, 37.5]
    assert [epoch for _, epoch, _ in grpo["val_curve"]] == [0, 1, 2]  # counted over the rounds
    steps_per_round = grpo["val_curve"][1][0]
    assert 0 < steps_per_round < grpo["val_curve"][2][0]  # round 2 counted on from round 1
    assert grpo["kept_checkpoint"] == "epoch 1" and grpo["val_score"] == 75.0
    assert recorder.current() == 1  # round 1's weights, put back after round 2 trained on
    assert not (tmp_path / "step_1_grpo" / "best_checkpoint").exists()
