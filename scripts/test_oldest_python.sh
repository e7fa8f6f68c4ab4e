#!/usr/bin/env bash
# The web and common tests under the oldest Python the project declares (3.10), installed as a
# user would: a fresh venv, the dependencies from pyproject.toml. The web tier never imports
# torch, so the model stack that needs it (torch, accelerate) is left out: no multi-GB download.
#   bash scripts/test_oldest_python.sh [pytest args]   (default: tests/web tests/test_layers.py)
# The interpreter: $PYTHON310, else pyenv's 3.10, else `python3.10` on PATH; none: skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON310:-}"
for candidate in /root/.pyenv/versions/3.10.13/bin/python "$(command -v python3.10 || true)"; do
  [[ -z "$python" && -n "$candidate" && -x "$candidate" ]] && python="$candidate"
done
if [[ -z "$python" ]]; then
  echo "Python 3.10 tests skipped: no Python 3.10 interpreter found"
  exit 0
fi
venv=.venv-py310
rm -rf "$venv"
"$python" -m venv "$venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pyproject.toml read by the project's own venv (3.11+: tomllib), so the list never drifts.
requirements=$(.venv/bin/python - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
needs_torch = {"torch", "accelerate"}
web_tests = {"pytest", "requests", "schemathesis"}  # what tests/web imports beyond the service
name = lambda spec: re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower()
specs = [s for s in project["dependencies"] if name(s) not in needs_torch]
specs += [s for s in project["optional-dependencies"]["test"] if name(s) in web_tests]
print("\n".join(specs))
EOF
)
mapfile -t specs <<<"$requirements"
"$venv/bin/pip" install -q "${specs[@]}"
"$venv/bin/pip" install -q --no-deps -e .
"$venv/bin/python" --version
"$venv/bin/python" -c "import common.protocol, web.app"
if (($#)); then set -- "$@"; else set -- tests/web tests/test_layers.py; fi
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
