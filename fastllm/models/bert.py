"""BERT-style encoder (Devlin et al., 2019) with a masked-LM head tied to the embeddings.

    x0 = LayerNorm(word(ids) + position(0..T-1) + token_type(types))
    layer(x) = LN(h + W2 gelu(W1 h)),  h = LN(x + Wo attention(x))       (post-LN, erf GELU)
    mlm_head(hidden) = LN(gelu(dense(hidden))) @ word_embeddings^T + bias

Module names follow Hugging Face's BertForMaskedLM (bert.embeddings..., bert.encoder.layer[i]
.attention.self.{query,key,value}, ..., cls.predictions...), so checkpoints map 1:1; the
decoder weight is the word-embedding matrix itself and is not stored. Attention (not causal,
padding masked) goes through fastllm.ops.attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastllm.ops import mlm_loss
from fastllm.ops.attention import attention

from ._decoder import check_token_ids, run_blocks
from .config import BertConfig
from .registry import HFNames


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(pos)[None]
            + self.token_type_embeddings(token_type_ids)
        )  # (B, T, H)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        B, T, C = x.shape
        q = self.query(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.key(x).view(B, T, self.n_heads, self.head_dim)
        v = self.value(x).view(B, T, self.n_heads, self.head_dim)
        return attention(q, k, v, causal=False, key_padding_mask=key_padding_mask).reshape(B, T, C)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + x)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        return self.output(self.self(x, key_padding_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + x)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        h = self.attention(x, key_padding_mask)
        return self.output(self.intermediate(h), h)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """transform -> logits against the tied word embeddings (passed in at call time, so the
    tie cannot come undone by a module swap or a dtype change) + its own bias."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self._embeddings = [word_embeddings]  # a list: not registered as a child module twice

    def forward(self, hidden: Tensor) -> Tensor:
        return F.linear(self.transform(hidden), self._embeddings[0].weight, self.bias)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)


class BertForMaskedLM(HFNames, nn.Module):
    """Encoder + MLM head. forward -> encoder hidden states; mlm_head(hidden) -> logits;
    mlm_loss(input_ids, labels) -> mean cross-entropy over labels != -100."""

    # The pooler and next-sentence head of pre-training checkpoints are not part of MLM;
    # position_ids is a buffer some files carry.
    _ignored_hf = (r"^bert\.pooler\.", r"^cls\.seq_relationship\.", r"embeddings\.position_ids$")

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertOnlyMLMHead(config, self.bert.embeddings.word_embeddings)
        self.activation_checkpointing = False  # recompute each block in the backward pass
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.cls.predictions.bias)

    @property
    def mlm_head(self) -> BertLMPredictionHead:
        """The MLM head module: mlm_head(hidden (..., H)) -> logits (..., V), decoder tied to
        bert.embeddings.word_embeddings."""
        return self.cls.predictions

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """input_ids (B, T) in [0, vocab_size); token_type_ids (B, T) in [0, type_vocab_size)
        (default 0); attention_mask (B, T), 1 for real tokens. Returns (B, T, hidden)."""
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape (B, T), got {list(input_ids.shape)}")
        check_token_ids(input_ids, cfg.vocab_size)
        B, T = input_ids.shape
        if T > cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids: sequence length {T} exceeds the context of "
                f"{cfg.max_position_embeddings} positions (max_position_embeddings)"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        elif tuple(token_type_ids.shape) != (B, T):
            raise ValueError(
                f"token_type_ids: expected shape {[B, T]} (as input_ids), "
                f"got {list(token_type_ids.shape)}"
            )
        else:
            check_token_ids(token_type_ids, cfg.type_vocab_size, "token_type_ids")
        key_padding_mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(
                    f"attention_mask: expected shape {[B, T]} (as input_ids), "
                    f"got {list(attention_mask.shape)}"
                )
            key_padding_mask = attention_mask.bool()
        x = self.bert.embeddings(input_ids, token_type_ids)
        x = run_blocks(self.bert.encoder.layer, x, key_padding_mask, checkpoint=self.activation_checkpointing)
        return x

    def mlm_loss(
        self,
        input_ids: Tensor,
        labels: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        reduction: str = "mean",
        num_tokens=None,
    ) -> Tensor:
        """Cross-entropy of the MLM head over positions whose label is not -100 (labels
        unshifted: fastllm.labels), through fastllm.ops.mlm_loss: only the masked rows go
        through the head's transform and the tied decoder. reduction "mean" (0 for a batch
        with no masked position), "sum" or "none"."""
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels: expected shape {list(input_ids.shape)} (as input_ids), "
                f"got {list(labels.shape)}"
            )
        hidden = self(input_ids, token_type_ids, attention_mask)
        head = self.mlm_head
        return mlm_loss(hidden, head._embeddings[0].weight, labels, head.bias, transform=head.transform,
                        reduction=reduction, num_tokens=num_tokens)

    # -- Hugging Face names ------------------------------------------------------------
    @classmethod
    def _from_hf(cls, name, tensor, raw, config):
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias"
        )
        if name == "cls.predictions.decoder.weight":
            emb = raw.get("bert.embeddings.word_embeddings.weight")
            if emb is not None and not torch.equal(emb, tensor):
                raise ValueError(
                    "cls.predictions.decoder.weight: the MLM decoder is tied to "
                    "bert.embeddings.word_embeddings.weight, but the checkpoint's differs"
                )
            return None
        if name == "cls.predictions.decoder.bias":
            if "cls.predictions.bias" in raw:
                return None
            name = "cls.predictions.bias"
        return name, tensor
