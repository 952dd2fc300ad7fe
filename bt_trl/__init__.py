"""bt_trl: BetterTogether (prompt + weight optimization of DSPy programs) on Hugging Face TRL's SFTTrainer."""

from bt_trl.config import BetterTogetherConfig
from bt_trl.integrations.dspy_lm import lm, load_dspy_program
from bt_trl.integrations.hub import load_program
from bt_trl.serving.models import EMBEDDED_MODEL, resolve_model_name_or_path
from bt_trl.serving.structured import structured_adapter
from bt_trl.steps.strategy import parse_strategy
from bt_trl.trainer import BetterTogetherTrainer

__all__ = [
    "BetterTogetherConfig",
    "BetterTogetherTrainer",
    "EMBEDDED_MODEL",
    "lm",
    "load_dspy_program",
    "load_program",
    "parse_strategy",
    "resolve_model_name_or_path",
    "structured_adapter",
]
__version__ = "0.1.0"
