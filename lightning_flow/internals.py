"""The private APIs of pinned libraries this project relies on, each because no public one exists.

Everything else uses public APIs. Here only: Lightning's logging step counter, the loop counters
inside its checkpoints (``reopen_cut_epoch``), a progress bar method, three LightningCLI methods
turned into public-named hooks (``LightningCLIHooks``), transformers' attention implementation of a
config, and two torch autograd flags. ``tests/test_internals.py`` checks each still exists and
behaves as relied on, so a library upgrade that changes one fails there, by name, rather than deep
inside a training step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningCLI


def batches_that_stepped(trainer: Trainer) -> int:
    """Training batches finished before the current one: the step Lightning's ``self.log`` writes at
    (``trainer.global_step`` counts optimizer steps, several per batch with ``num_iterations > 1``)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


# -- Lightning -------------------------------------------------------------------------------------


def reopen_cut_epoch(checkpoint: dict[str, Any]) -> None:
    """Record an epoch that a stop cut short (``max_steps``, ``max_time``, ``should_stop``) as unfinished.

    Lightning runs its epoch-end bookkeeping whenever the epoch loop exits, so a checkpoint written
    after a stop before the epoch's last batch (``ModelCheckpoint``'s at train end, or a user's
    ``trainer.save_checkpoint`` after ``fit``) says the epoch is complete: a run resumed from it
    starts the next epoch, a new shuffle from its first prompt, instead of the rest of this one.
    Here the loop counters go back to what they were after the last training batch, the state a
    checkpoint written in ``on_train_batch_end`` holds (the one resumed after a SIGKILL).
    """
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop:
        return
    epochs, batches = loop["epoch_progress"], loop["epoch_loop.batch_progress"]
    epoch_loop_exited = epochs["total"]["started"] == epochs["total"]["processed"] > 0
    if not epoch_loop_exited or batches["is_last_batch"] or batches["current"]["processed"] == 0:
        return
    for scope in ("total", "current"):
        epochs[scope]["processed"] -= 1
        epochs[scope]["completed"] = epochs[scope]["processed"]
    checkpoint["epoch"] = epochs["current"]["processed"]
    if batches["total"]["completed"] == batches["total"]["processed"]:  # the last batch's end was counted
        for scope in ("total", "current"):
            batches[scope]["completed"] -= 1
        loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1


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


class LightningCLIHooks(LightningCLI):
    """LightningCLI with three public-named hooks where LightningCLI offers only private methods:
    ``check_checkpoint`` before Lightning reads ``--ckpt_path`` (it ``torch.load``s the file while
    parsing), ``add_help_subcommands`` beside fit/validate/..., and ``default_callbacks`` for the
    Trainer (callbacks a config cannot drop by listing its own)."""

    def check_checkpoint(self, path: str | None) -> None:
        """Called with the subcommand's ``ckpt_path`` before Lightning reads it."""

    def add_help_subcommands(self, parser, subcommands) -> None:
        """Add subcommands (``subcommands.add_subcommand(name, parser, help=...)``) listed by --help."""

    def default_callbacks(self, config: dict, callbacks: list) -> list:
        """The Trainer's callbacks besides the config's (``config["callbacks"]``)."""
        return callbacks

    def _parse_ckpt_path(self) -> None:
        config = self.config.get(self.config.get("subcommand") or "", {}) or {}
        self.check_checkpoint(config.get("ckpt_path") if hasattr(config, "get") else None)
        super()._parse_ckpt_path()

    def _add_subcommands(self, parser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        self.add_help_subcommands(parser, parser._subcommands_action)

    def _instantiate_trainer(self, config: dict, callbacks: list) -> object:
        return super()._instantiate_trainer(config, self.default_callbacks(config, callbacks))


# -- transformers and torch ---------------------------------------------------------------------


def attention_implementation(config) -> str | None:
    """The attention implementation a transformers config dispatches to (``set_attn_implementation``
    is the public setter; transformers has no public getter)."""
    return config._attn_implementation


def in_backward() -> bool:
    """True while autograd runs a backward (e.g. a checkpointed layer re-running its forward)."""
    return torch._C._current_graph_task_id() != -1


def profiler_enabled() -> bool:
    """True while any autograd profiler runs (torch.profiler, NVTX or ITT ranges)."""
    return torch.autograd._profiler_enabled()
