"""The LightningModule: one GRPO-family step, read top to bottom in ``training_step`` and ``learn``.

Manual optimisation: a step samples a group of responses per prompt, scores them, lets
``RolloutCallback``s set per-token credit, then runs ``num_iterations`` optimizer steps over
the same rollouts in micro-batches (gradient accumulation and clipping happen here, since
Lightning refuses both on the Trainer under manual optimisation).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor

from lightning_flow.capture import AttentionRecorder, default_capture_layers
from lightning_flow.checkpoint_io import CheckpointError
from lightning_flow.engines import build_engine, eval_mode
from lightning_flow.internals import reopen_cut_epoch
from lightning_flow.loss import ScaleRewards, group_advantages, token_logprobs_and_entropy
from lightning_flow.objectives import (
    OBJECTIVES,
    ImportanceSamplingLevel,
    LossStats,
    LossType,
    SamplerCorrectionMode,
    clipped_term,
    entropy_threshold,
    policy_loss,
)
from lightning_flow.policy import (
    PolicyConfig,
    SamplingConfig,
    check_settings,
    decoder_and_head,
    eos_token_ids,
    load_policy,
    position_ids_from_mask,
)
from lightning_flow.rewards import RewardConfig, RewardSuite, correctness_reward, verifier_timeouts
from lightning_flow.rollouts import MicroBatch, RolloutCallback, Rollouts
from lightning_flow.seeded_sampling import response_seeds
from lightning_flow.step_scalars import StepScalars
from lightning_flow.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class GRPOConfig:
    """The RL objective. Names and defaults are TRL 1.16's GRPOConfig's unless a docstring says
    otherwise; docs/losses.md writes out each formula and how per-token credit composes with it."""

    loss_type: LossType = "grpo"
    """The objective and its normaliser: ``grpo`` (mean of per-response token means), ``bnpo``
    (micro-batch token mean), ``dr_grpo`` (sum / (responses × max_new_tokens)), ``dapo`` (sum / the
    generation batch's tokens), ``cispo`` (capped, detached ratio × log-prob; dapo's normaliser),
    ``sapo`` (soft sigmoid gate; grpo's), ``luspo`` (mean of per-response token sums). TRL's default
    is dapo; ours stays grpo, the objective the demo configs and their measured curves use."""
    epsilon: float = 0.2
    """Lower clip range: the ratio is clipped at 1 - epsilon."""
    epsilon_high: float | None = None
    """Upper clip range (1 + epsilon_high); defaults to epsilon. For ``cispo`` it is the cap on the
    ratio itself (ε_max, e.g. 5.0) and must be set: TRL would fall back to epsilon, capping every
    ratio at 0.2, which only shrinks the step."""
    delta: float | None = None
    """Two-sided clipping (INTELLECT-2): cap the unclipped ratio at delta, so a negative-advantage
    token's loss stays bounded; must exceed 1 + epsilon_high. For the clipped objectives only."""
    importance_sampling_level: ImportanceSamplingLevel = "token"
    """``token``: one ratio per token; ``sequence``: one per response, exp of the mean log-ratio over
    its tokens (GSPO); a token weight then only scales its response's advantage, see docs/losses.md."""
    sapo_temperature_pos: float = 1.0
    """SAPO's gate temperature τ for tokens with a positive advantage."""
    sapo_temperature_neg: float = 1.05
    """SAPO's gate temperature τ for the others."""
    beta: float = 0.0
    """Weight of the k3 KL penalty to the adapter-disabled reference; 0 skips the reference pass."""
    kl_bias_correction: bool = True
    """Multiply k3 by the importance ratio (TRL's ``use_bias_correction_kl``): an unbiased KL estimate
    under the sampling policy; it changes the gradient even at μ = 1, where the ratio is 1."""
    top_entropy_quantile: float = 1.0
    """Keep in the policy term only this top share of tokens by entropy ("80/20": 0.2). The threshold
    is taken once per step over the valid tokens of the generation batch on every rank, under the
    sampling policy (TRL: per micro-batch); with μ = 1 and several micro-batches that costs one more
    forward without gradients. In (0, 1]: TRL's 0 (one token kept) is refused as a mistake."""
    entropy_coef: float = 0.0
    """Subtract entropy_coef × the mean entropy of the tokens the policy term reads (an entropy bonus;
    the same meaning for every loss_type); its gradient runs through the log-softmax pass."""
    num_iterations: int = 1
    """Optimizer steps per generated batch (μ); above 1 the sampling log-probs are stored once."""
    scale_rewards: ScaleRewards = "group"
    """Divide advantages by the std of the ``group``, of the whole ``batch``, or ``none``."""
    mask_truncated_completions: bool = False
    """Drop responses that hit max_new_tokens without an EOS from the loss."""
    micro_batch_size: int = 8
    """Responses per forward/backward; gradients accumulate over the step's micro-batches."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping, the norm is still logged)."""
    vllm_importance_sampling_correction: bool = False
    """Weigh each token's policy term by π_trainer / π_sampler, the rollout engine's log-probs against
    the trainer's (truncated importance sampling; TRL's option, for any engine here). TRL's default
    is on, for vLLM; ours is off: the ``hf`` engine samples with the trainer's own weights (float32:
    a mismatch of ~1e-6). The mismatch is logged either way (docs/engines.md)."""
    vllm_importance_sampling_mode: SamplerCorrectionMode = "sequence_mask"
    """``token_*``: one weight per token; ``sequence_*``: one per response (exp of the summed log-ratio);
    ``*_truncate`` clamps a weight to [clip_min, clip_max], ``*_mask`` zeroes a weight outside it."""
    vllm_importance_sampling_clip_max: float | None = 3.0
    """Upper bound C_max of the correction weights (None: none)."""
    vllm_importance_sampling_clip_min: float | None = None
    """Lower bound C_min of the correction weights (None: none)."""

    def __post_init__(self) -> None:
        check_settings(
            "model.grpo",
            self,
            {
                "epsilon": (0 < self.epsilon < 1, "must be in (0, 1): the ratio is clipped at 1 - epsilon"),
                "epsilon_high": (self.epsilon_high is None or self.epsilon_high > 0, "must be > 0"),
                "beta": (self.beta >= 0, "must be >= 0 (0 turns the KL term off)"),
                "num_iterations": (self.num_iterations >= 1, "must be >= 1"),
                "micro_batch_size": (self.micro_batch_size >= 1, "must be >= 1"),
                "max_grad_norm": (
                    self.max_grad_norm is None or self.max_grad_norm > 0,
                    "must be > 0 or null",
                ),
            },
        )
        objective = OBJECTIVES.get(self.loss_type)  # an unknown name is the parser's error
        high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        if not 0 < self.top_entropy_quantile <= 1:
            raise ValueError(
                f"model.grpo.top_entropy_quantile={self.top_entropy_quantile}: the share of tokens kept must "
                "be in (0, 1] (1 keeps all)"
            )
        if self.delta is not None and objective is not None and objective.term is not clipped_term:
            raise ValueError(
                f"model.grpo.delta={self.delta}: two-sided clipping applies to the clipped objectives, not "
                f"loss_type={self.loss_type}"
            )
        if self.delta is not None and self.delta <= 1 + high:
            raise ValueError(
                f"model.grpo.delta={self.delta} must exceed 1 + epsilon_high = {1 + high:g}, or the upper "
                "clip never acts"
            )
        if self.loss_type == "cispo" and (self.epsilon_high is None or self.epsilon_high < 1):
            raise ValueError(
                f"model.grpo.epsilon_high={self.epsilon_high}: loss_type=cispo caps the ratio at "
                "epsilon_high itself "
                "(ε_max, e.g. 5.0), which must be set and at least 1"
            )
        clip_min, clip_max = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if clip_max is not None and (clip_max <= 0 or (clip_min is not None and clip_min >= clip_max)):
            raise ValueError(
                f"model.grpo.vllm_importance_sampling_clip_max={clip_max} must be > 0 and above "
                f"clip_min={clip_min}"
            )
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.grpo.{name}={getattr(self, name)} must be > 0")
        if (
            self.importance_sampling_level == "sequence"
            and objective is not None
            and objective.weighs_responses_by_length
        ):
            warnings.warn(
                f"model.grpo.importance_sampling_level=sequence with loss_type={self.loss_type}: this loss "
                "sums token terms, "
                "so each response's sequence-level term counts once per token (a length weighting); GSPO "
                "uses loss_type=grpo",
                stacklevel=2,
            )
        if self.loss_type == "luspo" and self.importance_sampling_level == "token":
            warnings.warn(
                "model.grpo.loss_type=luspo is defined with importance_sampling_level=sequence; token-level "
                "ratios are used",
                stacklevel=2,
            )


@dataclass
class OptimConfig:
    """AdamW over the adapter's parameters, with warm-up and a schedule."""

    lr: float = 1e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up, to 0 at trainer.max_steps."""

    def __post_init__(self) -> None:
        check_settings(
            "model.optim",
            self,
            {
                "lr": (0 < self.lr < math.inf, "must be > 0"),
                "weight_decay": (self.weight_decay >= 0, "must be >= 0"),
                "betas": (all(0 <= b < 1 for b in self.betas), "must both be in [0, 1)"),
                "warmup_steps": (self.warmup_steps >= 0, "must be >= 0"),
            },
        )


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


class GRPOModule(L.LightningModule):
    def __init__(
        self,
        policy: PolicyConfig,
        sampling: SamplingConfig = SamplingConfig(),
        grpo: GRPOConfig = GRPOConfig(),
        optim: OptimConfig = OptimConfig(),
        rewards: RewardConfig = RewardConfig(),
        val_num_samples: int = 0,
    ) -> None:
        """
        Args:
            policy: the model, its adapter and quantization.
            sampling: how responses are sampled.
            grpo: the loss and the update.
            optim: optimizer and learning-rate schedule.
            rewards: reward functions and their weights.
            val_num_samples: besides greedy accuracy, also log the mean accuracy over this many
                sampled responses per validation prompt (0: greedy only).
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the adapter, see on_save_checkpoint
        self.sampling, self.grpo, self.optim, self.val_num_samples = sampling, grpo, optim, val_num_samples
        self.tokenizer = load_tokenizer(policy.name_or_path)
        self.policy = load_policy(policy)
        self.decoder_and_head = decoder_and_head(self.policy)  # None: log-probs from the model's own logits
        self.reward_suite = RewardSuite(rewards)
        self.eos_ids = eos_token_ids(self.policy, self.tokenizer, sampling.extra_eos_token_ids)
        self.engine = build_engine(sampling, self.tokenizer.pad_token_id, self.eos_ids)
        self.attention_layers: list[int] | None = None  # set by request_attention
        # whether rows with a zero advantage are recorded too (request_attention)
        self.record_zero_advantage = False
        # bytes of dense maps held at once (request_attention); None: a micro-batch's
        self.attention_budget: int | None = None
        self.capture_seconds = self.credit_seconds = 0.0  # this step's, see first_pass
        # of attention_layers, made by request_attention, entered each step
        self.attention_recorder: AttentionRecorder | None = None
        # Sampling noise comes from (seed, step, prompt source); see seeded_sampling.
        self.sampling_seed = (
            sampling.seed if sampling.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        )
        self.skipped_nonfinite_steps = 0  # optimizer steps whose gradient had a NaN or inf (no update made)
        self.step_verifier_timeouts = 0  # completions of this step whose verification timed out (scored 0)
        self._rng_states_to_restore: dict | None = None  # from a checkpoint, applied when training starts
        # this step's scalars; rollout callbacks add theirs in on_rollouts_end
        self.step_scalars = StepScalars()

    @property
    def group_size(self) -> int:
        """Responses per prompt (``sampling.num_generations``)."""
        return self.sampling.num_generations

    @property
    def reward_names(self) -> list[str]:
        """The reward functions' names, in the order of ``Rollouts.rewards``' columns."""
        return self.reward_suite.names

    def request_attention(
        self, layers: list[int] | None = None, zero_advantage_rows: bool = False, max_bytes: int | None = None
    ) -> None:
        """Record head- and layer-mean attention of these decoder layers in the step's first forward
        over the rollouts (default: 5 layers evenly spaced over the middle third) and hand it to
        ``on_credit`` micro-batch by micro-batch (``MicroBatch.attention_maps``). Called by credit
        callbacks in their ``setup``.

        Responses with a zero advantage are left out: no credit can reach the gradient through
        them. A caller that needs every row asks with ``zero_advantage_rows=True`` (then every
        caller gets them). ``max_bytes`` bounds the dense maps that exist at once (the smallest
        asked for wins): a micro-batch whose recorded rows' maps would exceed it records the rest
        in extra no-grad passes, a chunk of rows at a time."""
        self.record_zero_advantage = self.record_zero_advantage or zero_advantage_rows
        if max_bytes is not None:
            self.attention_budget = (
                max_bytes if self.attention_budget is None else min(self.attention_budget, max_bytes)
            )
        num_layers = self.policy.config.num_hidden_layers
        layers = default_capture_layers(num_layers) if layers is None else sorted(set(layers))
        if not layers or not all(0 <= layer < num_layers for layer in layers):
            raise ValueError(
                f"attention layers {layers} must be in [0, {num_layers}) for this {num_layers}-layer policy"
            )
        self.attention_layers = layers
        self.attention_recorder = AttentionRecorder(self.policy, layers)

    def on_fit_start(self) -> None:
        self.check_attention_budget()
        responses = getattr(self.trainer.datamodule, "batch_size", 0) * self.sampling.num_generations
        size = self.grpo.micro_batch_size
        if responses and size < responses and responses % size:
            # Unequal micro-batches would weigh the last one's responses more (per-micro-batch means).
            raise ValueError(
                f"model.grpo.micro_batch_size={size} must divide the {responses} responses of a step "
                f"(data.batch_size × model.sampling.num_generations) or be at least {responses}"
            )
        # What the data loading kept, skipped and dropped, next to the curves.
        stats = getattr(self.trainer.datamodule, "stats", None)
        if stats and self.logger:
            self.logger.log_metrics({f"data/{key}": float(value) for key, value in stats.items()}, step=0)

    def check_attention_budget(self) -> None:
        """Before the first step: one response's map, at the longest prompt + response, must fit the
        budget."""
        longest = getattr(self.trainer.datamodule, "max_prompt_length", None)
        if self.attention_budget is None or not self.attention_layers or longest is None:
            return
        positions = longest + self.sampling.max_new_tokens
        if 4 * positions**2 > self.attention_budget:
            raise ValueError(
                f"the attention budget ({self.attention_budget / 2**20:.1f} MiB, FlowCredit's "
                "max_attention_mb) holds no "
                f"response's map: {positions} positions (data.max_prompt_length {longest} + "
                "model.sampling.max_new_tokens "
                f"{self.sampling.max_new_tokens}) need {4 * positions**2 / 2**20:.1f} MiB"
            )

    # ---- the step -------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        start = time.perf_counter()
        rollouts = self.make_rollouts(batch)
        self.learn(rollouts, sampling_seconds=time.perf_counter() - start)

    def learn(self, rollouts: Rollouts, sampling_seconds: float) -> None:
        """The step after sampling: the no-grad passes, credit, the update, and the step's scalars
        (a method of its own so that ``benchmarks/credit_ab.py`` runs exactly this on fixed rollouts)."""
        start = time.perf_counter()
        self.capture_seconds = self.credit_seconds = 0.0
        self.add_old_and_reference_logps(rollouts)  # the first pass (credit) when num_iterations > 1
        referenced = time.perf_counter()
        update = self.update(rollouts)  # else the update's own forward is the first pass
        end = time.perf_counter()

        step = sampling_seconds + end - start
        tokens = rollouts.completion_mask.sum()
        described = rollout_metrics(rollouts, self.reward_suite.names, self.sampling.num_generations)
        # Under DDP every scalar is the mean over ranks (each rank holds the same number of
        # responses), except the longest response (maximum) and the verifier timeouts (sum).
        self.step_scalars.add(
            {"train/response_length_max": described.pop("train/response_length_max")}, reduce="max"
        )
        self.step_scalars.add({"train/verifier_timeouts": self.step_verifier_timeouts}, reduce="sum")
        self.step_scalars.add(
            {
                **described,
                **update,
                "perf/generation_tokens_per_s": tokens / sampling_seconds,
                "perf/update_tokens_per_s": rollouts.attention_mask.sum()
                * self.grpo.num_iterations
                / (end - referenced),
                "perf/step_time_s": step,
                "perf/reference_time_s": referenced - start,
                "perf/capture_time_s": self.capture_seconds,
                "perf/capture_share": self.capture_seconds / step,
                "perf/credit_time_s": self.credit_seconds,
                "perf/credit_share": self.credit_seconds / step,
                "train/lr": self.optimizers().param_groups[0]["lr"],
            }
        )
        for callback in self.rollout_callbacks():
            callback.on_rollouts_end(self.trainer, self, rollouts)
        self.step_scalars.write(self.trainer, self.device)
        # The progress bar (and monitors such as ModelCheckpoint) read these two through self.log.
        progress = {"reward": described["train/reward"], "acc": described.get("train/accuracy")}
        self.log_dict(
            {k: float(v) for k, v in progress.items() if v is not None},
            prog_bar=True,
            logger=False,
            batch_size=len(rollouts),
        )

    def make_rollouts(self, batch: dict) -> Rollouts:
        """Sample a group per prompt, score it, and compute group-normalised advantages."""
        group = self.sampling.num_generations
        seeds = response_seeds(self.sampling_seed, self.global_step, batch["sources"], group)
        sampled = self.engine(self.policy, batch["prompt_ids"], batch["prompt_mask"], group, seeds)
        completion_ids, mask, truncated = sampled.ids, sampled.mask, sampled.is_truncated
        completions = self.decode(completion_ids, mask)
        if self.grpo.mask_truncated_completions:
            mask = mask * (~truncated).unsqueeze(1)
        prompts = [p for p in batch["prompts"] for _ in range(group)]
        golds = [g for g in batch["golds"] for _ in range(group)]
        timeouts_before = verifier_timeouts()
        rewards = self.reward_suite(prompts=prompts, completions=completions, golds=golds).to(self.device)
        self.step_verifier_timeouts = verifier_timeouts() - timeouts_before
        total = self.reward_suite.total(rewards)
        advantages, zero_std = group_advantages(total, group, self.grpo.scale_rewards)
        return Rollouts(
            prompt_ids=batch["prompt_ids"].repeat_interleave(group, 0),
            prompt_mask=batch["prompt_mask"].repeat_interleave(group, 0),
            completion_ids=completion_ids,
            completion_mask=mask,
            is_truncated=truncated,
            prompts=prompts,
            completions=completions,
            golds=golds,
            rewards=rewards,
            total_rewards=total,
            advantages=advantages,
            zero_std_groups=zero_std,
            token_weights=torch.ones_like(mask),
            step=self.global_step,
            sampler_logps=sampled.logps,
        )

    @torch.no_grad()
    def add_old_and_reference_logps(self, rollouts: Rollouts) -> None:
        """Log-probs of the sampling policy (μ > 1, the step's first pass) and of the adapter-disabled
        reference (β > 0)."""
        if self.grpo.num_iterations > 1:
            with self.first_pass_recording(rollouts) as recorder:
                rollouts.old_logps = torch.cat(
                    [self.first_pass(rollouts, rows, recorder)[0] for rows in self.micro_batches(rollouts)]
                )
        if self.grpo.beta > 0:
            with self.policy.disable_adapter():
                rollouts.ref_logps = torch.cat(
                    [self.completion_logps(rollouts, rows)[0] for rows in self.micro_batches(rollouts)]
                )

    @contextmanager
    def first_pass_recording(self, rollouts: Rollouts) -> Iterator[AttentionRecorder | None]:
        """Opens the step's first pass over the rollouts: allocates ``rollouts.entropy`` and, when a
        callback asked for attention, enters the recorder (None otherwise); once per pass, not per
        micro-batch."""
        rollouts.entropy = torch.zeros_like(rollouts.completion_mask)
        if not self.attention_layers:
            yield None
            return
        with self.attention_recorder as recorder:
            yield recorder
        self.capture_seconds += recorder.stopwatch.seconds()

    def first_pass(
        self, rollouts: Rollouts, rows: slice, recorder: AttentionRecorder | None
    ) -> tuple[Tensor, Tensor]:
        """Log-probs and entropies [n, L] of ``rows`` from the step's first forward over them, which
        also records the attention of the rows to credit (with a ``recorder``, as many as the budget
        holds) and keeps the entropy; then the rollout callbacks set the rows' credit (``on_credit``).
        The maps are dropped when the callbacks return."""
        micro_batch = MicroBatch(rows, attention_rows=[])
        if recorder is not None:
            start, stop, _ = rows.indices(len(rollouts))
            marked = (
                [True] * (stop - start) if self.record_zero_advantage else rollouts.credited[rows].tolist()
            )
            micro_batch.attention_rows = [start + j for j, yes in enumerate(marked) if yes]
            t = rollouts.prompt_ids.shape[1] + rollouts.completion_ids.shape[1]
            budget = self.attention_budget
            micro_batch.chunk_rows = len(marked) if budget is None else max(1, budget // (4 * t * t))
            micro_batch.capture = partial(self.capture_rows, rollouts, recorder)
        first = micro_batch.attention_rows[: micro_batch.chunk_rows]
        local = torch.tensor([row - rows.start for row in first], dtype=torch.long, device=self.device)
        # no rows to record: the recorder only passes through
        logps, entropy = self.completion_logps(rollouts, rows, recorder, local)
        if recorder is not None:
            maps = recorder.take()
            micro_batch.recorded = (first, maps) if first else None
            del maps
        rollouts.entropy[rows] = entropy.detach()
        began = time.perf_counter()
        for callback in self.rollout_callbacks():
            callback.on_credit(self.trainer, self, rollouts, micro_batch)
        self.credit_seconds += time.perf_counter() - began
        return logps, entropy

    @torch.no_grad()
    def capture_rows(self, rollouts: Rollouts, recorder: AttentionRecorder, rows: list[int]) -> Tensor:
        """[k, T, T] maps of these rollout rows from an extra pass (no grad, dropout off) that stops
        after the last recorded layer: the rows the attention budget left out of the forward."""
        mask = rollouts.attention_mask[rows]
        inputs = dict(
            input_ids=rollouts.input_ids[rows],
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
        )
        with eval_mode(self.policy):  # inside on_credit: its time counts as credit time
            recorder.run(
                forward=self.policy if self.decoder_and_head is None else self.decoder_and_head[0],
                stop=True,
                **inputs,
            )
        return recorder.take()

    def rollout_callbacks(self) -> list[RolloutCallback]:
        return [c for c in self.trainer.callbacks if isinstance(c, RolloutCallback)]

    def update(self, rollouts: Rollouts) -> dict[str, Tensor]:
        """``num_iterations`` optimizer steps over the rollouts; returns the step's loss metrics."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        micro_batches = self.micro_batches(rollouts)
        # dapo divides by the tokens of the whole generation batch, over all ranks; DDP then
        # averages the ranks' gradients, so each rank divides by the all-rank mean (as TRL does).
        tokens_per_rank = self.trainer.strategy.reduce(rollouts.completion_mask.sum(), reduce_op="mean")
        threshold = later_entropy = None  # top_entropy_quantile's, once per step, at the first micro-batch
        if self.grpo.top_entropy_quantile < 1 and self.grpo.num_iterations == 1 and len(micro_batches) > 1:
            # The first pass is this update's: at the first micro-batch's loss the later ones have not
            # been through the policy yet, so their entropies come from a no-grad pass, now, before
            # the first pass records attention.
            with torch.no_grad():
                later_entropy = torch.cat(
                    [self.completion_logps(rollouts, rows)[1] for rows in micro_batches[1:]]
                )
        step_loss = 0.0  # the first iteration's loss: the sum of its micro-batches' shares
        first_pass: list[tuple[Tensor, dict[str, Tensor]]] = []  # (tokens, metrics) per micro-batch
        for iteration in range(self.grpo.num_iterations):
            # With one iteration this forward is the step's first pass (else the old log-prob pass was).
            assigns_credit = iteration == 0 and self.grpo.num_iterations == 1
            with self.first_pass_recording(rollouts) if assigns_credit else nullcontext() as recorder:
                for index, rows in enumerate(micro_batches):
                    if assigns_credit:
                        logps, entropy = self.first_pass(rollouts, rows, recorder)
                    else:
                        logps, entropy = self.completion_logps(rollouts, rows)
                    mask = rollouts.completion_mask[rows]
                    if threshold is None and self.grpo.top_entropy_quantile < 1:
                        threshold = self.high_entropy_threshold(rollouts, micro_batches[0], later_entropy)
                    loss, stats = self.micro_batch_loss(
                        rollouts, rows, logps, tokens_per_rank, entropy, threshold, len(micro_batches)
                    )
                    # Under DDP, gradients are all-reduced once per optimizer step, on the last micro-batch.
                    with optimizer.toggle_model(sync_grad=index == len(micro_batches) - 1):
                        self.manual_backward(loss)
                    if iteration == 0:  # where the policy still is the sampler
                        entropy_mean = (entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
                        step_loss = step_loss + loss.detach()
                        # vars: asdict deep-copies tensors
                        first_pass.append((mask.sum(), {"entropy": entropy_mean, **vars(stats)}))
            # configure_optimizers' (no module walk)
            trainable = [p for group in optimizer.param_groups for p in group["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.grpo.max_grad_norm or float("inf"))
            if not torch.isfinite(grad_norm):  # a NaN/inf anywhere in the loss or logits ends up here
                # AdamW skips parameters without a gradient: the step counts, weights and moments stay.
                optimizer.zero_grad(set_to_none=True)
                self.skipped_nonfinite_steps += 1
                log.warning(
                    "step %d: non-finite gradient norm %s, update skipped (%d so far)",
                    self.global_step,
                    grad_norm,
                    self.skipped_nonfinite_steps,
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        # Token-weighted means over the micro-batches.
        tokens = sum(n for n, _ in first_pass).clamp(min=1)
        names = first_pass[0][1]
        return {
            "train/loss": step_loss,
            "train/grad_norm": grad_norm,
            "train/skipped_nonfinite_steps": torch.tensor(float(self.skipped_nonfinite_steps)),
            **{f"train/{k}": sum(n * m[k] for n, m in first_pass) / tokens for k in names},
        }

    # ---- helpers --------------------------------------------------------------------------
    def micro_batch_loss(
        self,
        rollouts: Rollouts,
        rows: slice,
        logps: Tensor,
        num_items_in_batch: Tensor,
        entropy: Tensor | None = None,
        entropy_threshold: Tensor | None = None,
        num_micro_batches: int = 1,
    ) -> tuple[Tensor, LossStats]:
        """The share of ``rows`` in the step's loss (``policy_loss``) from their log-probs and
        entropies under the current policy (the sampling policy's log-probs are these, detached,
        when no old-log-prob pass ran)."""
        grpo = self.grpo
        return policy_loss(
            logps,
            rollouts.old_logps[rows] if rollouts.old_logps is not None else logps.detach(),
            rollouts.advantages[rows],
            rollouts.completion_mask[rows],
            loss_type=grpo.loss_type,
            epsilon_low=grpo.epsilon,
            epsilon_high=grpo.epsilon_high,
            delta=grpo.delta,
            importance_sampling_level=grpo.importance_sampling_level,
            sapo_temperature_pos=grpo.sapo_temperature_pos,
            sapo_temperature_neg=grpo.sapo_temperature_neg,
            beta=grpo.beta,
            ref_logps=rollouts.ref_logps[rows] if rollouts.ref_logps is not None else None,
            kl_bias_correction=grpo.kl_bias_correction,
            token_weights=rollouts.token_weights[rows],
            entropy=entropy,
            entropy_threshold=entropy_threshold,
            entropy_coef=grpo.entropy_coef,
            max_completion_length=self.sampling.max_new_tokens,
            num_items_in_batch=num_items_in_batch,
            num_micro_batches=num_micro_batches,
            sampler_logps=rollouts.sampler_logps[rows] if rollouts.sampler_logps is not None else None,
            sampler_correction_mode=grpo.vllm_importance_sampling_mode
            if grpo.vllm_importance_sampling_correction
            else None,
            sampler_correction_clip=(
                grpo.vllm_importance_sampling_clip_min,
                grpo.vllm_importance_sampling_clip_max,
            ),
        )

    def high_entropy_threshold(
        self, rollouts: Rollouts, first_rows: slice, later_entropy: Tensor | None
    ) -> Tensor:
        """``top_entropy_quantile``'s threshold: the quantile of the entropies of every rank's
        completion tokens under the sampling policy, so every micro-batch and iteration of the
        step keeps tokens by the same line. They are the first pass's (``rollouts.entropy``), all
        of them at μ > 1; at μ = 1 those of ``first_rows`` followed by ``later_entropy``."""
        entropy = (
            rollouts.entropy
            if later_entropy is None
            else torch.cat([rollouts.entropy[first_rows], later_entropy])
        )
        # Padded to max_new_tokens, so that every rank gathers tensors of one shape.
        width = self.sampling.max_new_tokens - entropy.shape[1]
        entropy, mask = (torch.nn.functional.pad(t, (0, width)) for t in (entropy, rollouts.completion_mask))
        return entropy_threshold(
            self.all_gather(entropy), self.all_gather(mask), self.grpo.top_entropy_quantile
        )

    def completion_logps(
        self,
        rollouts: Rollouts,
        rows: slice,
        recorder: AttentionRecorder | None = None,
        record: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-token log-probs and entropies of the completion tokens of ``rows``.  # [n, L] each

        Where the policy's head is a plain linear layer (``decoder_and_head``), the decoder's
        hidden states of the completion tokens that the loss counts go to the chunked log-softmax
        with the head's weight, so no ``[n, L, V]`` logits exist (as TRL's fused LM head) and the
        other positions get 0 (they are masked out of the loss and the credit); otherwise the
        model's own head runs on the last L + 1 positions only and the log-softmax is chunked over
        their logits.
        With a ``recorder`` the pass also records the attention of the micro-batch rows ``record``
        ([k] long, counted from the micro-batch's start), for ``recorder.take()``.
        """
        attention_mask = rollouts.attention_mask[rows]
        targets = rollouts.completion_ids[rows]
        inputs = dict(
            input_ids=rollouts.input_ids[rows],
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        forward = self.policy if self.decoder_and_head is None else self.decoder_and_head[0]
        if recorder is not None:
            forward = partial(recorder.run, forward=forward, rows=record)
        # the bonus differentiates the entropy
        temperature, entropy_grad = (
            self.sampling.temperature,
            self.grpo.entropy_coef != 0,
        )
        if self.decoder_and_head is None:
            logits = forward(**inputs, logits_to_keep=targets.shape[1] + 1).logits[:, :-1]
            return token_logprobs_and_entropy(logits, targets, temperature, entropy_grad=entropy_grad)
        head = self.decoder_and_head[1]
        hidden = forward(**inputs).last_hidden_state[:, -targets.shape[1] - 1 : -1]
        # Only the loss's tokens go through the head: the padding after EOS costs no vocabulary pass.
        return token_logprobs_and_entropy(
            hidden,
            targets,
            temperature,
            head_weight=head.weight,
            head_bias=head.bias,
            positions=rollouts.completion_mask[rows] > 0,
            entropy_grad=entropy_grad,
        )

    def micro_batches(self, rollouts: Rollouts) -> list[slice]:
        size = self.grpo.micro_batch_size
        return [slice(i, i + size) for i in range(0, len(rollouts), size)]

    def decode(self, completion_ids: Tensor, mask: Tensor) -> list[str]:
        """Response text up to and including the first EOS, special tokens removed."""
        lengths = mask.sum(1).long().tolist()
        return [
            self.tokenizer.decode(ids[:n], skip_special_tokens=True)
            for ids, n in zip(completion_ids.tolist(), lengths)
        ]

    # ---- validation -----------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        size = len(batch["golds"])
        greedy = self.engine(self.policy, batch["prompt_ids"], batch["prompt_mask"], 1, None)
        scores = correctness_reward(
            prompts=batch["prompts"], completions=self.decode(greedy.ids, greedy.mask), golds=batch["golds"]
        )
        self.log("val/accuracy", sum(scores) / size, batch_size=size, prog_bar=True)
        if self.val_num_samples > 0:
            k = self.val_num_samples
            seeds = response_seeds(
                self.sampling_seed, self.global_step, [f"val:{s}" for s in batch["sources"]], k
            )
            sampled = self.engine(self.policy, batch["prompt_ids"], batch["prompt_mask"], k, seeds)
            scores = correctness_reward(
                prompts=[p for p in batch["prompts"] for _ in range(k)],
                completions=self.decode(sampled.ids, sampled.mask),
                golds=[g for g in batch["golds"] for _ in range(k)],
            )
            self.log(f"val/accuracy_mean@{k}", sum(scores) / len(scores), batch_size=size)

    # ---- optimisation and checkpoints -------------------------------------------------------
    def configure_optimizers(self):
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=self.optim.lr, weight_decay=self.optim.weight_decay, betas=tuple(self.optim.betas)
        )
        total = (
            self.trainer.max_steps
            if self.trainer.max_steps > 0
            else self.trainer.estimated_stepping_batches * self.grpo.num_iterations
        )
        if not math.isfinite(total):  # e.g. a run bounded by trainer.max_time only
            if self.optim.schedule != "constant":
                raise ValueError(
                    f"optim.schedule={self.optim.schedule!r} decays to 0 at the last step: set "
                    "trainer.max_steps"
                )
            total = 0  # unused by the constant schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.optim.warmup_steps, int(total), self.optim.schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def trainable_state_keys(self) -> set[str]:
        return {f"policy.{name}" for name, p in self.policy.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The base weights never change and can be reloaded from policy.name_or_path.
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # Anything drawing on the global RNGs (LoRA dropout, user rewards) resumes where it was.
        name, keys, position, has_gauss, gauss = np.random.get_state()
        checkpoint["rng_states"] = {  # tensors and builtins only, so weights_only loading accepts them
            "torch": torch.get_rng_state(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
            "python": random.getstate(),
        }
        checkpoint["skipped_nonfinite_steps"] = self.skipped_nonfinite_steps
        reopen_cut_epoch(checkpoint)  # a resumed run goes on with the rest of the epoch a stop cut short

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        try:
            source = f"checkpoint {self.trainer.ckpt_path}"
        except RuntimeError:  # not attached to a Trainer (load_from_checkpoint)
            source = "checkpoint"
        saved = checkpoint["state_dict"]
        missing = self.trainable_state_keys() - set(saved)
        if missing:
            raise CheckpointError(
                f"{source} lacks {len(missing)} adapter tensors of this policy (e.g. {sorted(missing)[0]}); "
                "was it written with another policy or LoRA config?"
            )
        own = self.state_dict()
        for key in sorted(self.trainable_state_keys()):
            if saved[key].shape != own[key].shape:
                raise CheckpointError(
                    f"{source}: {key} has shape {tuple(saved[key].shape)}, this policy's has "
                    f"{tuple(own[key].shape)} "
                    "(another lora_rank or model?)"
                )
        self._rng_states_to_restore = checkpoint.get("rng_states")
        self.skipped_nonfinite_steps = checkpoint.get("skipped_nonfinite_steps", 0)

    def on_train_start(self) -> None:
        # Applied here, not on load: Lightning draws on the RNGs between loading and training.
        if self._rng_states_to_restore is not None:
            states, self._rng_states_to_restore = self._rng_states_to_restore, None
            torch.set_rng_state(states["torch"])
            name, keys, position, has_gauss, gauss = states["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
            random.setstate(states["python"])

    def save_adapter(self, directory: str | Path) -> None:
        """Write the adapter (peft format, loadable with ``PeftModel.from_pretrained``) and tokenizer."""
        self.policy.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def on_train_end(self) -> None:
        # a collective call under DDP: every rank asks
        directory = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "adapter"
        if self.trainer.is_global_zero:
            self.save_adapter(directory)


def rollout_metrics(rollouts: Rollouts, reward_names: list[str], group: int) -> dict[str, Tensor]:
    """Scalars that describe the sampled batch (rewards, advantages, lengths)."""
    lengths = rollouts.completion_mask.sum(1)
    metrics = {
        "train/reward": rollouts.total_rewards.mean(),
        "train/reward_std": rollouts.total_rewards.view(-1, group).std(1).mean(),
        "train/zero_std_group_fraction": rollouts.zero_std_groups.float().mean(),
        "train/advantage_mean": rollouts.advantages.mean(),
        "train/advantage_std": rollouts.advantages.std(),
        "train/response_length_mean": lengths.mean(),
        "train/response_length_max": lengths.max(),
        "train/truncated_fraction": rollouts.is_truncated.float().mean(),
    }
    for index, name in enumerate(reward_names):
        metrics[f"train/reward/{name}"] = rollouts.rewards[:, index].mean()
    if "correctness" in reward_names:
        metrics["train/accuracy"] = metrics["train/reward/correctness"]
    return metrics
