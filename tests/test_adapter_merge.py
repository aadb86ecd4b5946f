"""Sampling with the adapter merged: the same function as the adapter, and the base weights back bit for
bit."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from lightning_flow.adapter_merge import merged_lora
from lightning_flow.engines.hf import HFEngine
from lightning_flow.policy import PolicyConfig, SamplingConfig, load_policy

from .lora import perturb_lora

IDS = torch.randint(4, 90, (3, 20), generator=torch.Generator().manual_seed(0))


def lora_layers(model) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def policy(tiny_policy_dir, **kwargs):
    model = load_policy(PolicyConfig(str(tiny_policy_dir), lora_rank=4, lora_alpha=8, **kwargs))
    perturb_lora(model)
    return model.eval()


@torch.no_grad()
def test_merged_layers_hold_w_plus_scaled_ba_and_compute_the_adapters_function(tiny_policy_dir):
    model = policy(tiny_policy_dir)
    layers = lora_layers(model)
    before = [(layer.get_base_layer().weight.data, layer.get_base_layer().weight.clone()) for layer in layers]
    with_adapter = model(input_ids=IDS).logits
    with model.disable_adapter():
        without_adapter = model(input_ids=IDS).logits
    assert (with_adapter - without_adapter).abs().max() > 1e-2  # the adapter matters here

    with merged_lora(model) as merged:
        assert merged and all(layer.merged for layer in layers)
        for layer, (_, weight) in zip(layers, before):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            expected = weight.double() + (8 / 4) * (b.double() @ a.double())  # W + (alpha / r) B A
            torch.testing.assert_close(layer.get_base_layer().weight.double(), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(input_ids=IDS).logits, with_adapter, rtol=1e-5, atol=1e-5)

    for layer, (original, copy) in zip(layers, before):
        assert not layer.merged
        # the same memory, not a recomputed tensor
        assert layer.get_base_layer().weight.data_ptr() == original.data_ptr()
        assert torch.equal(original, copy)
    assert torch.equal(model(input_ids=IDS).logits, with_adapter)


def test_weights_come_back_when_the_block_raises(tiny_policy_dir):
    model = policy(tiny_policy_dir)
    originals = [layer.get_base_layer().weight.data_ptr() for layer in lora_layers(model)]
    with pytest.raises(KeyError), merged_lora(model):
        raise KeyError("inside")
    assert [layer.get_base_layer().weight.data_ptr() for layer in lora_layers(model)] == originals
    assert not any(layer.merged for layer in lora_layers(model))


@torch.no_grad()
def test_bfloat16_merge_is_as_close_to_the_float32_policy_as_the_unmerged_adapter(tiny_policy_dir):
    """Rounding W + ΔW once to bfloat16 costs no more accuracy than the unmerged bfloat16 products do."""
    reference = torch.log_softmax(policy(tiny_policy_dir)(input_ids=IDS).logits.double(), -1)
    model = policy(tiny_policy_dir, dtype="bfloat16")
    unmerged = torch.log_softmax(model(input_ids=IDS).logits.double(), -1)
    with merged_lora(model) as merged:
        merged_logps = torch.log_softmax(model(input_ids=IDS).logits.double(), -1)
    assert merged
    unmerged_error = (unmerged - reference).abs().mean()
    assert unmerged_error > 0  # bfloat16 does round here
    assert (merged_logps - reference).abs().mean() <= 1.25 * unmerged_error


def test_4bit_base_disabled_adapter_and_dora_are_left_unmerged(tiny_policy_dir):
    quantised = policy(tiny_policy_dir, load_in_4bit=True)
    disabled = policy(tiny_policy_dir)
    dora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_policy_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM"),
    )
    for model, context in [(quantised, None), (disabled, disabled.disable_adapter), (dora, None)]:
        originals = [layer.get_base_layer().weight.data_ptr() for layer in lora_layers(model)]
        with context() if context else torch.no_grad(), merged_lora(model) as merged:
            assert not merged
            assert not any(layer.merged for layer in lora_layers(model))
        assert [layer.get_base_layer().weight.data_ptr() for layer in lora_layers(model)] == originals
    with merged_lora(AutoModelForCausalLM.from_pretrained(tiny_policy_dir)) as merged:
        assert not merged  # no LoRA layers at all


def test_a_base_weight_tied_to_another_module_is_left_unmerged(tiny_policy_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    base.lm_head.weight = base.model.embed_tokens.weight  # one tensor for the head and the embedding
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    )
    perturb_lora(model)
    embedding = model.get_input_embeddings().weight.clone()
    with torch.no_grad(), merged_lora(model) as merged:
        assert not merged
        assert torch.equal(model.get_input_embeddings().weight, embedding)


def test_generate_samples_the_same_tokens_merged_and_unmerged(tiny_policy_dir):
    model = policy(tiny_policy_dir).train()
    originals = [layer.get_base_layer().weight.data_ptr() for layer in lora_layers(model)]
    prompt, mask = IDS[:, :6], torch.ones(3, 6, dtype=torch.long)
    seeds = torch.arange(6)
    seen_merged = []
    lora_layers(model)[0].register_forward_pre_hook(lambda layer, args: seen_merged.append(layer.merged))
    outs = [
        HFEngine(SamplingConfig(num_generations=2, max_new_tokens=12, merge_adapter=merge), 0, [2])(
            model, prompt, mask, 2, seeds
        ).ids
        for merge in (False, True)
    ]
    assert outs[0].shape == (6, 12)
    assert torch.equal(outs[0], outs[1])
    assert seen_merged == [False] * 12 + [True] * 12  # one forward per new token, unmerged then merged
    assert model.training
    assert [layer.get_base_layer().weight.data_ptr() for layer in lora_layers(model)] == originals
    assert not any(layer.merged for layer in lora_layers(model))
