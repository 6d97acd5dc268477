"""A Llama block's decode step in one call: the native kernel against the reference, against
the decode branch's own kernels called one by one (bit for bit), and its argument errors."""

from __future__ import annotations

import math

import pytest
import torch

import fastllm
from fastllm.ops import rope_inv_freq
from fastllm.ops.decode_layer import decode_layer, decode_layer_reference
from tests.conftest import assert_close

NATIVE = fastllm.extension_available()
BACKENDS = ["reference"] + (["native"] if NATIVE else [])

# (B, H, Hq, Hkv, D, intermediate, Smax): odd sizes, grouped and plain multi-head attention
SHAPES = [(3, 48, 6, 2, 8, 80, 37), (1, 40, 4, 4, 10, 24, 5), (17, 96, 3, 1, 32, 130, 70)]


def _inputs(B, H, Hq, Hkv, D, inter, S, bias: bool):
    def w(rows, cols):
        return torch.randn(rows, cols) / math.sqrt(cols)

    def b(rows):
        return torch.randn(rows) * 0.1 if bias else None

    qkv_rows = (Hq + 2 * Hkv) * D
    pos = torch.randint(0, S, (B,), dtype=torch.int32)
    pos[0] = S - 1  # the last slot; the others ragged
    return dict(
        x=torch.randn(B, H), norm1=1 + 0.1 * torch.randn(H), eps1=1e-5, w_qkv=w(qkv_rows, H), b_qkv=b(qkv_rows),
        w_o=w(H, Hq * D), b_o=b(H), norm2=1 + 0.1 * torch.randn(H), eps2=1e-6, w_gate_up=w(2 * inter, H),
        b_gate_up=b(2 * inter), w_down=w(H, inter), b_down=b(H), k_cache=torch.randn(B, S, Hkv, D),
        v_cache=torch.randn(B, S, Hkv, D), positions=pos, lengths=pos + 1, inv_freq=rope_inv_freq(D, 10000.0),
    )


def _clone(args):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _native(args, scale):
    """The native op's positional arguments: the q/k/v and gate/up groups as lists."""
    vals = list(args.values()) + [scale]
    vals[3], vals[9] = [vals[3]], [vals[9]]
    return vals


def _as_parts(args, shape):
    """The same arguments with the q/k/v and gate/up groups given as their parts."""
    _, _, Hq, Hkv, D, inter, _ = shape
    return dict(args, w_qkv=list(args["w_qkv"].split([Hq * D, Hkv * D, Hkv * D])),
                w_gate_up=list(args["w_gate_up"].split([inter, inter])))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(backend, shape, bias):
    args = _inputs(*shape, bias)
    ref = _clone(args)
    untouched = args["k_cache"].clone()
    out = decode_layer(**args, backend=backend)
    want = decode_layer_reference(**ref, scale=1.0 / math.sqrt(shape[4]))
    assert out.shape == args["x"].shape
    assert_close(out, want)
    assert_close(args["k_cache"], ref["k_cache"])
    assert_close(args["v_cache"], ref["v_cache"])
    written = torch.zeros(args["k_cache"].shape[:2], dtype=torch.bool)
    written[torch.arange(shape[0]), args["positions"].long()] = True
    assert torch.equal(args["k_cache"][~written], untouched[~written])
    assert not torch.equal(args["k_cache"][written], untouched[written])


@pytest.mark.skipif(not NATIVE, reason="needs the compiled extension")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("parts", [False, True])
def test_native_equals_the_decode_branch_kernels_one_by_one(shape, parts):
    """The one call runs the per-op branch's kernels in its order: equal bit for bit. With the
    q/k/v and gate/up groups as parts, one small_linear_fwd per part."""
    ops = torch.ops.fastllm
    a = _inputs(*shape, bias=True)
    B, H, Hq, Hkv, D, inter, _ = shape
    scale = 1.0 / math.sqrt(D)
    p = _as_parts(a, shape)

    def group(x, name, sizes):
        if not parts:
            return ops.small_linear_fwd(x, a[name], a["b" + name[1:]], sizes)
        return [ops.small_linear_fwd(x, w, b, [w.shape[0]])[0] for w, b in zip(p[name], a["b" + name[1:]].split(sizes))]

    kc, vc = a["k_cache"].clone(), a["v_cache"].clone()
    q, k, v = group(ops.rms_norm_fwd(a["x"], a["norm1"], a["eps1"]), "w_qkv", [Hq * D, Hkv * D, Hkv * D])
    q = ops.kv_append_rope_fwd(q.view(B, Hq, D), k.view(B, Hkv, D), v.view(B, Hkv, D), kc, vc, a["positions"],
                               a["inv_freq"])
    attn = ops.decode_attention_fwd(q, kc, vc, a["lengths"], scale)
    (o,) = ops.small_linear_fwd(attn.view(B, Hq * D), a["w_o"], a["b_o"], [H])
    h = a["x"] + o
    g, u = group(ops.rms_norm_fwd(h, a["norm2"], a["eps2"]), "w_gate_up", [inter, inter])
    (d,) = ops.small_linear_fwd(ops.swiglu_fwd(g, u), a["w_down"], a["b_down"], [H])
    args = list(p.values()) + [scale] if parts else _native(a, scale)
    assert isinstance(args[3], list) and len(args[3]) == (3 if parts else 1)
    out = ops.decode_layer_fwd(*args)
    assert torch.equal(out, h + d)
    assert torch.equal(a["k_cache"], kc) and torch.equal(a["v_cache"], vc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_groups_as_parts_match_reference(backend, shape, bias):
    """q/k/v and gate/up given as separate weights (the cache's parts where one row goes to
    BLAS): each part its own product, the same block output as the fused weights give."""
    args = _inputs(*shape, bias)
    ref = _clone(args)
    out = decode_layer(**_as_parts(args, shape), backend=backend)
    want = decode_layer_reference(**ref, scale=1.0 / math.sqrt(shape[4]))
    assert_close(out, want)
    assert_close(args["k_cache"], ref["k_cache"])
    assert_close(args["v_cache"], ref["v_cache"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_argument(backend):
    args = _inputs(*SHAPES[0], bias=True)
    bad = dict(args, w_o=args["w_o"][:, :-1])
    with pytest.raises((ValueError, RuntimeError), match="w_o"):
        decode_layer(**bad, backend=backend)
    bad = dict(args, b_down=args["b_down"][:-1])
    with pytest.raises((ValueError, RuntimeError), match="b_down"):
        decode_layer(**bad, backend=backend)
    bad = dict(args, w_gate_up=args["w_gate_up"].double())
    with pytest.raises(TypeError, match="w_gate_up"):
        decode_layer(**bad, backend=backend)
    bad = dict(args, positions=args["positions"].long())
    with pytest.raises(ValueError, match="positions"):
        decode_layer(**bad, backend=backend)
    parts = _as_parts(args, SHAPES[0])
    bad = dict(parts, w_qkv=parts["w_qkv"][:2])  # two parts of three
    with pytest.raises(ValueError, match="w_qkv"):
        decode_layer(**bad, backend=backend)
    bad = dict(parts, w_gate_up=[parts["w_gate_up"][0], parts["w_gate_up"][1][:-1]])  # up one row short
    with pytest.raises(ValueError, match="w_gate_up"):
        decode_layer(**bad, backend=backend)


@pytest.mark.skipif(not NATIVE, reason="needs the compiled extension")
def test_native_kernel_checks_shapes_itself():
    """The model's decode branch calls the kernel without the Python checks: it checks too."""
    a = _inputs(*SHAPES[0], bias=True)
    vals = _native(a, 0.125)
    vals[5] = a["w_o"][:, :-1].contiguous()  # w_o
    with pytest.raises(RuntimeError, match="w_o"):
        torch.ops.fastllm.decode_layer_fwd(*vals)
    vals = _native(a, 0.125)
    vals[3] = [a["w_qkv"][:-1].contiguous()]  # w_qkv: not a whole number of heads
    with pytest.raises(RuntimeError, match="w_qkv"):
        torch.ops.fastllm.decode_layer_fwd(*vals)
    _, _, Hq, Hkv, D, inter, _ = SHAPES[0]
    vals = _native(a, 0.125)
    q, k, v = a["w_qkv"].split([Hq * D, Hkv * D, Hkv * D])
    vals[3] = [q, k, v[:-1]]  # v one row short
    with pytest.raises(RuntimeError, match="w_qkv"):
        torch.ops.fastllm.decode_layer_fwd(*vals)
    vals = _native(a, 0.125)
    vals[9] = list(a["w_gate_up"].split(inter)) + [a["w_gate_up"][:1]]  # three tensors
    with pytest.raises(RuntimeError, match="w_gate_up"):
        torch.ops.fastllm.decode_layer_fwd(*vals)


@pytest.mark.skipif(not NATIVE, reason="needs the compiled extension")
def test_opcheck_native_kernel():
    a = _inputs(*SHAPES[0], bias=True)
    torch.library.opcheck(torch.ops.fastllm.decode_layer_fwd.default, tuple(_native(a, 0.125)))
    vals = list(_as_parts(a, SHAPES[0]).values()) + [0.125]
    torch.library.opcheck(torch.ops.fastllm.decode_layer_fwd.default, tuple(vals))
