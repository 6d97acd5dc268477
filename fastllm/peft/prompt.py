"""Prompt tuning (Lester et al., 2021): P trainable embeddings prepended to the input
embeddings of a frozen decoder. forward returns the hidden states of the real tokens only,
so logits and loss line up with input_ids as for the base model.

    soft prompt: (P, hidden), initialised randomly (the embedding table's std) or from the
                 embeddings of given token ids (a text's tokens, repeated or cut to P)

    model = PromptTuningModel(base, num_virtual_tokens=8, init_token_ids=tok("Answer:"))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastllm.models._decoder import NextTokenLoss

from .utils import mark_only_adapters_trainable


class SoftPrompt(nn.Module):
    peft_parameters = ("",)

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (P, hidden)

    def forward(self, batch: int) -> Tensor:
        return self.weight.expand(batch, *self.weight.shape)  # (B, P, hidden)


def _input_embeddings(model: nn.Module) -> nn.Embedding:
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "embed_tokens", None), nn.Embedding):
        return inner.embed_tokens
    raise TypeError(f"model: expected a decoder with model.embed_tokens (Llama family), got {type(model).__name__}")


class PromptTuningModel(NextTokenLoss, nn.Module):
    """A frozen causal decoder with a trainable soft prompt before every sequence."""

    def __init__(self, model: nn.Module, num_virtual_tokens: int = 8, *, init_token_ids=None,
                 init_text: str | None = None, tokenizer=None):
        super().__init__()
        if num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens: expected a positive integer, got {num_virtual_tokens}")
        if init_text is not None:
            if tokenizer is None:
                raise ValueError("tokenizer: expected a tokenizer to encode init_text, got None")
            init_token_ids = tokenizer.encode(init_text)
        embed = _input_embeddings(model)
        if init_token_ids is not None:
            ids = torch.as_tensor(init_token_ids, dtype=torch.long, device=embed.weight.device).flatten()
            if ids.numel() == 0:
                raise ValueError("init_token_ids: expected at least one token, got none")
            ids = ids.repeat((num_virtual_tokens + ids.numel() - 1) // ids.numel())[:num_virtual_tokens]
            weight = embed.weight[ids].detach().clone()
        else:
            std = embed.weight.detach().float().std().item()
            weight = torch.randn(num_virtual_tokens, embed.embedding_dim, device=embed.weight.device,
                                 dtype=embed.weight.dtype) * std
        self.model = model
        self.prompt = SoftPrompt(weight)
        self.num_virtual_tokens = num_virtual_tokens
        self.peft_type = "FASTLLM_PROMPT_TUNING"
        self.peft_settings = {"num_virtual_tokens": num_virtual_tokens}
        mark_only_adapters_trainable(self)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        """Hidden states of the real tokens (B, T, hidden)."""
        B, P = input_ids.shape[0], self.num_virtual_tokens
        x = torch.cat([self.prompt(B), _input_embeddings(self.model)(input_ids)], 1)  # (B, P+T, hidden)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], 1)
        return self.model(inputs_embeds=x, attention_mask=attention_mask, **kwargs)[:, P:]

    @property
    def config(self):
        return self.model.config

    @property
    def lm_head_weight(self) -> Tensor:
        return self.model.lm_head_weight

    def logits(self, hidden: Tensor) -> Tensor:
        return self.model.logits(hidden)

