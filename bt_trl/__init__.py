"""bt_trl: BetterTogether (prompt + weight optimization of DSPy programs) on Hugging Face TRL's SFTTrainer."""

from .config import BetterTogetherConfig
from .hub import load_program
from .models import EMBEDDED_MODEL, resolve_model_name_or_path
from .strategy import parse_strategy
from .trainer import BetterTogetherTrainer

__all__ = [
    "BetterTogetherConfig",
    "BetterTogetherTrainer",
    "EMBEDDED_MODEL",
    "load_program",
    "parse_strategy",
    "resolve_model_name_or_path",
]
__version__ = "0.1.0"
