"""Per-token KL estimators and KL-coefficient controllers.

The estimators follow Schulman, "Approximating KL Divergence" (2020). A token y is sampled
from the policy pi; logp = log pi(y), ref_logp = log pi_ref(y), d = ref_logp - logp = log r
with r = pi_ref(y) / pi(y). Over y ~ pi:

    k1 = -d = logp - ref_logp             E[k1] = KL(pi || pi_ref)   unbiased, can be negative
    k2 = d^2 / 2                          E[k2] = sum_y pi(y) (log pi(y) - log pi_ref(y))^2 / 2
                                          biased (close to KL when pi ~ pi_ref), >= 0
    k3 = r - 1 - log r = e^d - 1 - d      E[k3] = KL(pi || pi_ref)   unbiased (E[r] = 1), >= 0

Inputs are per-token log-probs of the sampled tokens (B, T) from
`fastllm.ops.token_logprobs_and_entropy`; outputs have the same shape, unmasked (mask or
aggregate them with `fastllm.rl.losses.aggregate`). These values are estimates of the KL; for
where their *gradients* point when used as a loss see `fastllm.rl.losses.kl_loss`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_same_shape

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = logp - ref_logp (per token; unbiased for KL(pi || pi_ref) under y ~ pi)."""
    check_same_shape("ref_logp", ref_logp, "logp", logp)
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = (logp - ref_logp)^2 / 2 (per token; non-negative, biased)."""
    check_same_shape("ref_logp", ref_logp, "logp", logp)
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(d) - 1 - d with d = ref_logp - logp (per token; unbiased and non-negative).

    Computed as expm1(d) - d, which keeps its precision when pi ~ pi_ref (d ~ 0).
    """
    check_same_shape("ref_logp", ref_logp, "logp", logp)
    d = ref_logp - logp
    return torch.expm1(d) - d


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """The named per-token estimator: kind in ("k1", "k2", "k3")."""
    if kind == "k1":
        return kl_k1(logp, ref_logp)
    if kind == "k2":
        return kl_k2(logp, ref_logp)
    if kind == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"kind: expected one of {KL_ESTIMATORS}, got {kind!r}")


# --------------------------------------------------------------------------- controllers


class FixedKLController:
    """A constant KL coefficient beta, with the adaptive controller's interface."""

    def __init__(self, kl_coef: float):
        if not kl_coef >= 0:
            raise ValueError(f"kl_coef: expected a non-negative value, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """No change; returns the coefficient."""
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        _check_keys(state, {"value"}, type(self).__name__)
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional control of beta towards a target KL (Ziegler et al. 2019, section 2.2).

    After a batch whose measured KL (per sequence, summed over tokens) is `current_kl` and
    which took `n_steps` samples (or steps) out of the `horizon`:

        e     = clip(current_kl / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    so beta grows while the policy drifts further than the target and shrinks otherwise.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if not init_kl_coef > 0:
            raise ValueError(f"init_kl_coef: expected a positive value, got {init_kl_coef}")
        if not target > 0:
            raise ValueError(f"target: expected a positive value, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon: expected a positive value, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """One control step; returns the new coefficient."""
        kl = float(current_kl)
        if not math.isfinite(kl):
            raise FloatingPointError(f"current_kl: expected a finite value, got {kl}")
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        _check_keys(state, {"value", "target", "horizon"}, type(self).__name__)
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


def _check_keys(state: dict, expected: set, owner: str) -> None:
    if set(state) != expected:
        raise KeyError(f"{owner}.load_state_dict: expected keys {sorted(expected)}, got {sorted(state)}")
