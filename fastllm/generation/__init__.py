"""Batched generation engine for PPO rollouts: prefill + decode over a preallocated KV cache,
fused sampling, stop conditions, per-token log-probs and response masks."""

from .engine import GenerationOutput, generate, generate_reference

__all__ = ["GenerationOutput", "generate", "generate_reference"]
