"""The ``paged`` engine: transformers' continuous batching (``generate_batch``, a paged KV cache),
with the adapter merged.

Finished responses leave the batch and free their cache blocks at once, so no work is spent on
rows that already ended (``generate`` keeps computing them until the longest row ends).
It samples with ``torch.multinomial`` on the process-wide RNG, which it re-seeds: the engine
seeds it from the step's response seeds and puts every global RNG state back afterwards, so the
rest of training never sees the difference. Which random number reaches which response depends
on how the scheduler batches requests, so a response's tokens depend on the whole step's batch
(the other prompts, ``generation_batch_size``, the machine), not on its own seed alone; see
docs/engines.md for what exact resume keeps.
"""

from __future__ import annotations

import hashlib
import random
from contextlib import nullcontext

import numpy as np
import torch
from torch import Tensor
from transformers import ContinuousBatchingConfig, GenerationConfig

from lightning_flow.adapter_merge import merged_lora
from lightning_flow.engines import Completions, check_request, eval_mode, finish
from lightning_flow.engines.hf import pad_right
from lightning_flow.policy import SamplingConfig


class PagedEngine:
    def __init__(self, cfg: SamplingConfig, pad_token_id: int, eos_ids: list[int]) -> None:
        self.cfg, self.pad_token_id, self.eos_ids = cfg, pad_token_id, eos_ids

    @torch.no_grad()
    def __call__(
        self,
        model: torch.nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        group: int,
        seeds: Tensor | None,
    ) -> Completions:
        cfg = self.cfg
        check_request(prompt_ids, group, seeds)
        sample = seeds is not None
        generation_config = GenerationConfig(
            do_sample=sample,
            temperature=cfg.temperature if sample else None,
            top_k=cfg.top_k if sample else None,  # 0 (off) is what transformers' sampler reads as off too
            top_p=cfg.top_p if sample else None,
            max_new_tokens=cfg.max_new_tokens,
            num_return_sequences=group,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_ids,
        )
        prompts = [row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_mask)]
        batching = ContinuousBatchingConfig(
            return_logprobs=sample,
            seed=batch_seed(seeds) if sample else 0,
            max_requests_per_batch=cfg.generation_batch_size,
            **cache_size(prompts, group, cfg.max_new_tokens, cfg.generation_batch_size),
        )
        merge = merged_lora(model) if cfg.merge_adapter else nullcontext()
        with global_rng_kept(), eval_mode(model), merge:
            results = model.generate_batch(
                prompts, generation_config, continuous_batching_config=batching, progress_bar=False
            )
        if len(results) != len(prompts) * group:
            raise RuntimeError(
                f"continuous batching returned {len(results)} of {len(prompts) * group} responses"
            )
        outputs = list(results.values())  # in prompt order, a prompt's group together
        width = max(len(out.generated_tokens) for out in outputs)
        ids = torch.stack(
            [pad_right(torch.tensor([out.generated_tokens]), width, self.pad_token_id)[0] for out in outputs]
        )
        logps = None
        if sample:
            logps = torch.stack([pad_right(torch.tensor([out.logprobs]), width, 0.0)[0] for out in outputs])
        return finish(ids.to(prompt_ids.device), logps, self.eos_ids, self.pad_token_id)


def cache_size(prompts: list[list[int]], group: int, max_new_tokens: int, rows_at_once: int | None) -> dict:
    """Pages for every response alive at once at full length, and a forward that prefills all
    prompts (capped at 4096 tokens): transformers' default sizes the cache from free memory,
    which on a CPU means most of the RAM and tens of seconds per call."""
    page = ContinuousBatchingConfig().page_size
    alive = min(len(prompts) * group, rows_at_once or len(prompts) * group)
    longest = max(map(len, prompts)) + max_new_tokens
    return dict(
        num_blocks=alive * -(-longest // page) + 1,
        max_batch_tokens=min(4096, max(longest, sum(map(len, prompts)) + alive)),
    )


def batch_seed(seeds: Tensor) -> int:
    """One 63-bit seed for the whole batch, from its responses' seeds."""
    digest = hashlib.blake2b(seeds.cpu().numpy().astype(np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class global_rng_kept:
    """Saves torch's (CPU and CUDA), numpy's and Python's global RNG states and restores them on exit."""

    def __enter__(self) -> None:
        self.states = (
            torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            np.random.get_state(),
            random.getstate(),
        )

    def __exit__(self, *exc) -> None:
        cpu, cuda, numpy_state, python_state = self.states
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
