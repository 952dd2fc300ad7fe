"""BetterTogether strategies: chains of prompt (`p`) and weight (`w`, `grpo`) optimization steps, as `p -> w -> p`."""

from __future__ import annotations

PROMPT_STEP = "p"
WEIGHT_STEP = "w"
GRPO_STEP = "grpo"
STEP_NAMES = {PROMPT_STEP: "prompt optimization", WEIGHT_STEP: "weight optimization (fine-tuning)",
              GRPO_STEP: "weight optimization (GRPO on the program's metric)"}
SEPARATOR = "->"


def parse_strategy(strategy: str) -> list[str]:
    """`"p -> w -> p"` → `["p", "w", "p"]`. Raises ValueError naming the offending part."""
    if not isinstance(strategy, str) or not strategy.strip():
        raise ValueError(f"strategy must be a non-empty string such as 'p -> w -> p', got {strategy!r}")
    steps = [part.strip() for part in strategy.split(SEPARATOR)]
    for position, step in enumerate(steps, start=1):
        if not step:
            raise ValueError(
                f"strategy {strategy!r}: step {position} is empty; steps are separated by '{SEPARATOR}', "
                "as in 'p -> w -> p'"
            )
        if step not in STEP_NAMES:
            hint = " (separate steps with '->')" if len(step) > 1 and set(step) <= set(STEP_NAMES) | {" ", ",", ">"} \
                else ""
            raise ValueError(
                f"strategy {strategy!r}: unknown step {step!r} at position {position}{hint}; "
                f"known steps: {', '.join(f'{k!r} = {v}' for k, v in STEP_NAMES.items())}"
            )
    return steps
