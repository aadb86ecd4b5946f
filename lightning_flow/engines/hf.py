"""The ``hf`` and ``static`` engines: transformers ``generate`` with the adapter merged and each
response drawn from its own seed (``SeededSampler``), in chunks of ``generation_batch_size`` rows.

A response's tokens depend only on its prompt and seed, so the chunk size (and the batch layout,
the rank, a restart) never changes them. ``static`` runs the same loop on a static KV cache, whose
fixed shapes let torch.compile (CUDA graphs on a GPU) capture the decoding step; its merged
weights live in buffers kept between steps, so captured graphs stay valid.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor
from transformers import CompileConfig, GenerationConfig, LogitsProcessorList

from lightning_flow.adapter_merge import merged_lora
from lightning_flow.engines import Completions, check_request, eval_mode, finish
from lightning_flow.policy import SamplingConfig
from lightning_flow.seeded_sampling import SeededSampler


class HFEngine:
    def __init__(self, cfg: SamplingConfig, pad_token_id: int, eos_ids: list[int]) -> None:
        self.cfg, self.pad_token_id, self.eos_ids = cfg, pad_token_id, eos_ids
        self.static = cfg.engine == "static"
        self.merge_buffers: dict[int, Tensor] | None = {} if self.static else None

    @torch.no_grad()
    def __call__(
        self,
        model: torch.nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        group: int,
        seeds: Tensor | None,
    ) -> Completions:
        check_request(prompt_ids, group, seeds)
        prompt_ids, prompt_mask = (
            prompt_ids.repeat_interleave(group, 0),
            prompt_mask.repeat_interleave(group, 0),
        )
        size = self.cfg.generation_batch_size or len(prompt_ids)
        merge = merged_lora(model, self.merge_buffers) if self.cfg.merge_adapter else nullcontext()
        with (
            eval_mode(model),
            merge,
        ):  # no dropout while sampling; generate uses the KV cache under checkpointing
            chunks = [
                self.generate(
                    model,
                    prompt_ids[start : start + size],
                    prompt_mask[start : start + size],
                    None if seeds is None else seeds[start : start + size],
                )
                for start in range(0, len(prompt_ids), size)
            ]
        width = max(ids.shape[1] for ids, _ in chunks)  # chunks stop when their own rows all ended
        ids = torch.cat([pad_right(ids, width, self.pad_token_id) for ids, _ in chunks])
        logps = None if seeds is None else torch.cat([pad_right(logps, width, 0.0) for _, logps in chunks])
        return finish(ids, logps, self.eos_ids, self.pad_token_id)

    def generate(
        self, model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, seeds: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """One chunk: completion ids [n, l] and the sampler's log-probs [n, l] (None when greedy).

        A fresh GenerationConfig, so that a model's own defaults (top_k, repetition penalty) never
        change the distribution the loss's log-probs assume; sampling is greedy decoding of the
        seeded draw, which is its only finite score."""
        cfg = self.cfg
        sampler = None
        if seeds is not None:
            sampler = SeededSampler(seeds, prompt_ids.shape[1], cfg.temperature, cfg.top_k, cfg.top_p)
        compile_on = self.static and (
            cfg.compile if cfg.compile is not None else prompt_ids.device.type != "cpu"
        )
        compile_config = None
        if compile_on:
            compile_config = CompileConfig(fullgraph=False, dynamic=False)
            compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless asked
        generation_config = GenerationConfig(
            do_sample=False,
            max_new_tokens=cfg.max_new_tokens,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_ids,
            use_cache=True,
            cache_implementation="static" if self.static else None,
            compile_config=compile_config,
            disable_compile=not compile_on,
        )
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([sampler] if sampler else []),
        )
        ids = out[:, prompt_ids.shape[1] :]
        return ids, None if sampler is None else torch.stack(sampler.logps, dim=1)[:, : ids.shape[1]]


def pad_right(rows: Tensor, width: int, value: float) -> Tensor:
    return torch.nn.functional.pad(rows, (0, width - rows.shape[1]), value=value)
