"""The object that carries one training step's tensors from stage to stage.

N = prompts in the batch × num_generations (groups are contiguous rows), P = padded prompt
length, L = padded completion length. Each stage reads what it needs and fills what it makes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from lightning.pytorch import Callback, Trainer
from torch import Tensor, nn
from torch_geometric.data import Batch, Data
from transformers import PreTrainedTokenizerBase

from lightning_flow.step_scalars import StepScalars


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
    step: int = 0  # trainer.global_step (optimizer steps done) when this step began
    old_logps: Tensor | None = None  # [N, L] float, sampling policy's log-probs (num_iterations > 1)
    ref_logps: Tensor | None = None  # [N, L] float, adapter-disabled log-probs (beta > 0)
    # [N, L] float, the rollout engine's log-probs of its draws, if it has them
    sampler_logps: Tensor | None = None
    # [N, L] float, predictive entropy of each completion position (the step's first policy pass)
    entropy: Tensor | None = None
    # solved flow graphs (FlowCredit): (rollout rows, one graph per row)
    flow_graphs: list[tuple[list[int], Batch]] = field(default_factory=list)

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

    def flow_graph(self, row: int) -> Data | None:
        """The solved flow graph of ``row`` (node attributes f, h, log_h, role, position), if credit made
        one."""
        for rows, graphs in self.flow_graphs:
            if row in rows:
                return graphs.get_example(rows.index(row))
        return None


@dataclass
class MicroBatch:
    """One micro-batch as ``RolloutCallback.on_credit`` sees it, right after the step's first forward over it.

    The attention of ``attention_rows`` comes chunk by chunk from ``attention_maps()``: the first
    chunk was recorded by that forward itself; when the module's attention budget holds fewer
    rows, the later chunks are recorded by extra no-grad passes that stop after the last recorded
    layer. So at most one chunk's dense map (``[k, T, T]`` float32) exists at a time.
    """

    rows: slice  # the micro-batch's rollout rows: on_credit sets rollouts.token_weights[rows]
    # rollout rows whose maps attention_maps() yields (credited rows, or all when asked)
    attention_rows: list[int]
    # rows and [k, T, T] maps recorded by the forward, handed over once
    recorded: tuple[list[int], Tensor] | None = None
    capture: Callable[[list[int]], Tensor] | None = None  # [k, T, T] maps of more rows, one extra pass
    chunk_rows: int = 1  # rows per chunk (the attention budget)

    def attention_maps(self) -> Iterator[tuple[list[int], Tensor]]:
        """(rows, maps  # [k, T, T] float32 head- and layer-mean attention, query by key, zero at
        padding) for every row of ``attention_rows``, one chunk at a time. Nothing here keeps a
        chunk once it is handed over (the forward's own chunk is handed over once; a second caller
        gets it from an extra pass), so a caller that drops it frees it."""
        done = 0
        if self.recorded is not None:
            done = len(self.recorded[0])
            yield self._hand_over()
        for start in range(done, len(self.attention_rows), self.chunk_rows):
            rows = self.attention_rows[start : start + self.chunk_rows]
            yield rows, self.capture(rows)

    def _hand_over(self) -> tuple[list[int], Tensor]:
        recorded, self.recorded = self.recorded, None
        return recorded


class StepModule(Protocol):
    """What a ``RolloutCallback`` may use of the module running the step (``GRPOModule``)."""

    policy: nn.Module  # the adapted causal LM (eval passes, capture)
    tokenizer: PreTrainedTokenizerBase
    eos_ids: list[int]  # token ids that end a response
    attention_layers: list[int] | None  # layers recorded in the step's first pass; None: none asked
    step_scalars: StepScalars  # add this step's scalars here: reduced over ranks, logged on logging steps

    @property
    def group_size(self) -> int:
        """Responses per prompt: rows ``[g·G, (g+1)·G)`` of the rollouts are group g."""

    @property
    def reward_names(self) -> list[str]:
        """Names of the reward functions, in the order of ``Rollouts.rewards``' columns."""

    def request_attention(
        self, layers: list[int] | None = None, zero_advantage_rows: bool = False, max_bytes: int | None = None
    ) -> None:
        """Ask for attention maps in ``on_credit`` (call it in ``setup``)."""


class RolloutCallback(Callback):
    """A callback that sets per-token credit and sees each step's rollouts.

    Credit is assigned inside the step's first forward pass of the policy over the rollouts (the
    no-grad pass of the sampling log-probs when ``num_iterations > 1``, else the update's own
    forward), one micro-batch at a time, so that attention costs no extra pass:

    1. ``on_credit(micro_batch)`` per micro-batch, after the forward over ``micro_batch.rows`` and
       before their loss: ``rollouts.entropy[rows]`` is filled and, when the module was asked for
       attention (``request_attention``), ``micro_batch.attention_maps()`` yields the maps;
       setting ``rollouts.token_weights[rows]`` is how credit reaches the loss.
    2. ``on_rollouts_end`` once after the update: every row's weights and entropy, and the flow
       graphs credit kept (``rollouts.flow_graphs``).
    """

    def on_credit(
        self, trainer: Trainer, pl_module: StepModule, rollouts: Rollouts, micro_batch: MicroBatch
    ) -> None:
        """Set ``rollouts.token_weights[micro_batch.rows]`` (in place); other rows are not ready yet."""

    def on_rollouts_end(self, trainer: Trainer, pl_module: StepModule, rollouts: Rollouts) -> None:
        """Inspect the step's rollouts after the update (log, draw)."""
