#!/usr/bin/env bash
# Build a wheel, install it into a fresh venv outside the source tree, and run an op there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m pip wheel -q --no-build-isolation --no-deps . -w "$work/dist"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q torch==2.13.0 "numpy<2.4"
"$work/venv/bin/python" -m pip install -q "$work"/dist/fastllm-*.whl
cd "$work"
"$work/venv/bin/python" - <<'PY'
import torch, fastllm
assert fastllm.extension_available(), fastllm._extension.load_error()
import fastllm.triton_kernels  # shipped inside the wheel
assert "site-packages" in fastllm.__file__, fastllm.__file__
x, w = torch.randn(4, 33), torch.randn(33)
y = torch.ops.fastllm.rms_norm(x, w, 1e-6, "native")
torch.testing.assert_close(y, fastllm.ops.rms_norm_reference(x, w))
from fastllm.data import load_corpus, load_instructions, load_preferences  # package data
assert len(load_corpus("botchan")) == 12 and len(load_instructions()) == 2025
assert len(load_preferences()) == 1957
print("wheel ok:", fastllm.__file__)
PY
