"""Group relative policy optimisation (GRPO, Shao et al. 2024) and REINFORCE leave-one-out (RLOO,
Ahmadian et al. 2024) on the policy's own samples: no critic, the baseline is the group.

    from fastllm.train import GRPOConfig, grpo
    grpo(GRPOConfig(model="runs/sft/final", reward_funcs=["my_rewards:exact_answer"], num_generations=8))
    grpo(GRPOConfig(model="runs/sft/final", reward_model="runs/reward/final", advantage="rloo", beta=0.05))
    grpo(GRPOConfig(...), reward_funcs=[my_score, length_penalty])          # Python callables

One iteration (one `train_loop` step), written out in `step_fn`:
  1. rollout   batch_size prompts per process, each sampled G = num_generations times by
               `fastllm.generation.generate` on the live policy (rows [g G, (g + 1) G) answer
               prompt g; fastllm.train.rollout.sample_responses(num_samples=G));
  2. scoring   rewards r_i = sum_k w_k f_k(prompt, response) over the reward functions plus the
               reward model's score at the last real token; `no_eos_score` for a response cut off
               without EOS. Advantages per sequence, within each group (fastllm.rl):
                   grpo  A_i = (r_i - mean_g) / (std_g + eps)    scale_rewards=False: r_i - mean_g
                   rloo  A_i = r_i - mean of the other G - 1 rewards
               Old log-probs (one policy forward) only when the rows are reused (num_iterations
               > 1 or num_minibatches > 1); on-policy the ratio is exp(logp - logp.detach()) = 1
               with the same gradient. Reference log-probs only when beta > 0;
  3. training  num_iterations (mu) passes over the rows in a fresh shuffled order, num_minibatches
               `optimizer_step`s per pass, each over grad_accum micro-batches:
                   loss = clipped surrogate (fastllm.rl.ppo_policy_loss, epsilon / epsilon_high)
                          + beta * k3(pi, ref) [x pi / pi_old when kl_weighted]
               aggregated by loss_type: token_mean (DAPO: every token weighs the same),
               seq_mean (GRPO paper: the mean over each response, then over responses),
               seq_sum_norm (Dr. GRPO: the token sum / (rows x max_new_tokens)).

Which optimum (docs/ARCHITECTURE.md, "RLHF math"): with advantage="rloo" and kl_weighted=True the
expected update is the gradient of E[r] - beta KL(pi || ref), whose maximiser is
pi_ref exp(r / beta) / Z (tested on a bandit). The GRPO paper's unweighted k3 pulls towards the
reverse KL's optimum instead, and GRPO's leave-in mean ((G - 1) / G of the unbiased advantage)
and std scaling (rewards rescaled per group) move the fixed point too: that is GRPO as
published, kept as the default for comparability; choose rloo for the regularised optimum.

Normalisation (why splits do not change an update): as in PPO, each term returns a sum over
the micro-batch's rows and the step divides by the minibatch's global normaliser
(`count_fn` = `aggregation_normaliser` of the masks, all micro-batches and ranks). Groups
never straddle processes (each rank samples G responses for its own prompts), so advantages
are computed locally and N processes update as one process holding all rows.

Dropout is off throughout. The reference is a frozen copy of the initial weights, or with
PEFT the same model with adapters disabled; with beta = 0 there is none. Checkpoints hold the
weights, AdamW, the prompt order and every RNG, so a resumed run continues the same trajectory.

Logged per iteration: loss, reward/mean, reward/std, reward/<function> means, reward/group_std
(mean within-group std), zero_std_share (groups whose rewards are all equal: no signal), kl
(mean per-token k3 over the training passes), entropy, policy/clip_fraction, response_length,
eos_share, time/{rollout,scoring,training} and tokens_per_s/{rollout,training}.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fastllm.data import BatchLoader
from fastllm.rl import aggregation_normaliser, group_advantages, kl_k3, kl_loss, ppo_policy_loss, rloo_advantages

from . import build
from .checkpoint import resume_training_state, save_training_state
from .common import optimizer_for, optimizer_step
from .config import GRPOConfig, as_config
from .distributed import DistInfo, no_sync_fn, wrap_model
from .export import export_final
from .logging import read_metrics
from .loop import train_loop
from .peft_glue import apply_peft
from .ppo import load_reward_fn
from .rollout import (
    PolicyLogProbs,
    reference_logprobs_fn,
    response_batch,
    sample_responses,
    score_responses,
    to_response,
    update_passes,
)

# per-iteration sums of the training passes, all-reduced at the end of the iteration
_TRAIN_STATS = ("policy_sum", "kl_sum", "normaliser", "clip_tokens", "kl_tokens", "entropy_tokens", "tokens")


class RewardFunctions:
    """Weighted sum of reward functions, callable as fastllm.train.rollout's reward_fn.

    Each f(prompts, responses) -> one float per response; inputs are token-id lists, or decoded
    text when `tokenizer` is given (reward_inputs="text"). `last` holds each function's values
    of the last call (for logging), keyed by `names`."""

    def __init__(self, funcs: Sequence[Callable], weights: Sequence[float] | None = None, *, names=None,
                 tokenizer=None):
        self.funcs = list(funcs)
        self.weights = [1.0] * len(self.funcs) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.funcs):
            raise ValueError(f"reward_weights: expected one weight per reward function ({len(self.funcs)}), got "
                             f"{len(self.weights)}")
        self.names = list(names) if names is not None else [getattr(f, "__name__", f"f{i}")
                                                            for i, f in enumerate(self.funcs)]
        self.tokenizer = tokenizer
        self.last: dict[str, list[float]] = {}

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
        if self.tokenizer is not None:
            prompts, responses = self.tokenizer.decode(prompts), self.tokenizer.decode(responses)
        total = [0.0] * len(responses)
        self.last = {}
        for name, f, w in zip(self.names, self.funcs, self.weights, strict=True):
            got = [float(v) for v in f(prompts, responses)]
            if len(got) != len(responses):
                raise ValueError(f"reward_funcs[{name}]: expected {len(responses)} rewards (one per response), got "
                                 f"{len(got)}")
            self.last[name] = got
            total = [t + w * v for t, v in zip(total, got, strict=True)]
        return total


def _check(cfg: GRPOConfig) -> None:
    rows, per_update = cfg.batch_size * cfg.num_generations, cfg.num_minibatches * cfg.grad_accum
    if rows % per_update:
        raise ValueError(f"batch_size: expected batch_size * num_generations ({rows}) to be a multiple of "
                         f"num_minibatches * grad_accum = {per_update}")
    if not 0 < cfg.epsilon < 1:
        raise ValueError(f"epsilon: expected a clip range in (0, 1), got {cfg.epsilon}")


def _all_reduce(x: Tensor, info: DistInfo) -> Tensor:
    if info.world_size > 1:
        torch.distributed.all_reduce(x)
    return x


def reuses_rows(cfg: GRPOConfig) -> bool:
    """Whether a row is trained on after the weights moved (then old log-probs are needed)."""
    return cfg.num_iterations > 1 or cfg.num_minibatches > 1


@torch.no_grad()
def collect_groups(policy_lp: PolicyLogProbs, prompts: list[list[int]], cfg: GRPOConfig, *,
                   reference_logprobs: Callable | None, reward_model: nn.Module | None, reward_fn: Callable | None,
                   eos_id: int | None, pad_id: int) -> dict:
    """Rollout + scoring of one iteration on this rank: {"batch": ResponseBatch, "rows": the
    per-row tensors the updates need (response-aligned (B, N) and (B,) advantages), "scores",
    "eos", "times" {rollout, scoring}}. B = len(prompts) * num_generations."""
    G, N = cfg.num_generations, cfg.max_new_tokens
    t0 = time.perf_counter()
    out = sample_responses(policy_lp.model, prompts, max_new_tokens=N, temperature=cfg.temperature, top_k=cfg.top_k,
                           top_p=cfg.top_p, eos_id=eos_id, pad_id=pad_id, num_samples=G)
    batch = response_batch(out, N)
    t1 = time.perf_counter()
    scores, eos = score_responses(batch, reward_model=reward_model, reward_fn=reward_fn, eos_id=eos_id,
                                  no_eos_score=cfg.no_eos_score)
    if cfg.advantage == "rloo":
        advantages = rloo_advantages(scores, G)
    else:
        advantages = group_advantages(scores, G, scale_std=cfg.scale_rewards)
    mask = batch.mask
    m = mask.float()
    rows = {"input_ids": batch.tokens, "attention_mask": batch.attention_mask, "targets": batch.targets,
            "starts": batch.starts, "mask": mask, "advantages": advantages.float()}
    if reuses_rows(cfg):
        rows["old_logp"] = to_response(policy_lp(batch.tokens, batch.attention_mask, batch.targets)[0].float(),
                                       batch.starts, N) * m
    if reference_logprobs is not None:
        rows["ref_logp"] = to_response(reference_logprobs(batch).float(), batch.starts, N) * m
    t2 = time.perf_counter()
    return {"batch": batch, "rows": rows, "scores": scores, "eos": eos, "times": {"rollout": t1 - t0,
                                                                                   "scoring": t2 - t1}}


def grpo_loss_fns(cfg: GRPOConfig, wrapped: nn.Module, stats: Tensor):
    """(loss_sum, count_fn) for `optimizer_step`: loss_sum(micro-batch) is the summed GRPO loss of
    its rows (clipped surrogate + beta k3), count_fn(micro-batch) the normaliser of its mask
    under cfg.loss_type; optimizer_step divides the sums by the normaliser of the whole
    minibatch, all ranks included. Statistics accumulate into `stats` (_TRAIN_STATS order)."""
    N, mode = cfg.max_new_tokens, cfg.loss_type

    def count_fn(mb: dict) -> int:
        return int(aggregation_normaliser(mb["mask"], mode, N))

    def loss_sum(mb: dict) -> Tensor:
        logp, entropy = wrapped(mb["input_ids"], mb["attention_mask"], mb["targets"])
        logp, entropy = to_response(logp, mb["starts"], N), to_response(entropy, mb["starts"], N)
        mask = mb["mask"]
        old = mb["old_logp"] if "old_logp" in mb else logp.detach()  # on-policy: ratio 1, same gradient
        pol = ppo_policy_loss(logp, old, mb["advantages"], mask, cfg.epsilon, clip_eps_high=cfg.epsilon_high,
                              mode=mode, max_len=N)
        total = pol.loss_sum
        kl_sum = torch.zeros((), device=logp.device)
        kl_tokens = torch.zeros((), device=logp.device)
        if cfg.beta > 0:
            kl_sum, _ = kl_loss(logp, mb["ref_logp"], mask, "k3", old_logp=old if cfg.kl_weighted else None,
                                mode=mode, max_len=N)
            total = total + cfg.beta * kl_sum
            kl_tokens = (kl_k3(logp.detach(), mb["ref_logp"]) * mask).sum()
        stats.add_(torch.stack([pol.loss_sum.detach(), kl_sum.detach(), pol.normaliser, pol.clip_fraction * pol.tokens,
                                kl_tokens, (entropy.detach() * mask).sum(), pol.tokens]).double())
        return total

    return loss_sum, count_fn


def grpo_update(rows: dict, cfg: GRPOConfig, step: int, wrapped: nn.Module, optimizer, scheduler, info: DistInfo, *,
                device: torch.device, dtype: torch.dtype, loss_sum, count_fn, no_sync=None) -> dict:
    """cfg.num_iterations passes over this rank's rows, each in a fresh order (drawn from (seed,
    step, rank), so a resumed run repeats it), cut into cfg.num_minibatches optimizer steps of
    cfg.grad_accum micro-batches. Returns {"loss", "grad_norm", "lr"} lists per step."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + info.rank)

    def one_step(micro_batches: list[dict]) -> dict:
        return optimizer_step(micro_batches, loss_sum, wrapped, optimizer, scheduler, device=device, dtype=dtype,
                              max_grad_norm=cfg.max_grad_norm, world_size=info.world_size, no_sync=no_sync,
                              count_fn=count_fn)

    return update_passes(rows, list(rows), epochs=cfg.num_iterations, num_minibatches=cfg.num_minibatches,
                         grad_accum=cfg.grad_accum, generator=gen, step_fn=one_step)


def grpo(config: GRPOConfig | str | dict | None = None, *, model=None, tokenizer=None, prompts=None,
         reward_model=None, reward_funcs: Sequence[Callable] | None = None, reference_model=None) -> dict:
    """Run GRPO (or RLOO with advantage="rloo"); returns train_loop's result plus "reward" (the
    last iteration's mean score) and "trainable_params".

    config: a GRPOConfig, a YAML path or a dict of fields. model / tokenizer: ready objects
    instead of what the config names. prompts: a list of token-id lists (used as given), or
    records / questions for `PromptDataset` (chat template, bos). reward_model: a
    sequence-classification head model (its `predict` is the score); reward_funcs: callables
    f(prompts, responses) -> floats (token-id lists, or text with reward_inputs="text"), used
    instead of cfg.reward_funcs, weighted by cfg.reward_weights; either or both. reference_model:
    a separate reference policy."""
    cfg = as_config(GRPOConfig, config)
    _check(cfg)
    # ---- setup: devices, tokenizer, models, prompts, rewards
    info, device, dtype, out, items, tokenizer, model, eos_id, pad_id, reward_model = build.rollout_setup(
        cfg, "GRPO", prompts=prompts, tokenizer=tokenizer, model=model, reward_model=reward_model)
    names = None
    if reward_funcs is None:
        reward_funcs = [load_reward_fn(s) for s in cfg.reward_funcs]
        names = [s.partition(":")[2] for s in cfg.reward_funcs]
    if cfg.reward_inputs == "text" and tokenizer is None:
        raise ValueError("reward_inputs: 'text' needs a tokenizer to decode with, got none")
    reward_fn = RewardFunctions(reward_funcs, cfg.reward_weights, names=names,
                                tokenizer=tokenizer if cfg.reward_inputs == "text" else None) if reward_funcs else None
    if reward_model is None and reward_fn is None:
        raise ValueError("reward_model, reward_funcs: expected a reward model and/or reward functions, got neither")

    if cfg.peft:
        model = apply_peft(model, cfg.peft)
    # ---- the reference (beta > 0): the initial weights, set up before a checkpoint is loaded
    reference_logprobs = None
    if cfg.beta > 0:
        reference_logprobs = reference_logprobs_fn(model, reference_model=reference_model, peft=bool(cfg.peft),
                                                   device=device, temperature=cfg.temperature)
    policy_lp = PolicyLogProbs(model, cfg.temperature).to(device)
    if reward_model is not None:
        reward_model.to(device).requires_grad_(False).eval()
    n_trainable = sum(p.numel() for p in policy_lp.parameters() if p.requires_grad)
    wrapped = wrap_model(policy_lp, info, None, device)
    optimizer, scheduler = optimizer_for(wrapped, cfg, cfg.num_iterations * cfg.num_minibatches)
    loader = BatchLoader(list(range(len(items))), cfg.batch_size, seed=cfg.seed, rank=info.rank,
                         world_size=info.world_size, collate_fn=list)
    torch.manual_seed(cfg.seed + 7919 * info.rank)  # each rank samples its own responses
    step, _ = resume_training_state(cfg, wrapped, optimizer, scheduler, loader, info)
    policy_lp.eval()  # dropout off everywhere, rollout and training alike
    no_sync = no_sync_fn(wrapped, info)
    stats = torch.zeros(len(_TRAIN_STATS), dtype=torch.float64, device=device)
    loss_sum, count_fn = grpo_loss_fns(cfg, wrapped, stats)

    def step_fn(step: int) -> dict:
        # 1-2. rollout (G samples per prompt) and scoring on this rank's prompts
        roll = collect_groups(policy_lp, [items[i] for i in loader.next_batch()], cfg,
                              reference_logprobs=reference_logprobs, reward_model=reward_model, reward_fn=reward_fn,
                              eos_id=eos_id, pad_id=pad_id)
        # 3. num_iterations passes of num_minibatches optimizer steps over shuffled rows
        t0 = time.perf_counter()
        stats.zero_()
        res = grpo_update(roll["rows"], cfg, step, wrapped, optimizer, scheduler, info, device=device, dtype=dtype,
                          loss_sum=loss_sum, count_fn=count_fn, no_sync=no_sync)
        return _iteration_metrics(roll, stats, info, res, time.perf_counter() - t0, cfg, reward_fn)

    def save(step: int):
        return save_training_state(cfg, step, wrapped, optimizer, scheduler, loader, info,
                                   trainable_only=bool(cfg.peft))

    # ---- train (fastllm.train.loop: iterations, logging, checkpoints, final checkpoint)
    result = train_loop(cfg, info, step, step_fn, save=save)

    # ---- finish: the policy (or its adapters)
    export_final(model, wrapped, tokenizer, out / "final", info, adapters_only=bool(cfg.peft))
    last = read_metrics(out / "metrics.jsonl", "reward/mean") if info.is_main else {}
    result["reward"] = last[max(last)] if last else None
    result["trainable_params"] = n_trainable
    return result


def _iteration_metrics(roll: dict, stats: Tensor, info: DistInfo, updates: dict, t_train: float, cfg: GRPOConfig,
                       reward_fn: RewardFunctions | None) -> dict:
    """The logged record of one iteration, every statistic pooled over the ranks."""
    batch, G = roll["batch"], cfg.num_generations
    scores = roll["scores"].double()
    groups = scores.view(-1, G)
    per_fn = {name: torch.tensor(v, dtype=torch.float64, device=scores.device).sum()
              for name, v in (reward_fn.last.items() if reward_fn is not None else ())}
    rollout_tokens = batch.response_lengths.sum().double()
    all_tokens = batch.attention_mask.sum().double()
    sums = torch.stack([torch.tensor(float(scores.numel()), dtype=torch.float64, device=scores.device),
                        scores.sum(), (scores ** 2).sum(), groups.std(dim=1).sum(),
                        (groups.max(dim=1).values == groups.min(dim=1).values).double().sum(),
                        roll["eos"].double().sum(), rollout_tokens, all_tokens, *per_fn.values()])
    sums = _all_reduce(sums, info)
    s = dict(zip(_TRAIN_STATS, _all_reduce(stats.clone(), info).tolist(), strict=True))
    n = float(sums[0])
    n_groups = n / G
    mean = float(sums[1]) / n
    var = max(float(sums[2]) / n - mean * mean, 0.0) * n / max(n - 1, 1)
    tokens = max(s["tokens"], 1.0)
    times = dict(roll["times"], training=t_train)
    metrics = {
        "loss": sum(updates["loss"]) / len(updates["loss"]), "loss/first_update": updates["loss"][0],
        "tokens": int(sums[6]), "grad_norm": sum(updates["grad_norm"]) / len(updates["grad_norm"]),
        "lr": updates["lr"][0], "reward/mean": mean, "reward/std": var ** 0.5,
        "reward/group_std": float(sums[3]) / n_groups, "zero_std_share": float(sums[4]) / n_groups,
        **{f"reward/{name}": float(v) / n for name, v in zip(per_fn, sums[8:].tolist(), strict=True)},
        "kl": s["kl_tokens"] / tokens, "entropy": s["entropy_tokens"] / tokens,
        "policy/loss": s["policy_sum"] / max(s["normaliser"], 1.0),
        "policy/clip_fraction": s["clip_tokens"] / tokens,
        "response_length": float(sums[6]) / n, "eos_share": float(sums[5]) / n,
        "time/rollout": times["rollout"], "time/scoring": times["scoring"], "time/training": times["training"],
        "tokens_per_s/rollout": float(sums[6]) / max(times["rollout"], 1e-9),
        # training reads every real token (prompt + response) once per pass, forward and backward
        "tokens_per_s/training": float(sums[7]) * cfg.num_iterations / max(times["training"], 1e-9),
    }
    if cfg.beta > 0:
        metrics["kl_loss"] = s["kl_sum"] / max(s["normaliser"], 1.0)
    return metrics
