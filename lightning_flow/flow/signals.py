"""Per-token credit weights from a signal, and the comparison signals computed from attention.

Every signal is [N, T], aligned with positions; only response positions matter. The throughput
`FlowResult.flow` is the method's own signal; `uniform` (ones) and predictive entropy (from the
model) are left to the caller.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .solver import vector_matrix

# Added before flooring so that a product like 0.4 * 5 that lands a hair under 2.0 still rounds
# as the exact value would.
_ROUND_EPS = 1e-9


def boosted_count(num_tokens: Tensor, top_fraction: float) -> Tensor:
    """[N] long: how many of `num_tokens` [N] tokens are boosted, round(fraction · n) with halves
    rounded up (the boosted share is then as close to `top_fraction` as a whole count allows)."""
    return torch.floor(num_tokens.double() * top_fraction + (0.5 + _ROUND_EPS)).long()


@torch.no_grad()
def credit_weights(
    signal: Tensor, response: Tensor, top_fraction: float, boost: float, fallback: Tensor | None = None
) -> Tensor:
    """[N, T] weights: per response, its top `boosted_count` response tokens by `signal` get
    `boost`, every other position 1.0; rows where `fallback` [N] is True get all ones.

    Ranking is descending and stable: equal signals go to the earlier position. NaN ranks last.
    """
    if signal.shape != response.shape or response.dtype != torch.bool:
        raise ValueError(f"signal {tuple(signal.shape)} and bool response {tuple(response.shape)} must match")
    if not 0.0 <= top_fraction <= 1.0:  # so the top tokens are always response tokens
        raise ValueError(f"top_fraction={top_fraction}: expected a value in [0, 1]")
    dtype = signal.dtype if signal.is_floating_point() else torch.float32
    # NaN and -inf of response tokens become the lowest finite value, so every response token
    # ranks before every other position (-inf) and a row's top tokens are the first of its order.
    lowest = torch.finfo(dtype).min
    key = torch.nan_to_num(signal.to(dtype), nan=lowest, neginf=lowest, posinf=float("inf"))  # [N, T]
    key = torch.where(response, key, float("-inf"))  # [N, T]
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # [N, T]
    n_top = boosted_count(response.sum(-1), top_fraction)  # [N]
    if fallback is not None:
        n_top = n_top.masked_fill(fallback, 0)
    chosen = torch.arange(key.shape[-1], device=key.device) < n_top[:, None]  # [N, T] in rank order
    boosted = torch.zeros_like(response).scatter(-1, order, chosen)  # [N, T] back in position order
    return torch.where(boosted, boost, torch.ones_like(key))


@torch.no_grad()
def attention_received(attention: Tensor, valid: Tensor) -> Tensor:
    """[N, T] mean attention Ā[k, i] that token i gets from the later valid tokens k > i;
    0 for the last valid token and for padding."""
    v = valid.to(attention.dtype)  # [N, T]
    received = vector_matrix(v, torch.tril(attention, diagonal=-1))  # [N, T] Σ_k v(k) Ā[k, i] over k > i
    later = valid.flip(-1).long().cumsum(-1).flip(-1) - valid.long()  # [N, T] valid tokens after i
    mean = received / later.clamp_min(1)
    return torch.where(valid & (later > 0), mean, torch.zeros_like(mean))


def random_signal(valid: Tensor, generator: torch.Generator) -> Tensor:
    """[N, T] uniform [0, 1) noise from `generator` (drawn on its device), 0 at padding."""
    noise = torch.rand(valid.shape, generator=generator, device=generator.device).to(valid.device)  # [N, T]
    return torch.where(valid, noise, torch.zeros_like(noise))
