"""Linear cross-entropy (no logits) and MLM loss against the full-logits reference, for
every backend: outputs and every input gradient, all reductions and options, odd vocab
sizes, ignored rows and batches, huge logits, bf16, gradient-accumulation scaling,
gradcheck and opcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastllm.labels import next_token_labels
from fastllm.ops import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
    mlm_loss,
    mlm_loss_reference,
    next_token_loss,
)
from tests.conftest import assert_close, assert_lowp_rule, compiled_backends

BACKENDS = compiled_backends("cpu")
OPTIONS = {
    "plain": {},
    "smooth+zloss+softcap": {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0},
}


def _inputs(N, H, V, dtype=torch.float32, bias=True, ignored_every=5, scale=None):
    hidden = torch.randn(N, H, dtype=dtype)
    weight = torch.randn(V, H, dtype=dtype) * (scale if scale is not None else H ** -0.5)
    b = torch.randn(V, dtype=dtype) * 0.1 if bias else None
    labels = torch.randint(0, V, (N,))
    if ignored_every:
        labels[::ignored_every] = -100
    return hidden, weight, b, labels


def _grads(loss, tensors, grad_out=None):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, tensors, grad_out)


def _req(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("shape", [(37, 24, 101), (19, 16, 257)], ids=["37x24x101", "19x16x257"])
def test_matches_reference(backend, reduction, opts, shape, cpu_products):
    hidden, weight, bias, labels = _inputs(*shape)
    kw = dict(reduction=reduction, **OPTIONS[opts])
    h, w, b = _req(hidden, weight, bias)
    ours = linear_cross_entropy(h, w, labels, b, chunk_size=8, backend=backend, **kw)
    h2, w2, b2 = _req(hidden, weight, bias)
    ref = linear_cross_entropy_reference(h2, w2, labels, b2, **kw)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert_close(ours, ref)
    g = torch.randn_like(ref) if reduction == "none" else torch.tensor(0.7)
    for name, a, e in zip(("hidden", "weight", "bias"), _grads(ours, (h, w, b), g), _grads(ref, (h2, w2, b2), g)):
        assert_close(a, e, msg=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [0, 37])
def test_weight_gradient_ignores_uninitialised_memory(backend, rows, monkeypatch):
    """The head's gradient buffer is not zeroed (the first chunk overwrites it): with every
    torch.empty filled with NaN, as uninitialised memory may be, the gradients still match the
    reference; with no rows at all the weight's gradient is zero."""
    hidden, weight, bias, labels = _inputs(rows, 24, 101)
    h2, w2, b2 = _req(hidden, weight, bias)
    ref = linear_cross_entropy_reference(h2, w2, labels, b2, reduction="sum")
    expected = _grads(ref, (h2, w2, b2)) if rows else (None, torch.zeros_like(weight), torch.zeros_like(bias))
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    h, w, b = _req(hidden, weight, bias)
    ours = linear_cross_entropy(h, w, labels, b, chunk_size=8, backend=backend, reduction="sum")
    for name, a, e in zip(("hidden", "weight", "bias"), _grads(ours, (h, w, b)), expected):
        if e is not None:
            assert_close(a, e, msg=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_chunking_3d_no_bias_and_partial_grads(backend):
    hidden, weight, _, labels = _inputs(2 * 21, 32, 203, bias=False)
    hidden, labels = hidden.view(2, 21, 32), labels.view(2, 21)
    # only the weight needs a gradient (a frozen trunk), then only hidden (a frozen head)
    w = weight.clone().requires_grad_(True)
    ours = linear_cross_entropy(hidden, w, labels, backend=backend)
    w2 = weight.clone().requires_grad_(True)
    ref = linear_cross_entropy_reference(hidden, w2, labels)
    assert_close(ours, ref)
    assert_close(torch.autograd.grad(ours, w)[0], torch.autograd.grad(ref, w2)[0])
    h = hidden.clone().requires_grad_(True)
    h2 = hidden.clone().requires_grad_(True)
    ours = linear_cross_entropy(h, weight, labels, backend=backend)
    ref = linear_cross_entropy_reference(h2, weight, labels)
    assert_close(torch.autograd.grad(ours, h)[0], torch.autograd.grad(ref, h2)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_path_matches(backend):
    hidden, weight, bias, labels = _inputs(37, 24, 101)
    with torch.no_grad():
        for reduction in ("mean", "sum", "none"):
            assert_close(linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction, backend=backend),
                         linear_cross_entropy_reference(hidden, weight, labels, bias, reduction=reduction))


def test_reference_matches_torch():
    hidden, weight, bias, labels = _inputs(37, 24, 101)
    logits = hidden @ weight.t() + bias
    for reduction in ("mean", "sum", "none"):
        for ls in (0.0, 0.2):
            ref = linear_cross_entropy_reference(hidden, weight, labels, bias, reduction=reduction, label_smoothing=ls)
            torch_loss = F.cross_entropy(logits, labels, reduction=reduction, label_smoothing=ls)
            assert_close(ref, torch_loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(backend, reduction):
    # the Triton interpreter is slow: a smaller problem, still 2 chunks and an ignored row
    shape = (4, 3, 7) if backend == "triton" else (7, 5, 13)
    hidden, weight, bias, labels = _inputs(*shape, dtype=torch.float64, ignored_every=3)
    h, w, b = _req(hidden, weight, bias)

    def fn(h, w, b):
        return linear_cross_entropy(h, w, labels, b, reduction=reduction, label_smoothing=0.1, z_loss=0.01,
                                    softcap=2.0, chunk_size=3, backend=backend)

    assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-6, atol=1e-7, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_rows_and_batch(backend):
    hidden, weight, bias, labels = _inputs(13, 8, 29)
    labels[:] = -100
    for reduction, expected in (("mean", 0.0), ("sum", 0.0)):
        h, w, b = _req(hidden, weight, bias)
        loss = linear_cross_entropy(h, w, labels, b, reduction=reduction, backend=backend)
        assert loss.item() == expected  # documented: an all-ignored batch has loss 0 ...
        for g in _grads(loss, (h, w, b)):
            assert torch.isfinite(g).all() and (g == 0).all()  # ... and a zero gradient
    h, w, b = _req(hidden, weight, bias)
    rows = linear_cross_entropy(h, w, labels, b, reduction="none", backend=backend)
    assert (rows == 0).all()
    for g in _grads(rows, (h, w, b), torch.randn_like(rows)):
        assert (g == 0).all()
    # with num_tokens the mean of an all-ignored micro-batch is still 0
    loss = linear_cross_entropy(hidden, weight, labels, bias, num_tokens=17, backend=backend)
    assert loss.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_do_not_overflow(backend):
    hidden, weight, bias, labels = _inputs(11, 8, 37, scale=3e3)  # logits ~ 1e4
    h, w, b = _req(hidden, weight, bias)
    ours = linear_cross_entropy(h, w, labels, b, backend=backend, chunk_size=4)
    h2, w2, b2 = _req(hidden, weight, bias)
    ref = linear_cross_entropy_reference(h2, w2, labels, b2)
    assert torch.isfinite(ours) and ours.item() > 1e3
    assert_close(ours, ref)
    for a, e in zip(_grads(ours, (h, w, b)), _grads(ref, (h2, w2, b2))):
        assert torch.isfinite(a).all()
        assert_close(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_within_twice_torch_error(backend):
    hidden, weight, bias, labels = _inputs(37, 32, 257)
    hb, wb, bb = [t.bfloat16() for t in (hidden, weight, bias)]
    h, w, b = _req(hb, wb, bb)
    ours = linear_cross_entropy(h, w, labels, b, backend=backend, chunk_size=8)
    g_ours = _grads(ours, (h, w, b))
    h32, w32, b32 = _req(hb.float(), wb.float(), bb.float())
    ref = linear_cross_entropy_reference(h32, w32, labels, b32)
    g_ref = _grads(ref, (h32, w32, b32))
    hl, wl, bl = _req(hb, wb, bb)
    lowp = F.cross_entropy(hl @ wl.t() + bl, labels)  # PyTorch in bf16
    g_low = _grads(lowp, (hl, wl, bl))
    assert_lowp_rule(ours.bfloat16(), lowp, ref, "loss")
    for name, a, low, e in zip(("hidden", "weight", "bias"), g_ours, g_low, g_ref):
        assert a.dtype == torch.bfloat16
        assert_lowp_rule(a, low, e, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_scaling(backend):
    hidden, weight, bias, labels = _inputs(40, 16, 61)
    labels[:13] = -100  # the micro-batches hold different numbers of valid tokens
    total = int((labels != -100).sum())
    h, w, b = _req(hidden, weight, bias)
    full = linear_cross_entropy(h, w, labels, b, backend=backend)
    g_full = _grads(full, (h, w, b))
    h, w, b = _req(hidden, weight, bias)
    parts = [linear_cross_entropy(h[s], w, labels[s], b, num_tokens=total, backend=backend)
             for s in (slice(0, 16), slice(16, 40))]
    for p in parts:
        p.backward()
    assert_close(parts[0] + parts[1], full)
    for a, e in zip((h.grad, w.grad, b.grad), g_full):
        assert_close(a, e)
    # a tensor count works too (no host sync needed under data parallelism)
    loss = linear_cross_entropy(hidden[:16], weight, labels[:16], bias, num_tokens=torch.tensor(total), backend=backend)
    assert_close(loss, parts[0])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_gpt2_vocab_50257(backend):
    hidden, weight, bias, labels = _inputs(6, 16, 50257, ignored_every=4)
    h, w, b = _req(hidden, weight, bias)
    ours = linear_cross_entropy(h, w, labels, b, backend=backend, label_smoothing=0.1)
    h2, w2, b2 = _req(hidden, weight, bias)
    ref = linear_cross_entropy_reference(h2, w2, labels, b2, label_smoothing=0.1)
    assert_close(ours, ref)
    for a, e in zip(_grads(ours, (h, w, b)), _grads(ref, (h2, w2, b2))):
        assert_close(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_mlm_loss(backend, reduction):
    hidden, weight, bias, labels = _inputs(2 * 19, 16, 101, ignored_every=0)
    hidden, labels = hidden.view(2, 19, 16), labels.view(2, 19)
    labels[torch.rand(2, 19) > 0.2] = -100  # ~20% of the positions are masked
    h, w, b = _req(hidden, weight, bias)
    ours = mlm_loss(h, w, labels, b, reduction=reduction, backend=backend)
    h2, w2, b2 = _req(hidden, weight, bias)
    ref = mlm_loss_reference(h2, w2, labels, b2, reduction=reduction)
    assert ours.shape == ref.shape
    assert_close(ours, ref)
    g = torch.randn_like(ref) if reduction == "none" else None
    for a, e in zip(_grads(ours, (h, w, b), g), _grads(ref, (h2, w2, b2), g)):
        assert_close(a, e)


def test_mlm_no_masked_position():
    hidden, weight, bias, labels = _inputs(9, 8, 21)
    labels[:] = -100
    h = hidden.clone().requires_grad_(True)
    loss = mlm_loss(h, weight, labels, bias)
    assert loss.item() == 0.0
    loss.backward()
    assert (h.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    hidden, weight, bias, labels = _inputs(9, 8, 21, dtype=torch.float64)
    scale = torch.rand(9, dtype=torch.float64)
    opts = (-100, 0.1, 0.01, 3.0, 4)
    h, w, b = _req(hidden, weight, bias)
    torch.library.opcheck(torch.ops.fastllm.linear_cross_entropy_fused,
                          (h, w, labels, b, scale, *opts, True, True, True, backend))
    torch.library.opcheck(torch.ops.fastllm.linear_cross_entropy_rows, (h, w, labels, b, *opts, backend))
    torch.library.opcheck(torch.ops.fastllm.linear_cross_entropy_backward,
                          (torch.randn(9, dtype=torch.float64), hidden, weight, labels, bias, *opts,
                           True, False, True, backend))


def test_torch_compile_traces():
    hidden, weight, bias, labels = _inputs(37, 24, 101)
    h, w, b = _req(hidden, weight, bias)
    fn = torch.compile(lambda h, w, b: linear_cross_entropy(h, w, labels, b, z_loss=1e-3), backend="aot_eager",
                       fullgraph=True)
    ours = fn(h, w, b)
    h2, w2, b2 = _req(hidden, weight, bias)
    ref = linear_cross_entropy_reference(h2, w2, labels, b2, z_loss=1e-3)
    assert_close(ours, ref)
    for a, e in zip(_grads(ours, (h, w, b)), _grads(ref, (h2, w2, b2))):
        assert_close(a, e)


def test_argument_errors():
    hidden, weight, bias, labels = _inputs(5, 8, 11)
    with pytest.raises(ValueError, match="labels: expected values in \\[0, 11\\)"):
        linear_cross_entropy(hidden, weight, torch.full((5,), 11))
    with pytest.raises(ValueError, match="weight: expected shape \\[V, 8\\]"):
        linear_cross_entropy(hidden, weight[:, :7], labels)
    with pytest.raises(ValueError, match="labels: expected shape \\[5\\]"):
        linear_cross_entropy(hidden, weight, labels[:4])
    with pytest.raises(ValueError, match="reduction: expected one of"):
        linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(hidden, weight, labels, softcap=0.0)
    with pytest.raises(TypeError, match="weight: expected dtype"):
        linear_cross_entropy(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="bias: expected shape \\[11\\]"):
        linear_cross_entropy(hidden, weight, labels, bias[:3])


def test_fused_backward_twice_on_a_retained_graph():
    hidden, weight, bias, labels = _inputs(37, 24, 101)
    h, w = _req(hidden, weight)
    loss = linear_cross_entropy(h, w, labels, backend="native" if "native" in BACKENDS else None)
    first = torch.autograd.grad(loss, (h, w), torch.tensor(0.5), retain_graph=True)
    first = [g.clone() for g in first]
    second = torch.autograd.grad(loss, (h, w), torch.tensor(2.0))
    h2, w2 = _req(hidden, weight)
    ref = torch.autograd.grad(linear_cross_entropy_reference(h2, w2, labels), (h2, w2))
    for a, b, e in zip(first, second, ref):
        assert_close(a, 0.5 * e)
        assert_close(b, 2.0 * e)


def test_next_token_loss_closed_form():
    # hidden rows are log-probabilities and weight the identity, so logits = log p_t and the
    # loss of position t is exactly -log p_t[ids[t + 1]]: an off-by-one in the label shift
    # (unshifted, or shifted twice) gives a different value.
    V = 5
    p = torch.softmax(torch.randn(1, 4, V), -1)
    hidden = p.log().requires_grad_(True)
    weight = torch.eye(V)
    ids = torch.tensor([[3, 1, 4, 0]])
    labels = next_token_labels(ids)
    assert labels.tolist() == [[1, 4, 0, -100]]
    expected = -(p[0, 0, 1].log() + p[0, 1, 4].log() + p[0, 2, 0].log()) / 3
    assert_close(next_token_loss(hidden, weight, labels), expected)
    per_token = next_token_loss(hidden, weight, labels, reduction="none")
    assert_close(per_token[0, :3], -torch.stack([p[0, 0, 1], p[0, 1, 4], p[0, 2, 0]]).log())
    assert per_token[0, 3] == 0


def test_next_token_labels_packed_padded_and_prompt_masked():
    ids = torch.tensor([5, 6, 7, 8, 9])
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    # the last token of each packed sequence predicts nothing (never the next document's first)
    assert next_token_labels(ids, cu_seqlens=cu).tolist() == [6, -100, 8, 9, -100]
    batch = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert next_token_labels(batch, attention_mask=mask).tolist() == [[2, 3, -100, -100], [5, -100, -100, -100]]
    hf_style = torch.tensor([[-100, -100, 3, 0]])  # prompt masked, unshifted
    assert next_token_labels(batch[:1], labels=hf_style).tolist() == [[-100, 3, 0, -100]]


def test_packed_and_padded_batches_give_the_same_per_token_losses():
    from fastllm.models import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset("tiny-llama"))
    seqs = [torch.randint(0, 128, (n,)) for n in (5, 8, 3)]
    packed = torch.cat(seqs)[None]
    cu = torch.tensor([0, 5, 13, 16], dtype=torch.int32)
    per_packed = model.loss(packed, next_token_labels(packed, cu_seqlens=cu), cu_seqlens=cu, reduction="none")[0]
    padded = torch.zeros(3, 8, dtype=torch.long)
    mask = torch.zeros(3, 8, dtype=torch.long)
    for b, s in enumerate(seqs):
        padded[b, :len(s)], mask[b, :len(s)] = s, 1
    per_padded = model.loss(padded, next_token_labels(padded, attention_mask=mask), attention_mask=mask,
                            reduction="none")
    start = 0
    for b, s in enumerate(seqs):
        assert_close(per_packed[start:start + len(s)], per_padded[b, :len(s)])
        start += len(s)
    assert (per_padded[mask == 0] == 0).all()


@pytest.mark.parametrize("backend", compiled_backends("cpu"))
def test_mlm_loss_transform_equals_full_logits_reference(backend):
    # the one MLM entry gathers the masked rows before the head's transform: same value and
    # gradients as the full logits with ignore_index
    N, H, V = 23, 16, 37
    hidden = torch.randn(2, N, H, requires_grad=True)
    dense = torch.nn.Linear(H, H)
    weight = (torch.randn(V, H) * H ** -0.5).requires_grad_(True)
    bias = torch.randn(V, requires_grad=True)
    labels = torch.full((2, N), -100)
    labels[0, 3], labels[1, 7], labels[1, 20] = 4, 36, 0
    ours = mlm_loss(hidden, weight, labels, bias, transform=dense, backend=backend)
    logits = dense(hidden) @ weight.t() + bias
    expected = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert_close(ours, expected)
    inputs = (hidden, weight, bias, dense.weight)
    for a, b in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(expected, inputs), strict=True):
        assert_close(a, b)


def test_mlm_loss_all_ignored_is_zero_with_zero_gradient():
    hidden = torch.randn(3, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    loss = mlm_loss(hidden, weight, torch.full((3,), -100))
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, hidden)
    assert (g == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_reference(dtype):
    from fastllm.ops import token_logprobs_and_entropy, token_logprobs_and_entropy_reference

    hidden, weight, bias, labels = [t.cuda() if t is not None else None for t in _inputs(1000, 256, 50257)]
    hidden, weight, bias = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    h, w, b = _req(hidden, weight, bias)
    ours = linear_cross_entropy(h, w, labels, b, label_smoothing=0.1, softcap=30.0, backend="triton")
    g_ours = _grads(ours, (h, w, b))
    h2, w2, b2 = _req(hidden.float(), weight.float(), bias.float())
    ref = linear_cross_entropy_reference(h2, w2, labels, b2, label_smoothing=0.1, softcap=30.0)
    g_ref = _grads(ref, (h2, w2, b2))
    if dtype == torch.float32:
        # TF32 may be on for matmuls; the rows themselves are exact float32
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
        for a, e in zip(g_ours, g_ref):
            torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-5)
    else:
        hl, wl, bl = _req(hidden, weight, bias)
        low = linear_cross_entropy_reference(hl, wl, labels, bl, label_smoothing=0.1, softcap=30.0, upcast=False)
        assert_lowp_rule(ours.to(dtype), low, ref, "loss")
        for name, a, lo, e in zip(("hidden", "weight", "bias"), g_ours, _grads(low, (hl, wl, bl)), g_ref):
            assert_lowp_rule(a, lo, e, f"grad {name}")
    lp, ent = token_logprobs_and_entropy(hidden, weight, labels, temperature=0.9, bias=bias, backend="triton")
    lp_ref, ent_ref = token_logprobs_and_entropy_reference(hidden.float(), weight.float(), labels, temperature=0.9,
                                                           bias=bias.float())
    if dtype == torch.float32:
        torch.testing.assert_close(lp, lp_ref, rtol=1e-3, atol=1e-3)  # TF32 matmuls
        torch.testing.assert_close(ent, ent_ref, rtol=1e-3, atol=1e-3)
    else:
        logp = torch.log_softmax((hidden @ weight.t() + bias) / 0.9, -1)  # PyTorch in bf16
        lp_low = torch.where(labels != -100, logp.gather(-1, labels.clamp(min=0)[:, None])[:, 0], 0)
        assert_lowp_rule(lp.to(dtype), lp_low, lp_ref, "logprob")
        assert_lowp_rule(ent.to(dtype), -(logp.exp() * logp).sum(-1), ent_ref, "entropy")


def test_cpu_chunk_rows_follow_the_products_engine(cpu_products):
    """256 rows per chunk where the products run on the tile kernel; on BLAS (torch's products,
    or fastllm's engine set to BLAS) up to 1024 while the logits block stays within 256 MiB."""
    from fastllm.ops._chunked import CPU_MIN_ROWS, cpu_min_rows

    for vocab, itemsize, blas_rows in ((49152, 4, 1024), (128256, 4, 512), (151936, 4, 256),
                                       (128256, 2, 1024), (10**6, 4, 256)):
        assert cpu_min_rows(vocab, itemsize, tile=False) == blas_rows, (vocab, itemsize)
        if cpu_products != "default":  # "default": no extension, so no fastllm products engine
            expected = CPU_MIN_ROWS if cpu_products == "tile" else blas_rows
            assert cpu_min_rows(vocab, itemsize, tile=True) == expected, (vocab, itemsize)
