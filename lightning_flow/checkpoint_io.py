"""Checkpoint files that are never half-written, and load errors that name the file.

Lightning's ``TorchCheckpointIO`` writes local files through an fsspec transaction whose temporary
file lives in the system temp folder, so the final move can be a copy (another file system) and
nothing is fsynced: a kill or power loss can leave a truncated ``last.ckpt``. Here the bytes go to
a temporary file beside the target, are fsynced, and replace the target in one ``os.replace``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: missing, truncated, corrupt or from another run."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with write-fsync-rename saving and readable load errors (local paths only)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with partial.open("wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not Path(path).is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        try:
            checkpoint = torch.load(path, map_location=map_location or "cpu", weights_only=weights_only)
        except Exception as error:  # torch raises zip, pickle and unicode errors alike
            raise CheckpointError(
                f"cannot read checkpoint {path}: it is truncated, corrupt or not a PyTorch file "
                f"({type(error).__name__}: {error})"
            ) from None
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
            raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict'; found {found})")
        return checkpoint


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
