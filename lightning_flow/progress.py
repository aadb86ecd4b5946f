"""Lightning's rich progress bar with totals that hold when a run is resumed mid-epoch."""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """``RichProgressBar`` whose training total counts the batches of the epoch, not the steps left.

    Lightning's total under ``max_steps`` is ``min(batches per epoch, max_steps - global_step)``,
    taken when the bar starts; a run resumed after batch b of an epoch starts its bar at b, so a
    fit extended from 20 to 30 steps showed ``30/10``. Here the total is the batches already done
    in the epoch plus those the remaining optimizer steps need (``num_iterations`` steps a batch),
    and the epoch has no ``/-2`` after it when the run is bounded by steps."""

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0:
            return trainer.num_training_batches
        progress = trainer.fit_loop.epoch_loop.batch_progress
        done = 0 if progress.is_last_batch else progress.current.processed  # a new epoch starts at 0
        steps_a_batch = getattr(getattr(trainer.lightning_module, "grpo", None), "num_iterations", 1)
        batches_left = math.ceil(max(0, trainer.max_steps - trainer.global_step) / steps_a_batch)
        return min(trainer.num_training_batches, done + batches_left)

    def _get_train_description(self, current_epoch: int) -> str:
        epochs = self.trainer.max_epochs
        description = f"Epoch {current_epoch}" + (
            f"/{epochs - 1}" if epochs is not None and epochs > 0 else ""
        )
        return f"{description:{len(self.validation_description)}}"  # as wide as "Validation": no flicker
