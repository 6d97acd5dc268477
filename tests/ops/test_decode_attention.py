"""Decode attention against its reference: every backend, GQA and MHA, ragged lengths
(0, 1, full), odd head dims, float32/float64 tight, bf16/fp16 by the low-precision rule."""

from __future__ import annotations

import math

import pytest
import torch

import fastllm
from fastllm.ops.decode_attention import decode_attention, decode_attention_reference
from tests.conftest import DEVICES, assert_close, assert_lowp_rule

BACKENDS = ["reference"] + (["native"] if fastllm.extension_available() else [])
BACKEND_DEVICE = [(b, d) for d in DEVICES for b in BACKENDS]
# (B, Hq, Hkv, D, Smax); the CPU kernel's vector path takes D % 8 == 0 and G <= 8 (D = 24: a
# head size with an 8-wide tail after the 16-wide steps; G = 12 and D = 20: the generic path),
# on AVX-512 and AVX2 CPUs D = 64 and 128 take the wide body (16 or 8 lanes; G 1-8, lengths
# across several 64-key blocks and with a partial chunk of keys)
SHAPES = [(3, 6, 2, 16, 37), (1, 4, 4, 80, 5), (5, 9, 3, 64, 130), (2, 8, 1, 128, 70), (3, 4, 2, 24, 70),
          (3, 12, 1, 40, 9), (3, 4, 2, 20, 66), (3, 4, 4, 64, 200), (3, 8, 2, 128, 150), (4, 4, 2, 64, 17)]


def _marks(device):
    return [pytest.mark.gpu] if device == "cuda" else []


def _inputs(B, Hq, Hkv, D, S, dtype, device):
    q = torch.randn(B, Hq, D, dtype=dtype, device=device)
    k = torch.randn(B, S, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, S, Hkv, D, dtype=dtype, device=device)
    lengths = torch.randint(1, S + 1, (B,), dtype=torch.int32)
    lengths[0] = S  # the full cache
    if B > 2:
        lengths[1], lengths[2] = 1, 0  # a single key; no key at all (zeros)
    return q, k, v, lengths.to(device)


@pytest.mark.parametrize("backend,device", [pytest.param(b, d, marks=_marks(d)) for b, d in BACKEND_DEVICE])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend, device, shape, dtype):
    if dtype == torch.float64 and device == "cuda" and backend == "native":
        pytest.skip("the CUDA kernel has no float64 variant")
    q, k, v, lengths = _inputs(*shape, dtype, device)
    out = decode_attention(q, k, v, lengths, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, decode_attention_reference(q, k, v, lengths))


def test_reference_equals_sdpa_per_sequence():
    q, k, v, lengths = _inputs(3, 6, 2, 16, 37, torch.float64, "cpu")
    out = decode_attention_reference(q, k, v, lengths)
    for b in range(3):
        n = int(lengths[b])
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        kb = k[b, :n].repeat_interleave(3, dim=1).transpose(0, 1)  # (Hq, n, D)
        vb = v[b, :n].repeat_interleave(3, dim=1).transpose(0, 1)
        want = torch.nn.functional.scaled_dot_product_attention(q[b][:, None], kb, vb)[:, 0]
        torch.testing.assert_close(out[b], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,device", [pytest.param(b, d, marks=_marks(d)) for b, d in BACKEND_DEVICE])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rule(backend, device, dtype):
    q, k, v, lengths = _inputs(5, 9, 3, 64, 130, dtype, device)
    ref32 = decode_attention_reference(q.float(), k.float(), v.float(), lengths)
    lowp = decode_attention_reference(q, k, v, lengths, upcast=False)
    assert_lowp_rule(decode_attention(q, k, v, lengths, backend=backend), lowp, ref32)


def test_only_the_first_lengths_keys_are_read():
    q, k, v, lengths = _inputs(3, 6, 2, 16, 37, torch.float32, "cpu")
    before = decode_attention(q, k, v, lengths)
    past = torch.arange(37)[None, :, None, None] >= lengths.long()[:, None, None, None]
    k2, v2 = k.masked_fill(past, float("nan")), v.masked_fill(past, float("nan"))
    torch.testing.assert_close(decode_attention(q, k2, v2, lengths), before, rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("shape", [(6, 9, 3, 64, 150), (3, 8, 2, 128, 70), (1, 4, 4, 64, 90)])
def test_task_shapes_agree(threads, shape):
    """The CPU kernel's tasks are whole sequences (every kv head) when there are at least two per
    thread, single kv heads otherwise: both against the reference, keys past each length NaN."""
    q, k, v, lengths = _inputs(*shape, torch.float32, "cpu")
    past = torch.arange(shape[-1])[None, :, None, None] >= lengths.long()[:, None, None, None]
    k, v = k.masked_fill(past, float("nan")), v.masked_fill(past, float("nan"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = decode_attention(q, k, v, lengths)
    finally:
        torch.set_num_threads(before)
    want = decode_attention_reference(q, k.nan_to_num(), v.nan_to_num(), lengths)
    assert_close(got, want, torch.float32)


@pytest.mark.skipif(not fastllm.extension_available(), reason="needs fastllm._C")
@pytest.mark.parametrize("shape", [(16, 9, 3, 64, 200), (5, 8, 2, 128, 130)])
def test_threads_taking_each_others_tasks_agree(shape):
    """A thread that is done takes over tasks another has not started (balanced_for): many calls
    on 2-4 threads, with uneven lengths so that threads finish apart, each equal to the
    one-thread result bit for bit."""
    q, k, v, lengths = _inputs(*shape, torch.float32, "cpu")
    op = torch.ops.fastllm.decode_attention_fwd
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(q, k, v, lengths, 0.125)
        for threads in (2, 3, 4):
            torch.set_num_threads(threads)
            for _ in range(30):
                assert torch.equal(op(q, k, v, lengths, 0.125), one)
    finally:
        torch.set_num_threads(before)
    assert_close(one, decode_attention_reference(q, k, v, lengths, 0.125), torch.float32)


def test_custom_scale():
    q, k, v, lengths = _inputs(3, 6, 2, 16, 37, torch.float32, "cpu")
    assert_close(decode_attention(q, k, v, lengths, 0.3), decode_attention_reference(q, k, v, lengths, 0.3))
    assert not torch.allclose(decode_attention(q, k, v, lengths, 0.3), decode_attention(q, k, v, lengths))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, k, v, lengths = _inputs(3, 6, 2, 16, 9, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.fastllm.decode_attention.default, (q, k, v, lengths, 0.25, backend))


@pytest.mark.skipif(not fastllm.extension_available(), reason="needs fastllm._C")
def test_opcheck_native_kernel():
    q, k, v, lengths = _inputs(3, 6, 2, 16, 9, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.fastllm.decode_attention_fwd.default, (q, k, v, lengths, 1 / math.sqrt(16)))


def test_errors_name_the_argument():
    q, k, v, lengths = _inputs(3, 6, 2, 16, 9, torch.float32, "cpu")
    with pytest.raises(TypeError, match="lengths"):
        decode_attention(q, k, v, lengths.long())
    with pytest.raises(ValueError, match="kv heads"):
        decode_attention(q[:, :5], k, v, lengths)
    with pytest.raises(ValueError, match="k_cache"):
        decode_attention(q, k[:2], v[:2], lengths)
    with pytest.raises(RuntimeError, match="Triton"):
        decode_attention(q, k, v, lengths, backend="triton")
    if fastllm.extension_available():
        with pytest.raises(RuntimeError, match="lengths"):
            decode_attention(q, k, v, torch.tensor([1, 10, 2], dtype=torch.int32), backend="native")
