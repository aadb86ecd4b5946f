"""Fits through the CLI with each engine: the paged engine learns, and the hf engine's sampler
log-probs make the importance-sampling correction a no-op in float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_flow.cli import main
from tests.test_fit import scalars, tiny_args


def brevity(prompts: list[str], completions: list[str], golds: list[str]) -> list[float]:
    """1 - length / 12: a random tiny policy learns to end early (one token, EOS) in a few steps."""
    return [1 - len(text) / 12 for text in completions]


def fit(policy: Path, root: Path, steps: int, *options: str):
    return main(
        [
            "fit",
            *tiny_args(policy, root, steps=steps),
            "--trainer.val_check_interval=null",
            "--trainer.limit_val_batches=0",
            "--model.optim.lr=0.02",
            "--model.optim.warmup_steps=0",
            "--model.rewards.correctness=0",
            '--model.rewards.custom={"tests.test_engines_fit.brevity": 1.0}',
            *options,
        ]
    )


def test_paged_engine_learns_with_the_correction_on(tiny_policy_dir, tmp_path):
    cli = fit(
        tiny_policy_dir,
        tmp_path,
        12,
        "--model.sampling.engine=paged",
        "--model.grpo.vllm_importance_sampling_correction=true",
        "--model.grpo.vllm_importance_sampling_mode=token_truncate",
    )
    logged = scalars(Path(cli.trainer.log_dir))
    reward = logged["train/reward"]
    assert len(reward) == 12
    assert sum(reward[-8:]) / 8 > sum(reward[:2]) / 2 + 0.05, reward  # 0.10 -> 0.20 when measured
    # Paged attention and the trainer's forward round differently, but both in float32.
    assert max(logged["train/sampler_logp_diff"]) < 1e-3
    assert all(0 <= kl < 1e-5 for kl in logged["train/sampler_kl"])


def test_hf_sampler_log_probs_make_the_correction_a_no_op(tiny_policy_dir, tmp_path):
    adapters, losses = {}, {}
    for correction in ("false", "true"):
        cli = fit(
            tiny_policy_dir,
            tmp_path / correction,
            2,
            f"--model.grpo.vllm_importance_sampling_correction={correction}",
            "--model.grpo.vllm_importance_sampling_mode=token_mask",
            "--model.grpo.vllm_importance_sampling_clip_max=1.0001",
        )
        logged = scalars(Path(cli.trainer.log_dir))
        assert max(logged["train/sampler_logp_diff"]) < 1e-5  # merged float32 sampling vs the trainer's pass
        assert max(logged["train/sampler_clipped_fraction"]) == 0.0  # no weight above 1.0001
        adapters[correction] = [p.detach().clone() for p in cli.model.policy.parameters() if p.requires_grad]
        losses[correction] = logged["train/loss"]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5, abs=1e-7)
    # Weights within 1e-5 of 1 change AdamW's steps (0.02 each) by rounding only; entries whose
    # gradient is ~0 (Adam divides by its root) show it most.
    for off, on in zip(adapters["false"], adapters["true"]):
        torch.testing.assert_close(on, off, rtol=0, atol=1e-4)
