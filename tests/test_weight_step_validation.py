"""Validation-guided w steps on the tiny format model: real SFT epochs, real generation at each checkpoint, the best
checkpoint's weights saved and put back.

The case is constructed through the metric: it recognizes which checkpoint's weights serve the program (by their
fingerprint, recorded as training reaches each checkpoint) and passes a set share of the valset for each, so that the
scores of the checkpoints are known in advance and a later checkpoint is worse than an earlier one."""

import json

import pytest
from test_trainer import config, make_trainer
from transformers import TrainerCallback

from bt_trl.serving.engine import weights_fingerprint
from bt_trl.tasks import iris


class CheckpointRecorder(TrainerCallback):
    """Records the fingerprint of the trainable weights at the start of training and at each checkpoint (it runs
    before the trainer's validation, which is added later to the callbacks)."""

    def __init__(self, every_step: bool = False):
        self.every_step = every_step
        self.checkpoints: dict[str, int] = {}  # fingerprint -> checkpoint number (0: the start)
        self.model = None

    def _record(self, model):
        self.model = model
        self.checkpoints.setdefault(weights_fingerprint(model, only_trainable=True), len(self.checkpoints))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if not self.every_step:
            self._record(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_step:
            self._record(model)

    def current(self) -> int:
        """The checkpoint whose weights the model has now (0 before training or for unknown weights)."""
        if self.model is None:
            return 0
        return self.checkpoints.get(weights_fingerprint(self.model, only_trainable=True), 0)


def checkpoint_metric(recorder: CheckpointRecorder, passing_share: dict[int, int]):
    """Every trace passes (the w step has data); on the valset, `passing_share[checkpoint]` of 8 examples pass."""
    def metric(example, prediction, trace=None):
        if trace is not None:
            return True
        return example.index < passing_share.get(recorder.current(), 0)
    return metric


def indexed(examples):
    return [example.copy(index=i) for i, example in enumerate(examples)]


def run_w_step(format_model, tokenizer, tmp_path, recorder, passing_share, **overrides):
    trainer = make_trainer(format_model, tokenizer, config(tmp_path, strategy="w", num_train_epochs=3, **overrides),
                           metric=checkpoint_metric(recorder, passing_share), callbacks=[recorder])
    trainer.valset = indexed(trainer.valset)
    trainer.train()
    return trainer, json.loads((tmp_path / "results.json").read_text())["steps"]


def test_the_w_step_keeps_its_best_checkpoint_when_a_later_epoch_is_worse(format_model, tokenizer, tmp_path):
    recorder = CheckpointRecorder()
    trainer, steps = run_w_step(format_model, tokenizer, tmp_path, recorder, {0: 2, 1: 6, 2: 6, 3: 3})

    w = steps[1]
    assert [score for _, _, score in w["val_curve"]] == [25.0, 75.0, 75.0, 37.5]  # of a tie, the later is kept
    assert [epoch for _, epoch, _ in w["val_curve"]] == [0, 1, 2, 3]
    assert w["kept_checkpoint"] == "epoch 2" and w["val_score"] == 75.0
    # The model ends the step with epoch 2's weights, bit for bit, and the step's folder holds them.
    assert recorder.current() == 2
    assert w["weights_dir"] == "step_1_w" and w["lm_name"] != steps[0]["lm_name"]
    assert not (tmp_path / "step_1_w" / "best_checkpoint").exists()
    assert "kept epoch 2" in (tmp_path / "results.md").read_text()
    assert w["validation_seconds"] > 0
    assert (tmp_path / "results.png").stat().st_size > 0


def test_the_w_step_keeps_its_start_when_no_checkpoint_scores_above_it(format_model, tokenizer, tmp_path):
    recorder = CheckpointRecorder(every_step=True)
    # 10 traces in batches of 4: 3 optimizer steps per epoch, 9 in all; a checkpoint every 4 and at the end.
    trainer, steps = run_w_step(format_model, tokenizer, tmp_path, recorder, {0: 4, 4: 3, 8: 2},
                                weight_step_eval="steps", weight_step_eval_steps=4)

    w = steps[1]
    assert [step for step, _, _ in w["val_curve"]] == [0, 4, 8, 9]
    assert [score for _, _, score in w["val_curve"]] == [50.0, 37.5, 25.0, 0.0]
    assert w["kept_checkpoint"] == "start" and w["val_score"] == steps[0]["val_score"] == 50.0
    assert recorder.current() == 0  # the starting weights are back
    assert w["weights_dir"] == "step_0_vanilla" and w["lm_name"] == steps[0]["lm_name"]
    assert w["weights_version"] == 0
    assert "kept its start weights" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("overrides, message", [
    ({"weight_step_eval": "epochs"}, "weight_step_eval must be one of"),
    ({"weight_step_eval_size": 0}, "weight_step_eval_size must be >= 1"),
    ({"weight_step_eval_steps": 0}, "weight_step_eval_steps must be >= 1"),
])
def test_bad_weight_step_validation_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)


def test_validation_examples_are_a_seeded_sample():
    from bt_trl.steps.validation import validation_examples

    val = iris.load_splits(0, (0, 10, 0))[1]
    assert validation_examples(val, None, 0) == val and validation_examples(val, 20, 0) == val
    sample = validation_examples(val, 4, 0)
    assert len(sample) == 4 and all(example in val for example in sample)
    assert sample == validation_examples(val, 4, 0) != validation_examples(val, 4, 1)
