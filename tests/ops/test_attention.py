"""Attention: every backend against a float64 reference, outputs and every gradient (q, k, v,
prefix k/v); padded, variable-length, GQA, prefix, padding, causal or not; the bf16/fp16 2x
rule; gradcheck, opcheck, torch.compile, determinism and a tiny-model convergence check.

Triton runs under the interpreter here, so its cases stay small (sequence <= 64); the long
sequences (113, 1000) run on the fast backends only (reference and native on the CPU, every
backend on CUDA).
"""

from __future__ import annotations

import math

import pytest
import torch

from fastllm.ops import attention, attention_lse_reference, attention_reference, attention_varlen_reference
from tests.conftest import DEVICES, assert_close, assert_lowp_rule, compiled_backends

BACKEND_DEVICE = [(b, d) for d in DEVICES for b in compiled_backends(d)]


def _marks(device):
    return [pytest.mark.gpu] if device == "cuda" else []


def _fast(backend, device):
    """Backends that run long sequences in test time (not the Triton interpreter)."""
    return device == "cuda" or backend != "triton"


BD = [pytest.param(b, d, marks=_marks(d), id=f"{b}-{d}") for b, d in BACKEND_DEVICE]
BD_FAST = [pytest.param(b, d, marks=_marks(d), id=f"{b}-{d}") for b, d in BACKEND_DEVICE if _fast(b, d)]

# (B, T, S, Hq, Hkv, D, P, padding): odd lengths, GQA ratios 1/4/8, T != S, prefix keys.
SMALL = [
    (2, 17, 17, 4, 4, 16, 0, False),
    (1, 1, 1, 4, 1, 64, 0, False),
    (2, 33, 20, 8, 1, 16, 0, True),
    (2, 20, 33, 8, 2, 64, 3, True),
    (1, 40, 40, 4, 1, 16, 5, False),
]
LONG = [
    (1, 113, 113, 4, 1, 80, 0, True),
    (2, 113, 113, 8, 2, 96, 7, False),
    (1, 1000, 1000, 2, 2, 64, 0, False),
    (1, 1000, 1000, 4, 1, 128, 16, True),
]
# Under the interpreter Triton runs a subset (length 1, GQA 8 with padding and T != S, GQA 4
# with prefix keys); the varlen tests cover GQA 1 and more odd lengths.
SMALL_INTERPRETED = SMALL[1:4]


def _inputs(case, dtype, device, scale=1.0):
    B, T, S, Hq, Hkv, D, P, padding = case
    g = lambda *shape: (torch.randn(*shape, dtype=torch.float32, device=device) * scale).to(dtype)
    t = {"q": g(B, T, Hq, D), "k": g(B, S, Hkv, D), "v": g(B, S, Hkv, D)}
    if P:
        t["prefix_k"], t["prefix_v"] = g(B, P, Hkv, D), g(B, P, Hkv, D)
    mask = None
    if padding:
        mask = torch.rand(B, S, device=device) > 0.3
        mask[0, :] = False  # a batch row whose keys are all padding (prefix keys stay visible)
    return t, mask, g(B, T, Hq, D)


def _run(fn, tensors, dout):
    """Output and the gradient of every tensor input (order of `tensors`)."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in tensors.items()}
    out = fn(**leaves)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    return [out, *grads]


def _names(tensors):
    return ["out"] + [f"d{n}" for n in tensors]


def _compare_float(case, causal, backend, device, dtype=torch.float32):
    tensors, mask, dout = _inputs(case, dtype, device)
    ours = _run(lambda **t: attention(**t, causal=causal, key_padding_mask=mask, backend=backend), tensors, dout)
    ref = _run(lambda **t: attention_reference(**{n: x.double() for n, x in t.items()}, causal=causal,
                                               key_padding_mask=mask), tensors, dout.double())
    for name, o, r in zip(_names(tensors), ours, ref):
        assert o.dtype == dtype and o.shape == r.shape, name
        assert_close(o, r, msg=f"{name} ({backend}, causal={causal}, case={case})")


@pytest.mark.parametrize("backend,device,case", [
    pytest.param(*bd.values, case, marks=bd.marks, id=f"{bd.id}-{i}")
    for bd in BD for i, case in enumerate(SMALL) if _fast(*bd.values) or case in SMALL_INTERPRETED
])
@pytest.mark.parametrize("causal", [False, True])
def test_float32_matches_float64_reference(backend, device, causal, case, cpu_products):
    _compare_float(case, causal, backend, device)


@pytest.mark.parametrize("backend,device", BD_FAST)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", LONG)
def test_float32_long_sequences(backend, device, causal, case, cpu_products):
    _compare_float(case, causal, backend, device)


def _varlen_inputs(lens, Hq, Hkv, D, P, dtype, device):
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    total = int(cu[-1])
    g = lambda *shape: torch.randn(*shape, device=device).to(dtype)
    t = {"q": g(total, Hq, D), "k": g(total, Hkv, D), "v": g(total, Hkv, D)}
    if P:
        t["prefix_k"], t["prefix_v"] = g(len(lens), P, Hkv, D), g(len(lens), P, Hkv, D)
    return t, cu, g(total, Hq, D)


VARLEN = [([1, 17, 5, 30], 4, 1, 16, 0), ([9, 1, 23], 8, 2, 64, 4)]
VARLEN_LONG = [([113, 40, 1000, 3], 8, 1, 80, 2)]


@pytest.mark.parametrize("backend,device,lens,Hq,Hkv,D,P", [
    pytest.param(*bd.values, *case, marks=bd.marks, id=f"{bd.id}-{case[0]}")
    for bd in BD for case in VARLEN
] + [
    pytest.param(*bd.values, *case, marks=bd.marks, id=f"{bd.id}-long") for bd in BD_FAST for case in VARLEN_LONG
])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_per_sequence_reference(backend, device, causal, lens, Hq, Hkv, D, P):
    tensors, cu, dout = _varlen_inputs(lens, Hq, Hkv, D, P, torch.float32, device)
    ours = _run(lambda **t: attention(**t, causal=causal, cu_seqlens=cu, max_seqlen=max(lens), backend=backend),
                tensors, dout)
    ref = _run(lambda **t: attention_varlen_reference(**{n: x.double() for n, x in t.items()},
                                                      cu_seqlens_q=cu, cu_seqlens_k=cu, causal=causal),
               tensors, dout.double())
    for name, o, r in zip(_names(tensors), ours, ref):
        assert_close(o, r, msg=f"{name} ({backend}, causal={causal}, lens={lens})")


# The CPU backward runs in one pass (a task per (sequence, kv head)) or in two (dQ, then dK/dV),
# chosen from the thread count and how evenly the tasks split (plan_bwd in csrc/cpu/attention.cpp):
# one thread always takes the one pass; four threads take the two passes for one sequence with
# one kv head (a single task would leave three threads idle) and the one pass for 8 equal tasks.
CPU_PLANS = [
    (1, [300], 2, 1, 64, 0),  # one pass
    (4, [300], 2, 1, 64, 0),  # two passes
    (4, [150] * 4, 4, 2, 64, 0),  # one pass, 8 equal tasks
    (4, [200, 17, 90, 1], 4, 2, 32, 3),  # two passes: 8 unequal tasks, two of them most of the work
    (2, [200, 17, 90, 1], 4, 2, 32, 3),  # one pass: the same tasks on two threads
    (1, [77, 130], 6, 3, 40, 0),  # head dim 40: the tile kernel's scalar columns
]


@pytest.mark.parametrize("threads,lens,Hq,Hkv,D,P", CPU_PLANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_backward_plans_match_reference(threads, lens, Hq, Hkv, D, P, dtype, causal, cpu_products):
    tensors, cu, dout = _varlen_inputs(lens, Hq, Hkv, D, P, dtype, "cpu")
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=causal)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = _run(lambda **t: attention(**t, causal=causal, cu_seqlens=cu, max_seqlen=max(lens), backend="native"),
                    tensors, dout)
    finally:
        torch.set_num_threads(previous)
    ref = _run(lambda **t: attention_varlen_reference(**{n: x.double() for n, x in t.items()}, **kw),
               tensors, dout.double())
    if dtype == torch.float32:
        for name, o, r in zip(_names(tensors), ours, ref):
            assert_close(o, r, msg=f"{name} (threads={threads}, causal={causal}, lens={lens})")
        return
    lowp = _run(lambda **t: attention_varlen_reference(**t, **kw, upcast=False), tensors, dout)
    for name, o, r, t in zip(_names(tensors), ours, ref, lowp):
        assert o.dtype == dtype, name
        assert_lowp_rule(o, t, r.float(), name)


@pytest.mark.parametrize("backend,device", BD)
def test_packed_rows_never_attend_across_documents(backend, device):
    """Changing one document's keys must not change any other document's output."""
    tensors, cu, _ = _varlen_inputs([7, 12, 5], 4, 2, 16, 0, torch.float32, device)
    out1 = attention(**tensors, cu_seqlens=cu, backend=backend)
    k2 = tensors["k"].clone()
    k2[7:19] += 5.0  # document 1
    out2 = attention(tensors["q"], k2, tensors["v"], cu_seqlens=cu, backend=backend)
    torch.testing.assert_close(out1[:7], out2[:7], rtol=0, atol=0)
    torch.testing.assert_close(out1[19:], out2[19:], rtol=0, atol=0)
    assert not torch.allclose(out1[7:19], out2[7:19])


LOWP = [(True, (2, 33, 33, 8, 2, 64, 3, True)), (False, (1, 64, 50, 4, 4, 16, 0, False))]


@pytest.mark.parametrize("backend,device,causal,case", [
    pytest.param(*bd.values, causal, case, marks=bd.marks, id=f"{bd.id}-{i}")
    for bd in BD if bd.values[0] != "reference"
    for i, (causal, case) in enumerate(LOWP) if _fast(*bd.values) or i == 0
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_2x_torch(backend, device, dtype, causal, case):
    tensors, mask, dout = _inputs(case, dtype, device)
    kw = dict(causal=causal, key_padding_mask=mask)
    ours = _run(lambda **t: attention(**t, **kw, backend=backend), tensors, dout)
    ref32 = _run(lambda **t: attention_reference(**{n: x.float() for n, x in t.items()}, **kw), tensors, dout.float())
    lowp = _run(lambda **t: attention_reference(**t, **kw, upcast=False), tensors, dout)
    for name, o, r, t in zip(_names(tensors), ours, ref32, lowp):
        assert o.dtype == dtype, name
        assert_lowp_rule(o, t, r, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 80, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_head_dims_low_precision(dtype, D, causal):
    case = (2, 1000, 1000, 8, 2, D, 16, True)
    tensors, mask, dout = _inputs(case, dtype, "cuda")
    kw = dict(causal=causal, key_padding_mask=mask)
    ours = _run(lambda **t: attention(**t, **kw, backend="triton"), tensors, dout)
    ref32 = _run(lambda **t: attention_reference(**{n: x.float() for n, x in t.items()}, **kw), tensors, dout.float())
    lowp = _run(lambda **t: attention_reference(**t, **kw, upcast=False), tensors, dout)
    for name, o, r, t in zip(_names(tensors), ours, ref32, lowp):
        assert_lowp_rule(o, t, r, name)


@pytest.mark.parametrize("backend,device", BD)
def test_lse_and_softmax_scale(backend, device):
    case = (2, 9, 21, 4, 2, 16, 2, True)
    tensors, mask, _ = _inputs(case, torch.float32, device)
    scale = 0.37
    B, T, Hq = 2, 9, 4
    out, lse = torch.ops.fastllm.attention(tensors["q"], tensors["k"], tensors["v"], mask, tensors["prefix_k"],
                                           tensors["prefix_v"], None, 0, True, scale, False, backend)
    ref = attention_reference(**{n: x.double() for n, x in tensors.items()}, causal=True, key_padding_mask=mask,
                              softmax_scale=scale)
    ref_lse = attention_lse_reference(**{n: x.double() for n, x in tensors.items()}, causal=True,
                                      key_padding_mask=mask, softmax_scale=scale)  # (B, Hq, T)
    assert_close(out, ref)
    assert lse.shape == (Hq, B * T)
    assert_close(lse.float(), ref_lse.permute(1, 0, 2).reshape(Hq, B * T), dtype=torch.float32)


@pytest.mark.parametrize("backend,device", BD)
def test_query_without_visible_keys_gives_zeros(backend, device):
    q, k, v = (torch.randn(1, 4, 2, 16, device=device, requires_grad=True) for _ in range(3))
    mask = torch.zeros(1, 4, dtype=torch.bool, device=device)
    out = attention(q, k, v, key_padding_mask=mask, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t.grad))


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(backend, causal):
    if backend not in compiled_backends("cpu"):
        pytest.fail(f"backend {backend} unavailable on the CPU test machine")
    B, T, S, Hq, Hkv, D, P = 2, 5, 7, 4, 2, 8, 2
    d = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)
    q, k, v, pk, pv = d(B, T, Hq, D), d(B, S, Hkv, D), d(B, S, Hkv, D), d(B, P, Hkv, D), d(B, P, Hkv, D)
    mask = torch.rand(B, S) > 0.3
    fn = lambda *a: attention(*a[:3], prefix_k=a[3], prefix_v=a[4], key_padding_mask=mask, causal=causal,
                              backend=backend)
    assert torch.autograd.gradcheck(fn, (q, k, v, pk, pv), fast_mode=True)
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    q2, k2, v2, pk2, pv2 = d(9, Hq, D), d(9, Hkv, D), d(9, Hkv, D), d(3, P, Hkv, D), d(3, P, Hkv, D)
    fn2 = lambda *a: attention(*a[:3], prefix_k=a[3], prefix_v=a[4], cu_seqlens=cu, causal=causal, backend=backend)
    assert torch.autograd.gradcheck(fn2, (q2, k2, v2, pk2, pv2), fast_mode=True)


def test_reference_closed_form_backward_matches_autograd():
    """The reference backend's closed-form backward against autograd through the reference."""
    tensors, mask, dout = _inputs((2, 6, 9, 4, 2, 8, 3, True), torch.float64, "cpu")
    ours = _run(lambda **t: attention(**t, causal=True, key_padding_mask=mask, backend="reference"), tensors, dout)
    ref = _run(lambda **t: attention_reference(**t, causal=True, key_padding_mask=mask), tensors, dout)
    for name, o, r in zip(_names(tensors), ours, ref):
        assert_close(o, r, msg=name)


@pytest.mark.parametrize("backend,device", [p for p in BD if p.values[0] != "reference"])
def test_deterministic_backward_is_bitwise_repeatable(backend, device):
    tensors, mask, dout = _inputs((2, 24, 24, 4, 1, 16, 2, True), torch.float32, device)
    fn = lambda **t: attention(**t, causal=True, key_padding_mask=mask, backend=backend, deterministic=True)
    first, second = _run(fn, tensors, dout), _run(fn, tensors, dout)
    for name, a, b in zip(_names(tensors), first, second):
        assert torch.equal(a, b), name
    fast = _run(lambda **t: attention(**t, causal=True, key_padding_mask=mask, backend=backend), tensors, dout)
    for name, a, b in zip(_names(tensors), first, fast):
        assert_close(a, b, msg=name)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_opcheck(backend):
    if backend not in compiled_backends("cpu"):
        pytest.fail(f"backend {backend} unavailable on the CPU test machine")
    tensors, mask, dout = _inputs((2, 5, 7, 4, 2, 16, 2, True), torch.float32, "cpu")
    q, k, v, pk, pv = (tensors[n].requires_grad_() for n in ("q", "k", "v", "prefix_k", "prefix_v"))
    args = (q, k, v, mask, pk, pv, None, 0, True, 0.25, False, backend)
    torch.library.opcheck(torch.ops.fastllm.attention.default, args)
    out, lse = torch.ops.fastllm.attention(*args)
    bargs = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, mask, pk.detach(), pv.detach(), None, 0,
             True, 0.25, False, backend)
    torch.library.opcheck(torch.ops.fastllm.attention_backward.default, bargs)
    cu = torch.tensor([0, 2, 7], dtype=torch.int32)
    vq, vk, vv = (torch.randn(7, h, 16, requires_grad=True) for h in (4, 2, 2))
    torch.library.opcheck(torch.ops.fastllm.attention.default,
                          (vq, vk, vv, None, None, None, cu, 5, False, 0.25, False, backend))


def test_opcheck_native_kernels():
    if "native" not in compiled_backends("cpu"):
        pytest.fail("the native backend is unavailable on the CPU test machine")
    q, k, v = torch.randn(9, 4, 16), torch.randn(11, 2, 16), torch.randn(11, 2, 16)
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 11], dtype=torch.int32)
    keep = (torch.rand(11) > 0.2).to(torch.int8)
    torch.library.opcheck(torch.ops.fastllm.attention_fwd.default, (q, k, v, cu_q, cu_k, keep, 1, True, 0.25))
    out, lse = torch.ops.fastllm.attention_fwd(q, k, v, cu_q, cu_k, keep, 1, True, 0.25)
    torch.library.opcheck(torch.ops.fastllm.attention_bwd.default,
                          (torch.randn_like(q), q, k, v, out, lse, cu_q, cu_k, keep, 1, True, 0.25))


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    tensors, mask, dout = _inputs((2, 9, 9, 4, 2, 16, 2, True), torch.float32, "cpu")

    def fn(q, k, v, prefix_k, prefix_v):
        return attention(q, k, v, causal=True, key_padding_mask=mask, prefix_k=prefix_k, prefix_v=prefix_v,
                         backend=backend) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    ours = _run(compiled, tensors, dout)
    eager = _run(fn, tensors, dout)
    for name, a, b in zip(_names(tensors), ours, eager):
        torch.testing.assert_close(a, b, msg=name)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    vt, _, vdout = _varlen_inputs([3, 5], 4, 2, 16, 0, torch.float32, "cpu")
    vfn = lambda q, k, v: attention(q, k, v, cu_seqlens=cu, max_seqlen=5, causal=True, backend=backend)
    vc = _run(torch.compile(vfn, fullgraph=True, backend="aot_eager"), vt, vdout)
    ve = _run(vfn, vt, vdout)
    for name, a, b in zip(_names(vt), vc, ve):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("bad,match", [
    (dict(k=torch.randn(2, 7, 3, 16), v=torch.randn(2, 7, 3, 16)), "k: expected a number of heads dividing"),
    (dict(v=torch.randn(2, 7, 2, 8)), "v: expected shape"),
    (dict(q=torch.randn(2, 5, 4)), "q: expected a 4-D tensor"),
    (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), "key_padding_mask: expected shape"),
    (dict(prefix_k=torch.randn(2, 3, 2, 16)), "prefix_k, prefix_v: expected both or neither"),
    (dict(k=torch.randn(2, 7, 2, 16).double()), "k: expected dtype"),
])
def test_errors_name_the_argument(bad, match):
    args = dict(q=torch.randn(2, 5, 4, 16), k=torch.randn(2, 7, 2, 16), v=torch.randn(2, 7, 2, 16))
    kwargs = {n: bad.pop(n) for n in list(bad) if n not in args}
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        attention(args["q"], args["k"], args["v"], **kwargs)


# --------------------------------------------------------------------------- convergence


class _TinyAttentionLM(torch.nn.Module):
    """Two pre-norm attention blocks over token embeddings, GQA (4 query heads, 2 kv heads)."""

    def __init__(self, vocab=32, dim=32, heads=4, kv_heads=2, backend="reference"):
        super().__init__()
        self.heads, self.kv_heads, self.hd, self.backend = heads, kv_heads, dim // heads, backend
        self.emb = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({
                "norm": torch.nn.LayerNorm(dim),
                "qkv": torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.hd),
                "proj": torch.nn.Linear(dim, dim),
            }) for _ in range(2))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        B, T = tokens.shape
        x = self.emb(tokens)
        for blk in self.blocks:
            qkv = blk["qkv"](blk["norm"](x))
            q, k, v = qkv.split([self.heads * self.hd, self.kv_heads * self.hd, self.kv_heads * self.hd], -1)
            q = q.view(B, T, self.heads, self.hd)  # (B, T, Hq, hd)
            k = k.view(B, T, self.kv_heads, self.hd)
            v = v.view(B, T, self.kv_heads, self.hd)
            a = attention(q, k, v, causal=True, backend=self.backend)
            x = x + blk["proj"](a.reshape(B, T, -1))
        return self.head(x)


def _train(backend, steps):
    torch.manual_seed(0)
    model = _TinyAttentionLM(backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        # Counting sequences (next token = this token + 1 mod 32) from random starts.
        tokens = (torch.randint(0, 32, (4, 1), generator=gen) + torch.arange(13)) % 32
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_tiny_model_converges_like_reference(backend):
    if backend not in compiled_backends("cpu"):
        pytest.fail(f"backend {backend} unavailable on the CPU test machine")
    steps = 12 if backend == "native" else 6
    ref = _train("reference", steps)
    ours = _train(backend, steps)
    learned = 1.0 if backend == "native" else 0.3
    assert ref[-1] < ref[0] - learned, f"the reference model did not learn: {ref[0]:.3f} -> {ref[-1]:.3f}"
    # Float32 kernels and reference differ by rounding only: the trajectories stay together.
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4), f"step {step}: {a} vs reference {b}"
