"""Rollouts for on-policy RLHF (PPO, GRPO/RLOO): sample responses from the live policy, score
them, gather the per-token quantities the losses need, and run the update passes.

    out  = sample_responses(policy, prompts, max_new_tokens=64, temperature=1.0, eos_id=tok.eos_id)
    roll = response_batch(out)                                   # tokens, masks, targets, starts
    logp, entropy = policy_logprobs(policy, roll, temperature)   # (B, L), token-aligned
    scores, eos = score_responses(roll, reward_model=rm, reward_fn=fn, no_eos_score=-1.0)
    rewards, kl = kl_penalised_rewards(scores, resp(logp), resp(ref_logp), roll.mask, kl_coef, "k1")
    out  = sample_responses(policy, prompts, ..., num_samples=G)  # GRPO: rows [g G, (g + 1) G) share prompt g

Layouts. `generate` returns rows `prompt | response | pad` (right-padded, L = longest prompt +
max_new_tokens). Model forwards run on those (B, L) rows with an attention mask; the per-token
log-probs come from the fused `token_logprobs_and_entropy` with the labels convention
(`targets[b, t] = tokens[b, t + 1]` at response tokens, -100 elsewhere), so position t scores the
token after it, at the sampling temperature, never from (tokens, vocab) logits. The losses work
on *response-aligned* (B, N) tensors, N = max_new_tokens: column j is the j-th response token
of the row (`to_response` gathers it from position start_b + j, start_b = prompt_length_b - 1),
and `mask` (B, N) marks real response tokens (right-padded, no holes), as `fastllm.rl` expects.
Values are read at the same positions: V_j is the critic's output at the hidden state that
emitted response token j.

Rewards (the "N implementation details of RLHF with PPO"): the sequence score is given at the
last real response token (EOS when one was produced, never at a pad after it); a response
that ended without EOS gets `no_eos_score` instead of its score when that is set; the KL to
the reference enters every token's reward as -beta * k (k1 or k3 per token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastllm.generation import generate
from fastllm.labels import IGNORE_INDEX
from fastllm.ops import token_logprobs_and_entropy
from fastllm.rl import kl_estimate

RewardFn = Callable[[list[list[int]], list[list[int]]], Sequence[float]]


@dataclass
class ResponseBatch:
    """One rollout's rows and masks (tensors on the policy's device)."""

    tokens: Tensor  # (B, L) int64: prompt | response | pad
    attention_mask: Tensor  # (B, L) bool: prompt and response tokens
    targets: Tensor  # (B, L) int64: tokens[b, t + 1] at response tokens, -100 elsewhere
    starts: Tensor  # (B,) int64: position whose hidden state emits response token 0 (prompt_length - 1)
    mask: Tensor  # (B, N) bool: real response tokens, response-aligned
    prompt_lengths: Tensor  # (B,) int64
    response_lengths: Tensor  # (B,) int64

    @property
    def max_new_tokens(self) -> int:
        return self.mask.shape[1]

    def prompts(self) -> list[list[int]]:
        return [self.tokens[b, : int(n)].tolist() for b, n in enumerate(self.prompt_lengths)]

    def responses(self) -> list[list[int]]:
        return [self.tokens[b, int(p): int(p + n)].tolist()
                for b, (p, n) in enumerate(zip(self.prompt_lengths, self.response_lengths, strict=True))]


@torch.no_grad()
def sample_responses(policy: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
                     pad_id: int = 0, generator: torch.Generator | None = None, num_samples: int = 1):
    """`fastllm.generation.generate` on the live policy weights (no copy), stopping at eos_id.
    num_samples = G > 1 repeats each prompt G times in a row (GRPO/RLOO groups: rows
    [g G, (g + 1) G) answer prompts[g], each its own sample)."""
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive sampling temperature for RL rollouts, got {temperature}")
    if num_samples < 1:
        raise ValueError(f"num_samples: expected at least 1 sample per prompt, got {num_samples}")
    stop = () if eos_id is None else (eos_id,)
    rows = [list(p) for p in prompts for _ in range(num_samples)]
    return generate(policy, rows, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    stop_token_ids=stop, pad_token_id=pad_id, generator=generator)


def response_batch(out, max_new_tokens: int | None = None) -> ResponseBatch:
    """The masks and targets of a GenerationOutput (see the module docstring)."""
    tokens, resp = out.tokens, out.response_mask
    B, L = tokens.shape
    N = max_new_tokens or int(L - out.prompt_lengths.max())
    pos = torch.arange(L, device=tokens.device)
    attention_mask = pos[None, :] < out.lengths[:, None]
    targets = torch.full_like(tokens, IGNORE_INDEX)
    targets[:, :-1] = torch.where(resp[:, 1:], tokens[:, 1:], IGNORE_INDEX)
    rlen = out.lengths - out.prompt_lengths
    mask = torch.arange(N, device=tokens.device)[None, :] < rlen[:, None]
    return ResponseBatch(tokens, attention_mask, targets, out.prompt_lengths - 1, mask, out.prompt_lengths, rlen)


def to_response(x: Tensor, starts: Tensor, n: int) -> Tensor:
    """(B, L) token-aligned -> (B, n) response-aligned: out[b, j] = x[b, starts[b] + j] (columns past
    the row's end read the last position; mask them)."""
    idx = (starts[:, None] + torch.arange(n, device=x.device)[None, :]).clamp_max(x.shape[1] - 1)
    return x.gather(1, idx)


def policy_logprobs(model: nn.Module, batch: ResponseBatch, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(logp, entropy), each (B, L) float32: log p(targets[b, t]) under softmax(logits / T) and
    the entropy of that distribution at every position, from one forward and the fused op."""
    hidden = model(batch.tokens, attention_mask=batch.attention_mask)  # (B, L, H)
    return token_logprobs_and_entropy(hidden, model.lm_head_weight.to(hidden.dtype), batch.targets,
                                      temperature=temperature)


class PolicyLogProbs(nn.Module):
    """The policy and its fused log-probs behind one forward, so DDP sees the LM head used inside it.

    forward(input_ids (B, L), attention_mask (B, L), targets (B, L)) -> (logp, entropy), each
    (B, L) float32 and token-aligned, as `policy_logprobs`. The policy is held as `model`, so
    checkpoints name its weights as the policy does (fastllm.train.checkpoint strips `model.`)."""

    def __init__(self, policy: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.model = policy
        self.temperature = float(temperature)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.model(input_ids, attention_mask=attention_mask)  # (B, L, H)
        return token_logprobs_and_entropy(hidden, self.model.lm_head_weight.to(hidden.dtype), targets,
                                          temperature=self.temperature)


@torch.no_grad()
def reward_model_scores(reward_model: nn.Module, batch: ResponseBatch) -> Tensor:
    """(B,) float32: the reward model's normalised score of prompt + response, read at the last
    real token (EOS when produced), via its `predict`."""
    return reward_model.predict(batch.tokens, attention_mask=batch.attention_mask).float().reshape(-1)


def response_has_eos(batch: ResponseBatch, eos_id: int | None) -> Tensor:
    """(B,) bool: the response's last real token is eos_id."""
    if eos_id is None:
        return torch.zeros_like(batch.response_lengths, dtype=torch.bool)
    last = (batch.prompt_lengths + batch.response_lengths - 1).clamp_min(0)
    has = batch.tokens.gather(1, last[:, None])[:, 0] == eos_id
    return has & (batch.response_lengths > 0)


@torch.no_grad()
def score_responses(batch: ResponseBatch, *, reward_model: nn.Module | None = None, reward_fn: RewardFn | None = None,
                    eos_id: int | None = None, no_eos_score: float | None = None) -> tuple[Tensor, Tensor]:
    """(scores (B,) float32, has_eos (B,) bool). score = reward model score + reward_fn(prompts,
    responses) (token-id lists; either or both); a response without EOS scores no_eos_score
    instead when that is not None (truncated text is not rewarded for whatever it says)."""
    if reward_model is None and reward_fn is None:
        raise ValueError("reward: expected a reward model and/or a reward function, got neither")
    device = batch.tokens.device
    scores = torch.zeros(batch.tokens.shape[0], dtype=torch.float32, device=device)
    if reward_model is not None:
        scores += reward_model_scores(reward_model, batch)
    if reward_fn is not None:
        got = [float(v) for v in reward_fn(batch.prompts(), batch.responses())]
        if len(got) != scores.shape[0]:
            raise ValueError(f"reward_fn: expected {scores.shape[0]} rewards (one per response), got {len(got)}")
        scores += torch.tensor(got, dtype=torch.float32, device=device)
    eos = response_has_eos(batch, eos_id)
    if no_eos_score is not None:
        scores = torch.where(eos, scores, torch.full_like(scores, float(no_eos_score)))
    return scores, eos


def kl_penalised_rewards(scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float,
                         estimator: str = "k1") -> tuple[Tensor, Tensor]:
    """Per-token rewards (B, N) = -kl_coef * k_t at every response token, plus the score at the
    row's last real token; and the per-token KL estimate k_t (B, N) (0 outside the mask).
    Response-aligned inputs; kl_coef = 0 gives the score alone."""
    m = mask.to(logp.dtype)
    kl = kl_estimate(logp, ref_logp, estimator) * m
    rewards = -kl_coef * kl
    last = (mask.sum(1) - 1).clamp_min(0)
    has = mask.any(1).to(rewards.dtype)
    return rewards.scatter_add(1, last[:, None], (scores.to(rewards.dtype) * has)[:, None]), kl


def update_passes(rows: dict, keys: Sequence[str], *, epochs: int, num_minibatches: int, grad_accum: int,
                  generator: torch.Generator, step_fn: Callable[[list[dict]], dict]) -> dict:
    """`epochs` passes over a rollout's rows, each in a fresh order drawn from `generator`, cut
    into num_minibatches minibatches of grad_accum micro-batches; step_fn(micro_batches) is one
    optimizer step (`optimizer_step` with the method's loss closure). Returns {"loss",
    "grad_norm", "lr"}, one list entry per optimizer step. The row count must divide by
    num_minibatches * grad_accum (the methods check it on their config)."""
    B = rows[keys[0]].shape[0]
    device = rows[keys[0]].device
    mb_size = B // num_minibatches
    micro = mb_size // grad_accum
    out = {"loss": [], "grad_norm": [], "lr": []}
    for _ in range(epochs):
        order = torch.randperm(B, generator=generator).to(device)
        for k in range(num_minibatches):
            idx = order[k * mb_size:(k + 1) * mb_size]
            res = step_fn([{key: rows[key][idx[j * micro:(j + 1) * micro]] for key in keys} for j in range(grad_accum)])
            for key in out:
                out[key].append(res[key])
    return out


def reference_logprobs_fn(model: nn.Module, *, reference_model: nn.Module | None, peft: bool,
                          device: torch.device, temperature: float) -> Callable:
    """The KL reference of PPO and GRPO, set up from the initial weights (before a checkpoint is
    loaded): `reference_model` when given; with PEFT the same model with its adapters disabled (one
    copy of the base weights); else a frozen copy of the initial policy. Returns
    fn(batch: ResponseBatch) -> per-position reference log-probs at the sampling temperature."""
    import contextlib
    import copy

    if reference_model is not None:
        ref, ref_context = reference_model.to(device).requires_grad_(False), contextlib.nullcontext
    elif peft:
        from fastllm.peft import disable_adapters

        ref, ref_context = model, lambda: disable_adapters(model)
    else:
        ref, ref_context = copy.deepcopy(model).requires_grad_(False), contextlib.nullcontext
    ref.to(device).eval()

    @torch.no_grad()
    def reference_logprobs(batch: ResponseBatch) -> Tensor:
        with ref_context():
            return policy_logprobs(ref, batch, temperature)[0]

    return reference_logprobs
