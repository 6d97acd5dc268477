"""The causal decoders (Llama family, GPT-2) beyond parity: KV cache, packed sequences,
prefix k/v, inputs_embeds, the loss path, every op backend, and input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastllm.labels import next_token_labels
from fastllm.models import KVCache, build_model, preset
from tests.conftest import assert_close, compiled_backends

DECODERS = ["tiny-llama", "tiny-qwen2", "tiny-gpt2"]


def _model(name, **overrides):
    torch.manual_seed(3)
    model = build_model(preset(name, **overrides)).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("name", DECODERS)
def test_kv_cache_prefill_then_decode_equals_full_forward(name):
    model = _model(name)
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        full = model.logits(model(ids))
        cache = model.new_kv_cache(batch=2, max_len=16)
        steps = [model.logits(model(ids[:, :6], kv_cache=cache))]
        steps.append(model.logits(model(ids[:, 6:8], kv_cache=cache)))  # a 2-token chunk
        for t in range(8, 11):
            steps.append(model.logits(model(ids[:, t : t + 1], kv_cache=cache)))
    assert cache.lengths.tolist() == [11, 11]
    assert_close(torch.cat(steps, dim=1), full)


@pytest.mark.parametrize("name", DECODERS)
def test_kv_cache_right_padded_prefill_with_different_lengths(name):
    model = _model(name)
    a, b = torch.randint(0, 128, (9,)), torch.randint(0, 128, (6,))
    ids = torch.zeros(2, 7, dtype=torch.long)
    ids[0], ids[1, :4] = a[:7], b[:4]
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        cache = model.new_kv_cache(batch=2, max_len=12)
        pre = model.logits(model(ids, attention_mask=mask, kv_cache=cache))
        assert cache.lengths.tolist() == [7, 4]
        # decode one token per sequence at different positions
        d1 = model.logits(model(torch.stack([a[7:8], b[4:5]]), kv_cache=cache))
        d2 = model.logits(model(torch.stack([a[8:9], b[5:6]]), kv_cache=cache))
        full_a = model.logits(model(a[None]))
        full_b = model.logits(model(b[None]))
    assert_close(pre[0], full_a[0, :7])
    assert_close(pre[1, :4], full_b[0, :4])
    assert_close(torch.cat([d1[0], d2[0]]), full_a[0, 7:9])
    assert_close(torch.cat([d1[1], d2[1]]), full_b[0, 4:6])
    with pytest.raises(ValueError, match="kv_cache: a step of 2 tokens needs equal"):
        model(torch.zeros(2, 2, dtype=torch.long), kv_cache=cache)


def test_kv_cache_errors():
    model = _model("tiny-llama")
    cache = model.new_kv_cache(batch=1, max_len=4)
    model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="max_len=4"):
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        KVCache(2, 1, 0, 2, 16)
    with pytest.raises(ValueError, match="k: expected shape"):
        KVCache(2, 1, 8, 2, 16).update(0, torch.zeros(1, 1, 3, 16), torch.zeros(1, 1, 3, 16))


@pytest.mark.parametrize("name", DECODERS)
def test_packed_sequences_equal_separate_forwards(name):
    model = _model(name)
    lengths = [5, 9, 3]
    seqs = [torch.randint(0, 128, (n,)) for n in lengths]
    packed = torch.cat(seqs)[None]  # (1, N)
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    hidden = model(packed, cu_seqlens=cu)
    start = 0
    for s in seqs:
        assert_close(hidden[0, start : start + s.numel()], model(s[None])[0])
        start += s.numel()
    # the loss over the pack equals the token-weighted mean of the separate losses
    loss = model.loss(packed, next_token_labels(packed, cu_seqlens=cu), cu_seqlens=cu)
    sums = [model.loss(s[None], next_token_labels(s[None])) * (s.numel() - 1) for s in seqs]
    assert_close(loss, sum(sums) / sum(n - 1 for n in lengths))


@pytest.mark.parametrize("name", DECODERS)
def test_prefix_kv_equals_attending_to_a_cached_prefix(name):
    # Keys/values of P real tokens, used as prefix_kv (with positions continuing at P),
    # give the same hidden states as the full sequence.
    model = _model(name)
    ids = torch.randint(0, 128, (2, 10))
    P = 4
    with torch.no_grad():
        cache = model.new_kv_cache(batch=2, max_len=10)
        model(ids[:, :P], kv_cache=cache)
        prefix = [(cache.k[i, :, :P], cache.v[i, :, :P]) for i in range(cache.num_layers)]
        pos = torch.arange(P, 10)[None].expand(2, -1)
        out = model(ids[:, P:], prefix_kv=prefix, position_ids=pos)
        full = model(ids)
    assert_close(out, full[:, P:])
    # prefix tensors receive gradients (prefix tuning trains them)
    pk = [(k.clone().requires_grad_(True), v.clone().requires_grad_(True)) for k, v in prefix]
    model(ids[:, P:], prefix_kv=pk).sum().backward()
    assert all(k.grad is not None and v.grad.abs().sum() > 0 for k, v in pk)
    with pytest.raises(ValueError, match="prefix_kv: expected one"):
        model(ids, prefix_kv=prefix[:1])


@pytest.mark.parametrize("name", DECODERS)
def test_inputs_embeds_equal_input_ids(name):
    model = _model(name)
    ids = torch.randint(0, 128, (2, 6))
    emb = model.model.embed_tokens(ids) if hasattr(model, "model") else model.transformer.wte(ids)
    assert_close(model(inputs_embeds=emb), model(ids))
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=emb)


def test_lm_head_weight_tied_and_untied():
    tied = build_model(preset("tiny-llama", tie_word_embeddings=True))
    untied = build_model(preset("tiny-llama"))
    assert tied.lm_head is None and tied.lm_head_weight is tied.model.embed_tokens.weight
    assert untied.lm_head_weight is untied.lm_head.weight
    assert "lm_head.weight" not in tied.state_dict() and "lm_head.weight" in untied.state_dict()


@pytest.mark.parametrize("name", DECODERS)
def test_loss_is_the_next_token_cross_entropy_of_the_logits(name):
    # labels are already shifted (fastllm.labels): hidden[t] pairs with labels[t] = ids[t + 1]
    model = _model(name)
    ids = torch.randint(0, 128, (2, 8))
    labels = next_token_labels(ids)
    labels[1, 3] = -100
    logits = model.logits(model(ids))  # (B, T, V)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1), reduction="none")
    expected = expected.view(2, 7)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 3] = False
    assert_close(model.loss(ids, labels), expected[keep].mean())
    assert_close(model.loss(ids, labels, reduction="sum"), expected[keep].sum())
    per_token = model.loss(ids, labels, reduction="none")
    assert_close(per_token[:, :-1][keep], expected[keep])
    assert (per_token[:, -1] == 0).all() and per_token[1, 3] == 0


def test_loss_rejects_unshifted_labels():
    model = _model("tiny-llama")
    ids = torch.randint(0, 128, (2, 8))
    with pytest.raises(ValueError, match="labels: equal to input_ids.*next_token_labels"):
        model.loss(ids, ids)
    with pytest.raises(ValueError, match="labels: equal to input_ids"):
        model.loss(ids, ids.clone())


def test_loss_num_tokens_divides_the_sum():
    model = _model("tiny-llama")
    ids = torch.randint(0, 128, (2, 8))
    labels = next_token_labels(ids)
    mean = model.loss(ids, labels)
    assert_close(model.loss(ids, labels, num_tokens=7), mean * 14 / 7)


@pytest.mark.parametrize("backend", compiled_backends("cpu"))
def test_every_op_backend_gives_the_same_model(backend, backend_env):
    model = _model("tiny-llama")
    ids = torch.randint(0, 128, (2, 9))
    labels = next_token_labels(ids)
    backend_env("reference")
    ref_loss = model.loss(ids, labels)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    backend_env(backend)
    loss = model.loss(ids, labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r)


@pytest.mark.parametrize("name", DECODERS)
def test_bad_inputs_name_the_argument(name):
    model = _model(name)
    with pytest.raises(ValueError, match=r"input_ids: token ids must be in \[0, 128\).*got 128"):
        model(torch.tensor([[1, 128]]))
    with pytest.raises(ValueError, match=r"input_ids: token ids must be in \[0, 128\).*got -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(
        ValueError, match="input_ids: sequence length 129 exceeds the context of 128"
    ):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids: expected an integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="position_ids: expected values in"):
        model(torch.zeros(1, 3, dtype=torch.long), position_ids=torch.tensor([[0, 1, 500]]))
    with pytest.raises(ValueError, match="labels: expected shape"):
        model.loss(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="cu_seqlens: expected increasing offsets"):
        model(
            torch.zeros(1, 5, dtype=torch.long),
            cu_seqlens=torch.tensor([0, 3, 4], dtype=torch.int32),
        )


def test_mistral_sliding_window_limit():
    model = _model("tiny-mistral", sliding_window=8)
    model(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="sliding_window=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("name", ["tiny-llama"])
def test_torch_compile_fullgraph_loss_and_gradients(name):
    torch._dynamo.reset()
    model = _model(name)
    ids = torch.randint(0, 128, (2, 9))
    labels = next_token_labels(ids)
    compiled = torch.compile(lambda i, lab: model.loss(i, lab), fullgraph=True, backend="aot_eager")
    loss = compiled(ids, labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = model.loss(ids, labels)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert_close(loss, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r)


# --------------------------------------------------------------------------- decode branch


def _decode_vs_full(model, backend="auto", lora="merge"):
    """Ragged prompts prefilled right-padded, then model.decode steps at each sequence's own
    position; every step's logits against a full forward over the whole sequence."""
    torch.manual_seed(5)
    lengths = [5, 2, 7]
    new = 4
    seqs = torch.randint(0, 128, (3, 7 + new))
    ids = seqs[:, :7]
    mask = (torch.arange(7)[None] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        cache = model.new_kv_cache(batch=3, max_len=7 + new, backend=backend)
        cache.lora = lora
        model(ids, attention_mask=mask, kv_cache=cache)
        pos = torch.tensor(lengths, dtype=torch.int32)
        for _ in range(new):
            tok = seqs[torch.arange(3), pos.long()]
            got = model.logits(model.decode(tok, pos, cache))  # (B, V)
            for b in range(3):
                p = int(pos[b])
                want = model.logits(model(seqs[b : b + 1, : p + 1]))[0, -1]
                assert_close(got[b], want)
            assert torch.equal(cache.lengths, pos.long() + 1)
            pos = pos + 1
    return cache


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_decode_branch_equals_full_forward(name, backend):
    cache = _decode_vs_full(_model(name), backend)
    fused = [entry[-1] for entry in cache._fused.values()]
    assert len(fused) == 4 * 2 and all(f is not None for f in fused)  # every projection as a matmul
    if name != "tiny-gpt2":  # plain projections: one matmul for q/k/v and one for gate/up
        assert sum(len(f[3]) > 1 for f in fused) == 2 * 2


def test_decode_kernels_call_the_small_rows_product_where_it_applies():
    """The decode branch calls small_linear's kernel directly for a cache of at most
    SMALL_LINEAR_MAX_ROWS sequences with the native kernels; otherwise small_linear itself."""
    from fastllm.ops import SMALL_LINEAR_MAX_ROWS
    from fastllm.ops._backend import native_has

    native = native_has("small_linear_fwd", torch.device("cpu"))
    assert (KVCache(1, SMALL_LINEAR_MAX_ROWS, 8, 1, 8).kernels.small_linear is not None) == native
    assert KVCache(1, SMALL_LINEAR_MAX_ROWS + 1, 8, 1, 8).kernels.small_linear is None
    assert KVCache(1, 4, 8, 1, 8, backend="reference").kernels.small_linear is None


def _decode_steps(model, lora="merge", one_call=True, fixed_model=False):
    """Logits of three decode steps after a ragged prefill, and how many blocks ran as one call
    (KVCache.kernels.decode_layer; one_call=False switches it off: the per-op branch)."""
    torch.manual_seed(6)
    ids = torch.randint(0, 128, (3, 6))
    mask = (torch.arange(6)[None] < torch.tensor([[6], [2], [4]])).long()
    calls = [0]
    with torch.no_grad():
        cache = model.new_kv_cache(batch=3, max_len=10)
        cache.lora = lora
        cache.fixed_model = fixed_model
        kernel = cache.kernels.decode_layer
        if kernel is not None:
            def counted(*args):
                calls[0] += 1
                return kernel(*args)
            cache.kernels.decode_layer = counted if one_call else None
        model(ids, attention_mask=mask, kv_cache=cache)
        pos, out = mask.sum(1).to(torch.int32), []
        for step in range(3):
            out.append(model.logits(model.decode(torch.tensor([7, 8, 9]) + step, pos, cache)))
            pos = pos + 1
    return torch.stack(out), calls[0], cache


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_decode_block_in_one_call_equals_the_per_op_branch(name):
    """A Llama block's decode step runs as one native call where it applies (plain or merged
    projections, float32 on the CPU) and gives the per-op branch's result bit for bit."""
    from fastllm.ops._backend import native_has

    model = _model(name, mlp_bias=True) if name == "tiny-llama" else _model(name)
    got, calls, cache = _decode_steps(model)
    want, none, _ = _decode_steps(model, one_call=False)
    native = native_has("decode_layer_fwd", torch.device("cpu"))
    assert calls == (3 * model.config.num_hidden_layers if native else 0) and none == 0
    assert torch.equal(got, want)
    assert KVCache(1, 4, 8, 1, 8, backend="reference").kernels.decode_layer is None


def test_decode_block_with_hooks_keeps_the_per_op_branch():
    """A forward hook on a block's attention or MLP still runs in a decode step: those blocks
    keep the per-op branch (which calls the modules), with the same result."""
    model = _model("tiny-llama")
    want, _, _ = _decode_steps(model, one_call=False)
    seen = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    try:
        got, calls, _ = _decode_steps(model)
    finally:
        handle.remove()
    layers = model.config.num_hidden_layers
    assert len(seen) == 1 + 3  # the prefill and three decode steps
    from fastllm.ops._backend import native_has

    if native_has("decode_layer_fwd", torch.device("cpu")):
        assert calls == 3 * (layers - 1)  # every other block in one call
    assert torch.equal(got, want)


@pytest.mark.parametrize("lora", [None, "merge", "low_rank"])
@pytest.mark.parametrize("one_call", [True, False])
def test_one_row_on_blas_keeps_groups_as_parts(cpu_products, lora, one_call):
    """With one row on the BLAS engine the cache keeps q/k/v and gate/up as parts (the
    projections' own weights, or their merged copies: no concatenated copy), one product each;
    elsewhere, or with a low-rank LoRA term, one concatenated weight. The decode steps match a
    full forward, and the one-call block equals the per-op branch bit for bit."""
    from fastllm.ops._backend import native_has

    model = _lora_model() if lora else _model("tiny-llama", qkv_bias=True)
    torch.manual_seed(8)
    seq = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        out = []
        for call in (one_call, False):
            cache = model.new_kv_cache(batch=1, max_len=9)
            cache.lora = lora or "merge"
            if not call:
                cache.kernels.decode_layer = None
            model(seq[:, :5], kv_cache=cache)
            steps = []
            for p in range(5, 9):
                hidden = model.decode(seq[:, p], torch.tensor([p], dtype=torch.int32), cache)
                steps.append(model.logits(hidden))
                assert_close(steps[-1][0], model.logits(model(seq[:, : p + 1]))[0, -1])
            out.append(torch.stack(steps))
    assert torch.equal(out[0], out[1])
    blas_row = native_has("small_linear_fwd", torch.device("cpu")) and torch.ops.fastllm.small_linear_on_blas(1)
    assert cache.kernels.parts == blas_row
    parts = blas_row and lora != "low_rank"
    attn = model.model.layers[0].self_attn
    weight = cache.fused_projection(attn, ("q_proj", "k_proj", "v_proj"))[0]
    assert isinstance(weight, tuple) == parts
    if parts and lora is None:  # the projections' own weights: nothing copied
        assert [w.data_ptr() for w in weight] == [attn.q_proj.weight.data_ptr(), attn.k_proj.weight.data_ptr(),
                                                  attn.v_proj.weight.data_ptr()]


@pytest.mark.parametrize("fixed_model", [False, True])
def test_decode_plan_built_every_step_or_once(monkeypatch, fixed_model):
    """The blocks' one-call arguments (decode_plan) are checked and built at every decode step,
    or once per cache when the cache says the model is fixed (generate's own cache); the
    result is the per-op branch's either way."""
    from fastllm.models.llama import LlamaDecoderLayer
    from fastllm.ops._backend import native_has

    if not native_has("decode_layer_fwd", torch.device("cpu")):
        pytest.skip("the native extension is not built")
    model = _model("tiny-llama")
    built, real = [0], LlamaDecoderLayer.decode_args

    def counted(self, cache):
        built[0] += 1
        return real(self, cache)

    monkeypatch.setattr(LlamaDecoderLayer, "decode_args", counted)
    got, calls, cache = _decode_steps(model, fixed_model=fixed_model)
    layers = model.config.num_hidden_layers
    assert calls == 3 * layers
    assert built[0] == (layers if fixed_model else 3 * layers)
    assert (cache.plan is not None) == fixed_model
    monkeypatch.setattr(LlamaDecoderLayer, "decode_args", real)
    want, _, _ = _decode_steps(model, one_call=False)
    assert torch.equal(got, want)


def test_decode_block_hook_runs_at_every_step():
    """A forward hook on a block itself runs at every decode step: the blocks are then called
    as modules (each still in one native call), with the same result."""
    model = _model("tiny-llama")
    want, _, _ = _decode_steps(model, one_call=False)
    seen = []
    handle = model.model.layers[0].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    try:
        got, calls, cache = _decode_steps(model, fixed_model=True)
    finally:
        handle.remove()
    assert len(seen) == 1 + 3 and cache.plan is None
    from fastllm.ops._backend import native_has

    if native_has("decode_layer_fwd", torch.device("cpu")):
        assert calls == 3 * model.config.num_hidden_layers
    assert torch.equal(got, want)


def test_generate_holds_one_decode_plan(monkeypatch):
    """generate marks its cache fixed_model: its decode loop builds the plan once."""
    from fastllm.generation import generate
    from fastllm.models import _decoder
    from fastllm.ops._backend import native_has

    model = _model("tiny-llama")
    caches, real = [], _decoder.decode_plan

    def spy(blocks, cache):
        caches.append(cache)
        return real(blocks, cache)

    monkeypatch.setattr(_decoder, "decode_plan", spy)
    generate(model, [[1, 2, 3], [4]], 4, temperature=0.0)
    assert len(caches) == 3 and all(c is caches[0] for c in caches) and caches[0].fixed_model
    assert (caches[0].plan is not None) == native_has("decode_layer_fwd", torch.device("cpu"))


@pytest.mark.parametrize("lora", ["merge", "low_rank"])
def test_decode_block_in_one_call_with_lora(lora):
    """Merged adapters run in the one call; a low-rank term keeps the per-op branch."""
    from fastllm.ops._backend import native_has

    model = _lora_model()
    got, calls, _ = _decode_steps(model, lora=lora)
    want, _, _ = _decode_steps(model, lora=lora, one_call=False)
    native = native_has("decode_layer_fwd", torch.device("cpu"))
    assert calls == (3 * model.config.num_hidden_layers if native and lora == "merge" else 0)
    assert torch.equal(got, want)


def _lora_model(**overrides):
    from fastllm.peft import apply_lora

    model = _model("tiny-llama", **overrides)
    apply_lora(model, target_modules=("q_proj", "v_proj", "gate_proj", "o_proj"), r=4)
    with torch.no_grad():  # non-zero B so the adapters change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("lora", ["merge", "low_rank"])
def test_decode_branch_with_lora_equals_full_forward(lora):
    model = _lora_model()
    weights = {n: p.clone() for n, p in model.named_parameters()}
    cache = _decode_vs_full(model, lora=lora)
    fused = [entry[-1] for entry in cache._fused.values()]
    assert len(fused) == 4 * 2 and all(f is not None for f in fused)  # adapters fused, not called
    # q/k/v, gate/up and o_proj carry adapters in each layer; down_proj does not
    assert sum(f[2] is not None for f in fused) == (3 * 2 if lora == "low_rank" else 0)
    for n, p in model.named_parameters():  # merging works on copies
        assert torch.equal(p, weights[n]), n


@pytest.mark.parametrize("lora", ["merge", "low_rank"])
def test_decode_with_lora_sees_adapter_changes(lora):
    # One layer, changes in the MLP only: the cached keys/values stay right (as in the test below)
    from fastllm.peft import disable_adapters

    model = _lora_model(num_hidden_layers=1)
    ids = torch.randint(0, 128, (2, 6))
    tok, pos = torch.tensor([3, 4]), torch.tensor([6, 6], dtype=torch.int32)
    b = model.model.layers[0].mlp.gate_proj.lora_B["default"]
    with torch.no_grad():
        cache = model.new_kv_cache(batch=2, max_len=8)
        cache.lora = lora
        model(ids, kv_cache=cache)
        before = model.logits(model.decode(tok, pos, cache))
        b.mul_(-2.0)  # an optimizer step on the adapter, in place
        after = model.logits(model.decode(tok, pos, cache))
        full = model.logits(model(torch.cat([ids, tok[:, None]], 1)))[:, -1]
        assert not torch.allclose(before, full)
        assert_close(after, full)
        with disable_adapters(model):  # the MLP's adapter off; attention's kept (the cached k/v used them)
            for layer in model.model.layers:
                layer.self_attn.q_proj.disabled = layer.self_attn.v_proj.disabled = False
                layer.self_attn.o_proj.disabled = False
            base = model.logits(model.decode(tok, pos, cache))
            want = model.logits(model(torch.cat([ids, tok[:, None]], 1)))[:, -1]
        assert_close(base, want)
        assert not torch.allclose(base, after)


def test_decode_sees_in_place_weight_updates():
    # One layer: the cached keys/values depend only on the embeddings and q/k/v, so after an
    # in-place update of the MLP's gate (fused with up in the decode branch) the old cache is
    # still right and the decode step must equal a full forward with the new weights.
    model = _model("tiny-llama", num_hidden_layers=1)
    ids = torch.randint(0, 128, (2, 6))
    tok, pos = torch.tensor([3, 4]), torch.tensor([6, 6], dtype=torch.int32)
    gate = model.model.layers[0].mlp.gate_proj.weight
    with torch.no_grad():
        cache = model.new_kv_cache(batch=2, max_len=8)
        model(ids, kv_cache=cache)
        before = model.logits(model.decode(tok, pos, cache))
        gate.mul_(-1.5)  # what an optimizer step does: in place
        after = model.logits(model.decode(tok, pos, cache))  # same slot, rewritten
        full = model.logits(model(torch.cat([ids, tok[:, None]], 1)))[:, -1]
    assert not torch.allclose(before, full)
    assert_close(after, full)
