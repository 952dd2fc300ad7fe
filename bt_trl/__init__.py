"""bt_trl: BetterTogether (prompt + weight optimization of DSPy programs) on Hugging Face TRL's SFTTrainer."""

from .config import BetterTogetherConfig
from .dspy_lm import lm, load_dspy_program
from .hub import load_program
from .models import EMBEDDED_MODEL, resolve_model_name_or_path
from .strategy import parse_strategy
from .structured import structured_adapter
from .trainer import BetterTogetherTrainer

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
