"""Per-response seeded sampling: the same distribution as transformers' sampler, noise owned by each row."""

from __future__ import annotations

import pytest
import torch

from lightning_flow.engines.hf import HFEngine
from lightning_flow.policy import PolicyConfig, SamplingConfig, eos_token_ids, load_policy
from lightning_flow.seeded_sampling import SeededSampler, counter_uniform, response_seeds
from lightning_flow.tokenizer import load_tokenizer

ROWS = 40_000


def sampled_frequencies(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Token frequencies of ROWS independent seeded draws from one distribution (one position)."""
    sampler = SeededSampler(
        torch.arange(ROWS), prompt_length=3, temperature=temperature, top_k=top_k, top_p=top_p
    )
    scores = sampler(torch.zeros(ROWS, 3, dtype=torch.long), logits.expand(ROWS, -1).clone())
    return torch.bincount(scores.argmax(1), minlength=len(logits)).double() / ROWS


def assert_matches(frequencies: torch.Tensor, probabilities: torch.Tensor) -> None:
    # 5 binomial standard deviations per token: a false alarm has odds far below 1e-5.
    sigma = (probabilities * (1 - probabilities) / ROWS).sqrt()
    assert ((frequencies - probabilities).abs() <= 5 * sigma + 1e-12).all(), (frequencies, probabilities)


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_frequencies_follow_the_tempered_softmax(temperature):
    assert_matches(
        sampled_frequencies(LOGITS, temperature=temperature), torch.softmax(LOGITS.double() / temperature, 0)
    )


def test_top_k_and_top_p_renormalise_the_kept_tokens():
    probabilities = torch.softmax(LOGITS.double(), 0)
    top3 = torch.zeros_like(probabilities)
    top3[:3] = probabilities[:3] / probabilities[:3].sum()
    assert_matches(sampled_frequencies(LOGITS, top_k=3), top3)
    # The smallest prefix of the sorted probabilities (0.57, 0.21, 0.13, ...) reaching 0.75 keeps 2 tokens.
    top2 = torch.zeros_like(probabilities)
    top2[:2] = probabilities[:2] / probabilities[:2].sum()
    assert_matches(sampled_frequencies(LOGITS, top_p=0.75), top2)


def test_uniforms_are_uniform_and_independent_of_the_batch():
    uniforms = counter_uniform(torch.arange(100_000), position=5)
    assert 0 < uniforms.min() and uniforms.max() < 1
    assert abs(uniforms.mean().item() - 0.5) < 0.003 and abs(uniforms.var().item() - 1 / 12) < 0.001
    # A row's draw depends on its own seed and position only, and positions are uncorrelated.
    torch.testing.assert_close(counter_uniform(torch.tensor([7]), 5)[0], uniforms[7], rtol=0, atol=0)
    next_position = counter_uniform(torch.arange(100_000), position=6)
    assert abs(torch.corrcoef(torch.stack([uniforms, next_position]))[0, 1].item()) < 0.01


def test_a_long_tail_of_small_probabilities_keeps_its_mass():
    """50K tokens share half the mass (1e-5 each, after a token of 0.5): the CDF is summed in
    float64, so the tail is drawn as often as its total says."""
    logits = torch.cat(
        [torch.tensor([0.0]), torch.full((50_000,), -torch.log(torch.tensor(50_000.0)).item())]
    )
    tail = 0
    for seeds in torch.arange(4000).split(500):  # 500 rows at a time: [500, 50001] float64 CDFs
        sampler = SeededSampler(seeds, prompt_length=0, temperature=1.0, top_k=0, top_p=1.0)
        drawn = sampler(
            torch.zeros(len(seeds), 1, dtype=torch.long), logits.expand(len(seeds), -1).clone()
        ).argmax(1)
        tail += int((drawn > 0).sum())
    assert abs(tail / 4000 - 0.5) <= 5 * (0.25 / 4000) ** 0.5  # 5 binomial standard deviations


def test_response_seeds_depend_on_prompt_not_position():
    both = response_seeds(0, 3, ["a", "b"], group=2)
    assert torch.equal(response_seeds(0, 3, ["b"], group=2), both[2:])
    assert len(set(both.tolist())) == 4
    assert not torch.equal(response_seeds(0, 4, ["a", "b"], group=2), both)


def test_generated_responses_do_not_depend_on_batch_layout_or_global_rng(tiny_policy_dir):
    model = load_policy(PolicyConfig(name_or_path=str(tiny_policy_dir), lora_rank=4))
    tokenizer = load_tokenizer(str(tiny_policy_dir))
    cfg = SamplingConfig(num_generations=3, max_new_tokens=10)
    eos = eos_token_ids(model, tokenizer)
    batch = tokenizer(["1+2\n", "7-3+1\n"], return_tensors="pt", padding=True)
    seeds = response_seeds(0, 0, ["p0", "p1"], group=3)

    torch.manual_seed(1)
    engine = HFEngine(cfg, tokenizer.pad_token_id, eos)
    together = engine(model, batch.input_ids, batch.attention_mask, 3, seeds).ids
    torch.manual_seed(2)
    alone = tokenizer(["7-3+1\n"], return_tensors="pt")
    second = engine(model, alone.input_ids, alone.attention_mask, 3, seeds[3:]).ids
    width = second.shape[1]
    assert torch.equal(together[3:, :width], second)
    assert (together[3:, width:] == tokenizer.pad_token_id).all()
    assert len({tuple(row) for row in together.tolist()}) > 1  # it does sample
