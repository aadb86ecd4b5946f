"""The policy: LoRA wiring, the CPU 4-bit guard, generation vs training log-probs, adapters."""

from __future__ import annotations

import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lightning_flow.engines.hf import HFEngine
from lightning_flow.loss import token_logprobs_and_entropy
from lightning_flow.policy import (
    PolicyConfig,
    SamplingConfig,
    decoder_and_head,
    disable_cpu_4bit_repacking,
    load_policy,
    position_ids_from_mask,
)
from lightning_flow.tokenizer import load_tokenizer

from .lora import perturb_lora


def lora_gradients(model, ids: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_lora_targets_every_projection_and_freezes_the_base(tiny_policy_dir):
    model = load_policy(PolicyConfig(str(tiny_policy_dir), lora_rank=4))
    assert model.training
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for projection in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]:
        assert any(projection in n for n in trainable), projection


def test_4bit_gradients_after_generate_equal_gradients_before(tiny_policy_dir):
    model = load_policy(PolicyConfig(str(tiny_policy_dir), load_in_4bit=True, lora_rank=4))
    perturb_lora(model)
    ids = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    before = lora_gradients(model, ids)
    HFEngine(SamplingConfig(max_new_tokens=4), 0, [2])(
        model, ids[:, :4], torch.ones(2, 4, dtype=torch.long), 1, None
    )
    after = lora_gradients(model, ids)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_4bit_trap_exists_without_the_guard(tiny_policy_dir, monkeypatch):
    """Shows the guard above is needed: undo it and the same check fails on this CPU."""
    if not has_avx512bf16():
        pytest.skip("this CPU lacks AVX512-BF16, where bitsandbytes never repacks")
    monkeypatch.setattr("lightning_flow.policy.disable_cpu_4bit_repacking", lambda model: 0)
    model = load_policy(PolicyConfig(str(tiny_policy_dir), load_in_4bit=True, lora_rank=4))
    perturb_lora(model)
    ids = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    before = lora_gradients(model, ids)
    HFEngine(SamplingConfig(max_new_tokens=4), 0, [2])(
        model, ids[:, :4], torch.ones(2, 4, dtype=torch.long), 1, None
    )
    assert not torch.allclose(lora_gradients(model, ids), before)
    assert disable_cpu_4bit_repacking(model) > 0


def test_training_forward_reproduces_generation_logits_with_left_padding(tiny_policy_dir):
    """The loss's log-probs must be those of the distribution that sampled the tokens."""
    model = load_policy(PolicyConfig(str(tiny_policy_dir), lora_rank=4))
    perturb_lora(model)
    tokenizer = load_tokenizer(str(tiny_policy_dir))
    batch = tokenizer(["1+2", "3+4-5+6"], return_tensors="pt", padding=True)
    assert batch.attention_mask[0, 0] == 0  # really left-padded
    model.eval()
    with torch.no_grad():
        out = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=6,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=None,
        )
        completion = out.sequences[:, batch.input_ids.shape[1] :]
        generation_logits = torch.stack(out.logits, dim=1)  # [B, L, V]
        ids = out.sequences
        mask = torch.cat([batch.attention_mask, torch.ones_like(completion)], dim=1)
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            logits_to_keep=completion.shape[1] + 1,
        ).logits[:, :-1]
    torch.testing.assert_close(logits, generation_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(-1), completion)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_head_on_decoder_states_gives_the_models_log_probs_and_lora_gradients(tiny_policy_dir, checkpointing):
    """The module's fused path (decoder, then the head block by block) against the model's own logits."""
    model = load_policy(PolicyConfig(str(tiny_policy_dir), lora_rank=4, gradient_checkpointing=checkpointing))
    perturb_lora(model)
    decoder, head = decoder_and_head(model)
    assert head is model.get_output_embeddings()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 90, (3, 14), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    inputs = dict(
        input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
    )
    targets = ids[:, -6:]

    def logps_and_grads(fused: bool, adapter: bool = True):
        model.zero_grad(set_to_none=True)
        with model.disable_adapter() if not adapter else torch.enable_grad():
            if fused:
                hidden = decoder(**inputs).last_hidden_state[:, -7:-1]
                logps, _ = token_logprobs_and_entropy(
                    hidden, targets, 0.7, chunk_tokens=4, head_weight=head.weight, head_bias=head.bias
                )
            else:
                logits = model(**inputs).logits[:, -7:-1]
                logps = torch.log_softmax(logits / 0.7, -1).gather(-1, targets[..., None]).squeeze(-1)
        if not adapter:
            return logps, None
        logps.sum().backward()
        return logps, torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    fused, fused_grads = logps_and_grads(True)
    plain, plain_grads = logps_and_grads(False)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_grads, plain_grads, rtol=1e-4, atol=1e-6)
    assert fused_grads.abs().sum() > 0
    reference, _ = logps_and_grads(True, adapter=False)
    torch.testing.assert_close(reference, logps_and_grads(False, adapter=False)[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(reference, fused)  # disable_adapter reaches the decoder's LoRA layers


def test_decoder_and_head_is_refused_where_logits_are_more_than_a_plain_head(tiny_policy_dir):
    adapted_head = load_policy(
        PolicyConfig(str(tiny_policy_dir), lora_rank=4, lora_target_modules=["q_proj", "lm_head"])
    )
    assert decoder_and_head(adapted_head) is None  # a LoRA on the head: its logits come from the model
    from transformers import GraniteConfig, GraniteForCausalLM

    granite = GraniteForCausalLM(
        GraniteConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            logits_scaling=4.0,
        )
    )
    assert type(granite.get_output_embeddings()) is torch.nn.Linear
    assert decoder_and_head(granite) is None  # its logits are the head's divided by logits_scaling


def test_reference_policy_is_the_base_model_without_a_copy(tiny_policy_dir):
    model = load_policy(PolicyConfig(str(tiny_policy_dir), lora_rank=4))
    perturb_lora(model)
    base = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    ids = torch.randint(4, 90, (2, 10), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            reference = model(input_ids=ids).logits
        expected = base(input_ids=ids).logits
    torch.testing.assert_close(reference, expected)
    assert not torch.allclose(adapted, expected)
    base_params = sum(p.numel() for p in base.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == base_params  # one copy of the base weights


def test_gradient_checkpointing_gives_the_same_lora_gradients(tiny_policy_dir):
    ids = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpointing in (False, True):
        model = load_policy(
            PolicyConfig(str(tiny_policy_dir), lora_rank=4, gradient_checkpointing=checkpointing)
        )
        perturb_lora(model)
        grads.append(lora_gradients(model, ids))
    torch.testing.assert_close(grads[1], grads[0])


def test_saved_adapter_loads_in_plain_peft(tiny_policy_dir, tmp_path):
    model = load_policy(PolicyConfig(str(tiny_policy_dir), lora_rank=4))
    perturb_lora(model)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_policy_dir), tmp_path / "adapter"
    ).eval()
    ids = torch.randint(4, 90, (2, 10), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_group_size_below_two_is_refused():
    with pytest.raises(ValueError, match="num_generations=1"):
        SamplingConfig(num_generations=1)


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="bfloat16"):
        PolicyConfig("x", dtype="fp8")


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_module_log_probs_are_the_same_from_the_fused_head_and_from_the_models_logits(
    tiny_policy_dir, load_in_4bit
):
    """GRPOModule.completion_logps on both of its paths, at the loss's tokens: decoder + blockwise
    head, and (for models without a plain head) the model's own logits; a 4-bit base keeps its
    head unquantised."""
    from dataclasses import fields

    from lightning_flow.module import GRPOModule
    from lightning_flow.rollouts import Rollouts

    module = GRPOModule(
        PolicyConfig(str(tiny_policy_dir), lora_rank=4, load_in_4bit=load_in_4bit),
        SamplingConfig(num_generations=2, max_new_tokens=6, temperature=0.7),
    )
    perturb_lora(module.policy)
    assert module.decoder_and_head is not None
    gen = torch.Generator().manual_seed(4)
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    completion_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    rollouts = Rollouts(
        **{
            **{f.name: None for f in fields(Rollouts)},
            "prompt_ids": torch.randint(4, 90, (3, 5), generator=gen),
            "prompt_mask": prompt_mask,
            "completion_ids": torch.randint(4, 90, (3, 6), generator=gen),
            "completion_mask": completion_mask,
        }
    )
    results = []
    for path in ("fused", "logits"):
        if path == "logits":
            module.decoder_and_head = None
        module.policy.zero_grad(set_to_none=True)
        logps, entropy = module.completion_logps(rollouts, slice(0, None))
        (logps * completion_mask).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.requires_grad])
        results.append((logps.detach(), entropy, grads))
    scored = completion_mask.bool()
    for fused, plain in zip(results[0][:2], results[1][:2]):
        torch.testing.assert_close(fused[scored], plain[scored], rtol=1e-5, atol=1e-6)
        assert fused[~scored].eq(0).all()  # the fused head scores only the loss's tokens
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-5, atol=1e-6)
