#!/usr/bin/env bash
# Set up, then run the main job: ZO-SGD full fine-tuning of SmolLM2-135M on SST-2 under the
# 8gb-gpu profile (emulated on the CPU when there is no CUDA GPU). Extra arguments go to
# `edgezo finetune`, e.g. `bash scripts/run.sh --steps 200 --output runs/quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec edgezo finetune --profile 8gb-gpu "$@"
