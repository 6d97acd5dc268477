"""Proximal policy optimisation (PPO) on the policy's own rollouts, the RLHF stage after SFT.

    from fastllm.train import PPOConfig, ppo
    ppo(PPOConfig(model="runs/sft/final", reward_model="runs/reward/final", kl_coef=0.05))
    ppo(PPOConfig(model="runs/sft/final", peft={"method": "lora", "r": 8}), reward_fn=my_score)

One iteration (one `train_loop` step), written out in `step_fn`:
  1. rollout   batch_size prompts per process -> `fastllm.generation.generate` on the live
               policy weights (fastllm.train.rollout.sample_responses);
  2. scoring   one forward each of the policy (old log-probs, entropy) and critic (values) and of
               the reference (reference log-probs) on prompt | response, all through the fused
               `token_logprobs_and_entropy` at the sampling temperature; the reward model's score
               and/or reward_fn at the last real token, `no_eos_score` for a response cut off
               without EOS; per-token rewards -beta * k_t (+ score at the end) when kl_penalty is
               "reward"; GAE(gamma, lambda); optional reward whitening and advantage whitening
               (statistics pooled over all ranks, so a rank split does not change them);
  3. training  ppo_epochs passes over the rollout in a fresh shuffled order, num_minibatches
               `optimizer_step`s per pass, each over grad_accum micro-batches:
                   loss = clipped surrogate + vf_coef * clipped value loss
                          - entropy_coef * entropy (+ beta * importance-weighted KL with
                          kl_penalty "loss")
               every term aggregated the same way (`loss_aggregation`, fastllm.rl.aggregate).

Normalisation (why splits do not change an update): each term returns a sum over the
micro-batch's rows and the step divides by the minibatch's *global* normaliser, computed from
the masks alone before the first backward (`count_fn` = `aggregation_normaliser`: real response
tokens for token_mean, non-empty sequences for seq_mean, rows x max_new_tokens for
seq_sum_norm), added over micro-batches and all-reduced over ranks by `optimizer_step`. So a
minibatch's loss and gradient are those of the whole minibatch, however it is cut.

Dropout is off throughout (every module stays in eval mode; gradients still flow): the
rollout's log-probs and the training forwards then come from the same function. The policy's
reference is a frozen copy of the initial weights, or with PEFT the same model with its
adapters disabled (one copy of the base weights). The value model is a separate critic (a copy
of the reward model when there is one, else the policy's trunk with a zero-initialised value
head) or a zero-initialised head on the policy's trunk (critic="shared"). The KL coefficient is
fixed or adaptive (kl_target); its state is checkpointed with the weights, the optimizer
(policy and value parameters in one AdamW), the prompt order and every RNG, so a killed run
resumes on the same trajectory.

Logged per iteration: loss, reward/mean, reward/std, kl (per sequence, summed k1 of the rollout),
kl_coef, entropy, policy/clip_fraction, policy/approx_kl, value/loss, value/clip_fraction,
value/explained_variance, response_length, eos_share, and time/{rollout,scoring,training} with
tokens_per_s/{rollout,scoring,training}; `ppo_curves.png` plots reward and KL.
"""

from __future__ import annotations

import copy
import importlib
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from fastllm import models
from fastllm.data import BatchLoader
from fastllm.ops import token_logprobs_and_entropy
from fastllm.rl import (
    AdaptiveKLController,
    FixedKLController,
    aggregation_normaliser,
    entropy_bonus,
    gae,
    kl_loss,
    ppo_policy_loss,
    ppo_value_loss,
)

from . import build
from .checkpoint import resume_training_state, save_training_state
from .common import (
    optimizer_for,
    optimizer_step,
)
from .config import PPOConfig, as_config
from .distributed import DistInfo, no_sync_fn, wrap_model
from .export import export_final
from .logging import pyplot, read_metrics
from .loop import train_loop
from .peft_glue import apply_peft
from .rollout import (
    RewardFn,
    kl_penalised_rewards,
    reference_logprobs_fn,
    response_batch,
    sample_responses,
    score_responses,
    to_response,
    update_passes,
)

# per-iteration sums of the training passes, all-reduced at the end of the iteration
_TRAIN_STATS = ("policy_sum", "value_sum", "entropy_sum", "kl_sum", "normaliser", "clip_tokens", "approx_kl_tokens",
                "value_clip_tokens", "tokens")
_ROW_KEYS = ("input_ids", "attention_mask", "targets", "starts", "mask", "old_logp", "ref_logp", "old_values",
             "advantages", "returns")


class ActorCritic(nn.Module):
    """The policy and its value model behind one forward, so DDP sees every parameter a loss uses.

    forward(input_ids (B, L), attention_mask (B, L), targets (B, L)) -> (logp, entropy, values),
    each (B, L) float32, token-aligned: logp/entropy at the sampling temperature from the fused
    op, values from the critic (`token_scores`) or the value head on the policy's hidden states.
    """

    def __init__(self, policy: nn.Module, *, critic: nn.Module | None = None, value_head: nn.Module | None = None,
                 temperature: float = 1.0):
        super().__init__()
        if (critic is None) == (value_head is None):
            raise ValueError("ActorCritic: expected exactly one of critic and value_head")
        parts = {"policy": policy, "critic": critic} if critic is not None else {"policy": policy,
                                                                                 "value_head": value_head}
        self.model = nn.ModuleDict(parts)
        self.temperature = float(temperature)

    @property
    def policy(self) -> nn.Module:
        return self.model["policy"]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        policy = self.model["policy"]
        hidden = policy(input_ids, attention_mask=attention_mask)  # (B, L, H)
        logp, entropy = token_logprobs_and_entropy(hidden, policy.lm_head_weight.to(hidden.dtype), targets,
                                                   temperature=self.temperature)
        if "critic" in self.model:
            critic = self.model["critic"]
            values = critic.token_scores(critic(input_ids, attention_mask=attention_mask))[..., 0]
        else:
            values = self.model["value_head"](hidden).float()[..., 0]
        return logp, entropy, values


def build_critic(policy: nn.Module, reward_model: nn.Module | None, kind: str) -> dict:
    """ActorCritic's value part: {"critic": ...} (a trainable copy of the reward model, else the
    policy's trunk with a zero value head) or {"value_head": zero Linear(H, 1)} (kind "shared")."""
    if kind == "shared":
        head = nn.Linear(policy.lm_head_weight.shape[1], 1, bias=True)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return {"value_head": head}
    if kind != "separate":
        raise ValueError(f"critic: expected separate or shared, got {kind!r}")
    if reward_model is not None:
        return {"critic": copy.deepcopy(reward_model).requires_grad_(True)}
    critic = models.build_head_model(policy.config, "sequence_classification",
                                     models.TaskHead(num_labels=1, problem_type="regression"))
    trunk = {k: v for k, v in policy.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = critic.load_state_dict(trunk, strict=False)
    if unexpected or [k for k in missing if not k.startswith("score.")]:
        raise ValueError(f"critic: the policy's trunk does not fit the value model (missing {missing}, unexpected "
                         f"{unexpected})")
    nn.init.zeros_(critic.score.weight)
    return {"critic": critic}


def load_reward_fn(spec: str) -> RewardFn:
    """"module:function" -> the function."""
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"reward_fn: expected \"module:function\", got {spec!r}")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward_fn: cannot load {spec!r} ({type(exc).__name__}: {exc})") from None
    if not callable(fn):
        raise ValueError(f"reward_fn: {spec!r} is not callable")
    return fn


def _all_reduce(x: Tensor, info: DistInfo) -> Tensor:
    if info.world_size > 1:
        torch.distributed.all_reduce(x)
    return x


def whiten_pooled(x: Tensor, mask: Tensor, info: DistInfo, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """`fastllm.rl.whiten` with the mean and (Bessel) variance pooled over every rank's rollout,
    so N processes whiten exactly as one process holding the whole batch."""
    m = mask.to(torch.float64)
    xf = x.to(torch.float64)
    s = _all_reduce(torch.stack([m.sum(), (xf * m).sum()]), info)
    n, mean = s[0], s[1] / s[0].clamp_min(1)
    var = _all_reduce(((xf - mean) ** 2 * m).sum(), info) / (n - 1).clamp_min(1)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return (out * m).to(x.dtype)


def _check(cfg: PPOConfig) -> None:
    per_update = cfg.num_minibatches * cfg.grad_accum
    if cfg.batch_size % per_update:
        raise ValueError(f"batch_size: expected a multiple of num_minibatches * grad_accum = {per_update}, got "
                         f"{cfg.batch_size}")
    if cfg.kl_target is not None and not cfg.kl_coef > 0:
        raise ValueError(f"kl_coef: expected a positive initial value with kl_target (adaptive), got {cfg.kl_coef}")


@torch.no_grad()
def collect_rollout(ac: ActorCritic, prompts: list[list[int]], cfg: PPOConfig, *, reference_logprobs: Callable,
                    reward_model: nn.Module | None, reward_fn: RewardFn | None, eos_id: int | None, pad_id: int,
                    kl_coef: float, info: DistInfo) -> dict:
    """Rollout + scoring of one iteration on this rank: {"batch": ResponseBatch, "rows": the
    per-row tensors the updates need (response-aligned, (B, N)), "scores", "eos", "kl" (B, N)
    per-token estimate, "entropy" (B, N), "rewards" (B, N), "times" {rollout, scoring}}."""
    policy = ac.policy
    t0 = time.perf_counter()
    out = sample_responses(policy, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           top_k=cfg.top_k, top_p=cfg.top_p, eos_id=eos_id, pad_id=pad_id)
    batch = response_batch(out, cfg.max_new_tokens)
    t1 = time.perf_counter()
    N = cfg.max_new_tokens
    logp, entropy, values = ac(batch.tokens, batch.attention_mask, batch.targets)
    ref_logp = reference_logprobs(batch)
    scores, eos = score_responses(batch, reward_model=reward_model, reward_fn=reward_fn, eos_id=eos_id,
                                  no_eos_score=cfg.no_eos_score)
    resp = {k: to_response(v.float(), batch.starts, N) for k, v in
            (("old_logp", logp), ("ref_logp", ref_logp), ("old_values", values), ("entropy", entropy))}
    mask = batch.mask
    m = mask.float()
    in_reward = kl_coef if cfg.kl_penalty == "reward" else 0.0
    rewards, kl = kl_penalised_rewards(scores, resp["old_logp"], resp["ref_logp"], mask, in_reward,
                                       cfg.kl_estimator)
    if cfg.whiten_rewards:
        rewards = whiten_pooled(rewards, mask, info, shift_mean=False)
    values = resp["old_values"] * m
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten_pooled(advantages, mask, info)
    t2 = time.perf_counter()
    rows = {"input_ids": batch.tokens, "attention_mask": batch.attention_mask, "targets": batch.targets,
            "starts": batch.starts, "mask": mask, "old_logp": resp["old_logp"] * m, "ref_logp": resp["ref_logp"] * m,
            "old_values": values, "advantages": advantages, "returns": returns}
    return {"batch": batch, "rows": rows, "scores": scores, "eos": eos, "kl": kl, "entropy": resp["entropy"] * m,
            "rewards": rewards, "times": {"rollout": t1 - t0, "scoring": t2 - t1}}


def ppo_loss_fns(cfg: PPOConfig, wrapped: nn.Module, kl_coef: Callable[[], float], stats: Tensor):
    """(loss_sum, count_fn) for `optimizer_step`: loss_sum(micro-batch) is the summed PPO loss of
    its rows (policy + vf_coef value - entropy_coef entropy [+ beta KL]), count_fn(micro-batch) the
    normaliser of its mask under cfg.loss_aggregation; optimizer_step divides the sums by the
    normaliser of the whole minibatch, all ranks included. Statistics accumulate into `stats`
    (_TRAIN_STATS order)."""
    N, mode = cfg.max_new_tokens, cfg.loss_aggregation

    def count_fn(mb: dict) -> int:
        return int(aggregation_normaliser(mb["mask"], mode, N))

    def loss_sum(mb: dict) -> Tensor:
        logp, entropy, values = wrapped(mb["input_ids"], mb["attention_mask"], mb["targets"])
        logp, entropy, values = (to_response(x, mb["starts"], N) for x in (logp, entropy, values))
        mask = mb["mask"]
        pol = ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], mask, cfg.clip_eps, mode=mode, max_len=N)
        val = ppo_value_loss(values, mb["old_values"], mb["returns"], mask, cfg.clip_eps_value, mode=mode, max_len=N)
        ent, _ = entropy_bonus(entropy, mask, mode, N)
        total = pol.loss_sum + cfg.vf_coef * val.loss_sum - cfg.entropy_coef * ent
        kl_sum = torch.zeros((), device=logp.device)
        if cfg.kl_penalty == "loss":
            kl_sum, _ = kl_loss(logp, mb["ref_logp"], mask, cfg.kl_estimator, old_logp=mb["old_logp"], mode=mode,
                                max_len=N)
            total = total + kl_coef() * kl_sum
        stats.add_(torch.stack([pol.loss_sum.detach(), val.loss_sum.detach(), ent.detach(), kl_sum.detach(),
                                pol.normaliser, pol.clip_fraction * pol.tokens, pol.approx_kl * pol.tokens,
                                val.clip_fraction * pol.tokens, pol.tokens]).double())
        return total

    return loss_sum, count_fn


def ppo_update(rows: dict, cfg: PPOConfig, step: int, wrapped: nn.Module, optimizer, scheduler, info: DistInfo, *,
               device: torch.device, dtype: torch.dtype, loss_sum, count_fn, no_sync=None) -> dict:
    """cfg.ppo_epochs passes over this rank's rollout rows, each in a fresh order (drawn from
    (seed, step, rank), so a resumed run repeats it), cut into cfg.num_minibatches optimizer
    steps of cfg.grad_accum micro-batches. Returns {"loss", "grad_norm", "lr"} lists per step."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + info.rank)

    def one_step(micro_batches: list[dict]) -> dict:
        return optimizer_step(micro_batches, loss_sum, wrapped, optimizer, scheduler, device=device, dtype=dtype,
                              max_grad_norm=cfg.max_grad_norm, world_size=info.world_size, no_sync=no_sync,
                              count_fn=count_fn)

    return update_passes(rows, _ROW_KEYS, epochs=cfg.ppo_epochs, num_minibatches=cfg.num_minibatches,
                         grad_accum=cfg.grad_accum, generator=gen, step_fn=one_step)


def _explained_variance_sums(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    m = mask.double()
    r, d = returns.double(), (returns - values).double()
    return torch.stack([m.sum(), (r * m).sum(), (r * r * m).sum(), (d * m).sum(), (d * d * m).sum()])


def _explained_variance(s: Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the real tokens, from pooled sums (n, sum R, sum R^2, sum d, sum d^2)."""
    n = float(s[0])
    if n < 2:
        return float("nan")
    var_r = float(s[2]) / n - (float(s[1]) / n) ** 2
    var_d = float(s[4]) / n - (float(s[3]) / n) ** 2
    return 1.0 - var_d / var_r if var_r > 0 else float("nan")


def ppo(config: PPOConfig | str | dict | None = None, *, model=None, tokenizer=None, prompts=None,
        reward_model=None, reward_fn: RewardFn | None = None, reference_model=None) -> dict:
    """Run PPO; returns train_loop's result plus "reward" (the last iteration's mean score) and
    "trainable_params".

    config: a PPOConfig, a YAML path or a dict of fields. model / tokenizer: ready objects instead
    of what the config names. prompts: a list of token-id lists (used as given), or records /
    questions for `PromptDataset` (chat template, bos). reward_model: a sequence-classification
    head model (its `predict` is the score); reward_fn(prompts, responses) -> floats on token-id
    lists (either or both; added). reference_model: a separate reference policy."""
    cfg = as_config(PPOConfig, config)
    _check(cfg)
    # ---- setup: devices, tokenizer, models, prompts
    info, device, dtype, out, items, tokenizer, model, eos_id, pad_id, reward_model = build.rollout_setup(
        cfg, "PPO", prompts=prompts, tokenizer=tokenizer, model=model, reward_model=reward_model)
    if reward_fn is None and cfg.reward_fn is not None:
        reward_fn = load_reward_fn(cfg.reward_fn)
    if reward_model is None and reward_fn is None:
        raise ValueError("reward_model, reward_fn: expected a reward model and/or a reward function, got neither")

    value_part = build_critic(model, reward_model, cfg.critic)  # from the initial (pre-PEFT) weights
    if cfg.peft:
        model = apply_peft(model, cfg.peft)
    # ---- the reference: the initial weights, set up before a checkpoint is loaded
    reference_logprobs = reference_logprobs_fn(model, reference_model=reference_model, peft=bool(cfg.peft),
                                               device=device, temperature=cfg.temperature)

    ac = ActorCritic(model, temperature=cfg.temperature, **value_part).to(device)
    if reward_model is not None:
        reward_model.to(device).requires_grad_(False).eval()
    n_trainable = sum(p.numel() for p in ac.parameters() if p.requires_grad)
    wrapped = wrap_model(ac, info, None, device)
    optimizer, scheduler = optimizer_for(wrapped, cfg, cfg.ppo_epochs * cfg.num_minibatches)
    loader = BatchLoader(list(range(len(items))), cfg.batch_size, seed=cfg.seed, rank=info.rank,
                         world_size=info.world_size, collate_fn=list)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target is not None
              else FixedKLController(cfg.kl_coef))
    torch.manual_seed(cfg.seed + 7919 * info.rank)  # each rank samples its own responses
    step, state = resume_training_state(cfg, wrapped, optimizer, scheduler, loader, info)
    if "kl_controller" in state:
        kl_ctl.load_state_dict(state["kl_controller"])
    ac.eval()  # dropout off everywhere, rollout and training alike
    if reward_model is not None:
        reward_model.eval()
    no_sync = no_sync_fn(wrapped, info)
    stats = torch.zeros(len(_TRAIN_STATS), dtype=torch.float64, device=device)

    loss_sum, count_fn = ppo_loss_fns(cfg, wrapped, lambda: kl_ctl.value, stats)

    def step_fn(step: int) -> dict:
        # 1-2. rollout and scoring on this rank's prompts
        prompts_now = [items[i] for i in loader.next_batch()]
        roll = collect_rollout(ac, prompts_now, cfg, reference_logprobs=reference_logprobs,
                               reward_model=reward_model, reward_fn=reward_fn, eos_id=eos_id, pad_id=pad_id,
                               kl_coef=kl_ctl.value, info=info)
        # 3. ppo_epochs passes of num_minibatches optimizer steps over shuffled rows
        t0 = time.perf_counter()
        stats.zero_()
        updates = ppo_update(roll["rows"], cfg, step, wrapped, optimizer, scheduler, info, device=device, dtype=dtype,
                             loss_sum=loss_sum, count_fn=count_fn, no_sync=no_sync)
        return _iteration_metrics(roll, stats, info, kl_ctl, updates, time.perf_counter() - t0, cfg)

    def save(step: int):
        return save_training_state(cfg, step, wrapped, optimizer, scheduler, loader, info,
                                   trainable_only=bool(cfg.peft), extra={"kl_controller": kl_ctl.state_dict()})

    # ---- train (fastllm.train.loop: iterations, logging, checkpoints, final checkpoint)
    result = train_loop(cfg, info, step, step_fn, save=save)

    # ---- finish: the policy (or its adapters), the value model, the reward/KL plot
    export_final(model, wrapped, tokenizer, out / "final", info, adapters_only=bool(cfg.peft))
    if info.is_main:
        if "critic" in ac.model:
            models.save_pretrained(ac.model["critic"], out / "critic")
        else:
            from safetensors.torch import save_file

            (out / "critic").mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in ac.model["value_head"].state_dict().items()},
                      out / "critic" / "value_head.safetensors")
        if cfg.plot:
            png = write_ppo_curves(out / "metrics.jsonl")
            if png is not None:
                result["ppo_curves"] = str(png)
    info.barrier()
    last = read_metrics(out / "metrics.jsonl", "reward/mean") if info.is_main else {}
    result["reward"] = last[max(last)] if last else None
    result["trainable_params"] = n_trainable
    return result


def _iteration_metrics(roll: dict, stats: Tensor, info: DistInfo, kl_ctl, updates: dict, t_train: float,
                       cfg: PPOConfig) -> dict:
    """The logged record of one iteration, every statistic pooled over the ranks."""
    batch, mask = roll["batch"], roll["rows"]["mask"]
    m = mask.double()
    scores = roll["scores"].double()
    seq_kl = roll["kl"].double().sum(1)
    rollout_tokens = batch.response_lengths.sum().double()
    scoring_tokens = batch.attention_mask.sum().double()
    sums = torch.stack([torch.tensor(float(scores.numel()), dtype=torch.float64, device=scores.device),
                        scores.sum(), (scores ** 2).sum(), seq_kl.sum(), (roll["entropy"].double() * m).sum(), m.sum(),
                        roll["eos"].double().sum(), rollout_tokens, scoring_tokens,
                        roll["rewards"].double().sum()])
    sums = _all_reduce(sums, info)
    ev = _all_reduce(_explained_variance_sums(roll["rows"]["old_values"], roll["rows"]["returns"], mask), info)
    stats = _all_reduce(stats, info)
    n, n_tok = float(sums[0]), max(float(sums[5]), 1.0)
    mean = float(sums[1]) / n
    var = max(float(sums[2]) / n - mean * mean, 0.0) * n / max(n - 1, 1)
    s = dict(zip(_TRAIN_STATS, stats.tolist(), strict=True))
    train_tokens = max(s["tokens"], 1.0)
    kl_mean = float(sums[3]) / n
    beta = kl_ctl.value
    kl_ctl.update(kl_mean, int(n))  # the coefficient of the next iteration
    times = dict(roll["times"], training=t_train)
    metrics = {
        "loss": sum(updates["loss"]) / len(updates["loss"]), "loss/first_update": updates["loss"][0],
        "tokens": int(sums[7]), "grad_norm": sum(updates["grad_norm"]) / len(updates["grad_norm"]),
        "lr": updates["lr"][0], "reward/mean": mean, "reward/std": var ** 0.5, "reward/total": float(sums[9]) / n,
        "kl": kl_mean, "kl_coef": beta, "entropy": float(sums[4]) / n_tok,
        "policy/loss": s["policy_sum"] / max(s["normaliser"], 1.0),
        "policy/clip_fraction": s["clip_tokens"] / train_tokens,
        "policy/approx_kl": s["approx_kl_tokens"] / train_tokens,
        "value/loss": s["value_sum"] / max(s["normaliser"], 1.0),
        "value/clip_fraction": s["value_clip_tokens"] / train_tokens,
        "value/explained_variance": _explained_variance(ev),
        "response_length": float(sums[7]) / n, "eos_share": float(sums[6]) / n,
        "time/rollout": times["rollout"], "time/scoring": times["scoring"], "time/training": times["training"],
        "tokens_per_s/rollout": float(sums[7]) / max(times["rollout"], 1e-9),
        "tokens_per_s/scoring": float(sums[8]) / max(times["scoring"], 1e-9),
        # training reads every real token (prompt + response) once per epoch, forward and backward
        "tokens_per_s/training": float(sums[8]) * cfg.ppo_epochs / max(times["training"], 1e-9),
    }
    if cfg.kl_penalty == "loss":
        metrics["kl_loss"] = s["kl_sum"] / max(s["normaliser"], 1.0)
    return metrics


def plot_ppo_curves(metrics_path: str | Path, png_path: str | Path | None = None) -> Path:
    """reward/mean and kl against iteration, side by side, into a PNG (needs matplotlib)."""
    plt = pyplot("plot_ppo_curves")
    metrics_path = Path(metrics_path)
    png_path = Path(png_path) if png_path else metrics_path.with_name("ppo_curves.png")
    reward, kl = read_metrics(metrics_path, "reward/mean"), read_metrics(metrics_path, "kl")
    if not reward:
        raise ValueError(f"metrics_path: {str(metrics_path)!r} holds no reward/mean records")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), dpi=100)
    for ax, series, label in ((axes[0], reward, "reward (mean score)"), (axes[1], kl, "KL to reference (per seq)")):
        ax.plot(list(series), list(series.values()), linewidth=1)
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def write_ppo_curves(metrics_path: str | Path) -> Path | None:
    try:
        return plot_ppo_curves(metrics_path)
    except ImportError as exc:
        warnings.warn(f"plot: ppo_curves.png not written, {exc}", stacklevel=2)
        return None
