"""Build the fastllm wheel: Python packages, Triton kernels and the compiled `fastllm._C`.

CPU kernels (csrc/cpu) are always compiled. CUDA kernels (csrc/cuda) are compiled only
when the installed torch is a CUDA build and nvcc is found. Target architectures come
from FASTLLM_CUDA_ARCHS (default "8.0;9.0a"). Build without isolation so the extension
is compiled against the torch that is already installed:

    pip install --no-build-isolation .
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_available(torch) -> bool:
    if os.environ.get("FASTLLM_NO_CUDA", "0") == "1" or torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None or shutil.which("nvcc") is not None


def _extensions():
    if os.environ.get("FASTLLM_NO_EXTENSION", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = _rel(
        [os.path.join(ROOT, "csrc", "registration.cpp")]
        + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    cxx = ["-O3", "-fopenmp", "-Wno-unknown-pragmas", "-DFASTLLM_WITH_CPU"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if _cuda_available(torch):
        archs = os.environ.get("FASTLLM_CUDA_ARCHS", "8.0;9.0a")
        # cpp_extension reads the architecture list from this variable.
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_binding.cpp")))
        ext = CUDAExtension(
            "fastllm._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={
                "cxx": cxx + ["-DFASTLLM_WITH_CUDA"],
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "-DFASTLLM_WITH_CUDA"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "fastllm._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    # The Triton kernels live in triton_kernels/ at the top of the tree and install as
    # fastllm.triton_kernels (a bare top-level `triton_kernels` package exists elsewhere):
    # fastllm/triton_kernels is a link to them, so a source checkout imports the same way.
    packages=find_packages(include=["fastllm", "fastllm.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
