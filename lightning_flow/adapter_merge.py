"""Sampling with the LoRA adapter merged into the base weights, restored bit for bit afterwards.

An unmerged LoRA projection runs three matrix products (base, A, B) plus a scale and an add for
every generated token; merged, it runs one. Generation is many small products per token (on a
GPU it is bound by launching them), so merging for the length of ``generate`` cuts most of that
work. The merge is not peft's ``merge_adapter``/``unmerge_adapter``: that pair adds and then
subtracts the delta in place, which in bfloat16 does not give the base weights back. Here each
adapted ``nn.Linear`` gets a new tensor ``W + ΔW`` (summed in float32, rounded once to W's dtype)
while the original tensor is held aside and put back on exit; the extra memory is one copy of the
adapted weights while sampling.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer
from torch import nn


def _plain_adapters(layer: LoraLayer) -> list[str] | None:
    """The layer's active LoRA adapters when merging them is exact W + ΔW on a float ``nn.Linear``
    weight; None when the layer cannot be merged that way (quantised or non-linear base, DoRA or
    another variant, LoRA bias, adapters switched off or already merged)."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    # bitsandbytes layers subclass nn.Linear
    if layer.disable_adapters or layer.merged or type(base) is not nn.Linear:
        return None
    if type(weight) is not nn.Parameter or not weight.dtype.is_floating_point:
        return None
    names = [name for name in layer.active_adapters if name in layer.lora_A]
    variants, biases = getattr(layer, "lora_variant", {}), getattr(layer, "lora_bias", {})
    if any(name in variants or biases.get(name, False) for name in names):
        return None
    return names


@contextmanager
def merged_lora(model: nn.Module, buffers: dict[int, torch.Tensor] | None = None) -> Iterator[bool]:
    """Inside the block every LoRA layer of ``model`` runs as merged (one product with ``W + ΔW``);
    yields True. On exit, normal or by an exception, each base weight is the very tensor it was
    before and the layers run unmerged again.

    With ``buffers`` (a dict the caller keeps between calls) ``W + ΔW`` is copied into the same
    tensor every time, one per layer, so the merged weights keep their addresses from call to call
    (what captured CUDA graphs and compiled code hold on to).

    All or nothing: when any LoRA layer cannot be merged exactly (see ``_plain_adapters``: a 4-bit
    base, DoRA, adapters disabled) or its base weight is tied to another module (an adapted LM head
    sharing the embedding), nothing is changed and the block gets False. A model without LoRA
    layers also gets False.
    """
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    plans = [(layer, _plain_adapters(layer)) for layer in layers]
    holders = Counter(id(parameter) for _, parameter in model.named_parameters(remove_duplicate=False))
    tied = any(holders[id(layer.get_base_layer().weight)] > 1 for layer, names in plans if names)
    # tied: W + ΔW would reach the other holder too
    if not layers or tied or any(names is None for _, names in plans):
        yield False
        return
    kept: list[tuple[LoraLayer, nn.Parameter, torch.Tensor, list[str]]] = []
    try:
        with torch.no_grad():
            for layer, names in plans:
                if not names:  # no active LoRA adapter on this layer
                    continue
                weight = layer.get_base_layer().weight
                delta = sum(layer.get_delta_weight(name).float() for name in names)
                kept.append((layer, weight, weight.data, names))
                merged = (weight.float() + delta).to(weight.dtype)  # summed in float32, rounded once
                if buffers is not None:
                    merged = buffers.setdefault(id(layer), torch.empty_like(merged)).copy_(merged)
                weight.data = merged
                layer.merged_adapters.extend(names)
        yield True
    finally:
        for layer, weight, original, names in kept:
            weight.data = original
            for name in names:
                layer.merged_adapters.remove(name)
