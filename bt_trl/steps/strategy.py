"""BetterTogether strategies: chains of named steps, written `p -> w -> p`. A step name is a prompt step (a DSPy
teleprompter: `p`, `gepa`, `mipro`, `simba`, or one of the user's own) or a weight step (`w`, `sft`, `grpo`)."""

from __future__ import annotations

import re
from collections.abc import Collection

PROMPT_STEP = "p"
WEIGHT_STEP = "w"
VANILLA = "vanilla"  # step 0: the initial program, scored; not a name a strategy can use
PROMPT_STEPS = {
    PROMPT_STEP: "prompt optimization (BootstrapFewShotWithRandomSearch, or the trainer's prompt_optimizer)",
    "gepa": "prompt optimization with dspy.GEPA (reflecting with the served model)",
    "mipro": "prompt optimization with dspy.MIPROv2 (auto='light')",
    "simba": "prompt optimization with dspy.SIMBA",
}
GRPO_STEP = "grpo"
WEIGHT_STEPS = {WEIGHT_STEP: "weight optimization (SFT on the program's passing traces)", "sft": "the same as 'w'",
                GRPO_STEP: "weight optimization (GRPO on the program's metric, mmGRPO's per-module groups)"}
STEP_NAMES = PROMPT_STEPS | WEIGHT_STEPS
SEPARATOR = "->"
# A step's name is also its folder's suffix (`step_2_gepa`) and, joined with '-', a `bt-trl reproduce` folder.
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def is_weight_step(name: str) -> bool:
    """Whether step `name` fine-tunes the weights; every other strategy step optimizes prompts."""
    return name in WEIGHT_STEPS


def is_prompt_step(name: str) -> bool:
    """Whether step `name` (a step result's `kind`, "vanilla" included) optimized prompts."""
    return name != VANILLA and not is_weight_step(name)


def check_step_name(name: str, owner: str) -> None:
    """A name `owner` (such as `prompt_optimizers`) gives a prompt optimizer: well formed, and not a weight step's."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"{owner}: step name {name!r} must be letters, digits and '_', starting with a letter")
    if is_weight_step(name) or name == VANILLA:
        reserved = ", ".join(map(repr, [*WEIGHT_STEPS, VANILLA]))
        raise ValueError(f"{owner}: {name!r} names {'a weight step' if is_weight_step(name) else 'step 0'}, not a "
                         f"prompt optimizer; pick another name (reserved: {reserved})")


def check_prompt_step(name: str, prompt_steps: Collection[str], owner: str) -> None:
    """`owner` (such as the callback's `prompt_step`) names a prompt step: a built-in one or one of `prompt_steps`."""
    known = ", ".join(map(repr, dict.fromkeys([*PROMPT_STEPS, *prompt_steps])))
    if is_weight_step(name):
        raise ValueError(f"{owner}={name!r} is a weight step; it must name a prompt step: {known}")
    if name not in PROMPT_STEPS and name not in prompt_steps:
        raise ValueError(f"{owner}={name!r} is not a known prompt step; known: {known} (a prompt optimizer of your "
                         "own is named in prompt_optimizers=)")


def known_steps(prompt_steps: Collection[str] = ()) -> str:
    """The step names a strategy may use, for error messages."""
    own = [f"{name!r} = a prompt optimizer of yours" for name in prompt_steps if name not in STEP_NAMES]
    return ", ".join([*(f"{k!r} = {v}" for k, v in STEP_NAMES.items()), *own])


def parse_strategy(strategy: str, prompt_steps: Collection[str] | None = ()) -> list[str]:
    """`"p -> w -> p"` → `["p", "w", "p"]`. Raises ValueError naming the offending part.

    A step is a built-in name (`STEP_NAMES`) or one of `prompt_steps`, the names of the user's own prompt optimizers.
    `prompt_steps=None` accepts any well-formed name as one (`BetterTogetherConfig`, which does not see the
    optimizers given to the trainer or the callback: they check the names again)."""
    if not isinstance(strategy, str) or not strategy.strip():
        raise ValueError(f"strategy must be a non-empty string such as 'p -> w -> p', got {strategy!r}")
    steps = [part.strip() for part in strategy.split(SEPARATOR)]
    for position, step in enumerate(steps, start=1):
        if not step:
            raise ValueError(
                f"strategy {strategy!r}: step {position} is empty; steps are separated by '{SEPARATOR}', "
                "as in 'p -> w -> p'"
            )
        if step in STEP_NAMES or (NAME.fullmatch(step) and (prompt_steps is None or step in prompt_steps)):
            continue
        hint = " (separate steps with '->')" if len(step) > 1 and set(step) <= set(STEP_NAMES) | {" ", ",", ">"} \
            else ""
        own = ("; a prompt optimizer of your own is named in prompt_optimizers= (trainer or callback) or in "
               "BetterTogetherConfig.prompt_optimizers") if prompt_steps is not None else ""
        raise ValueError(
            f"strategy {strategy!r}: unknown step {step!r} at position {position}{hint}; "
            f"known steps: {known_steps(prompt_steps or ())}{own}"
        )
    return steps
