"""End to end through the CLI: fit, resume, validate, print_config, and credit reaching the loss."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from lightning_flow.cli import main
from lightning_flow.rollouts import RolloutCallback

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")


def tiny_args(policy: Path, root: Path, steps: int = 2) -> list[str]:
    """The demo config shrunk to a few quick steps on a given policy, logging under root."""
    return [
        "--config",
        DEMO,
        f"--model.policy.name_or_path={policy}",
        f"--trainer.max_steps={steps}",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root / 'runs'}",
        "--trainer.val_check_interval=2",
        "--model.sampling.num_generations=4",
        "--model.sampling.max_new_tokens=12",
        "--model.grpo.micro_batch_size=8",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_train=64",
        "--data.init_args.num_val=8",
        "--data.init_args.val_batch_size=8",
    ]


def scalars(log_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def lora_state(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in torch.load(path, map_location="cpu", weights_only=False)["state_dict"].items()}


def test_fit_logs_saves_and_resumes(tiny_policy_dir, tmp_path):
    cli = main(
        [
            "fit",
            *tiny_args(tiny_policy_dir, tmp_path),
            "--model.grpo.beta=0.04",
            "--model.grpo.num_iterations=2",
            "--trainer.val_check_interval=1",
        ]
    )
    log_dir = Path(cli.trainer.log_dir)
    assert cli.trainer.global_step == 2  # num_iterations=2: two optimizer steps from one batch

    logged = scalars(log_dir)
    expected = [
        "train/reward",
        "train/reward/correctness",
        "train/accuracy",
        "train/reward_std",
        "train/zero_std_group_fraction",
        "train/advantage_mean",
        "train/advantage_std",
        "train/kl",
        "train/clip_ratio_low",
        "train/clip_ratio_high",
        "train/entropy",
        "train/response_length_mean",
        "train/response_length_max",
        "train/truncated_fraction",
        "perf/generation_tokens_per_s",
        "perf/update_tokens_per_s",
        "perf/step_time_s",
        "train/grad_norm",
        "train/lr",
        "train/loss",
        "val/accuracy",
        "data/train_examples",
        "data/dropped_too_long",
    ]
    assert not [tag for tag in expected if tag not in logged]
    assert all(v == v for values in logged.values() for v in values), "a NaN was logged"
    assert logged["data/train_examples"] == [64.0]

    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["model"]["policy"]["name_or_path"] == str(tiny_policy_dir)
    assert cli.datamodule.tokenizer == str(tiny_policy_dir)  # linked from the policy, so not saved

    # The adapter is in peft's format and matches the checkpoint's LoRA tensors.
    base = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    adapter = PeftModel.from_pretrained(base, log_dir / "adapter")
    checkpoint = lora_state(log_dir / "checkpoints" / "last.ckpt")
    assert checkpoint and all("lora_" in k for k in checkpoint)
    for name, param in adapter.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, checkpoint["policy." + name])

    # Resume from the checkpoint and train two more steps.
    resumed = main(
        [
            "fit",
            *tiny_args(tiny_policy_dir, tmp_path, steps=4),
            f"--ckpt_path={log_dir / 'checkpoints' / 'last.ckpt'}",
        ]
    )
    assert resumed.trainer.global_step == 4


def length_reward(prompts: list[str], completions: list[str], golds: list[str]) -> list[float]:
    """A custom reward that varies even for an untrained policy, so advantages are nonzero."""
    return [len(c) / 10 for c in completions]


class ZeroCredit(RolloutCallback):
    """Gives every token weight 0: the update must then leave the adapter exactly as it was."""

    def on_credit(self, trainer, pl_module, rollouts, micro_batch):
        rows = micro_batch.rows
        assert rollouts.token_weights.shape == rollouts.completion_mask.shape
        assert torch.equal(rollouts.token_weights[rows], torch.ones_like(rollouts.completion_mask[rows]))
        rollouts.token_weights[rows] = 0.0


@pytest.mark.parametrize("credit", [None, "zero"])
def test_token_weights_reach_the_loss(tiny_policy_dir, tmp_path, credit):
    args = [
        *tiny_args(tiny_policy_dir, tmp_path, steps=1),
        "--trainer.val_check_interval=null",
        "--trainer.limit_val_batches=0",
    ]
    if credit:
        args.append("--trainer.callbacks+=tests.test_fit.ZeroCredit")
    cli = main(
        [
            "fit",
            *args,
            "--model.optim.lr=0.05",
            '--model.rewards.custom={"tests.test_fit.length_reward": 1.0}',
        ]
    )
    assert cli.model.reward_suite.names == ["correctness", "tests.test_fit.length_reward"]
    # The LoRA B matrices start at zero; any update with a nonzero gradient moves them.
    moved = max(p.abs().max().item() for n, p in cli.model.policy.named_parameters() if "lora_B" in n)
    if credit:
        assert moved == 0.0
    else:
        assert moved > 0.0


def test_validate_logs_accuracy(tiny_policy_dir, tmp_path):
    cli = main(["validate", *tiny_args(tiny_policy_dir, tmp_path), "--model.val_num_samples=2"])
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= float(metrics["val/accuracy"]) <= 1.0
    assert "val/accuracy_mean@2" in metrics


def test_print_config_shows_every_group():
    out = subprocess.run(
        [sys.executable, "-m", "lightning_flow", "fit", "--config", DEMO, "--print_config"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    config = yaml.safe_load(out)
    assert set(config["model"]) >= {"policy", "sampling", "grpo", "optim", "rewards"}
    assert config["model"]["grpo"]["loss_type"] == "grpo"
    assert config["data"]["class_path"] == "lightning_flow.datamodules.ArithmeticDataModule"


def test_fit_on_real_stories260k_weights(stories260k, shared_data, tmp_path):
    """Real weights and a SentencePiece tokenizer through generation, reward, loss and backward."""
    args = [
        "--config",
        DEMO,
        f"--model.policy.name_or_path={stories260k}",
        "--trainer.max_steps=2",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.limit_val_batches=0",
        "--model.sampling.num_generations=4",
        "--model.sampling.max_new_tokens=24",
        "--model.grpo.micro_batch_size=8",
        "--model.grpo.beta=0.04",
        "--model.optim.lr=0.01",
        "--data=lightning_flow.datamodules.MathDataModule",
        f"--data.train={shared_data / 'gsm8k' / 'test.jsonl'}",
        "--data.limit=32",
        "--data.val_size=4",
        "--data.batch_size=2",
        "--data.max_prompt_length=512",
    ]
    cli = main(["fit", *args])
    logged = scalars(Path(cli.trainer.log_dir))
    assert cli.trainer.global_step == 2
    assert all(
        torch.isfinite(torch.tensor(logged[tag])).all()
        for tag in ["train/loss", "train/kl", "train/grad_norm", "train/entropy"]
    )
    assert logged["train/response_length_mean"][0] > 0
