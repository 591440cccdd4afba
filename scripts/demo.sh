#!/usr/bin/env bash
# Set up the environment and run the main job on the embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m stillroom_cookbook.recipes.distillation_demo "$@"
