"""Sampling whose randomness belongs to each response, not to the process.

``transformers`` samples with the process-wide torch RNG, so a response depends on everything
sampled before it: the batch layout, the rank it runs on, a restart. Here each response row has
its own 32-bit seed (from the run seed, the step and the prompt's source), and the token at
position ``t`` is drawn by inverting the sampler's CDF at ``U``, a counter-based hash of
(row seed, t): the first token whose cumulative probability (in float64, so tail tokens keep
their mass) exceeds ``U`` times the total. That draws exactly from the tempered, top-k/top-p
softmax; only where the randomness comes from changes. One uniform per row and token keeps it
cheap at large vocabularies, where a Gumbel-max draw would hash a noise value for every
vocabulary entry of every row at every token.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

_MASK32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer mix (Wellons' "lowbias32") on int64 tensors holding uint32 values.

    int64 products wrap modulo 2**64, which leaves the low 32 bits exact, and every right
    shift acts on a masked, non-negative value.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def counter_uniform(row_seeds: Tensor, position: int) -> Tensor:
    """U(0, 1) [N] as float64, a pure function of (row seed, position); never exactly 0 or 1."""
    bits = _hash32(_hash32(row_seeds.long() & _MASK32) ^ position)  # [N]
    return (bits.double() + 0.5) / 2**32


def response_seeds(seed: int, step: int, sources: list[str], group: int) -> Tensor:
    """One seed per response [len(sources) * group]: prompt i's j-th response gets
    hash(seed, step, sources[i], j), whatever rank or batch position the prompt lands on."""
    seeds = []
    for source in sources:
        for member in range(group):
            digest = hashlib.blake2b(f"{seed}:{step}:{source}:{member}".encode(), digest_size=4).digest()
            seeds.append(int.from_bytes(digest, "little"))
    return torch.tensor(seeds, dtype=torch.long)


class SeededSampler(LogitsProcessor):
    """Turns greedy decoding into per-row seeded sampling: temperature, top-k and top-p as
    ``transformers`` applies them when sampling, then each row's draw (see the module docstring)
    becomes its only finite score, so that greedy's argmax picks it. ``logps`` collects, per call,
    each row's log-probability of its draw under the distribution drawn from (tempered, truncated)."""

    def __init__(
        self, row_seeds: Tensor, prompt_length: int, temperature: float, top_k: int, top_p: float
    ) -> None:
        self.row_seeds, self.prompt_length = row_seeds, prompt_length
        self.logps: list[Tensor] = []  # [N] per generated position
        self.warpers: list[LogitsProcessor] = (
            [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        )
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:  # [N, T], [N, V] -> [N, V]
        scores = scores.float()
        # a NaN never wins; the update skips such steps
        scores = torch.where(scores.isnan(), float("-inf"), scores)
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        # on the scores' device: no host round trip per token
        self.row_seeds = self.row_seeds.to(scores.device)
        cdf = torch.softmax(scores, dim=-1).double().cumsum(dim=-1)  # [N, V]
        target = counter_uniform(self.row_seeds, input_ids.shape[1] - self.prompt_length) * cdf[:, -1]  # [N]
        # The first token whose CDF exceeds the target: a token of probability 0 never is.
        token = torch.searchsorted(cdf, target[:, None], right=True).clamp_(max=scores.shape[1] - 1)  # [N, 1]
        self.logps.append(torch.log_softmax(scores, dim=-1).gather(1, token).squeeze(1))
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)
