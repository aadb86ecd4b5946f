"""The object that carries one training step's tensors from stage to stage.

N = prompts in the batch × num_generations (groups are contiguous rows), P = padded prompt
length, L = padded completion length. Each stage reads what it needs and fills what it makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor


@dataclass
class Rollouts:
    prompt_ids: Tensor  # [N, P] long, left-padded
    prompt_mask: Tensor  # [N, P] long
    completion_ids: Tensor  # [N, L] long, right-padded after the first EOS
    completion_mask: Tensor  # [N, L] float, 1 up to and including the first EOS
    is_truncated: Tensor  # [N] bool, no EOS within max_new_tokens
    prompts: list[str]  # [N] formatted prompt text
    completions: list[str]  # [N] decoded responses (special tokens removed)
    golds: list[str]  # [N] gold final answers
    rewards: Tensor  # [N, F] float, one column per reward function, unweighted
    total_rewards: Tensor  # [N] float, weighted sum over functions
    advantages: Tensor  # [N] float, group-normalised
    zero_std_groups: Tensor  # [N / G] bool, groups whose rewards were all equal
    token_weights: Tensor  # [N, L] float, per-token credit multiplying the advantage (default ones)
    step: int = 0  # trainer.global_step when this step began: the step FlowPictures logs at
    old_logps: Tensor | None = None  # [N, L] float, sampling policy's log-probs (num_iterations > 1)
    ref_logps: Tensor | None = None  # [N, L] float, adapter-disabled log-probs (beta > 0)
    attention: Tensor | None = None  # [N, P + L, P + L] float32 head- and layer-mean attention (query, key), when a callback asked for it
    attention_recorded: Tensor | None = None  # [N] bool, rows whose map in `attention` was recorded (by default the `credited` ones; the others are zero)
    entropy: Tensor | None = None  # [N, L] float, predictive entropy of each completion position (the step's first policy pass)
    first_copy: list[int] | None = None  # [N], with attention: the first credited row of the same micro-batch with the same tokens (itself if none earlier); only it is recorded, its copies get its map

    @property
    def input_ids(self) -> Tensor:  # [N, P + L]
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:  # [N, P + L]
        return torch.cat([self.prompt_mask, self.completion_mask.to(self.prompt_mask.dtype)], dim=1)

    @property
    def credited(self) -> Tensor:  # [N] bool
        """Responses whose credit can reach the gradient: the loss multiplies token weights into
        the advantage, so a zero advantage (a group whose rewards were all equal) cancels any."""
        return self.advantages != 0

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def is_copy(self, row: int) -> bool:
        """Whether ``row`` repeats an earlier credited row of its micro-batch (``first_copy``)."""
        return self.first_copy is not None and self.first_copy[row] != row

    def recorded_rows(self, rows: slice) -> Tensor:  # [r] long
        """Rows of ``rows`` (counted from its start) whose map a forward records: those marked in
        ``attention_recorded``, less the copies of an earlier row, which take its map."""
        start, stop, _ = rows.indices(len(self))
        marked = self.attention_recorded[rows].tolist()
        recorded = [j for j, row in enumerate(range(start, stop)) if marked[j] and not self.is_copy(row)]
        return torch.tensor(recorded, dtype=torch.long, device=self.completion_ids.device)

    def credited_rows(self, rows: slice, follow_copies: bool = True) -> "CreditedRows":
        """The credited rows of ``rows`` and, with ``follow_copies``, which of them are copies: those
        are not solved, each takes the results of its first copy."""
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise ValueError(f"rows={rows}: credit is computed over a contiguous slice of the rollouts")
        credited = [row for row, yes in zip(range(start, stop), self.credited[rows].tolist()) if yes]
        is_copy = [follow_copies and self.is_copy(row) for row in credited]
        solved = [row for row, copy in zip(credited, is_copy) if not copy]
        position = {row: index for index, row in enumerate(solved)}
        device = self.completion_ids.device
        copy_of = torch.tensor([position[self.first_copy[row]] for row in credited], device=device) if any(is_copy) else None
        return CreditedRows(
            torch.tensor([row - start for row in credited], dtype=torch.long, device=device),
            torch.tensor(solved, dtype=torch.long, device=device), copy_of, torch.tensor(is_copy, dtype=torch.bool, device=device),
        )


class CreditedRows(NamedTuple):
    """The rows of one micro-batch that credit works on (``Rollouts.credited_rows``)."""

    local: Tensor  # [k] long, credited rows counted from the micro-batch's start
    solved: Tensor  # [s] long, rollout rows of those that are no copy: each is solved once (s <= k)
    copy_of: Tensor | None  # [k] long, position in ``solved`` of each credited row's first copy; None when none is a copy
    is_copy: Tensor  # [k] bool, the row takes an earlier identical row's results


def first_identical_rows(tokens: Tensor, candidates: Tensor, block: int | None = None) -> list[int]:
    """For each row of ``tokens`` [n, T], the first row among ``candidates`` ([n] bool) with the same
    tokens in the same block of ``block`` consecutive rows (None: one block); itself when it is not
    a candidate or no earlier candidate matches.  # -> [n]

    Identical prompt + response tokens (padding included, e.g. ``ids.masked_fill(mask == 0, -1)``)
    give identical attention, flow and credit, so one computation serves every copy: a small
    policy's group often repeats a short answer word for word. Python tuples as keys: for a step's
    few dozen short rows, cheaper than sorting the rows on the device."""
    size = block or max(1, len(tokens))
    first: dict[tuple[int, tuple[int, ...]], int] = {}
    return [
        first.setdefault((index // size, tuple(row)), index) if candidate else index
        for index, (row, candidate) in enumerate(zip(tokens.tolist(), candidates.tolist()))
    ]


class RolloutCallback(Callback):
    """A callback that sets per-token credit and sees each step's rollouts.

    Credit is assigned inside the step's first forward pass of the policy over the rollouts (the
    no-grad pass of the sampling log-probs when ``num_iterations > 1``, else the update's own
    forward), one micro-batch at a time, so that attention costs no extra pass:

    1. ``on_credit(rows)`` per micro-batch, after the forward over ``rows`` and before their loss:
       ``rollouts.attention[rows]`` (when the module was asked for attention) and
       ``rollouts.entropy[rows]`` are filled; setting ``rollouts.token_weights[rows]`` is how
       credit reaches the loss.
    2. ``on_rollouts_end`` once after the update: every row's weights, attention and entropy.
    """

    def on_credit(self, trainer: Trainer, pl_module: LightningModule, rollouts: Rollouts, rows: slice) -> None:
        """Set ``rollouts.token_weights[rows]`` (in place); other rows are not ready yet."""

    def on_rollouts_end(self, trainer: Trainer, pl_module: LightningModule, rollouts: Rollouts) -> None:
        """Inspect the step's rollouts after the update (log, draw)."""


def copy_first_maps(rollouts: Rollouts, rows: slice) -> None:
    """Give each row of ``rows`` that is a copy of an earlier one (``rollouts.first_copy``) that
    row's recorded attention map: the tokens, hence the attention, are the same."""
    copies = [row for row in range(*rows.indices(len(rollouts))[:2]) if rollouts.is_copy(row)]
    if copies:
        rollouts.attention[copies] = rollouts.attention[[rollouts.first_copy[row] for row in copies]]
