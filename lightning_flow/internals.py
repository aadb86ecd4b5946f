"""The private APIs of pinned libraries this project relies on, each because no public one exists.

Everything else uses public APIs. Each function here is the only use of its private name, and
``tests/test_internals.py`` checks that it still behaves as relied on, so a library upgrade that
changes one fails there, by name, rather than deep inside a training step.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer


def batches_that_stepped(trainer: Trainer) -> int:
    """Training batches finished before the current one: the step Lightning's ``self.log`` writes at
    (``trainer.global_step`` counts optimizer steps, several per batch with ``num_iterations > 1``)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


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
