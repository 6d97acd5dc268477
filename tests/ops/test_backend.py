"""The one backend chooser: resolved once per (op, device, backend) and cached."""

from __future__ import annotations

import pytest
import torch

import fastllm
from fastllm.ops import _backend

CPU = torch.device("cpu")
needs_extension = pytest.mark.skipif(not fastllm.extension_available(), reason="fastllm._C is not built")


def test_choice_is_cached_until_cleared(backend_env, monkeypatch):
    backend_env("reference")
    assert _backend.choose("rms_norm", CPU, native_op="rms_norm_fwd") == "reference"
    # The variable is read when a choice is resolved, not on every call ...
    monkeypatch.setenv("FASTLLM_BACKEND", "bogus")
    assert _backend.choose("rms_norm", CPU, native_op="rms_norm_fwd") == "reference"
    # ... and again after clear_cache().
    _backend.clear_cache()
    with pytest.raises(ValueError, match="FASTLLM_BACKEND: expected one of"):
        _backend.choose("rms_norm", CPU, native_op="rms_norm_fwd")


def test_cache_is_keyed_by_op_device_and_backend(backend_env):
    backend_env(None)
    auto = _backend.choose("rms_norm", CPU, native_op="rms_norm_fwd")
    assert _backend.choose("rms_norm", CPU, "reference", native_op="rms_norm_fwd") == "reference"
    assert _backend.choose("rms_norm", CPU, native_op="rms_norm_fwd") == auto
    assert _backend.choose("no_such_op", CPU, native_op="no_such_kernel") == "reference"


@needs_extension
def test_ops_without_triton_fall_back_from_the_variable_but_not_from_an_argument(backend_env):
    backend_env("triton")
    assert _backend.choose("sample", CPU, native_op="sample_tokens", cuda_order=("native",),
                           has_triton=False) == "native"
    with pytest.raises(RuntimeError, match="sample: backend 'triton' is unavailable: this op has no Triton kernel"):
        _backend.choose("sample", CPU, "triton", native_op="sample_tokens", has_triton=False)


def test_bad_backend_argument_is_named():
    with pytest.raises(ValueError, match="backend: expected one of"):
        _backend.choose("rms_norm", CPU, "fast", native_op="rms_norm_fwd")


def test_unavailable_forced_backend_says_why():
    with pytest.raises(RuntimeError, match="rms_norm: backend 'native' is unavailable on cpu: .*no_such_kernel"):
        _backend.choose("rms_norm", CPU, "native", native_op="no_such_kernel")
