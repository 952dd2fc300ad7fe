"""Validation-guided weight steps: the program, served from the weights being trained, is scored on the valset at
checkpoints of the step's training, and the step keeps its best checkpoint — by default never one scoring below the
weights it started from."""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import TrainerCallback

if TYPE_CHECKING:  # the config imports this module, and must not load DSPy
    import dspy

WEIGHT_STEP_EVALS = ("epoch", "steps", "no")


@dataclass
class Checkpoint:
    """A point of a weight step's training scored on the valset: optimizer step 0 is the weights it started from."""

    step: int
    epoch: float
    score: float

    @property
    def label(self) -> str:
        if self.step == 0:
            return "start"
        return f"epoch {self.epoch:g}" if float(self.epoch).is_integer() else f"step {self.step}"


def validation_examples(valset: list[dspy.Example], size: int | None, seed: int) -> list[dspy.Example]:
    """The valset examples a weight step scores its checkpoints on: all, or a seeded sample of `size`."""
    if size is None or size >= len(valset):
        return list(valset)
    return random.Random(seed).sample(list(valset), size)


class ValidationGuard(TrainerCallback):
    """Scores the program at each checkpoint of one weight step's training (`eval_strategy`: every epoch, or every
    `eval_steps` optimizer steps and at the end) with `score()`, and saves (`save(folder)`) the weights of the best
    checkpoint so far to `checkpoint_dir`. A step of several training runs (a grpo step's rounds) calls `next_run`
    between them: its steps and epochs count on from the last run's. Among equal scores the latest is kept: a tie on
    the valset is no sign that training hurt, and the trained weights are what the step is for. With `keep_start`, the
    starting weights (`start_score`) are kept only when every checkpoint scores below them."""

    def __init__(self, score: Callable[[], float], save: Callable[[str], None], checkpoint_dir: str | Path,
                 start_score: float, eval_strategy: str = "epoch", eval_steps: int = 10, keep_start: bool = True):
        if eval_strategy not in WEIGHT_STEP_EVALS[:2]:
            raise ValueError(f"eval_strategy must be one of {WEIGHT_STEP_EVALS[:2]}, got {eval_strategy!r}")
        self.score, self.save = score, save
        self.checkpoint_dir = Path(checkpoint_dir)
        self.eval_strategy, self.eval_steps = eval_strategy, eval_steps
        self.curve = [Checkpoint(0, 0.0, start_score)]
        self.best: Checkpoint | None = self.curve[0] if keep_start else None
        self.best_saved = False  # whether checkpoint_dir holds the best checkpoint's weights
        self.seconds = 0.0  # spent scoring and saving checkpoints
        self.step_offset, self.epoch_offset = 0, 0.0  # the optimizer steps and epochs of the earlier training runs
        self.final_run = True  # whether no training run follows this one (its last weights stay in the model)

    def next_run(self, state) -> None:
        """Another training run of the same step follows the one that ended in `state`."""
        self.step_offset += state.global_step
        self.epoch_offset += state.epoch or 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if self.eval_strategy == "steps" and state.global_step % self.eval_steps == 0:
            self._validate(state)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.eval_strategy == "epoch":
            self._validate(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.curve[-1].step != self.step_offset + state.global_step:  # the steps after the last checkpoint
            self._validate(state)

    def _validate(self, state) -> None:
        started = time.perf_counter()
        checkpoint = Checkpoint(self.step_offset + state.global_step,
                                round(self.epoch_offset + (state.epoch or 0.0), 2), self.score())
        self.curve.append(checkpoint)
        if self.best is None or checkpoint.score >= self.best.score:
            self.best = checkpoint
            self.best_saved = not (self.final_run and state.global_step >= state.max_steps)  # else left in the model
            if self.best_saved:
                self.save(str(self.checkpoint_dir))
        self.seconds += time.perf_counter() - started

    @property
    def start(self) -> Checkpoint:
        return self.curve[0]

    @property
    def kept(self) -> Checkpoint:
        """The checkpoint the step ends on (the start when training took no optimizer step)."""
        return self.best or self.start

    def remove_checkpoint(self) -> None:
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
