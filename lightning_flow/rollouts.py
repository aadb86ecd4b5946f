"""The object that carries one training step's tensors from stage to stage.

N = prompts in the batch × num_generations (groups are contiguous rows), P = padded prompt
length, L = padded completion length. Each stage reads what it needs and fills what it makes.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    old_logps: Tensor | None = None  # [N, L] float, sampling policy's log-probs (num_iterations > 1)
    ref_logps: Tensor | None = None  # [N, L] float, adapter-disabled log-probs (beta > 0)
    attention: Tensor | None = None  # [N, P + L, P + L] float32 head- and layer-mean attention (query, key), when a callback asked for it

    @property
    def input_ids(self) -> Tensor:  # [N, P + L]
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:  # [N, P + L]
        return torch.cat([self.prompt_mask, self.completion_mask.to(self.prompt_mask.dtype)], dim=1)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]


class RolloutCallback(Callback):
    """A callback that sees each step's scored rollouts before the update.

    The training step calls ``on_rollouts`` on every such callback after advantages, the no-grad
    log-prob passes and any requested attention capture, and before the update; setting
    ``rollouts.token_weights`` there is how per-token credit reaches the loss.
    """

    def on_rollouts(self, trainer: Trainer, pl_module: LightningModule, rollouts: Rollouts) -> None:
        """Inspect or modify the step's rollouts (in place)."""
