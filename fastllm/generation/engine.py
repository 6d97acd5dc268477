"""Batched generation for PPO rollouts: prefill the prompts once, then decode one token per
sequence per step over a preallocated KV cache, sampling with the fused sampler.

    out = generate(model, prompts, max_new_tokens=128, temperature=1.0, top_k=0, top_p=1.0,
                   stop_token_ids=[eos], generator=g)
    out.tokens         (B, L) int64  row b: prompt_b, then its response, then pad_token_id
    out.response_mask  (B, L) bool   True on response tokens (a stop token included)
    out.logprobs       (B, L) float32 log-prob of each response token, 0 elsewhere
    out.prompt_lengths (B,) int64;  out.lengths (B,) int64 = prompt + response length
    L = max(prompt lengths) + max_new_tokens

Row layout: token t of row b is predicted by the logits at t - 1, so a teacher-forced
forward over `tokens` (attention mask `arange(L) < lengths`) gives, at the positions of
`response_mask`, log_softmax(logits / T) equal to `logprobs`: the log-probability under
the temperature-scaled distribution before top-k/top-p filtering, taken from the very
logits that drew the token (fastllm.ops.sampling explains the choice).

Ragged prompts: the batch is right-padded and prefilled in one forward with a key mask;
each sequence then decodes at its own position (the cache takes per-sequence lengths), so
no prompt is recomputed and no sequence's tokens depend on the others in the batch.

Stopping: a sequence stops after emitting one of stop_token_ids or after max_new_tokens;
the loop ends early when every sequence has stopped (checked every `sync_every` steps, the
only host syncs of the decode loop). Randomness: one torch.rand(B, generator=generator) per
step, on the model's device, feeds the sampler's inverse-CDF draw.

On CUDA the decode step is captured once in a CUDA graph and replayed (use_cuda_graph).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fastllm.models.kv_cache import inference_kernel
from fastllm.ops.sampling import sample_reference, sampling_params


def _check_generate_args(vocab: int, stop_token_ids, temperature, pad_token_id, top_k=0, top_p=1.0) -> None:
    """Arguments of `generate` that would otherwise be silent no-ops: stop tokens that can
    never be drawn, a negative tensor temperature (run as greedy), tensor top_k / top_p out of
    range, a pad id outside the vocab (scalars are checked by sampling_params). Tensor values
    are read once per call, before the decode loop."""
    stop = (stop_token_ids if isinstance(stop_token_ids, Tensor) else torch.as_tensor(list(stop_token_ids))).flatten()
    bad = [t for t in stop.tolist() if t != int(t) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"stop_token_ids: expected token ids in [0, {vocab}) (vocab_size), got {bad}; such a stop "
                         "token could never be drawn")
    if isinstance(temperature, Tensor) and temperature.numel() and not bool((temperature >= 0).all()):
        raise ValueError(f"temperature: expected values >= 0 (0: greedy), got a minimum of "
                         f"{float(temperature.min())}")
    if isinstance(top_k, Tensor) and top_k.numel() and not bool((top_k >= 0).all()):
        raise ValueError(f"top_k: expected integers >= 0 (0: off), got a minimum of {int(top_k.min())}")
    if isinstance(top_p, Tensor) and top_p.numel() and not bool(((top_p > 0) & (top_p <= 1)).all()):
        raise ValueError(f"top_p: expected values in (0, 1] (1: off), got values from {float(top_p.min())} to "
                         f"{float(top_p.max())}")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab:
        raise ValueError(f"pad_token_id: expected a token id in [0, {vocab}) (vocab_size), got {pad_token_id!r}")


# A CPU decode step whose largest product, (B x hidden) @ (hidden x max(intermediate, vocab)),
# is below this many multiply-adds runs on one thread: a thread fork/join per matmul costs more
# than it saves there (tiny-llama generate measured 5-14% slower on 2 threads than on 1 on an idle
# machine, bench/bench_threads.py), while larger steps (SmolLM2 at batch 1: 28M) gain from them.
INLINE_DECODE_MACS = 1 << 22


def _decode_runs_inline(model, rows: int, device: torch.device) -> bool:
    """Whether a forward over `rows` tokens is too small to pay for threads (see above)."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        return False
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if hidden is None:
        return False
    inner = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    return rows * hidden * max(inner, cfg.vocab_size) < INLINE_DECODE_MACS


@dataclass
class GenerationOutput:
    tokens: Tensor  # (B, L) int64: prompt, response, padding per row
    response_mask: Tensor  # (B, L) bool: response tokens
    logprobs: Tensor  # (B, L) float32: log-prob of each response token, 0 elsewhere
    lengths: Tensor  # (B,) int64: prompt + response length per row
    prompt_lengths: Tensor  # (B,) int64

    @property
    def response_lengths(self) -> Tensor:
        return self.lengths - self.prompt_lengths


def _prompts_tensor(prompts, prompt_lengths, pad_token_id: int, device) -> tuple[Tensor, Tensor]:
    """Right-padded (B, P) int64 prompts and their (B,) lengths, on device."""
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2 or prompts.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"prompts: expected a (B, P) integer tensor, got {prompts.dtype} {list(prompts.shape)}")
        B, P = prompts.shape
        if prompt_lengths is None:
            prompt_lengths = torch.full((B,), P, dtype=torch.int64)
        prompt_lengths = torch.as_tensor(prompt_lengths, dtype=torch.int64).to(device)
        if tuple(prompt_lengths.shape) != (B,):
            raise ValueError(f"prompt_lengths: expected shape [{B}], got {list(prompt_lengths.shape)}")
        ids = prompts.to(device=device, dtype=torch.int64)
    else:
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths: only with a padded tensor of prompts, not with lists")
        prompts = [list(p) for p in prompts]
        B = len(prompts)
        P = max((len(p) for p in prompts), default=0)
        ids = torch.full((B, max(P, 1)), pad_token_id, dtype=torch.int64)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.tensor(p, dtype=torch.int64)
        ids = ids.to(device)
        prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
    if ids.shape[0] == 0:
        raise ValueError("prompts: expected at least one prompt, got none")
    lo, hi = int(prompt_lengths.min()), int(prompt_lengths.max())
    if lo < 1 or hi > ids.shape[1]:
        raise ValueError(f"prompts: every prompt needs 1..{ids.shape[1]} tokens, got lengths from {lo} to {hi}")
    return ids[:, :hi], prompt_lengths


class _Rollout:
    """The output buffers and per-sequence state of one generate call (all on device)."""

    def __init__(self, ids: Tensor, prompt_lengths: Tensor, max_new_tokens: int, pad_token_id: int,
                 stop_token_ids: Tensor):
        B, P = ids.shape
        L = P + max_new_tokens
        dev = ids.device
        self.tokens = torch.full((B, L), pad_token_id, dtype=torch.int64, device=dev)
        self.tokens[:, :P] = torch.where(torch.arange(P, device=dev) < prompt_lengths[:, None], ids, pad_token_id)
        self.logprobs = torch.zeros(B, L, dtype=torch.float32, device=dev)
        self.mask = torch.zeros(B, L, dtype=torch.bool, device=dev)
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.stop = stop_token_ids
        self.pad = pad_token_id
        self.last = torch.zeros(B, dtype=torch.int64, device=dev)  # the token fed to the next step
        self.pos = (prompt_lengths - 1).to(torch.int32)  # position of `last` in its row
        self.at = (prompt_lengths - 1).to(torch.int64).unsqueeze(1)  # (B, 1): pos, as a scatter index

    def record(self, token: Tensor, logprob: Tensor) -> None:
        """Write the tokens drawn for position pos + 1 of every live row; advance."""
        # few, in-place ops: at small batch every tensor op costs more than its arithmetic
        done = self.finished
        token = token.masked_fill(done, self.pad)
        at = self.at.add_(1)  # (B, 1) int64: pos + 1
        self.tokens.scatter_(1, at, token.unsqueeze(1))
        self.logprobs.scatter_(1, at, logprob.masked_fill(done, 0.0).unsqueeze(1))
        self.mask.scatter_(1, at, done.logical_not().unsqueeze(1))
        if self.stop.numel():
            # a broadcast compare, not torch.isin: isin's sorting path syncs with the host
            done |= (token.unsqueeze(1) == self.stop).any(-1)  # a stopped row's token is pad
        self.last.copy_(token)
        self.pos.add_(1)


class DecodeStep:
    """One decode step plus sampling and bookkeeping, on fixed buffers (graph-capturable):
    the model's own forward in its decode branch (`model.decode`), its head, the sampler."""

    def __init__(self, model, cache, state: _Rollout, sample, params, uniforms: Tensor):
        self.model, self.cache, self.state, self.sample = model, cache, state, sample
        self.params, self.uniforms = params, uniforms

    def __call__(self) -> None:
        s = self.state
        hidden = self.model.decode(s.last, s.pos, self.cache)  # (B, H)
        logits = self.model.logits(hidden).float()
        token, logprob = self.sample(logits.contiguous(), *self.params, self.uniforms)
        s.record(token, logprob)


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]] | Tensor,
    max_new_tokens: int,
    *,
    prompt_lengths: Tensor | Sequence[int] | None = None,
    temperature: float | Tensor = 1.0,
    top_k: int | Tensor = 0,
    top_p: float | Tensor = 1.0,
    stop_token_ids: Sequence[int] | Tensor = (),
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
    use_cuda_graph: bool = True,
    sync_every: int | None = None,
    backend: str = "auto",
    lora: str = "merge",
) -> GenerationOutput:
    """Sample up to max_new_tokens per prompt (see the module docstring).

    prompts: a list of token-id lists, or a right-padded (B, P) tensor with prompt_lengths (B,)
        (default: every row is a full prompt).
    temperature (0: greedy), top_k (0: off), top_p (1: off): scalars or (B,) tensors.
    generator: a torch.Generator on the model's device (default: torch's global one).
    use_cuda_graph: capture the decode step in a CUDA graph (CUDA only; ignored on the CPU).
    sync_every: steps between checks that every sequence stopped (default 1 on the CPU,
        8 on CUDA).
    backend: "auto", "reference" or "native" for the fused ops.
    lora: how LoRA-adapted projections run ("merge": s B A folded into a copy of each adapted
        weight, kept for this call; "low_rank": the base weights plus one low-rank matmul pair
        per projection group, no weight copy). The model's parameters are never changed.
    """
    if lora not in ("merge", "low_rank"):
        raise ValueError(f"lora: expected 'merge' or 'low_rank', got {lora!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    _check_generate_args(model.config.vocab_size, stop_token_ids, temperature, pad_token_id, top_k, top_p)
    weight = next(model.parameters())
    device = weight.device
    ids, plens = _prompts_tensor(prompts, prompt_lengths, pad_token_id, device)
    B, P = ids.shape
    vocab = model.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"prompts: token ids must be in [0, {vocab}) (vocab_size), got "
                         f"{int(ids.min()) if int(ids.min()) < 0 else int(ids.max())}")
    stop = torch.as_tensor(list(stop_token_ids) if not isinstance(stop_token_ids, Tensor) else stop_token_ids,
                           dtype=torch.int64).to(device).reshape(-1)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and P + max_new_tokens > max_positions:
        raise ValueError(f"max_new_tokens: prompt length {P} + {max_new_tokens} new tokens exceeds the model's "
                         f"{max_positions} positions (max_position_embeddings)")
    params = sampling_params(B, device, temperature, top_k, top_p)
    sample = inference_kernel("sample", device, backend)
    was_training = model.training
    model.eval()
    try:
        state = _Rollout(ids, plens, max_new_tokens, pad_token_id, stop)
        cache = model.new_kv_cache(B, P + max_new_tokens, backend=backend)
        cache.lora = lora
        cache.fixed_model = True  # the model is not changed during this call
        # Prefill: every prompt in one right-padded forward; the logits at each prompt's last
        # token draw its first response token.
        mask = torch.arange(P, device=device)[None] < plens[:, None]  # (B, P)
        threads = torch.get_num_threads()
        if _decode_runs_inline(model, B * P, device):  # a prefill as small as a decode step
            torch.set_num_threads(1)
        try:
            hidden = model(ids, attention_mask=mask.long(), kv_cache=cache)  # (B, P, H)
        finally:
            torch.set_num_threads(threads)
        last_hidden = hidden[torch.arange(B, device=device), plens - 1]  # (B, H)
        logits = model.logits(last_hidden).float().contiguous()
        uniforms = torch.rand(B, generator=generator, device=device)
        token, logprob = sample(logits, *params, uniforms)
        state.record(token, logprob)

        step = DecodeStep(model, cache, state, sample, params, uniforms)
        runner = step
        if use_cuda_graph and device.type == "cuda" and max_new_tokens > 1:
            from .cuda_graph import CapturedStep

            runner = CapturedStep(step, state)
        every = sync_every or (8 if device.type == "cuda" else 1)
        if _decode_runs_inline(model, B, device):
            torch.set_num_threads(1)
        try:
            for i in range(max_new_tokens - 1):
                if i % every == 0 and bool(state.finished.all()):
                    break
                torch.rand(B, generator=generator, device=device, out=uniforms)
                runner()
        finally:
            torch.set_num_threads(threads)
    finally:
        model.train(was_training)
    resp = state.mask.sum(1)
    return GenerationOutput(state.tokens, state.mask, state.logprobs, plens + resp, plens)


# --------------------------------------------------------------------------- reference


@torch.no_grad()
def generate_reference(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature=1.0,
                       top_k=0, top_p=1.0, stop_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                       generator: torch.Generator | None = None) -> GenerationOutput:
    """Obviously-correct generation: every step recomputes the whole sequence with a plain
    forward (no cache) and samples with the reference sampler, drawing the uniforms exactly
    as `generate` does (one torch.rand(B) per step), so both agree token for token."""
    device = next(model.parameters()).device
    ids, plens = _prompts_tensor(prompts, None, pad_token_id, device)
    B, P = ids.shape
    stop = torch.as_tensor(list(stop_token_ids), dtype=torch.int64, device=device)
    params = sampling_params(B, device, temperature, top_k, top_p)
    state = _Rollout(ids, plens, max_new_tokens, pad_token_id, stop)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            if bool(state.finished.all()):
                break
            T = int(state.pos.max()) + 1  # every row's tokens up to its newest
            seq = state.tokens[:, :T]
            mask = torch.arange(T, device=device)[None] < (state.pos + 1)[:, None].long()
            hidden = model(seq, attention_mask=mask.long())
            logits = model.logits(hidden[torch.arange(B, device=device), state.pos.long()]).float()
            uniforms = torch.rand(B, generator=generator, device=device)
            state.record(*sample_reference(logits, *params, uniforms))
    finally:
        model.train(was_training)
    resp = state.mask.sum(1)
    return GenerationOutput(state.tokens, state.mask, state.logprobs, plens + resp, plens)
