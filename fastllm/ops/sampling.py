"""Fused sampling: temperature, top-k and top-p (nucleus) filtering and the draw, per row.

logits (B, V) float32. Per row b, with temperature T_b, top_k k_b, top_p p_b and a uniform
u_b in [0, 1):

    greedy (T_b == 0): token = argmax(logits_b) (the first on ties);
    otherwise: z = logits_b / T_b; keep the tokens with z_i >= t, where t is the larger of
      - the top-k threshold: the k_b-th largest value of z (k_b == 0 or >= V: no threshold),
      - the top-p threshold: walking z from the largest, the value at which the running
        probability mass (renormalised over what top-k kept) first reaches p_b
        (p_b >= 1: no threshold);
      token = the first kept index i whose running sum (in index order) of exp(z - max z)
      over kept tokens exceeds u_b times their total: inverse-CDF sampling from
      softmax(z) restricted to the kept tokens.

Thresholds are values, so every token tied with the boundary token is kept.

logprobs: the log-probability of the sampled token under softmax(logits / T) - the
temperature-scaled distribution BEFORE top-k/top-p filtering - which is what a
teacher-forced forward recomputes (log_softmax(logits / T)) and what PPO's importance ratio
needs; with top-k/top-p the filtered distribution differs from it by the log of the kept
mass. Greedy rows (T == 0) report log_softmax(logits) at the argmax.

Randomness: the uniforms come from `torch.rand(B, generator=generator)` on the logits'
device; the kernels themselves are deterministic functions of (logits, params, uniforms),
so nothing waits on the host and a CUDA graph can replay the step.

Kernels: C++ CPU (csrc/cpu/sampling.cpp), CUDA (csrc/cuda/sampling.cu). Inference only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend
from ._checks import check_dtype, check_same_device, check_tensor

# --------------------------------------------------------------------------- references


def _keep_mask(z: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """(B, V) bool: the tokens top-k and top-p keep (see the module docstring)."""
    V = z.shape[-1]
    ninf = torch.tensor(float("-inf"), device=z.device)
    m = z.max(-1, keepdim=True).values
    ordered = z.sort(-1, descending=True).values  # (B, V)
    k = top_k.long().to(z.device)
    thr_k = ordered.gather(-1, (k.clamp(1, V) - 1)[:, None])  # (B, 1)
    thr_k = torch.where(((k > 0) & (k < V))[:, None], thr_k, ninf)
    mass = (ordered - m).double().exp() * (ordered >= thr_k)
    cum = mass.cumsum(-1)
    p = top_p.to(device=z.device, dtype=torch.float32).double()[:, None]
    r = (cum < p * cum[:, -1:]).sum(-1).clamp(max=V - 1)  # first rank whose mass reaches p
    thr_p = torch.where(p < 1, ordered.gather(-1, r[:, None]), ninf)
    return z >= torch.maximum(thr_k, thr_p)


def sampling_distribution_reference(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """The distribution each row is drawn from, (B, V) float64: softmax(logits / T) over the
    kept tokens, zero elsewhere; one-hot at the argmax for greedy rows."""
    x = logits.float()
    t = temperature.to(device=x.device, dtype=torch.float32)
    greedy = t <= 0
    z = x / torch.where(greedy, torch.ones_like(t), t)[:, None]
    keep = _keep_mask(z, top_k, top_p)
    e = (z - z.max(-1, keepdim=True).values).double().exp() * keep
    probs = e / e.sum(-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).double()
    return torch.where(greedy[:, None], onehot, probs)


def sample_reference(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                     uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """Plain PyTorch sampling from given uniforms: (tokens (B,) int64, logprobs (B,) float32)."""
    x = logits.float()
    V = x.shape[-1]
    t = temperature.to(device=x.device, dtype=torch.float32)
    greedy = t <= 0
    z = x / torch.where(greedy, torch.ones_like(t), t)[:, None]  # (B, V)
    shifted = z - z.max(-1, keepdim=True).values
    e = shifted.double().exp()
    logprob_all = shifted.double() - e.sum(-1, keepdim=True).log()  # log_softmax(z), float64
    keep = _keep_mask(z, top_k, top_p)
    cdf = (e * keep).cumsum(-1)
    target = uniforms.to(x.device).double()[:, None] * cdf[:, -1:]
    token = (cdf <= target).sum(-1)  # the first index whose running mass exceeds the target
    last_kept = V - 1 - keep.flip(-1).int().argmax(-1)
    token = torch.minimum(token, last_kept)
    token = torch.where(greedy, x.argmax(-1), token)
    return token, logprob_all.gather(-1, token[:, None])[:, 0].float()


# --------------------------------------------------------------------------- checks


def _check(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, uniforms: Tensor) -> None:
    check_tensor(logits, "logits")
    check_dtype(logits, "logits", (torch.float32,))
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits: expected shape (B, V) with V > 0, got {list(logits.shape)}")
    B = logits.shape[0]
    for t, name, dtype in ((temperature, "temperature", torch.float32), (top_k, "top_k", torch.int32),
                           (top_p, "top_p", torch.float32), (uniforms, "uniforms", torch.float32)):
        check_tensor(t, name)
        check_dtype(t, name, (dtype,))
        check_same_device(logits, "logits", t, name)
        if tuple(t.shape) != (B,):
            raise ValueError(f"{name}: expected shape [{B}], got {list(t.shape)}")


# --------------------------------------------------------------------------- registered op


@torch.library.custom_op("fastllm::sample", mutates_args=())
def _sample_op(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, uniforms: Tensor,
               backend: str = "auto") -> tuple[Tensor, Tensor]:
    _check(logits, temperature, top_k, top_p, uniforms)
    chosen = _backend.choose("sample", logits.device, backend, native_op="sample_tokens",
                             cuda_order=("native",), has_triton=False)
    if chosen == "reference":
        return sample_reference(logits, temperature, top_k, top_p, uniforms)
    return torch.ops.fastllm.sample_tokens(logits.contiguous(), temperature.contiguous(), top_k.contiguous(),
                                           top_p.contiguous(), uniforms.contiguous())


def _fake(logits, *rest):
    B = logits.shape[0]
    return (logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B,), dtype=torch.float32))


_sample_op.register_fake(lambda logits, temperature, top_k, top_p, uniforms, backend="auto": _fake(logits))


def _register_native_fakes() -> None:
    from fastllm import _extension

    if _extension.available():
        torch.library.register_fake("fastllm::sample_tokens")(
            lambda logits, temperature, top_k, top_p, uniforms: _fake(logits))


_register_native_fakes()

# --------------------------------------------------------------------------- public API


def sampling_params(batch: int, device, temperature=1.0, top_k=0, top_p=1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row parameter tensors (temperature float32, top_k int32, top_p float32), each (B,),
    from scalars or (B,) tensors. Python scalars are validated; tensors are taken as given
    (checking their values would wait on the device)."""
    def as_tensor(value, name, dtype):
        if isinstance(value, Tensor):
            if value.dim() == 0:
                value = value.expand(batch)
            if tuple(value.shape) != (batch,):
                raise ValueError(f"{name}: expected a scalar or shape [{batch}], got {list(value.shape)}")
            return value.to(device=device, dtype=dtype)
        return torch.full((batch,), value, device=device, dtype=dtype)

    if not isinstance(temperature, Tensor) and not temperature >= 0:
        raise ValueError(f"temperature: expected a value >= 0 (0: greedy), got {temperature}")
    if not isinstance(top_k, Tensor) and (int(top_k) != top_k or top_k < 0):
        raise ValueError(f"top_k: expected an integer >= 0 (0: off), got {top_k}")
    if not isinstance(top_p, Tensor) and not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a value in (0, 1] (1: off), got {top_p}")
    return (as_tensor(temperature, "temperature", torch.float32), as_tensor(top_k, "top_k", torch.int32),
            as_tensor(top_p, "top_p", torch.float32))


def sample(logits: Tensor, temperature=1.0, top_k=0, top_p=1.0, *, generator: torch.Generator | None = None,
           uniforms: Tensor | None = None, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Sample one token per row of logits (B, V) -> (tokens (B,) int64, logprobs (B,) float32).

    temperature (0: greedy), top_k (0: off), top_p (1: off): scalars or (B,) tensors.
    The uniforms come from `generator` (default: torch's) on the logits' device, unless given.
    See the module docstring for the exact rule and which log-probability is returned."""
    logits = logits.float()
    B = logits.shape[0] if logits.dim() == 2 else 0
    t, k, p = sampling_params(B, logits.device, temperature, top_k, top_p)
    if uniforms is None:
        uniforms = torch.rand(B, generator=generator, device=logits.device, dtype=torch.float32)
    return torch.ops.fastllm.sample(logits, t, k, p, uniforms, backend or "auto")
