"""The progress bar's training total, hand-computed for a fresh epoch and for a resumed one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lightning_flow.progress import ProgressBar


def bar_for(max_steps, global_step, processed, is_last_batch, num_iterations=1, max_epochs=-1) -> ProgressBar:
    bar = ProgressBar()
    bar._trainer = SimpleNamespace(
        max_steps=max_steps,
        max_epochs=max_epochs,
        global_step=global_step,
        num_training_batches=250,
        lightning_module=SimpleNamespace(grpo=SimpleNamespace(num_iterations=num_iterations)),
        fit_loop=SimpleNamespace(
            epoch_loop=SimpleNamespace(
                batch_progress=SimpleNamespace(
                    is_last_batch=is_last_batch, current=SimpleNamespace(processed=processed)
                )
            )
        ),
    )
    return bar


@pytest.mark.parametrize(
    ("args", "total"),
    [
        ((30, 0, 0, False), 30),  # a fresh 30-step run: 30 of the epoch's 250 batches
        ((30, 21, 21, False), 30),  # resumed after 20 steps, at the end of batch 21: 21 done + 9 left
        ((60, 42, 21, False, 2), 30),  # two optimizer steps a batch: 21 done + ceil(18 / 2)
        ((300, 250, 250, True), 50),  # the second epoch starts at 0: 50 steps left
        ((1000, 0, 0, False), 250),  # more steps than an epoch holds
    ],
)
def test_total_counts_the_epochs_batches(args, total):
    assert bar_for(*args).total_train_batches == total


def test_description_has_no_negative_epoch_count():
    assert bar_for(30, 0, 0, False)._get_train_description(1).strip() == "Epoch 1"
    assert bar_for(30, 0, 0, False, max_epochs=3)._get_train_description(1).strip() == "Epoch 1/2"
