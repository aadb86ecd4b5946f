"""A training step's scalars, reduced over ranks in one go and written to the loggers in one call.

Lightning's ``self.log`` has a fixed cost per key (each call moves the metric's whole state to
the value's device), which the ~35 scalars of a GRPO step turn into a visible share of a small
model's step. The module and the rollout callbacks ``add`` their scalars here during the step; the module
``write``s them once at its end: on logging steps only (Lightning's rule), after one all-reduce
per kind of reduction, straight to every logger at Lightning's step (the batch index), so they
sit on the same axis as anything logged with ``self.log``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from lightning.pytorch import Trainer
from torch import Tensor

from lightning_flow.internals import batches_that_stepped

Reduce = Literal["mean", "max", "sum"]


def batch_index(trainer: Trainer) -> int:
    """Training batches finished before this one: the step Lightning logs this batch's scalars at."""
    return batches_that_stepped(trainer)


def is_logging_step(trainer: Trainer, every: int | None = None) -> bool:
    """Whether this batch logs: every ``every``-th batch (default the trainer's ``log_every_n_steps``),
    counted as Lightning counts for ``self.log``. The one rule for scalars, pictures and anything else."""
    every = every or trainer.log_every_n_steps
    return bool(trainer.loggers) and every > 0 and (batch_index(trainer) + 1) % every == 0


class StepScalars:
    """Scalars of the current training step, each with how ranks combine it."""

    def __init__(self) -> None:
        self._scalars: dict[str, tuple[Tensor | float, Reduce]] = {}
        self._ratios: dict[str, tuple[Tensor | float, Tensor | float]] = {}

    def add(self, metrics: Mapping[str, Tensor | float], reduce: Reduce = "mean") -> None:
        """Queue scalars (0-dim tensors or numbers) for this step; a name added twice keeps the last value."""
        if reduce not in ("mean", "max", "sum"):
            raise ValueError(f"reduce={reduce!r}: expected 'mean', 'max' or 'sum'")
        for name, value in metrics.items():
            self._scalars[name] = (value, reduce)

    def add_ratios(self, ratios: Mapping[str, tuple[Tensor | float, Tensor | float]]) -> None:
        """Queue (numerator, denominator) pairs: each logs the sum of numerators over ranks divided
        by the sum of denominators, exact however the rows split over ranks; nothing is logged for
        a step whose denominators sum to 0."""
        self._ratios.update({name: tuple(pair) for name, pair in ratios.items()})

    def write(self, trainer: Trainer, device: torch.device) -> dict[str, float]:
        """Reduce and log the queued scalars if this is a logging step (a collective call under
        DDP: every rank calls it); empties the queue. Returns what was logged (on every rank)."""
        scalars, ratios, self._scalars, self._ratios = self._scalars, self._ratios, {}, {}
        if not (scalars or ratios) or not is_logging_step(trainer):
            return {}
        logged: dict[str, float] = {}
        for reduce in ("mean", "max", "sum"):
            names = [name for name, (_, kind) in scalars.items() if kind == reduce]
            values = [scalars[name][0] for name in names]
            if reduce == "sum":  # ratios travel as two sums each, after the plain sums
                values += [part for pair in ratios.values() for part in pair]
            if not values:
                continue
            # one tensor: one collective, one copy to the host
            stacked = torch.stack(
                [torch.as_tensor(v).detach().to(device, torch.float64).reshape(()) for v in values]
            )
            reduced = trainer.strategy.reduce(stacked, reduce_op=reduce).tolist()
            logged.update(zip(names, reduced))
            if reduce == "sum":
                parts = reduced[len(names) :]
                logged.update(
                    {name: num / den for name, num, den in zip(ratios, parts[::2], parts[1::2]) if den > 0}
                )
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=batch_index(trainer))
                logger.save()
        return logged
