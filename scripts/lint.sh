#!/usr/bin/env bash
# Lint and type-check the tree (settings in pyproject.toml): ruff, then basedpyright (pyright in basic
# mode). Exits non-zero on any finding. `ruff check --fix .` repairs the mechanical ones.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/ruff ] && . .venv/bin/activate
status=0
echo "lint: ruff check"
ruff check . || status=1
echo "lint: basedpyright"
basedpyright || status=1
exit $status
