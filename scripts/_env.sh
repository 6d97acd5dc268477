# Sourced by the set-up scripts: create .venv (once) and build fastllm into it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY="$PWD/.venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q -r "requirements/${FASTLLM_REQUIREMENTS:-base}.txt"
# Build against the torch just installed (an isolated build would fetch another torch).
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VPY" -m pip install -q --no-build-isolation --no-deps -e .
