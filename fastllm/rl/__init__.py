"""Model-free math of RLHF: advantages, KL estimators and controllers, PPO/GRPO/DPO losses.

Shared by the reward-model, PPO, DPO and GRPO/RLOO loops; everything is a plain function of
(B, T) per-token tensors with a response mask (see docs/ARCHITECTURE.md, "RLHF math").
"""

from .advantages import gae, group_advantages, rloo_advantages, whiten
from .kl import AdaptiveKLController, FixedKLController, kl_estimate, kl_k1, kl_k2, kl_k3
from .losses import (
    AGGREGATIONS,
    DPOLoss,
    PolicyLoss,
    ValueLoss,
    aggregate,
    aggregation_normaliser,
    bradley_terry_loss,
    dpo_loss,
    entropy_bonus,
    kl_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logprobs,
)

__all__ = [
    "AGGREGATIONS", "AdaptiveKLController", "DPOLoss", "FixedKLController", "PolicyLoss", "ValueLoss",
    "aggregate", "aggregation_normaliser", "bradley_terry_loss", "dpo_loss", "entropy_bonus", "gae",
    "group_advantages", "kl_estimate", "kl_k1", "kl_k2", "kl_k3", "kl_loss", "ppo_policy_loss",
    "ppo_value_loss", "rloo_advantages", "sequence_logprobs", "whiten",
]
