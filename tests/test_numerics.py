"""Numerical faults in a real fit: NaN/inf logits or attention, flat rewards, an exploding learning rate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from lightning_flow.cli import main
from lightning_flow.rollouts import RolloutCallback
from tests.test_fit import scalars, tiny_args

NO_VAL = ["--trainer.limit_val_batches=0", "--trainer.val_check_interval=null"]
VARYING_REWARD = '--model.rewards.custom={"tests.test_fit.length_reward": 1.0}'


def lora(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}


class PoisonLogits(Callback):
    """At step 0 only, a forward hook puts ``value`` into the last hidden state (so into every
    logit) of the first response of every training forward."""

    def __init__(self, value: float) -> None:
        self.value, self.hook, self.before, self.after_step0 = value, None, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self.before = lora(pl_module)
            self.optimizer_state = {k: v for k, v in trainer.optimizers[0].state.items()}

            def poison(module, args, output):
                if torch.is_grad_enabled():
                    bump = torch.zeros_like(output.last_hidden_state)
                    bump[0, -2, 0] = self.value  # position -2 scores the last response token (-1 scores none)
                    output.last_hidden_state = output.last_hidden_state + bump
                return output

            decoder, _ = pl_module.decoder_and_head  # the module applies the head to these states itself
            self.hook = decoder.register_forward_hook(poison)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.hook is not None:
            self.hook.remove()
            self.hook, self.after_step0 = None, lora(pl_module)
            self.optimizer_state_after = dict(trainer.optimizers[0].state)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_logits_skip_the_step_and_count_it(tiny_policy_dir, tmp_path, value):
    poison = PoisonLogits(value)
    cli = main(
        [*tiny_args(tiny_policy_dir, tmp_path, steps=2), *NO_VAL, VARYING_REWARD, "--model.optim.lr=0.05"],
        run=False,
    )
    cli.trainer.callbacks.append(poison)
    cli.trainer.fit(cli.model, cli.datamodule)

    assert cli.trainer.global_step == 2  # the skipped step still counts toward max_steps
    for name, before in poison.before.items():
        assert torch.equal(poison.after_step0[name], before), name  # not updated, not NaN
    assert poison.optimizer_state_after == {}  # AdamW kept no moments from the bad step
    moved = max((p - poison.before[n]).abs().max().item() for n, p in lora(cli.model).items())
    # step 1 trains normally
    assert moved > 0 and all(torch.isfinite(p).all() for p in lora(cli.model).values())
    logged = scalars(Path(cli.trainer.log_dir))
    assert logged["train/skipped_nonfinite_steps"] == [1.0, 1.0]


class PoisonAttention(RolloutCallback):
    """Puts a NaN into the captured attention of the first credited response (nonzero advantage) before
    FlowCredit sees it (listed first)."""

    row: int | None = None

    def on_credit(self, trainer, pl_module, rollouts, micro_batch):
        # this micro-batch's maps were just recorded
        if PoisonAttention.row is None and micro_batch.recorded is not None:
            rows, maps = micro_batch.recorded  # the credited rows, in place (nothing is handed over)
            PoisonAttention.row = rows[0]
            maps[0, -1, 0] = float("nan")


class CheckWeights(RolloutCallback):
    """After the update: the poisoned response fell back to uniform weights, the others kept credit."""

    def __init__(self) -> None:
        self.checked = 0

    def on_rollouts_end(self, trainer, pl_module, rollouts):
        poisoned = PoisonAttention.row
        assert poisoned is not None
        assert torch.isfinite(rollouts.token_weights).all()
        assert (rollouts.token_weights[poisoned] == 1).all()
        assert (rollouts.token_weights > 1).any()
        self.credited = int((rollouts.advantages != 0).sum())
        self.checked += 1


def test_nonfinite_attention_falls_back_to_uniform_weights(tiny_policy_dir, tmp_path):
    from lightning_flow.callbacks import FlowCredit

    check, PoisonAttention.row = CheckWeights(), None
    cli = main([*tiny_args(tiny_policy_dir, tmp_path, steps=1), *NO_VAL, VARYING_REWARD], run=False)
    credit = FlowCredit(layers=[0, 1])
    cli.trainer.callbacks.extend([PoisonAttention(), credit, check])
    # callbacks added after construction: ask for attention as the CLI would
    credit.setup(cli.trainer, cli.model, "fit")
    cli.trainer.fit(cli.model, cli.datamodule)
    assert check.checked == 1
    logged = scalars(Path(cli.trainer.log_dir))
    # of the credited responses
    assert logged["credit/nonfinite_attention_fraction"] == [pytest.approx(1 / check.credited)]
    assert logged["train/skipped_nonfinite_steps"] == [0.0]


def constant_reward(prompts, completions, golds):
    return [0.5] * len(completions)


def test_all_equal_rewards_for_many_steps_leave_the_adapter_alone(tiny_policy_dir, tmp_path):
    cli = main(
        [
            *tiny_args(tiny_policy_dir, tmp_path, steps=6),
            *NO_VAL,
            "--model.optim.lr=0.05",
            "--model.rewards.correctness=0",
            '--model.rewards.custom={"tests.test_numerics.constant_reward": 1.0}',
        ],
        run=False,
    )
    start = lora(cli.model)
    cli.trainer.fit(cli.model, cli.datamodule)
    logged = scalars(Path(cli.trainer.log_dir))
    assert logged["train/zero_std_group_fraction"] == [1.0] * 6
    assert logged["train/loss"] == [0.0] * 6 and logged["train/grad_norm"] == [0.0] * 6
    assert logged["train/skipped_nonfinite_steps"] == [0.0] * 6
    end = lora(cli.model)
    assert all(torch.equal(end[n], start[n]) for n in start)  # no signal: no move


class RecordAppliedNorms(Callback):
    """The gradient norm at the moment each optimizer step applies it (None when it was skipped)."""

    def __init__(self) -> None:
        self.norms: list[float | None] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.policy.parameters() if p.requires_grad and p.grad is not None]
        self.norms.append(
            torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() if grads else None
        )


def test_exploding_learning_rate_is_held_by_clipping(tiny_policy_dir, tmp_path):
    record = RecordAppliedNorms()
    cli = main(
        [
            *tiny_args(tiny_policy_dir, tmp_path, steps=6),
            *NO_VAL,
            VARYING_REWARD,
            "--model.optim.lr=1000",
            "--model.grpo.max_grad_norm=0.5",
        ],
        run=False,
    )
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, cli.datamodule)
    logged = scalars(Path(cli.trainer.log_dir))
    assert len(record.norms) == 6
    applied = [n for n in record.norms if n is not None]
    assert applied and all(n <= 0.5 * (1 + 1e-5) for n in applied)
    assert max(logged["train/grad_norm"]) > 0.5  # the raw gradient did exceed the bound
    assert all(torch.isfinite(p).all() for p in lora(cli.model).values())
    assert logged["train/skipped_nonfinite_steps"][-1] == record.norms.count(None)
