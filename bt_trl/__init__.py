"""bt_trl: BetterTogether (prompt + weight optimization of DSPy programs) on Hugging Face TRL's SFTTrainer.

The public names load their module on first use (as `transformers` and `trl` do), so that importing the config does
not import the serving stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

_EXPORTS = {
    "BetterTogetherConfig": "bt_trl.config",
    "BetterTogetherTrainer": "bt_trl.trainer",
    "BetterTogetherCallback": "bt_trl.callbacks",
    "lm": "bt_trl.integrations.dspy_lm",
    "load_dspy_program": "bt_trl.integrations.dspy_lm",
    "load_program": "bt_trl.integrations.hub",
    "EMBEDDED_MODEL": "bt_trl.serving.models",
    "resolve_model_name_or_path": "bt_trl.serving.models",
    "parse_strategy": "bt_trl.steps.strategy",
    "structured_adapter": "bt_trl.serving.structured",
    "end_job": "bt_trl.core.ranks",
}
__all__ = [
    "EMBEDDED_MODEL", "BetterTogetherCallback", "BetterTogetherConfig", "BetterTogetherTrainer", "end_job", "lm",
    "load_dspy_program", "load_program", "parse_strategy", "resolve_model_name_or_path", "structured_adapter",
]
if TYPE_CHECKING:
    from bt_trl.callbacks import BetterTogetherCallback
    from bt_trl.config import BetterTogetherConfig
    from bt_trl.core.ranks import end_job
    from bt_trl.integrations.dspy_lm import lm, load_dspy_program
    from bt_trl.integrations.hub import load_program
    from bt_trl.serving.models import EMBEDDED_MODEL, resolve_model_name_or_path
    from bt_trl.serving.structured import structured_adapter
    from bt_trl.steps.strategy import parse_strategy
    from bt_trl.trainer import BetterTogetherTrainer


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bt_trl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
