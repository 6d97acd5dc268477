"""bench/cpu_stream_probe.cpp (the decode step's weight-stream probe, built by hand: see its
header) compiles cleanly with the C++ compiler that builds the extension."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = os.path.join(ROOT, "bench", "cpu_stream_probe.cpp")
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_stream_probe_compiles_without_warnings(tmp_path):
    out = subprocess.run(
        [CXX, "-O2", "-Wall", "-Wextra", "-Werror", "-mavx512f", "-mfma", "-fopenmp", PROBE,
         "-o", str(tmp_path / "probe")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
