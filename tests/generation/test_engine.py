"""The rollout engine: greedy equals a full-recompute reference token for token, ragged
prompts batched equal each prompt alone, log-probs equal a teacher-forced forward's, stop
tokens and max_new_tokens, sampled rollouts equal the reference draw for draw."""

from __future__ import annotations

import copy

import pytest
import torch

import fastllm
from fastllm.generation import generate, generate_reference
from fastllm.models import build_model, preset

BACKENDS = ["reference"] + (["native"] if fastllm.extension_available() else [])
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17], [100]]


def _model(name="tiny-llama", device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    # A wider init than the default 0.02 makes the tiny models' next-token distributions
    # peaked, so greedy argmaxes are far from ties and a wrong token shows up.
    model = build_model(preset(name, initializer_range=0.3)).to(device=device, dtype=dtype).eval()
    return model


def _marks(device):
    return [pytest.mark.gpu] if device == "cuda" else []


# Every preset through the default (native) kernels; the reference kernels on one preset.
GREEDY_CASES = [(n, BACKENDS[-1]) for n in ("tiny-llama", "tiny-qwen2", "tiny-llama3", "tiny-mistral", "tiny-gpt2")]
GREEDY_CASES += [("tiny-llama", "reference")] if BACKENDS[-1] != "reference" else []


@pytest.mark.parametrize("name,backend", GREEDY_CASES)
def test_greedy_equals_full_recompute(name, backend):
    model = _model(name)
    out = generate(model, PROMPTS, 12, temperature=0.0, backend=backend)
    ref = generate_reference(model, PROMPTS, 12, temperature=0.0)
    assert torch.equal(out.tokens, ref.tokens)
    assert torch.equal(out.response_mask, ref.response_mask)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
    assert out.tokens.shape == (4, 9 + 12)
    assert torch.equal(out.prompt_lengths, torch.tensor([5, 2, 9, 1]))
    assert torch.equal(out.lengths, out.prompt_lengths + 12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_equals_reference_draw_for_draw(backend):
    model = _model("tiny-qwen2")
    kwargs = dict(temperature=torch.tensor([0.7, 1.0, 1.3, 0.0]), top_k=torch.tensor([0, 10, 5, 0]),
                  top_p=torch.tensor([0.9, 1.0, 0.8, 1.0]), stop_token_ids=[3, 4])
    out = generate(model, PROMPTS, 14, generator=torch.Generator().manual_seed(7), backend=backend, **kwargs)
    ref = generate_reference(model, PROMPTS, 14, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(out.tokens, ref.tokens)
    assert torch.equal(out.lengths, ref.lengths)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_batch_equals_each_prompt_alone(backend):
    model = _model("tiny-llama")
    batched = generate(model, PROMPTS, 12, temperature=0.0, backend=backend)
    for b, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], 12, temperature=0.0, backend=backend)
        n = int(alone.lengths[0])
        assert int(batched.lengths[b]) == n
        assert torch.equal(batched.tokens[b, :n], alone.tokens[0, :n])
        torch.testing.assert_close(batched.logprobs[b, :n], alone.logprobs[0, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 10, 0.9)])
def test_logprobs_equal_teacher_forced_forward(backend, temperature, top_k, top_p):
    model = _model("tiny-llama")
    out = generate(model, PROMPTS, 16, temperature=temperature, top_k=top_k, top_p=top_p,
                   generator=torch.Generator().manual_seed(3), backend=backend)
    L = out.tokens.shape[1]
    mask = torch.arange(L)[None] < out.lengths[:, None]
    # the teacher-forced forward in float64: a float32 one sums in another order (BLAS against the
    # decode step's small-rows kernel) and is itself ~1e-5 off the exact values
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = exact.logits(exact(out.tokens, attention_mask=mask.long()))  # (B, L, V) float64
    logp = torch.log_softmax(logits[:, :-1] / temperature, -1).gather(-1, out.tokens[:, 1:, None])[..., 0].float()
    resp = out.response_mask[:, 1:]
    assert resp.sum() == (out.lengths - out.prompt_lengths).sum() > 0
    torch.testing.assert_close(out.logprobs[:, 1:][resp], logp[resp], rtol=1e-5, atol=1e-5)
    assert (out.logprobs[~out.response_mask] == 0).all()


def test_response_mask_layout():
    model = _model("tiny-llama")
    out = generate(model, PROMPTS, 10, temperature=0.0)
    pos = torch.arange(out.tokens.shape[1])[None]
    want = (pos >= out.prompt_lengths[:, None]) & (pos < out.lengths[:, None])
    assert torch.equal(out.response_mask, want)
    for b, prompt in enumerate(PROMPTS):
        assert out.tokens[b, :len(prompt)].tolist() == prompt
    assert (out.tokens[~want & (pos >= out.prompt_lengths[:, None])] == 0).all()


def test_stop_tokens_end_each_sequence():
    model = _model("tiny-llama")
    free = generate(model, PROMPTS, 12, temperature=0.0)
    # stop on the 3rd response token of the first row: that row ends there, others may go on
    stop = int(free.tokens[0, 5 + 2])
    out = generate(model, PROMPTS, 12, temperature=0.0, stop_token_ids=[stop], pad_token_id=127)
    for b in range(len(PROMPTS)):
        resp = free.tokens[b, free.prompt_lengths[b]:free.lengths[b]].tolist()
        n = resp.index(stop) + 1 if stop in resp else 12
        assert int(out.lengths[b] - out.prompt_lengths[b]) == n
        assert out.tokens[b, out.prompt_lengths[b]:out.lengths[b]].tolist() == resp[:n]
        assert (out.tokens[b, out.lengths[b]:] == 127).all()
    assert int(out.lengths[0] - out.prompt_lengths[0]) <= 3


def test_early_exit_when_every_sequence_stopped(monkeypatch):
    model = _model("tiny-llama")
    from fastllm.generation import engine

    calls = []
    original = engine.DecodeStep.__call__
    monkeypatch.setattr(engine.DecodeStep, "__call__", lambda self: (calls.append(1), original(self)))
    out = generate(model, PROMPTS, 50, temperature=1.0, stop_token_ids=list(range(128)))
    assert torch.equal(out.lengths - out.prompt_lengths, torch.ones(4, dtype=torch.int64))
    assert calls == []  # every sequence stopped at its first token: no decode step ran


def test_max_new_tokens_one_and_tensor_prompts():
    model = _model("tiny-llama")
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    out = generate(model, ids, 1, prompt_lengths=[3, 2], temperature=0.0)
    ref = generate_reference(model, [[1, 2, 3], [4, 5]], 1, temperature=0.0)
    assert torch.equal(out.tokens, ref.tokens)
    assert out.tokens.shape == (2, 4)


def test_errors_name_the_argument():
    model = _model("tiny-llama")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, PROMPTS, 0)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, [[1, 200]], 4)
    with pytest.raises(ValueError, match="prompts"):
        generate(model, [[]], 4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, PROMPTS, 200)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, PROMPTS, 4, temperature=-1.0)


def test_training_mode_is_restored():
    model = _model("tiny-llama").train()
    generate(model, PROMPTS, 2)
    assert model.training


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_equals_eager_on_gpu(dtype):
    model = _model("tiny-llama", "cuda", dtype)
    kwargs = dict(temperature=0.8, top_k=20, top_p=0.95, stop_token_ids=[3])
    eager = generate(model, PROMPTS, 24, generator=torch.Generator("cuda").manual_seed(1), use_cuda_graph=False,
                     **kwargs)
    graph = generate(model, PROMPTS, 24, generator=torch.Generator("cuda").manual_seed(1), use_cuda_graph=True,
                     **kwargs)
    assert torch.equal(eager.tokens, graph.tokens)
    assert torch.equal(eager.logprobs, graph.logprobs)


@pytest.mark.gpu
def test_greedy_equals_full_recompute_on_gpu():
    model = _model("tiny-llama", "cuda")
    out = generate(model, PROMPTS, 16, temperature=0.0)
    ref = generate_reference(model, PROMPTS, 16, temperature=0.0)
    assert torch.equal(out.tokens, ref.tokens)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-4, atol=1e-4)


FALLBACK_SCRIPT = """
import warnings
warnings.simplefilter("ignore")
import torch, fastllm
from fastllm.generation import generate, generate_reference
from fastllm.models import build_model, preset
assert not fastllm.extension_available()
torch.manual_seed(0)
model = build_model(preset("tiny-llama", initializer_range=0.3)).eval()
prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
out = generate(model, prompts, 6, temperature=0.0)
ref = generate_reference(model, prompts, 6, temperature=0.0)
assert torch.equal(out.tokens, ref.tokens)
print("ok")
"""


def test_generate_without_extension_uses_references():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, FASTLLM_DISABLE_EXTENSION="1", FASTLLM_BACKEND="", PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_in_place_weight_updates_between_calls_are_seen(name):
    model = _model(name)
    first = generate(model, PROMPTS, 8, temperature=0.0)
    with torch.no_grad():  # what a PPO optimizer step does: update the parameters in place
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    second = generate(model, PROMPTS, 8, temperature=0.0)
    ref = generate_reference(model, PROMPTS, 8, temperature=0.0)
    assert torch.equal(second.tokens, ref.tokens)
    torch.testing.assert_close(second.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
    assert not torch.equal(first.logprobs, second.logprobs)


def test_lora_model_generates_as_reference():
    from fastllm.peft import apply_lora

    model = _model("tiny-llama")
    apply_lora(model, target_modules="all-linear", r=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    out = generate(model, PROMPTS, 10, temperature=0.0)
    ref = generate_reference(model, PROMPTS, 10, temperature=0.0)
    assert torch.equal(out.tokens, ref.tokens)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)


def test_tiny_cpu_decode_runs_on_one_thread_and_restores_the_count(monkeypatch):
    from fastllm.generation import engine
    from fastllm.models import build_model, preset

    tiny = build_model(preset("tiny-llama")).eval()
    big = preset("smollm2-135m")
    assert engine._decode_runs_inline(tiny, 16, torch.device("cpu")) or torch.get_num_threads() == 1
    assert not engine._decode_runs_inline(type("M", (), {"config": big})(), 1, torch.device("cpu"))
    seen = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real_set(n)))
    before = torch.get_num_threads()
    engine.generate(tiny, [[1, 2, 3]], 4, temperature=0)
    assert torch.get_num_threads() == before
    if before > 1:  # the 3-token prefill and the decode steps each ran on one thread
        assert seen == [1, before, 1, before]
