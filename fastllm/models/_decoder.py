"""Pieces shared by the causal decoders (Llama family, GPT-2): input checks, position ids,
the per-forward attention arguments, the decode branch, and the next-token loss (`NextTokenLoss.loss`).

One forward serves training, prefill and the single-token decode step. `prepare` validates a
forward's arguments and builds its Step; `decode_step` builds the Step of `model.decode` (one
token per sequence at its own position over a KVCache, no value checks, no host sync). The
layers run the same code for both and branch only where the decode step differs:
`self_attention` appends the new key/value at each sequence's position and calls the fused
`decode_attention` (Llama: `kv_append_rope` applies RoPE on the way), `norm` and `swiglu_act`
call the native kernels directly, and `project` runs one matmul for several projections
(LoRA adapters merged in, or added as one low-rank term).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from fastllm.labels import IGNORE_INDEX, check_shifted
from fastllm.ops import linear as ops_linear
from fastllm.ops import lora_linear_group, next_token_loss, small_linear, swiglu
from fastllm.ops.attention import attention

from .kv_cache import KVCache

__all__ = ["IGNORE_INDEX", "NextTokenLoss", "Step", "check_token_ids", "prepare", "recompute_saved", "run_blocks"]


def check_token_ids(input_ids: Tensor, vocab_size: int, name: str = "input_ids") -> None:
    """Raise a ValueError naming `name` when an id is outside [0, vocab_size)."""
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name}: expected an integer tensor, got dtype {input_ids.dtype}")
    if input_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: token ids must be in [0, {vocab_size}) (vocab_size), got {bad}")


@dataclass
class Step:
    """What every layer of one forward needs."""

    batch: int
    seq_len: int
    position_ids: Tensor  # (B, T) (int32 in a decode step)
    key_padding_mask: Tensor | None  # (B, T) bool, without a cache
    cu_seqlens: Tensor | None  # (B'+1,) int32 when packed
    max_seqlen: int | None
    kv_cache: KVCache | None
    prefix_kv: list | None
    num_new: Tensor | int  # real new tokens per sequence, for kv_cache.advance
    decode: Decode | None = None  # set for model.decode: the decode branch
    recompute: bool = True  # recompute_saved may drop activations (off under activation checkpointing)


@dataclass
class Decode:
    """One token per sequence, each at its own position, over a KVCache."""

    positions: Tensor  # (B,) int32: the new token's position, also its cache slot
    lengths: Tensor  # (B,) int32: positions + 1, the keys to attend to
    inv_freq: Tensor | None = None  # (D/2,) float32 RoPE frequencies (None: no RoPE)


def decode_step(config, tokens: Tensor, positions: Tensor, kv_cache: KVCache) -> Step:
    """The Step of model.decode: tokens (B,) at positions (B,) (int32, or any integer dtype),
    written at those slots of kv_cache. Shapes are checked; values are not (that would sync
    with the host): the caller keeps positions below kv_cache.max_len and the context."""
    B = kv_cache.batch
    if tuple(tokens.shape) != (B,) or tuple(positions.shape) != (B,):
        raise ValueError(
            f"tokens, positions: expected shape [{B}] (the kv_cache batch) each, "
            f"got {list(tokens.shape)} and {list(positions.shape)}"
        )
    if positions.dtype != torch.int32:
        positions = positions.to(torch.int32)
    return Step(
        B, 1, positions.unsqueeze(1), None, None, None, kv_cache, None, 1,
        Decode(positions, positions + 1),
    )


def prepare(
    config,
    input_ids,
    inputs_embeds,
    *,
    position_ids,
    cu_seqlens,
    max_seqlen,
    attention_mask,
    prefix_kv,
    kv_cache,
    max_positions: int,
    window: int | None = None,
) -> tuple[Tensor | None, Step]:
    """Validate the decoder forward arguments and derive positions and masks.

    Returns input_ids (B, T) (or None when inputs_embeds is given) and a Step.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(
            "input_ids, inputs_embeds: expected exactly one of them, got "
            f"{'both' if input_ids is not None else 'neither'}"
        )
    x = input_ids if input_ids is not None else inputs_embeds
    if input_ids is not None:
        if input_ids.dim() == 1 and cu_seqlens is not None:
            input_ids = input_ids[None]  # packed tokens (N,) -> (1, N)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape (B, T), got {list(input_ids.shape)}")
        check_token_ids(input_ids, config.vocab_size)
        B, T = input_ids.shape
        device = input_ids.device
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds: expected shape (B, T, {config.hidden_size}), "
                f"got {list(inputs_embeds.shape)}"
            )
        B, T = inputs_embeds.shape[:2]
        device = x.device
    if T == 0:
        raise ValueError("input_ids: expected at least one token per sequence, got T=0")

    if prefix_kv is not None and len(prefix_kv) != _num_layers(config):
        raise ValueError(
            f"prefix_kv: expected one (k, v) per layer ({_num_layers(config)}), "
            f"got {len(prefix_kv)}"
        )
    num_new: Tensor | int = T
    key_padding_mask = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(
                f"attention_mask: expected shape {[B, T]} (as input_ids), "
                f"got {list(attention_mask.shape)}"
            )
        key_padding_mask = attention_mask.bool()

    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(
                "input_ids: packed sequences (cu_seqlens) expect shape (1, N) or (N,), "
                f"got {[B, T]}"
            )
        if kv_cache is not None or prefix_kv is not None or attention_mask is not None:
            raise ValueError(
                "cu_seqlens: cannot be combined with kv_cache, prefix_kv or attention_mask"
            )
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens: expected shape (num_seqs + 1,), got {list(cu_seqlens.shape)}"
            )
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if not torch.compiler.is_compiling():
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T or bool((lengths < 0).any()):
                raise ValueError(
                    f"cu_seqlens: expected increasing offsets from 0 to N={T}, "
                    f"got {cu_seqlens.tolist()}"
                )
        if max_seqlen is None:
            max_seqlen = int(lengths.max())
        if position_ids is None:  # every packed sequence restarts at 0
            starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths.long(), output_size=T)
            position_ids = (torch.arange(T, device=device) - starts)[None]
        longest = max_seqlen
    elif kv_cache is not None:
        kv_cache.check_append(T)
        if attention_mask is not None:
            real = key_padding_mask.sum(1)
            if not torch.compiler.is_compiling() and not bool(
                (key_padding_mask == (torch.arange(T, device=device)[None] < real[:, None])).all()
            ):
                raise ValueError(
                    "attention_mask: with a kv_cache the new tokens must be right-padded "
                    "(ones then zeros in each row)"
                )
            num_new = real
        key_padding_mask = None  # the cache builds the key mask
        if position_ids is None:
            position_ids = kv_cache.positions(T)
        longest = kv_cache._max_length + T
    else:
        if position_ids is None:
            position_ids = torch.arange(T, device=device)[None].expand(B, T)
        longest = T

    if position_ids.dim() == 1:
        position_ids = position_ids[None].expand(B, T)
    if tuple(position_ids.shape) != (B, T):
        raise ValueError(
            f"position_ids: expected shape {[B, T]} (as input_ids), got {list(position_ids.shape)}"
        )
    if longest > max_positions:
        raise ValueError(
            f"input_ids: sequence length {longest} exceeds the context of "
            f"{max_positions} positions "
            "(max_position_embeddings)"
        )
    if window is not None and longest > window:
        raise ValueError(
            f"input_ids: sequence length {longest} exceeds sliding_window={window}, "
            "beyond which sliding-window attention is not implemented"
        )
    if not torch.compiler.is_compiling() and position_ids.numel():
        top = int(position_ids.max())
        if top >= max_positions or int(position_ids.min()) < 0:
            raise ValueError(
                f"position_ids: expected values in [0, {max_positions}) (max_position_embeddings), "
                f"got {top if top >= max_positions else int(position_ids.min())}"
            )
    return input_ids, Step(
        B, T, position_ids, key_padding_mask, cu_seqlens, max_seqlen, kv_cache, prefix_kv, num_new
    )


def _num_layers(config) -> int:
    return getattr(config, "num_hidden_layers", None) or config.n_layer


def self_attention(
    q: Tensor, k: Tensor, v: Tensor, layer_idx: int, step: Step, softmax_scale=None
) -> Tensor:
    """Causal attention of one layer through fastllm.ops.attention: q (B, T, Hq, D), k/v
    (B, T, Hkv, D), after RoPE where the model has it. Returns (B, T, Hq, D).
    In a decode step see `decode_attention` (the Llama layer calls it with q, k before RoPE)."""
    if step.decode is not None:
        return decode_attention(q, k, v, layer_idx, step, softmax_scale)
    B, T = q.shape[:2]
    if step.cu_seqlens is not None:  # packed: (N, H, D) with offsets
        out = attention(
            q[0],
            k[0],
            v[0],
            causal=True,
            softmax_scale=softmax_scale,
            cu_seqlens=step.cu_seqlens,
            max_seqlen=step.max_seqlen,
        )
        return out[None]
    key_padding_mask = step.key_padding_mask
    if step.kv_cache is not None:
        k, v, key_padding_mask = step.kv_cache.update(layer_idx, k, v)
    prefix_k = prefix_v = None
    if step.prefix_kv is not None:
        prefix_k, prefix_v = step.prefix_kv[layer_idx]
    return attention(
        q,
        k,
        v,
        causal=True,
        softmax_scale=softmax_scale,
        key_padding_mask=key_padding_mask,
        prefix_k=prefix_k,
        prefix_v=prefix_v,
    )


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, layer_idx: int, step: Step, softmax_scale=None
) -> Tensor:
    """The decode branch of a layer's attention: q (B, 1, Hq, D), k/v (B, 1, Hkv, D), before
    RoPE when step.decode.inv_freq is set. The new key/value of sequence b is written at slot
    positions[b] of the cache (kv_append_rope rotates q and k there; without RoPE a plain
    indexed write), then fastllm's decode_attention attends to slots 0..positions[b].
    Returns (B, 1, Hq, D)."""
    cache, d = step.kv_cache, step.decode
    kernels = cache.kernels
    k_cache, v_cache = cache.layer_k[layer_idx], cache.layer_v[layer_idx]  # (B, Smax, Hkv, D) views
    # (B, 1, H, D) -> (B, H, D); squeeze and contiguous, not indexing: a decode step is
    # dozens of tiny calls, and Python-side tensor indexing costs more than the kernels.
    q, k, v = q.squeeze(1).contiguous(), k.squeeze(1).contiguous(), v.squeeze(1).contiguous()
    if d.inv_freq is not None:
        q = kernels.append_rope(q, k, v, k_cache, v_cache, d.positions, d.inv_freq)
    else:
        slots = d.positions.long()
        k_cache[cache.rows, slots] = k.to(k_cache.dtype)
        v_cache[cache.rows, slots] = v.to(v_cache.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    return kernels.attention(q, k_cache, v_cache, d.lengths, scale).unsqueeze(1)  # (B, 1, Hq, D)


def project(owner: nn.Module, names: tuple[str, ...], x: Tensor, step: Step | None) -> list[Tensor]:
    """x through owner.<name> for each name (one projection, or several that read the same
    input: q/k/v, gate/up). In an inference forward over a KVCache (no gradients) whose
    projections are plain nn.Linear or LoRALinear, one matmul with their concatenated weight
    (or one per weight where the cache keeps the group as parts), LoRA merged in or added as one
    low-rank term (kept by the cache, rebuilt when a weight changes in place:
    KVCache.fused_projection): at decode batch sizes every matmul and
    module call costs more than its arithmetic. Otherwise (training, other wrappers) each
    module is called, a plain nn.Linear through fastllm.ops.linear, except a group of LoRA
    projections, which runs as one fastllm.ops.lora_linear_group op (`_lora_group`). The parameters keep their
    Hugging Face names either way."""
    fused = None
    if step is not None and step.kv_cache is not None and not torch.is_grad_enabled():
        fused = step.kv_cache.fused_projection(owner, names)
    if fused is None:
        modules = [getattr(owner, name) for name in names]
        grouped = _lora_group(modules, x) if len(modules) > 1 else None
        return grouped if grouped is not None else [_call(m, x) for m in modules]
    weight, bias, low_rank, sizes = fused
    if isinstance(weight, tuple):  # the group kept as parts (KVCache.fused_projection): one product each
        biases = [None] * len(weight) if bias is None else bias.split(sizes)
        return [_project_one(w, b, x, step)[0] for w, b in zip(weight, biases)]
    return _project_one(weight, bias, x, step, sizes, low_rank)


def _lora_group(modules: list[nn.Module], x: Tensor) -> list[Tensor] | None:
    """The modules' outputs on x through one fastllm.ops.lora_linear_group call, when each is a
    LoRA linear whose forward is one part of it (`group_parts()`, see LoRALinear) with the same
    backend and none carries forward hooks; else None. Its backward sums the parts' gradients
    for x inside the op instead of leaving autograd one addition per extra part."""
    if has_forward_hooks(*modules):
        return None
    parts = []
    for module in modules:
        get = getattr(module, "group_parts", None)
        part = get() if get is not None else None
        if part is None or (parts and part[5] != parts[0][5]):
            return None
        parts.append(part)
    weights, biases, lora_a, lora_b, scales, backends = zip(*parts)
    return lora_linear_group(x, list(weights), list(biases), [a.to(x.dtype) for a in lora_a],
                             [b.to(x.dtype) for b in lora_b], list(scales), backend=backends[0])


def _project_one(weight: Tensor, bias: Tensor | None, x: Tensor, step: Step, sizes: list[int] | None = None,
                low_rank: tuple[Tensor, Tensor] | None = None) -> list[Tensor]:
    """x through one inference weight (fused or not) of `project`, as its parts (`sizes`)."""
    sizes = sizes or [weight.shape[0]]
    # a decode step's few rows: the native kernel on the CPU, each part written contiguously;
    # called directly in the decode branch (small_linear's own checks cost more than its
    # arithmetic at these sizes: the fused weight is float32 and row-major, x is the step's)
    kernel = step.kv_cache.kernels.small_linear if step.decode is not None else None
    if (kernel is not None and low_rank is None and x.dtype == weight.dtype == torch.float32
            and weight.stride(-1) == 1 and x.is_contiguous()):
        lead = x.shape[:-1]
        return [o.view(*lead, o.shape[-1]) for o in kernel(x.view(-1, x.shape[-1]), weight, bias, sizes)]
    if low_rank is None:
        return small_linear(x, weight, bias, split=sizes)
    y = small_linear(x, weight, bias)
    y += F.linear(F.linear(x, low_rank[0]), low_rank[1])
    return y.split_with_sizes(sizes, -1) if len(sizes) > 1 else [y]


def has_forward_hooks(*modules: nn.Module) -> bool:
    """Whether calling these modules would run a forward hook (their own, or a global one): a
    path that skips the module call must not be taken then."""
    return (bool(nn.modules.module._global_forward_hooks) or bool(nn.modules.module._global_forward_pre_hooks)
            or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


def decode_plan(blocks, cache: KVCache) -> list | None:
    """Every block's one-call decode arguments (`block.decode_args(cache)`, see
    LlamaDecoderLayer), or None when a block has none or carries forward hooks (skipping its
    module call would skip them). Checked and built at every step; once per cache while
    `cache.fixed_model` is set (generate's decode loop: the model does not change during it),
    kept in `cache.plan`. At batch 1 the blocks' module calls and these checks, run between
    weight streams that evict the interpreter's data from the caches, cost ~7% of a step
    (bench/README.md)."""
    held = cache.plan
    if held is not None and held[0] is blocks:
        return held[1]
    if has_forward_hooks(*blocks):
        return None
    plan = []
    for block in blocks:
        get = getattr(block, "decode_args", None)
        block_args = get(cache) if get is not None else None
        if block_args is None:
            return None
        plan.append(block_args)
    if cache.fixed_model:
        cache.plan = (blocks, plan)
    return plan


def decode_in_one_call(kernel, x: Tensor, plan: list[tuple[tuple, float]], step: Step) -> Tensor:
    """Blocks' decode steps through the native one-call kernel (fastllm.ops.decode_layer), one
    call per block in a row: x (B, 1, H) float32 -> (B, 1, H); plan: each block's arguments from
    its `decode_args` (one block's, or every block's from `decode_plan`)."""
    d = step.decode
    positions, lengths, inv_freq = d.positions, d.lengths, d.inv_freq
    B, H = x.shape[0], x.shape[-1]
    y = x.view(B, H)
    for weights, scale in plan:
        y = kernel(y, *weights, positions, lengths, inv_freq, scale)
    return y.view(B, 1, H)


def _call(module: nn.Module, x: Tensor) -> Tensor:
    """module(x); a plain nn.Linear without forward hooks through fastllm.ops.linear (fastllm's
    own CPU kernels; F.linear elsewhere). Subclasses and wrappers (LoRA, quantised layers) keep
    their forward, and a module with hooks (the user's, or any registered globally) is called
    as a module so that they run."""
    if type(module) is nn.Linear and not has_forward_hooks(module):
        return ops_linear(x, module.weight, module.bias)
    return module(x)


def linear(owner: nn.Module, name: str, x: Tensor, step: Step | None) -> Tensor:
    """owner.<name>(x) for one projection, through `project` (LoRA merged in inference)."""
    return project(owner, (name,), x, step)[0]


def norm(module: nn.Module, x: Tensor, step: Step) -> Tensor:
    """module(x) for an RMSNorm of the model; in a decode step with the native kernels, its
    forward kernel directly (no autograd wrapper)."""
    kernel = step.kv_cache.kernels.rms_norm if step.decode is not None else None
    if kernel is None:
        return module(x)
    return kernel(x.contiguous(), module.weight, module.eps)  # any leading shape


def swiglu_act(gate: Tensor, up: Tensor, step: Step | None) -> Tensor:
    """fastllm.ops.swiglu(gate, up); in a decode step with the native kernels, its forward
    kernel directly."""
    kernel = step.kv_cache.kernels.swiglu if step is not None and step.decode is not None else None
    if kernel is None:
        return swiglu(gate, up)
    return kernel(gate.contiguous(), up.contiguous())


class _Recomputed:
    """A saved activation kept as the call that recomputes it (`recompute_saved`); the value
    is made once, on the backward pass's first use, and shared by every consumer's node."""

    __slots__ = ("fn", "value")

    def __init__(self, fn: Callable[[], Tensor]):
        self.fn, self.value = fn, None

    def get(self) -> Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.fn()
        return self.value


def recompute_saved(value: Tensor, recompute: Callable[[], Tensor], consumer: Callable[[Tensor], Tensor],
                    step: Step | None) -> Tensor:
    """consumer(value) without keeping `value` for the backward pass: whatever the consumer's
    autograd saves from value's storage (its input, or a view of it) is stored as `recompute`,
    called again without gradients when the backward needs it. `recompute` must give the same
    values from tensors that are kept anyway: a norm's input (its backward saves it), an
    activation's inputs (likewise), so the saving is the activation itself, at the cost of
    recomputing it once. Plain consumer(value) without gradients, under activation
    checkpointing (step.recompute False: it has its own saved-tensor hooks) and while compiling."""
    if (step is None or not step.recompute or not torch.is_grad_enabled() or not value.is_contiguous()
            or torch.compiler.is_compiling()):
        return consumer(value)
    # the hooks live as long as the saved tensors, so they hold value's description, never value
    storage, offset, dtype, device = value.untyped_storage().data_ptr(), value.storage_offset(), value.dtype, \
        value.device
    box = _Recomputed(recompute)

    def pack(t: Tensor):
        # (a frozen layer's input is saved too, for its adapters' gradients, whether or not it
        # requires grad itself)
        if t.dtype == dtype and t.device == device and t.layout == torch.strided \
                and t.untyped_storage().data_ptr() == storage:
            return box, t.shape, t.stride(), t.storage_offset() - offset
        return t

    def unpack(packed):
        if isinstance(packed, tuple):
            held, shape, stride, at = packed
            return held.get().as_strided(shape, stride, at)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return consumer(value)


def run_blocks(blocks, x: Tensor, *args, checkpoint: bool = False) -> Tensor:
    """x through every block in order. With checkpoint (and gradients enabled) each block runs
    under torch.utils.checkpoint: its activations are recomputed in the backward pass instead
    of kept (the model's `activation_checkpointing` switch). A decode step (args ending in a
    Step with `decode`) whose blocks all have a one-call decode step (`decode_plan`) runs those
    calls in a row, without the blocks' module calls."""
    step = args[-1] if args else None
    if isinstance(step, Step) and step.decode is not None and x.dtype == torch.float32:
        plan, kernel = decode_plan(blocks, step.kv_cache), step.kv_cache.kernels.decode_layer
        if plan is not None and kernel is not None:
            return decode_in_one_call(kernel, x, plan, step)
    for block in blocks:
        if checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False)
        else:
            x = block(x, *args)
    return x


def finish(step: Step) -> None:
    """After the last layer: move the cache lengths on (a decode step sets them to
    positions + 1 on the device)."""
    if step.decode is not None:
        step.kv_cache.set_lengths(step.decode.lengths)
    elif step.kv_cache is not None:
        step.kv_cache.advance(step.num_new)


class NextTokenLoss:
    """`loss()` for every causal decoder and decoder wrapper (PEFT): the module's forward, then
    fastllm.ops.next_token_loss against its lm_head_weight. Defined once here."""

    def loss(self, input_ids: Tensor, labels: Tensor, *, reduction: str = "mean", num_tokens=None,
             **kwargs) -> Tensor:
        """Next-token cross-entropy. labels: already shifted (fastllm.labels: labels[t] is the
        token after position t, -100 where no loss is taken; `next_token_labels(input_ids)`
        makes them), shaped like input_ids. reduction "mean" (over counted targets, or divided
        by num_tokens), "sum" or "none". kwargs go to forward (attention_mask, cu_seqlens, ...)."""
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels: expected shape {list(input_ids.shape)} (as input_ids), got {list(labels.shape)}")
        check_shifted(input_ids, labels)
        hidden = self(input_ids, **kwargs)  # (B, T, H), or (1, N, H) packed
        return next_token_loss(hidden, self.lm_head_weight, labels.reshape(hidden.shape[:-1]),
                               reduction=reduction, num_tokens=num_tokens)
