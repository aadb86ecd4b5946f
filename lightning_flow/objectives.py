"""The GRPO family's policy objectives: one small pure function per choice, picked by name.

An objective is a per-token term (how the importance ratio ρ and the advantage Â make a token's
loss) and an aggregation (how the token losses of a micro-batch become one number), as TRL 1.16's
GRPOTrainer defines them. ``policy_loss`` adds what every objective shares: ρ at the token or
sequence level, per-token credit (Â = w_t · A_i), the high-entropy token mask, the k3 KL penalty
and the entropy bonus. Adding a loss is one term or aggregation function, one ``OBJECTIVES`` line,
its name in ``LossType`` and its test. ``docs/losses.md`` writes out every formula.

n = responses in one micro-batch, L = completion length. Nothing here knows about models or
trainers, so every function can be checked by hand on small tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from lightning_flow.loss import check_choice, check_shape

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"]
ImportanceSamplingLevel = Literal["token", "sequence"]
SamplerCorrectionMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


# ---- per-token terms ------------------------------------------------------------------------
@dataclass(frozen=True)
class TermOptions:
    """The hyperparameters the per-token terms read (GRPOConfig documents each)."""

    epsilon_low: float
    epsilon_high: float
    delta: float | None
    sapo_temperature_pos: float
    sapo_temperature_neg: float


class Term(NamedTuple):
    per_token: Tensor  # [n, L] the objective's loss of each token, before masking
    # bool, broadcastable to [n, L]: tokens the clip stops pushing down (None: the term has no such clip)
    clipped_low: Tensor | None
    clipped_high: Tensor | None  # bool: tokens the clip stops pushing up


def clipped_term(ratio: Tensor, logps: Tensor, adv: Tensor, options: TermOptions) -> Term:
    """PPO's clipped surrogate: -min(ρ' Â, clip(ρ, 1 - ε_low, 1 + ε_high) Â), ρ' = min(ρ, δ)
    with two-sided clipping (``delta``, INTELLECT-2), else ρ' = ρ."""
    clipped = torch.clamp(ratio, 1 - options.epsilon_low, 1 + options.epsilon_high)
    unclipped = ratio if options.delta is None else torch.clamp(ratio, max=options.delta)
    per_token = -torch.min(unclipped * adv, clipped * adv)
    return Term(
        per_token,
        (ratio < 1 - options.epsilon_low) & (adv < 0),
        (ratio > 1 + options.epsilon_high) & (adv > 0),
    )


def cispo_term(ratio: Tensor, logps: Tensor, adv: Tensor, options: TermOptions) -> Term:
    """CISPO (MiniMax-M1): -sg(min(ρ, ε_max)) Â log π. The ratio is only a detached weight, capped
    at ``epsilon_high`` itself (TRL's ε_max), so every token keeps a gradient."""
    weight = torch.clamp(ratio, max=options.epsilon_high).detach()
    return Term(-weight * adv * logps, None, (ratio > options.epsilon_high) & (adv > 0))


def sapo_term(ratio: Tensor, logps: Tensor, adv: Tensor, options: TermOptions) -> Term:
    """SAPO: -(4 / τ) σ(τ (ρ - 1)) Â with τ = τ_pos where Â > 0, else τ_neg: a soft gate in place
    of the clip (its gradient is -Â at ρ = 1 and fades smoothly off-policy; nothing is clipped)."""
    tau = torch.where(
        adv > 0, adv.new_tensor(options.sapo_temperature_pos), adv.new_tensor(options.sapo_temperature_neg)
    )
    return Term(-torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv, None, None)


# ---- aggregations: token losses -> one micro-batch loss -------------------------------------
class Normalisers(NamedTuple):
    max_completion_length: int | None  # dr_grpo
    # dapo, cispo: completion tokens of the whole generation batch
    num_items_in_batch: int | float | Tensor | None


def response_mean(per_token: Tensor, mask: Tensor, norms: Normalisers) -> Tensor:
    """Mean over responses of each response's token mean (grpo, sapo)."""
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


def token_mean(per_token: Tensor, mask: Tensor, norms: Normalisers) -> Tensor:
    """Mean over the micro-batch's tokens (bnpo)."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def max_length_mean(per_token: Tensor, mask: Tensor, norms: Normalisers) -> Tensor:
    """Token sum / (responses × max_completion_length) (dr_grpo)."""
    if norms.max_completion_length is None:
        raise ValueError("this loss_type needs max_completion_length")
    return (per_token * mask).sum() / (per_token.shape[0] * norms.max_completion_length)


def batch_token_mean(per_token: Tensor, mask: Tensor, norms: Normalisers) -> Tensor:
    """Token sum / the completion tokens of the whole generation batch (dapo, cispo); an all-empty batch gives
    0."""
    if norms.num_items_in_batch is None:
        raise ValueError("this loss_type needs num_items_in_batch (completion tokens of the whole batch)")
    return (per_token * mask).sum() / torch.as_tensor(
        norms.num_items_in_batch, dtype=per_token.dtype, device=per_token.device
    ).clamp(min=1)


def response_sum_mean(per_token: Tensor, mask: Tensor, norms: Normalisers) -> Tensor:
    """Mean over responses of each response's token sum (luspo: a response weighs by its length)."""
    return (per_token * mask).sum(dim=1).mean()


@dataclass(frozen=True)
class Objective:
    term: Callable[[Tensor, Tensor, Tensor, TermOptions], Term]
    aggregate: Callable[[Tensor, Tensor, Normalisers], Tensor]

    @property
    def sums_over_micro_batches(self) -> bool:
        """Its normaliser is the whole generation batch's, so micro-batch losses add up; the
        others are means of their micro-batch and are averaged over micro-batches."""
        return self.aggregate is batch_token_mean

    @property
    def weighs_responses_by_length(self) -> bool:
        """Whether a sequence-level ratio would count each response once per token (TRL warns; so do we).
        luspo does so on purpose and is left out, as in TRL."""
        return self.aggregate in (token_mean, max_length_mean, batch_token_mean)


OBJECTIVES: dict[str, Objective] = {
    "grpo": Objective(clipped_term, response_mean),
    "bnpo": Objective(clipped_term, token_mean),
    "dr_grpo": Objective(clipped_term, max_length_mean),
    "dapo": Objective(clipped_term, batch_token_mean),
    "cispo": Objective(cispo_term, batch_token_mean),
    "sapo": Objective(sapo_term, response_mean),
    "luspo": Objective(clipped_term, response_sum_mean),
}


def gradient_accumulation_divisor(loss_type: LossType, num_micro_batches: int) -> int:
    """What each micro-batch loss is divided by so that one optimizer step sees the whole
    generation batch's loss: the number of (equal) micro-batches for the per-micro-batch means,
    1 for the objectives already normalised by the whole batch (dapo, cispo)."""
    check_choice("loss_type", loss_type, get_args(LossType))
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
    return 1 if OBJECTIVES[loss_type].sums_over_micro_batches else num_micro_batches


# ---- what every objective shares ------------------------------------------------------------
@dataclass(frozen=True)
class LossStats:
    """Detached scalar diagnostics of one micro-batch (masked means over completion tokens)."""

    kl: Tensor  # the KL term as it enters the loss (ρ · k3 with kl_bias_correction), without beta
    clip_ratio_low: Tensor
    clip_ratio_high: Tensor
    clip_ratio: Tensor
    # share of the tokens the policy term reads (below 1 with top_entropy_quantile)
    policy_token_fraction: Tensor
    sampler_logp_diff: (
        Tensor  # mean |log π_trainer - log π_sampler| over tokens (0 without sampler log-probs)
    )
    sampler_kl: Tensor  # k3 estimate of KL(sampler ‖ trainer) per token (0 without sampler log-probs)
    sampler_clipped_fraction: Tensor  # share of tokens whose correction weight was clipped or masked


def sampler_correction(
    trainer_logps: Tensor,
    sampler_logps: Tensor,
    mask: Tensor,
    mode: SamplerCorrectionMode,
    clip_max: float | None = 3.0,
    clip_min: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Truncated importance sampling between the trainer and the rollout engine (TRL 1.16's
    ``vllm_importance_sampling_correction``): w = π_trainer / π_sampler of each token, or one w per
    response, exp of the sum of its tokens' log-ratios (``sequence_*``); ``*_truncate`` clamps w to
    [clip_min, clip_max], ``*_mask`` sets a w outside it to 0 (None: no bound on that side). A NaN
    log-prob counts as no mismatch (w = 1). Returns (w [n, L] or [n, 1], detached; whether each w
    was outside the bounds, same shape). Both log-probs are detached: w is a constant weight."""
    check_choice("sampler correction mode", mode, get_args(SamplerCorrectionMode))
    diff = torch.where(mask > 0, trainer_logps.detach() - sampler_logps.detach(), 0.0).nan_to_num(nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=1, keepdim=True)
    weight = torch.exp(diff)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    outside = (weight < low) | (weight > high)
    weight = (
        weight.clamp(min=low, max=high) if mode.endswith("truncate") else weight.masked_fill(outside, 0.0)
    )
    return weight, outside


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:  # [n, L], [n, L] -> scalar
    return (values * mask).sum() / mask.sum().clamp(min=1)


def sampler_mismatch(
    trainer_logps: Tensor, sampler_logps: Tensor | None, mask: Tensor, corrected: Tensor | None
) -> dict[str, Tensor]:
    """LossStats' sampler fields: mean |Δ log-prob|, the k3 estimate exp(Δ) - Δ - 1 of
    KL(sampler ‖ trainer) (Δ = trainer - sampler, tokens drawn by the sampler), and the share of
    tokens whose correction weight was clipped or masked (a response's tokens share its weight)."""
    zero = mask.new_zeros(())
    if sampler_logps is None:
        return dict(sampler_logp_diff=zero, sampler_kl=zero, sampler_clipped_fraction=zero)
    diff = torch.where(mask > 0, trainer_logps.detach() - sampler_logps, 0.0)
    clipped = zero if corrected is None else _masked_mean(corrected.expand_as(mask).to(mask.dtype), mask)
    return dict(
        sampler_logp_diff=_masked_mean(diff.abs(), mask),
        sampler_kl=_masked_mean(torch.exp(diff) - diff - 1, mask),
        sampler_clipped_fraction=clipped,
    )


def entropy_threshold(entropy: Tensor, mask: Tensor, top_entropy_quantile: float) -> Tensor:
    """The entropy at or above which a token is among the top ``top_entropy_quantile`` of the
    valid tokens (``mask`` > 0) of ``entropy`` (any shape): their (1 - q)-quantile, linearly
    interpolated as TRL's. +inf when no token is valid, so none is kept."""
    if not 0 < top_entropy_quantile <= 1:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {top_entropy_quantile}")
    values = entropy[mask > 0]
    if values.numel() == 0:
        return entropy.new_tensor(float("inf"))
    return torch.quantile(values, 1 - top_entropy_quantile)


def policy_loss(
    logps: Tensor,  # [n, L] current policy, requires grad
    old_logps: Tensor,  # [n, L] sampling policy (detached); logps.detach() when num_iterations == 1
    advantages: Tensor,  # [n] one per response
    mask: Tensor,  # [n, L] completion mask
    loss_type: LossType = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,  # None -> epsilon_low; cispo: the cap on ρ itself, required
    delta: float | None = None,  # clipped objectives: cap on the unclipped ρ (two-sided clipping)
    importance_sampling_level: ImportanceSamplingLevel = "token",
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    beta: float = 0.0,
    ref_logps: Tensor | None = None,  # [n, L], required when beta > 0
    kl_bias_correction: bool = True,  # multiply k3 by ρ (TRL's use_bias_correction_kl)
    token_weights: Tensor | None = None,  # [n, L] per-token credit, Â = w_t * A
    entropy: Tensor | None = None,  # [n, L] current policy's entropies (differentiable for the bonus)
    entropy_threshold: float
    | Tensor
    | None = None,  # keep only tokens whose entropy is >= this in the policy term
    entropy_coef: float = 0.0,  # subtract entropy_coef × the mean entropy of the kept tokens
    max_completion_length: int | None = None,  # required for dr_grpo
    num_items_in_batch: int
    | float
    | Tensor
    | None = None,  # required for dapo and cispo: tokens of the whole generation batch
    num_micro_batches: int = 1,  # of the optimizer step; the loss returned is this micro-batch's share
    sampler_logps: Tensor | None = None,  # [n, L] the rollout engine's log-probs of its draws
    sampler_correction_mode: SamplerCorrectionMode | None = None,  # None: no correction, mismatch logged only
    sampler_correction_clip: tuple[float | None, float | None] = (None, 3.0),  # (clip_min, clip_max)
) -> tuple[Tensor, LossStats]:
    """This micro-batch's share of the step's loss and its diagnostics.

    ρ = exp(logps - old_logps) per token, or per response exp(mean over its tokens of the log-ratio)
    at the ``sequence`` level. per-token loss = term(ρ, Â) × [entropy >= threshold] + beta × k3
    (× ρ with kl_bias_correction), k3 = exp(ref - logps) - (ref - logps) - 1; aggregated as
    ``loss_type`` says, divided by ``gradient_accumulation_divisor``; minus
    entropy_coef × (mean entropy of the kept tokens) / num_micro_batches. Under DDP gradient
    averaging, pass num_items_in_batch / world_size (as TRL does). With ``sampler_logps`` and a
    ``sampler_correction_mode`` the policy term (after the entropy mask, before the KL term, as
    TRL) is multiplied by ``sampler_correction(old_logps, sampler_logps, ...)``: old_logps are the
    trainer's log-probs of the policy that sampled.
    """
    check_choice("loss_type", loss_type, get_args(LossType))
    check_choice("importance_sampling_level", importance_sampling_level, get_args(ImportanceSamplingLevel))
    if logps.dim() != 2:
        raise ValueError(f"logps must be 2-D [n, L], got shape {tuple(logps.shape)}")
    for name, other in (
        ("old_logps", old_logps),
        ("mask", mask),
        ("ref_logps", ref_logps),
        ("token_weights", token_weights),
        ("entropy", entropy),
        ("sampler_logps", sampler_logps),
    ):
        if other is not None:
            check_shape(name, other, logps.shape, "logps")
    check_shape("advantages", advantages, logps.shape[:1], "logps[:, 0]")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the reference policy's log-probs)")
    if (entropy_threshold is not None or entropy_coef != 0) and entropy is None:
        raise ValueError("entropy_threshold and entropy_coef need the entropy of every token")
    if loss_type == "cispo" and epsilon_high is None:
        raise ValueError("loss_type 'cispo' caps the ratio at epsilon_high itself (e.g. 5.0): pass it")
    objective = OBJECTIVES[loss_type]
    options = TermOptions(
        epsilon_low,
        epsilon_low if epsilon_high is None else epsilon_high,
        delta,
        sapo_temperature_pos,
        sapo_temperature_neg,
    )

    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype)[:, None].expand_as(logps)  # [n, L]
    if token_weights is not None:
        adv = adv * token_weights.to(logps.dtype)
    adv = adv.detach()  # credit is a target, never a path for gradients

    present = mask > 0
    # Padding positions may hold any log-probs; zero their log-ratio so exp cannot overflow
    # into inf * 0 = NaN (where() also sends them zero gradient).
    log_ratio = torch.where(present, logps - old_logps.detach(), 0.0)  # [n, L]
    if importance_sampling_level == "sequence":
        # [n, 1]
        log_ratio = (log_ratio * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    ratio = torch.exp(log_ratio)
    term = objective.term(ratio, torch.where(present, logps, 0.0), adv, options)
    per_token = term.per_token
    kept = present
    if entropy_threshold is not None:
        kept = present & (entropy.detach() >= entropy_threshold)
        per_token = per_token * kept
    corrected = None
    if sampler_logps is not None and sampler_correction_mode is not None:
        weight, corrected = sampler_correction(
            old_logps, sampler_logps, mask, sampler_correction_mode, *reversed(sampler_correction_clip)
        )
        per_token = per_token * weight
    kl = None
    if ref_logps is not None:
        log_ref_ratio = torch.where(present, ref_logps.detach() - logps, 0.0)
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # k3: unbiased, always >= 0
        if kl_bias_correction:  # an unbiased estimate under the sampling policy, with its gradient
            kl = kl * ratio
        if beta > 0:
            per_token = per_token + beta * kl

    norms = Normalisers(max_completion_length, num_items_in_batch)
    loss = objective.aggregate(per_token, mask, norms) / gradient_accumulation_divisor(
        loss_type, num_micro_batches
    )
    kept = kept.to(logps.dtype)
    if entropy_coef != 0:
        # The mean entropy of the tokens the policy term reads, whatever the loss type's normaliser (as TRL).
        loss = loss - entropy_coef * _masked_mean(entropy, kept) / num_micro_batches

    with torch.no_grad():
        nothing = torch.zeros_like(logps, dtype=torch.bool)
        low = (nothing if term.clipped_low is None else term.clipped_low.expand_as(logps)).to(logps.dtype)
        high = (nothing if term.clipped_high is None else term.clipped_high.expand_as(logps)).to(logps.dtype)
        stats = LossStats(
            kl=_masked_mean(kl, mask) if kl is not None else logps.new_zeros(()),
            clip_ratio_low=_masked_mean(low, mask),
            clip_ratio_high=_masked_mean(high, mask),
            clip_ratio=_masked_mean(torch.maximum(low, high), mask),
            policy_token_fraction=_masked_mean(kept, mask),
            **sampler_mismatch(old_logps, sampler_logps, mask, corrected),
        )
    return loss, stats
