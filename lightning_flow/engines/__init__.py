"""Rollout engines: how a step's responses are sampled, behind one small interface.

An engine takes left-padded prompts, the group size and one seed per response, and returns the
completions with, where it has them, the sampler's log-probability of each sampled token (the
distribution it actually drew from: tempered, then truncated by top-k/top-p). ``make_rollouts``
calls only this; merging the adapter, seeding and chunking are the engine's business.
``model.sampling.engine`` picks one; docs/engines.md says what each guarantees.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lightning_flow.loss import completion_mask
from lightning_flow.policy import SamplingConfig


@dataclass
class Completions:
    ids: Tensor  # [N, L] long, pad_token_id after the first EOS; groups contiguous
    mask: Tensor  # [N, L] float, 1 up to and including the first EOS
    is_truncated: Tensor  # [N] bool, no EOS within max_new_tokens
    logps: Tensor | None = None  # [N, L] float32, the sampler's log-prob of each token, 0 past the end


class RolloutEngine(Protocol):
    def __call__(
        self,
        model: torch.nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        group: int,
        seeds: Tensor | None,
    ) -> Completions:
        """``group`` responses per prompt (prompt_ids, prompt_mask: [B, P] left-padded), ``seeds``
        [B * group] one per response; ``seeds=None`` decodes greedily, one response per prompt
        (group=1). On return the model's training flags and the global RNG states are as before."""


def check_request(prompt_ids: Tensor, group: int, seeds: Tensor | None) -> None:
    """One seed per response, or greedy decoding (no seeds) of one response per prompt."""
    if seeds is not None and len(seeds) != len(prompt_ids) * group:
        raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts x {group} responses")
    if seeds is None and group != 1:
        raise ValueError(f"greedy decoding (no seeds) gives one response per prompt, not {group}")


def finish(ids: Tensor, logps: Tensor | None, eos_ids: list[int], pad_token_id: int) -> Completions:
    """Completions from raw engine rows: padding and log-probs cleared past each row's first EOS."""
    mask, truncated = completion_mask(ids, eos_ids)
    ids = torch.where(mask > 0, ids, pad_token_id)
    return Completions(ids, mask, truncated, None if logps is None else logps.float() * mask)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module of ``model`` in eval mode (dropout off) inside the block; the flags are restored after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def build_engine(cfg: SamplingConfig, pad_token_id: int, eos_ids: list[int]) -> RolloutEngine:
    """The engine ``cfg.engine`` names, for this tokenizer's padding and these EOS ids."""
    from lightning_flow.engines.hf import HFEngine
    from lightning_flow.engines.paged import PagedEngine

    engines = {"hf": HFEngine, "static": HFEngine, "paged": PagedEngine}
    return engines[cfg.engine](cfg, pad_token_id, eos_ids)
