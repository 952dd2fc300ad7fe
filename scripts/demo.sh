#!/usr/bin/env bash
# The main job: p -> w -> p on Iris with the embedded SmolLM2-135M-Instruct (a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# `bt-trl train`, run through the interpreter: a console script just installed may not be on PATH yet (pyenv shims)
python -m bt_trl.cli train --config recipes/iris_quick.yaml "$@"
