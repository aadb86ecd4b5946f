"""A fit that stopped cleanly (``max_steps``, ``max_time``) or on an exception in a user's reward,
resumed from its last checkpoint, equals one uninterrupted fit step for step (the SIGKILL case is
in test_resume.py). The last checkpoint of a clean stop is the one ModelCheckpoint writes at train
end; the tiny fit's 3 batches an epoch make every stop here fall mid-epoch."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from lightning_flow.cli import main
from tests.test_fit import length_reward, tiny_args
from tests.test_resume import EVERY_STEP, STEPS, TAGS, adapter_tensors, logged_by_step, run_dir

_reward_calls = {"count": 0, "fail_at": None, "sleep": 0.0}


def flaky_length_reward(prompts: list[str], completions: list[str], golds: list[str]) -> list[float]:
    """``length_reward`` that can sleep (to let a time limit stop the fit) or raise at its n-th call."""
    _reward_calls["count"] += 1
    if _reward_calls["count"] == _reward_calls["fail_at"]:
        raise RuntimeError("the user's reward failed")
    time.sleep(_reward_calls["sleep"])
    return length_reward(prompts, completions, golds)


def fit(policy: Path, root: Path, steps: int, *extra: str):
    _reward_calls.update(count=0, fail_at=None, sleep=0.0)
    return main(["fit", *fit_args_with(policy, root, steps), *extra])


def last_checkpoint(root: Path) -> Path:
    return run_dir(root) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def uninterrupted(tiny_policy_dir, tmp_path_factory) -> tuple[dict, dict]:
    root = tmp_path_factory.mktemp("uninterrupted")
    fit(tiny_policy_dir, root, STEPS)
    return logged_by_step(run_dir(root), TAGS), adapter_tensors(last_checkpoint(root))


def assert_resumed_equals(root: Path, uninterrupted: tuple[dict, dict]) -> None:
    expected, expected_adapter = uninterrupted
    assert sorted(expected["train/reward"]) == list(range(STEPS))
    assert logged_by_step(run_dir(root), TAGS) == expected
    adapter = adapter_tensors(last_checkpoint(root))
    assert adapter.keys() == expected_adapter.keys()
    assert all(torch.equal(adapter[k], expected_adapter[k]) for k in adapter)


def test_a_finished_fit_extended_to_more_steps(tiny_policy_dir, tmp_path, uninterrupted):
    cli = fit(tiny_policy_dir, tmp_path, 2)  # stops after the 2nd of 3 batches of epoch 0
    assert cli.trainer.global_step == 2
    assert torch.load(last_checkpoint(tmp_path), weights_only=False)["epoch"] == 0
    cli = fit(tiny_policy_dir, tmp_path, STEPS, "--ckpt_path=last")
    assert cli.trainer.global_step == STEPS and cli.trainer.current_epoch == 2
    assert_resumed_equals(tmp_path, uninterrupted)


def test_a_fit_stopped_by_max_time_then_resumed(tiny_policy_dir, tmp_path, uninterrupted):
    _reward_calls["sleep"] = 0.6
    cli = main(
        [
            "fit",
            *fit_args_with(tiny_policy_dir, tmp_path),
            "--trainer.max_time=00:00:00:01",
        ]
    )
    stopped_at = cli.trainer.global_step
    assert 1 <= stopped_at < STEPS
    # Given by its path (not "last"), the checkpoint's version folder is still the one logged into.
    cli = fit(tiny_policy_dir, tmp_path, STEPS, f"--ckpt_path={last_checkpoint(tmp_path)}")
    assert cli.trainer.global_step == STEPS
    assert_resumed_equals(tmp_path, uninterrupted)


def fit_args_with(policy: Path, root: Path, steps: int = STEPS) -> list[str]:
    """``fit``'s arguments without resetting the reward's counters (a test sets them first)."""
    return [
        *tiny_args(policy, root, steps=steps),
        "--trainer.limit_val_batches=0",
        "--trainer.val_check_interval=null",
        "--data.init_args.num_train=12",
        "--model.policy.lora_dropout=0.1",
        "--model.optim.lr=0.02",
        '--model.rewards.custom={"tests.test_resume_stops.flaky_length_reward": 1.0}',
    ]


def test_a_fit_ended_by_an_exception_in_a_reward_then_resumed(tiny_policy_dir, tmp_path, uninterrupted):
    _reward_calls.update(count=0, fail_at=5, sleep=0.0)  # the 5th step's reward raises
    with pytest.raises(RuntimeError, match="the user's reward failed"):
        main(["fit", *fit_args_with(tiny_policy_dir, tmp_path), "--config", EVERY_STEP])
    assert torch.load(last_checkpoint(tmp_path), weights_only=False)["global_step"] == 4
    # The same checkpoint settings as the failed run (else Lightning writes last-v1.ckpt beside last.ckpt).
    cli = fit(tiny_policy_dir, tmp_path, STEPS, "--config", EVERY_STEP, "--ckpt_path=last")
    assert cli.trainer.global_step == STEPS
    assert_resumed_equals(tmp_path, uninterrupted)
