#!/usr/bin/env bash
# The GPU checks, in one run on a lent GPU machine (random weights: it has no model files); at most
# 560 s of timeouts in all. First the engine tests (the CUDA ones run there: graph vs eager in fp32
# and bf16 on a deterministic batch, overlapped replays, the anchor against generate, --speculate's verify
# graphs against eager verify steps), then the
# batching benchmark: the host step (instant and simulated device), ceiling, engine (with its mixed
# and decode launch times), anchor (replays timed alone), naive, and the service with its mixed
# load (ITL p99) at 32 x 64 (SmolLM2-135M architecture, bf16); the engine at batch 1; the
# Llama-3.2-1B architecture at 64 requests. Every mode runs in its own process group with its own
# timeout (bench/batching.py --mode-timeout) after one warm-up at the measured shape; each mode's
# rows are saved to $OUT as it ends, so a mode that fails or runs out of time loses nothing else.
#   here:  bash scripts/gpu_wheels.sh
#   there: bash scripts/gpu_check.sh        (carry .whl)
# Exits non-zero when any step fails (the engine tests, a benchmark mode), naming them on its
# last line; on a machine without CUDA it checks nothing and says so in one line.
set -uo pipefail
cd "$(dirname "$0")/.."
no_cuda() { echo "gpu_check: no CUDA device on this machine ($1): nothing checked" >&2; exit 2; }
nvidia-smi -L >/dev/null 2>&1 || no_cuda "nvidia-smi finds no GPU"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-bench/results}
mkdir -p "$out"
export BENCH_RESULTS=$out
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || no_cuda "torch sees none"
nvidia-smi -L | tee "$out/gpu.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$out/gpu.txt"
card=$(python3 -c 'import torch; print(torch.cuda.get_device_name().split()[1].lower())')
failed=()
# timeout's own process group: -k kills whatever a test left running after the grace period.
# pipefail: each step's status is its command's, not tail's or tee's.
timeout -k 10 120 python3 -m pytest -q -p no:cacheprovider tests/engine 2>&1 | tail -25 | tee "$out/engine-tests.log" \
  || failed+=("engine tests")
bench() {  # the outer timeout only backs up the per-mode ones; bench.batching exits 1 when a mode failed
  timeout -k 30 "$2" python3 -m bench.batching --device cuda --random-weights --rounds 1 "${@:3}" 2>&1 \
    | { grep -v Warning || true; } | tee -a "$out/bench.log" || failed+=("bench $1")
}
bench "$card" 270 --name "$card" --naive-requests 4 --mode-timeout 110
bench "$card-batch1" 60 --name "$card-batch1" --requests 1 --new-tokens 128 --skip host naive anchor service --mode-timeout 40
bench "$card-1b" 110 --name "$card-1b" --architecture llama-3.2-1b --requests 64 --skip host naive service --mode-timeout 45
if ((${#failed[@]})); then
  echo "gpu_check: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "gpu_check: every step passed"
