#!/usr/bin/env bash
# The GPU checks, in one run on a lent GPU machine (random weights: it has no model files):
# the engine tests (the CUDA-graph ones run there), then the batching benchmark at 32 x 64,
# at batch 1, and the 1B-class comparison. Logs and results go to $OUT (or bench/results).
#   here:  bash scripts/gpu_wheels.sh
#   there: bash scripts/gpu_check.sh        (carry .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-bench/results}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi -L | tee "$out/gpu.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$out/gpu.txt"
card=$(python3 -c 'import torch; print(torch.cuda.get_device_name().split()[1].lower())')
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/engine 2>&1 | tail -15 | tee "$out/engine-tests.log"
bench() { timeout "$1" python3 -m bench.batching --device cuda --random-weights --rounds 1 "${@:2}" 2>&1 | grep -v Warning | tee -a "$out/bench.log"; }
bench 240 --name "$card" --naive-requests 4 --skip mixed
bench 90 --name "$card-batch1" --requests 1 --new-tokens 128 --skip naive service
bench 150 --name "$card-1b" --architecture llama-3.2-1b --requests 64 --skip naive service
cp bench/results/batching-"$card"*.json "$out"/ 2>/dev/null
exit 0
