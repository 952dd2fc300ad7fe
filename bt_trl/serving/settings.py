"""How program calls are generated; importing it loads no serving code (the config holds one)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationSettings:
    """How program calls are generated: LM defaults (max tokens, temperature), micro-batching, and whether outputs are
    generated inside their adapter's format (structured generation)."""

    max_tokens: int = 256
    temperature: float = 0.0
    max_batch_size: int = 8
    batch_wait: float = 0.02
    structured: bool = True
