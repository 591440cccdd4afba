#!/usr/bin/env bash
# Create (or update) .venv with everything Stillroom needs: torch==2.13.0 first (the CPU wheel;
# an unpinned torch would pull several GB of CUDA packages), then stillroom with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.13.0
pip install -q -e ".[dev]"
# tinker-cookbook (a test dependency) without its deps: its tml-renderers requirement is not on the
# package index; the dev extra lists the others (docs/tinker_compat.md)
pip install -q --no-deps tinker-cookbook==0.6.1
echo "setup: $(python -c 'import torch, transformers, grpc; print(f"torch {torch.__version__}, transformers {transformers.__version__}, grpcio {grpc.__version__}")')"
