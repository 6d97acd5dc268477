"""Without the compiled extension, `import fastllm` still works, warns once, and every
op falls back to its reference."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import fastllm
    import fastllm.ops
import torch
assert not fastllm.extension_available()
messages = [str(w.message) for w in caught if "fastllm._C" in str(w.message)]
assert len(messages) == 1, messages
x, w = torch.randn(3, 10), torch.randn(10)
torch.testing.assert_close(fastllm.ops.rms_norm(x, w), fastllm.ops.rms_norm_reference(x, w))
assert fastllm.ops.choose("rms_norm", x.device, native_op="rms_norm_fwd") == "reference"
try:
    fastllm.ops.rms_norm(x, w, backend="native")
except RuntimeError as exc:
    assert "not loaded" in str(exc), exc
else:
    raise AssertionError("backend='native' without the extension must fail")
print("ok")
"""


def test_import_without_extension_warns_once_and_falls_back():
    env = dict(os.environ, FASTLLM_DISABLE_EXTENSION="1", FASTLLM_BACKEND="")
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
