#!/usr/bin/env bash
# One-shot GPU benchmark for a lent GPU (under 5 minutes on one H100/H200): on SmolLM2-135M
# and a ~1B Llama (random weights, built here, no download), N = 1, 4, 16, 64 adapters:
# fused vs sequential steps, MFU, peak memory (bench/bench_scale.py); then the fused-step
# bars of bench/bench_fused.py on SmolLM2-135M; then sampling: 64 concurrent samplers x 256
# tokens over 8 adapters through a real server, against `vllm serve` when vLLM is installed
# (bench/bench_sampling.py). Results land in $OUT (or bench_results/).
#
#   bash bench/gpu.sh                      # on the GPU
#   bash bench/gpu.sh --device cpu --quick # a smoke run here: builtin-tiny, tiny settings
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
quick=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --quick) quick=(--quick); shift ;;
    *) echo "usage: bash bench/gpu.sh [--device cuda|cpu] [--quick]" >&2; exit 2 ;;
  esac
done
out="${OUT:-bench_results}"
cache="${THINKER_CACHE_DIR:-$HOME/.cache/thinker}"
mkdir -p "$out"

if [ "$device" != "cpu" ]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

python3 bench/bench_scale.py --device "$device" "${quick[@]}" --cache-dir "$cache" --out "$out"

if [ ${#quick[@]} -gt 0 ]; then
  fused=(--model builtin-tiny --adapters 4 --max-len 64 --optim-adapters 4 --reps 1
         --memory-model builtin-tiny --memory-adapters 4 --memory-rank 8 --memory-max-len 64)
else
  fused=(--model smollm2-135m --memory-model llama-1b --memory-layers 16)
fi
python3 bench/bench_fused.py --device "$device" "${fused[@]}" --cache-dir "$cache" --out "$out"

# Sampling: 64 concurrent one-prompt requests over 8 rank-8 adapters, 256 new tokens each.
if [ ${#quick[@]} -gt 0 ]; then
  sampling=(--model builtin-tiny --max-tokens 16 --reps 1)
else
  sampling=(--model smollm2-135m --max-tokens 256 --reps 2)
fi
python3 bench/bench_sampling.py --device "$device" --workloads "64 samplers" --quiet-only "${sampling[@]}" \
  --cache-dir "$cache" | tee "$out/sampling.txt"
