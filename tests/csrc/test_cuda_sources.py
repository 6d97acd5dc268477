"""CUDA sources compile where nothing CUDA can run: every torch-free kernel file under
csrc/cuda/*.cu is compiled with nvcc for sm_80 and sm_90a, and every torch binding is
syntax-checked as C++17 against the installed torch headers. Needs nvcc (present on the
development and CI machines); a compile error fails the test."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch.utils.cpp_extension as cpp_ext

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
BINDINGS = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_binding.cpp")))
NVCC = shutil.which("nvcc")
if NVCC is None and os.environ.get("CUDA_HOME"):
    NVCC = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _cuda_include() -> str:
    """The CUDA toolkit's include directory (nvcc may be a wrapper outside the toolkit)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "/usr/local/cuda"]
    for home in filter(None, homes):
        if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.join(home, "include")
    pytest.fail("cuda_runtime_api.h not found: set CUDA_HOME to the CUDA toolkit")


def test_there_are_cuda_sources():
    assert KERNELS and BINDINGS


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("path", KERNELS, ids=os.path.basename)
def test_kernel_file_compiles(path, arch, tmp_path):
    out = subprocess.run(
        [NVCC, "-std=c++17", f"-arch={arch}", "-cubin", "-O3", "-Xptxas", "-v",
         "-I", os.path.join(ROOT, "csrc", "include"), path, "-o", str(tmp_path / "k.cubin")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr


@needs_nvcc
@pytest.mark.parametrize("path", BINDINGS, ids=os.path.basename)
def test_binding_is_valid_cpp17(path, tmp_path):
    # The CPU torch wheel ships c10/cuda headers but not the generated macros header.
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [str(tmp_path), os.path.join(ROOT, "csrc", "include"), _cuda_include(),
                sysconfig.get_paths()["include"]] + cpp_ext.include_paths()
    cmd = [os.environ.get("CXX", "g++"), "-std=c++17", "-fsyntax-only", "-w"]
    cmd += [f"-I{p}" for p in includes] + [path]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
