"""Test helper: give a LoRA adapter nonzero weights so that it changes the model's output."""

from __future__ import annotations

import torch


def perturb_lora(model, seed: int = 0, scale: float = 0.1, match: str = "lora_") -> None:
    """Overwrite parameters whose name contains ``match`` with seeded N(0, scale²) values
    (LoRA's B starts at zero, so a fresh adapter changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if match in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
