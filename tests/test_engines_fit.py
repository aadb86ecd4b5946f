"""Fits through the CLI with each engine: the demo learns with the paged engine and resumes
exactly after a kill, and the hf engine's sampler log-probs make the importance-sampling
correction a no-op in float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_flow.cli import main
from tests.test_fit import DEMO, scalars, tiny_args
from tests.test_resume import (
    EVERY_STEP,
    assert_same_run,
    cli_fit,
    kill_after_checkpoint,
    launch,
    run_dir,
    stderr_tail,
)

DEMO_STEPS, KILL_AFTER = 20, 10


def demo_command(policy: Path, root: Path, *extra: str) -> list[str]:
    """configs/demo.yaml for 20 steps with the paged engine and the correction on, on one fixed
    batch of 8 problems (``num_train=8``), a checkpoint after every step, no validation."""
    return cli_fit(
        "--config",
        DEMO,
        "--config",
        EVERY_STEP,
        f"--model.policy.name_or_path={policy}",
        f"--trainer.max_steps={DEMO_STEPS}",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root / 'runs'}",
        "--trainer.limit_val_batches=0",
        "--data.init_args.num_train=8",
        "--model.sampling.engine=paged",
        "--model.grpo.vllm_importance_sampling_correction=true",
        "--model.grpo.vllm_importance_sampling_mode=token_truncate",
        *extra,
    )


def test_demo_learns_with_the_paged_engine_and_resumes_exactly_after_a_kill(demo_policy_dir, tmp_path):
    """The demo (its warm-started policy, arithmetic data, correctness reward, learning rate and
    warm-up) with ``engine: paged``. On its 2,000 problems 20 steps show no clear rise, a step's
    reward ranging from 0.11 to 0.45 with its problems (paged; measured, mean of steps 1-5 -> 11-20:
    paged 0.31 -> 0.33, hf 0.30 -> 0.33), so the run keeps one batch of 8 problems
    (``num_train=8``) and learns those.

    docs/engines.md promises that paged, on one machine, samples the same batch at the same step
    identically, so that a run SIGKILLed after step 10 and resumed from ``last.ckpt`` repeats the
    uninterrupted run: the same rewards, losses and gradient norms, and the same adapter bit for bit."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # one torch thread each: the two run side by side
    uninterrupted = launch(demo_command(demo_policy_dir, straight), straight, OMP_NUM_THREADS="1")
    process = launch(demo_command(demo_policy_dir, killed), killed, OMP_NUM_THREADS="1")
    resumed_from = kill_after_checkpoint(process, killed, step=KILL_AFTER, timeout_s=600)
    assert KILL_AFTER - 1 <= resumed_from < DEMO_STEPS  # the kill may fall between step=10 and last.ckpt
    resumed = launch(demo_command(demo_policy_dir, killed, "--ckpt_path=last"), killed, OMP_NUM_THREADS="1")
    assert resumed.wait() == 0, stderr_tail(killed)
    assert uninterrupted.wait() == 0, stderr_tail(straight)

    logged = scalars(run_dir(straight))
    reward = logged["train/reward"]
    assert len(reward) == DEMO_STEPS
    # Measured: mean of steps 1-5 0.216, of steps 11-20 0.417, the same rewards with the correction
    # off (hf, on its own draws: 0.213 -> 0.402).
    assert sum(reward[-10:]) / 10 > sum(reward[:5]) / 5 + 0.1, reward
    # Paged attention and the trainer's forward round differently, both in float32: measured at
    # most 1.2e-7 per token, so the correction's weights are 1 to rounding. The k3 KL is >= 0 in
    # exact arithmetic; float32 rounds it to -1e-9 to -3e-9 here.
    assert max(logged["train/sampler_logp_diff"]) < 1e-5
    assert max(abs(kl) for kl in logged["train/sampler_kl"]) < 1e-6
    assert_same_run(killed, straight)


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
            '--model.rewards.custom={"tests.test_fit.length_reward": 1.0}',
            *options,
        ]
    )


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
