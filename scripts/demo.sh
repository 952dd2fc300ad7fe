#!/usr/bin/env bash
# The main job: p -> w -> p on Iris with the embedded SmolLM2-135M-Instruct (a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python scripts/train.py --config recipes/iris_quick.yaml "$@"
