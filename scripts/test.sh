#!/usr/bin/env bash
# Set up with the test tools, then lint and run the whole test suite (CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
. .venv/bin/activate
ruff check .
python -m pytest -q "$@"
