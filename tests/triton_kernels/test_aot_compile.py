"""Every Triton kernel compiles for the GPUs we target, in every variant its launcher can
choose, without a GPU: `triton.compile` for sm_80 (A100) and sm_90 (H100/H200) down to a cubin
(Triton ships ptxas), with the launch's num_warps/num_stages. A variant fails when it does not
compile or when its shared memory exceeds what one block may use on that card (the opt-in
maximum: 163 KiB on sm_80, 227 KiB on sm_90). The variants come from each launcher's
`launch_configs()` (tests/triton_kernels/aot.py says how they are compiled).

Every variant is compiled down to a cubin (ptxas included); none stops at PTX. The compiles run
in one child process without TRITON_INTERPRET (this suite's conftest sets it, and the
interpreter replaces the kernels), in a pool of os.cpu_count() processes. Triton's cache for them
lives outside the checkout, in ~/.cache/fastllm/triton-aot (FASTLLM_AOT_CACHE overrides it), so
a second run takes seconds. Only the test_compiles items selected in a session are compiled
(`-k attn_fwd` compiles the forward attention variants alone).
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from tests.triton_kernels import aot  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPECS = aot.all_specs()
CAPABILITIES = sorted(aot.SHARED_LIMIT)
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fastllm", "triton-aot")


def test_every_kernel_module_is_listed():
    files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "triton_kernels", "*.py"))}
    assert files - {"__init__", "utils"} == set(aot.MODULES)


def test_every_kernel_has_a_launch_config():
    """Each @triton.jit function named *_kernel is launched by some listed variant."""
    defined = set()
    for name in aot.MODULES:
        with open(os.path.join(ROOT, "triton_kernels", f"{name}.py")) as f:
            defined |= set(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", f.read()))
    listed = {aot.kernel_name(spec.kernel) for spec in SPECS.values()}
    assert defined and defined == listed, f"kernels without a launch config: {sorted(defined - listed)}"


@pytest.fixture(scope="module")
def compiled(request):
    """{(spec id, capability): result} for the test_compiles items selected in this session."""
    items = [i for i in request.session.items
             if i.module is sys.modules[__name__] and "key" in getattr(getattr(i, "callspec", None), "params", {})]
    keys = sorted({i.callspec.params["key"] for i in items})
    caps = sorted({i.callspec.params["cc"] for i in items})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["TRITON_CACHE_DIR"] = os.environ.get("FASTLLM_AOT_CACHE", CACHE)
    workers = str(os.cpu_count() or 1)
    proc = subprocess.run([sys.executable, "-m", "tests.triton_kernels.aot", ",".join(map(str, caps)), workers],
                          input="\n".join(keys), capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {}
    for line in proc.stdout.splitlines():
        r = json.loads(line)
        results[(r["id"], r["cc"])] = r
    return results


@pytest.mark.parametrize("cc", CAPABILITIES, ids=lambda c: f"sm_{c}")
@pytest.mark.parametrize("key", list(SPECS), ids=list(SPECS))  # full ids: pytest shortens long strings
def test_compiles(key, cc, compiled):
    r = compiled.get((key, cc))
    assert r is not None, f"{key}: no result for sm_{cc}"
    assert r["error"] is None, f"{key}: does not compile for sm_{cc}: {r['error']}"
    limit = aot.SHARED_LIMIT[cc]
    assert r["shared"] <= limit, (f"{key}: needs {r['shared']} bytes of shared memory per block, "
                                  f"sm_{cc} allows at most {limit}")
    assert r["num_warps"] == SPECS[key].num_warps
