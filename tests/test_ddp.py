"""Two CPU processes (gloo, Lightning's ``ddp``) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from safetensors.torch import load_file

from lightning_flow.rollouts import RolloutCallback, Rollouts
from tests.test_fit import REPO, tiny_args
from tests.test_resume import logged_by_step

STEPS = 3


class RecordPrompts(RolloutCallback):
    """Writes the prompts each rank trains on, one file per rank and step."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_rollouts_end(self, trainer: Trainer, pl_module: LightningModule, rollouts: Rollouts) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"prompts": rollouts.prompts, "completions": rollouts.completions}
        (self.out_dir / f"step{rollouts.step}-rank{trainer.global_rank}.json").write_text(json.dumps(record))


def start_fit(policy: Path, root: Path, devices: int, prompts_per_rank: int) -> subprocess.Popen:
    record = {"class_path": "tests.test_ddp.RecordPrompts", "init_args": {"out_dir": str(root / "prompts")}}
    command = [
        sys.executable,
        "-m",
        "lightning_flow",
        "fit",
        *tiny_args(policy, root, steps=STEPS),
        f"--trainer.devices={devices}",
        "--trainer.strategy=ddp" if devices > 1 else "--trainer.strategy=auto",
        "--trainer.limit_val_batches=0",
        "--trainer.val_check_interval=null",
        f"--data.init_args.batch_size={prompts_per_rank}",
        "--model.grpo.loss_type=dapo",
        "--model.grpo.micro_batch_size=4",
        # The high-entropy threshold is taken over every rank's tokens: a per-rank one would change the
        # gradient.
        "--model.grpo.top_entropy_quantile=0.5",
        "--model.grpo.entropy_coef=0.01",
        "--model.optim.lr=0.02",
        '--model.rewards.custom={"tests.test_fit.length_reward": 1.0}',
        f"--trainer.callbacks+={json.dumps(record)}",
        "--trainer.callbacks+=lightning_flow.callbacks.FlowCredit",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def finished(run: subprocess.Popen, root: Path) -> Path:
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    return root / "runs" / "demo" / "version_0"


def test_two_processes_match_one_with_the_same_global_batch(tiny_policy_dir, tmp_path):
    # side by side
    runs = [
        start_fit(tiny_policy_dir, tmp_path / "one", devices=1, prompts_per_rank=4),
        start_fit(tiny_policy_dir, tmp_path / "two", devices=2, prompts_per_rank=2),
    ]
    single, double = finished(runs[0], tmp_path / "one"), finished(runs[1], tmp_path / "two")

    # Each rank generated the groups of its own prompts, and together they are the single run's.
    group = 4
    for step in range(STEPS):
        one = json.loads((tmp_path / "one" / "prompts" / f"step{step}-rank0.json").read_text())
        ranks = [
            json.loads((tmp_path / "two" / "prompts" / f"step{step}-rank{r}.json").read_text())
            for r in (0, 1)
        ]
        for rank in ranks:
            groups = [rank["prompts"][i : i + group] for i in range(0, len(rank["prompts"]), group)]
            assert len(groups) == 2 and all(len(set(g)) == 1 for g in groups)  # whole groups on one rank
        assert set(ranks[0]["prompts"]).isdisjoint(ranks[1]["prompts"])
        assert ranks[0]["prompts"] + ranks[1]["prompts"] == one["prompts"]
        assert ranks[0]["completions"] + ranks[1]["completions"] == one["completions"]

    # Metrics are means over ranks; the gradient norm is of the all-reduced gradient, so it checks
    # the averaging, dapo's all-rank token count (a per-rank count would double it) and the
    # all-rank entropy threshold.
    # The credit fractions are summed over ranks before dividing, so they match however the credited rows
    # split.
    tags = [
        "train/reward",
        "train/grad_norm",
        "train/response_length_max",
        "credit/credited_fraction",
        "credit/fallback_fraction",
    ]
    expected, got = logged_by_step(single, tags), logged_by_step(double, tags)
    for tag in tags:
        assert sorted(got[tag]) == sorted(expected[tag]) == list(range(STEPS))
        torch.testing.assert_close(
            torch.tensor([got[tag][s] for s in range(STEPS)]),
            torch.tensor([expected[tag][s] for s in range(STEPS)]),
            rtol=1e-4,
            atol=1e-6,
        )

    lora_one, lora_two = (
        load_file(single / "adapter" / "adapter_model.safetensors"),
        load_file(double / "adapter" / "adapter_model.safetensors"),
    )
    assert lora_one.keys() == lora_two.keys()
    assert max(v.abs().max().item() for k, v in lora_one.items() if "lora_B" in k) > 1e-3  # it trained
    for key in lora_one:
        torch.testing.assert_close(lora_two[key], lora_one[key], rtol=1e-4, atol=1e-5)
