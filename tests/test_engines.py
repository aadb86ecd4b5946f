"""Rollout engines against transformers' own decoding and a teacher-forced pass (float32, CPU)."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from lightning_flow.adapter_merge import merged_lora
from lightning_flow.engines import build_engine
from lightning_flow.module import GRPOConfig
from lightning_flow.objectives import sampler_correction, sampler_mismatch
from lightning_flow.policy import PolicyConfig, SamplingConfig, eos_token_ids, load_policy
from lightning_flow.seeded_sampling import response_seeds
from lightning_flow.tokenizer import load_tokenizer

GROUP, NEW_TOKENS = 3, 16
SAMPLING = dict(temperature=0.7, top_k=40, top_p=0.9)


@pytest.fixture(scope="module", params=["tiny", "stories260k"])
def setup(request):
    """(policy with a non-zero LoRA adapter in train mode, tokenizer, prompt ids, mask, EOS ids, seeds)."""
    path = str(request.getfixturevalue("tiny_policy_dir" if request.param == "tiny" else "stories260k"))
    model = load_policy(PolicyConfig(name_or_path=path, lora_rank=4, lora_dropout=0.1))
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
    tokenizer = load_tokenizer(path)
    batch = tokenizer(["1+2=", "Once upon a time 7-3+1"], return_tensors="pt", padding=True)
    seeds = response_seeds(0, 0, ["a", "b"], GROUP)
    return model, tokenizer, batch.input_ids, batch.attention_mask, eos_token_ids(model, tokenizer), seeds


def run(setup, engine: str, greedy: bool = False, **options):
    model, tokenizer, ids, mask, eos, seeds = setup
    cfg = SamplingConfig(num_generations=GROUP, max_new_tokens=NEW_TOKENS, engine=engine, **options)
    return build_engine(cfg, tokenizer.pad_token_id, eos)(
        model, ids, mask, 1 if greedy else GROUP, None if greedy else seeds
    )


def rng_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def teacher_forced_logps(setup, completions, temperature, top_k, top_p) -> torch.Tensor:
    """log p(token) under the tempered, top-k then top-p truncated softmax, from one full forward
    of the merged policy in eval mode; the truncation written out here, not transformers'."""
    model, _, ids, mask, _, _ = setup
    group = len(completions.ids) // len(ids)
    ids, mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    full = torch.cat([ids, completions.ids], 1)
    full_mask = torch.cat([mask, torch.ones_like(completions.ids)], 1)
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)
    model.eval()
    with torch.no_grad(), merged_lora(model):  # the weights the engines sample with
        logits = model(input_ids=full, attention_mask=full_mask, position_ids=positions).logits
    logits = logits if logits.dtype == torch.float64 else logits.float()
    model.train()
    logits = logits[:, ids.shape[1] - 1 : -1] / temperature  # [N, L, V]
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the more likely tokens
    drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= top_p)
    logps = logits.masked_fill(drop, float("-inf")).log_softmax(-1)
    return logps.gather(-1, completions.ids[..., None]).squeeze(-1) * completions.mask


def test_hf_tokens_do_not_depend_on_the_chunk_size(setup):
    whole = run(setup, "hf")
    for size in (1, 2):
        chunked = run(setup, "hf", generation_batch_size=size)
        assert torch.equal(chunked.ids, whole.ids) and torch.equal(chunked.mask, whole.mask)
    greedy = run(setup, "hf", greedy=True)
    assert torch.equal(run(setup, "hf", greedy=True, generation_batch_size=1).ids, greedy.ids)
    assert len({tuple(row) for row in whole.ids.tolist()}) > 1  # it does sample


@pytest.mark.parametrize("engine", ["hf", "static", "paged"])
def test_engine_greedy_equals_generate_and_keeps_rng_and_training_flags(setup, engine):
    model, tokenizer, ids, mask, eos, _ = setup
    model.eval()
    expected = model.generate(  # transformers' own greedy decoding, adapter unmerged
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )[:, ids.shape[1] :]
    model.train()
    before = rng_states()
    greedy = run(setup, engine, greedy=True)
    width = greedy.ids.shape[1]
    assert torch.equal(greedy.ids[greedy.mask > 0], expected[:, :width][greedy.mask > 0])
    assert greedy.logps is None or engine == "paged"
    first = run(setup, engine, **SAMPLING)
    second = run(setup, engine, **SAMPLING)
    assert torch.equal(first.ids, second.ids)  # a fixed seed reproduces its samples
    after = rng_states()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    assert all(module.training for module in model.modules())  # LoRA dropout is back on for the update
    if engine == "static":  # the same loop as hf: the same draws from the same seeds
        assert torch.equal(first.ids, run(setup, "hf", **SAMPLING).ids)
    expected_logps = teacher_forced_logps(setup, first, **SAMPLING)
    # Cached decoding and one full forward round differently in float32: on stories260K up to 4.4e-5
    # (2.1e-5 relative), each pass's logits being up to 2.8e-5 off a float64 forward (docs/engines.md).
    torch.testing.assert_close(first.logps, expected_logps, rtol=3e-5, atol=1e-5)


@pytest.mark.parametrize("engine", ["hf", "static", "paged"])
def test_engine_log_probs_equal_teacher_forced_ones_to_1e_5_in_float64(setup, engine):
    """The float32 gap above is the forward's rounding, not the engines' log-probs: with the policy in
    float64 every engine's returned log-probs (stored as float32) are within 1e-5 of the teacher-forced
    ones (measured 1.1e-6 on stories260K)."""
    model, *rest = setup
    wide = (copy.deepcopy(model).double(), *rest)
    sampled = run(wide, engine, **SAMPLING)
    expected = teacher_forced_logps(wide, sampled, **SAMPLING)
    torch.testing.assert_close(sampled.logps.double(), expected, rtol=0, atol=1e-5)


def test_bad_engine_options_are_refused_by_name():
    with pytest.raises(ValueError, match="model.sampling.engine='vllm' must be one of hf, static, paged"):
        SamplingConfig(engine="vllm")
    for size in (0, -2, 1.5):
        with pytest.raises(ValueError, match="model.sampling.generation_batch_size"):
            SamplingConfig(generation_batch_size=size)
    with pytest.raises(ValueError, match="model.sampling.compile=True is for the static engine only"):
        SamplingConfig(engine="paged", compile=True)
    with pytest.raises(
        ValueError, match="model.grpo.vllm_importance_sampling_clip_max=0.5 must be > 0 and above"
    ):
        GRPOConfig(vllm_importance_sampling_clip_max=0.5, vllm_importance_sampling_clip_min=2.0)


def test_sampler_correction_weights_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -9.0]])
    sampler = torch.tensor([[-1.5, -1.0, -0.5], [-2.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1's last token is padding
    e = torch.e
    cases = {  # w = exp(trainer - sampler): row 0 tokens e^0.5, e^-1, 1; row 1 e^1.5, 1 (padding: 1)
        "token_truncate": [[e**0.5, e**-1, 1.0], [2.0, 1.0, 1.0]],
        "token_mask": [[e**0.5, e**-1, 1.0], [0.0, 1.0, 1.0]],
        "sequence_truncate": [[e**-0.5], [2.0]],  # exp of the sums: -0.5 and 1.5
        "sequence_mask": [[e**-0.5], [0.0]],
    }
    for mode, expected in cases.items():
        weight, over = sampler_correction(trainer, sampler, mask, mode, clip_max=2.0)
        torch.testing.assert_close(weight, torch.tensor(expected), msg=mode)
        assert over.nonzero().tolist() == [[1, 0]], mode  # only row 1 (its first token, or itself) exceeds 2
    # TRL 1.16's lower bound: e^-1 clamped up to 0.5 (truncate) or zeroed (mask), e^1.5 unbounded above.
    weight, _ = sampler_correction(trainer, sampler, mask, "token_truncate", clip_max=None, clip_min=0.5)
    torch.testing.assert_close(weight[0], torch.tensor([e**0.5, 0.5, 1.0]))
    weight, _ = sampler_correction(trainer, sampler, mask, "token_mask", clip_max=None, clip_min=0.5)
    torch.testing.assert_close(weight, torch.tensor([[e**0.5, 0.0, 1.0], [e**1.5, 1.0, 1.0]]))
    stats = sampler_mismatch(
        trainer, sampler, mask, sampler_correction(trainer, sampler, mask, "token_mask", clip_max=2.0)[1]
    )
    diffs = torch.tensor([0.5, -1.0, 0.0, 1.5, 0.0])  # trainer - sampler over the 5 valid tokens
    assert stats["sampler_logp_diff"].item() == pytest.approx(diffs.abs().mean().item())
    assert stats["sampler_kl"].item() == pytest.approx((diffs.exp() - diffs - 1).mean().item())
    assert stats["sampler_clipped_fraction"].item() == pytest.approx(1 / 5)  # e^1.5 > 2


def test_static_merge_reuses_its_buffers(tiny_policy_dir):
    """The static engine's merged weights keep their addresses from step to step (what captured
    graphs hold), hold W + ΔW of the adapter of the moment, and the base weights come back."""
    from peft.tuners.lora import LoraLayer

    model = load_policy(PolicyConfig(name_or_path=str(tiny_policy_dir), lora_rank=4))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    originals = [layer.get_base_layer().weight.data_ptr() for layer in layers]
    base = layers[0].get_base_layer().weight.detach().clone()
    buffers, seen = {}, []
    for step in range(2):
        for layer in layers:
            layer.lora_B["default"].weight.data.fill_(0.01 * (step + 1))  # the adapter moves between steps
        with torch.no_grad(), merged_lora(model, buffers):
            seen.append([layer.get_base_layer().weight.data_ptr() for layer in layers])
            first = layers[0]
            delta = first.scaling["default"] * first.lora_B["default"].weight @ first.lora_A["default"].weight
            torch.testing.assert_close(first.get_base_layer().weight, base + delta)
    assert seen[0] == seen[1] and len(buffers) == len(layers)
    assert [layer.get_base_layer().weight.data_ptr() for layer in layers] == originals
