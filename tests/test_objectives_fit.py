"""The new objectives and options through the CLI, on the tiny policy: they train, and the
high-entropy threshold is the generation batch's (over every micro-batch), at μ = 1 and μ = 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_flow.cli import main
from lightning_flow.rollouts import RolloutCallback
from tests.test_fit import scalars, tiny_args


class KeepEntropies(RolloutCallback):
    """Keeps each step's first-pass entropies and completion mask."""

    def __init__(self) -> None:
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_rollouts_end(self, trainer, pl_module, rollouts) -> None:
        self.steps.append((rollouts.entropy.clone(), rollouts.completion_mask.clone()))


@pytest.mark.parametrize(
    ("options", "keep"),
    [
        # μ = 1 in 4 micro-batches: the threshold needs a no-grad pass over the 3 later ones.
        (
            [
                "--model.grpo.loss_type=sapo",
                "--model.grpo.importance_sampling_level=sequence",
                "--model.grpo.micro_batch_size=4",
                "--model.grpo.entropy_coef=0.01",
            ],
            0.25,
        ),
        # μ = 2: the threshold comes from the first pass, which stored every row's entropy.
        (
            [
                "--model.grpo.loss_type=luspo",
                "--model.grpo.importance_sampling_level=sequence",
                "--model.grpo.num_iterations=2",
                "--model.grpo.delta=1.5",
                "--model.grpo.beta=0.04",
            ],
            0.5,
        ),
        (
            [
                "--model.grpo.loss_type=cispo",
                "--model.grpo.epsilon_high=5",
                "--model.grpo.num_iterations=2",
                "--model.grpo.micro_batch_size=4",
                "--model.grpo.entropy_coef=0.01",
            ],
            0.2,
        ),
    ],
)
def test_objective_trains_and_keeps_the_batch_top_entropy_share(tiny_policy_dir, tmp_path, options, keep):
    cli = main(
        [
            "fit",
            *tiny_args(tiny_policy_dir, tmp_path),
            "--trainer.val_check_interval=null",
            "--trainer.limit_val_batches=0",
            "--model.optim.lr=0.05",
            '--model.rewards.custom={"tests.test_fit.length_reward": 1.0}',
            f"--model.grpo.top_entropy_quantile={keep}",
            "--trainer.callbacks+=tests.test_objectives_fit.KeepEntropies",
            *options,
        ]
    )
    logged = scalars(Path(cli.trainer.log_dir))
    assert all(torch.isfinite(torch.tensor(values)).all() for values in logged.values()), (
        "a NaN or inf was logged"
    )
    # it trained
    assert max(p.abs().max().item() for n, p in cli.model.policy.named_parameters() if "lora_B" in n) > 0
    kept_entropies = next(c for c in cli.trainer.callbacks if isinstance(c, KeepEntropies))
    fractions = []
    for entropy, mask in kept_entropies.steps:
        valid = entropy[mask > 0]
        threshold = torch.quantile(valid, 1 - keep)  # over the whole generation batch
        fractions.append((valid >= threshold).float().mean().item())
    assert logged["train/policy_token_fraction"] == pytest.approx(fractions, abs=1e-6)
    assert all(0 < f < 1 for f in fractions)


class KeepMaps(RolloutCallback):
    """Records every row's attention (zero advantage included) and keeps the first step's maps."""

    def __init__(self) -> None:
        self.maps: dict[int, torch.Tensor] = {}

    def setup(self, trainer, pl_module, stage) -> None:
        pl_module.request_attention(zero_advantage_rows=True)

    def on_credit(self, trainer, pl_module, rollouts, micro_batch) -> None:
        for rows, maps in micro_batch.attention_maps():
            assert maps.shape[0] == len(rows), "maps of another forward were handed over"
            if rollouts.step == 0:
                self.maps.update(zip(rows, maps.clone()))


def test_the_extra_entropy_pass_leaves_the_recorded_attention_alone(tiny_policy_dir, tmp_path):
    """μ = 1 in 4 micro-batches with the high-entropy mask runs a no-grad pass for the threshold
    before the first pass records attention: the first step's maps (same rollouts) must be those
    of a run without the mask."""
    maps = []
    for keep in (1.0, 0.25):
        cli = main(
            [
                "fit",
                *tiny_args(tiny_policy_dir, tmp_path / str(keep), steps=1),
                "--trainer.val_check_interval=null",
                "--trainer.limit_val_batches=0",
                "--model.grpo.micro_batch_size=4",
                f"--model.grpo.top_entropy_quantile={keep}",
                "--trainer.callbacks+=tests.test_objectives_fit.KeepMaps",
            ]
        )
        maps.append(next(c for c in cli.trainer.callbacks if isinstance(c, KeepMaps)).maps)
    assert sorted(maps[0]) == sorted(maps[1]) == list(range(16))
    for row in range(16):
        assert torch.equal(maps[0][row], maps[1][row])
