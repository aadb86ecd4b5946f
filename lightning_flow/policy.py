"""The policy: a causal LM with a LoRA adapter (optionally over 4-bit NF4 weights), and how it samples.

The reference policy for the KL term is the same model with its adapter disabled
(``model.disable_adapter()``), so the base weights exist once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PreTrainedModel,
)

from lightning_flow.tokenizer import model_source_errors

log = logging.getLogger(__name__)

ENGINE_NAMES = ("hf", "static", "paged")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_settings(prefix: str, config: object, rules: dict[str, tuple[bool, str]]) -> None:
    """Raise for the first setting whose rule fails, naming it as the command line spells it
    (``{prefix}.{name}=value``): the config dataclasses check themselves before any model loads."""
    for name, (valid, requirement) in rules.items():
        if not valid:
            raise ValueError(f"{prefix}.{name}={getattr(config, name)!r} {requirement}")


@dataclass
class PolicyConfig:
    """How to build the policy."""

    name_or_path: str
    """Hub id (e.g. ``Qwen/Qwen2.5-0.5B-Instruct``) or local folder of a causal LM."""
    dtype: str = "float32"
    """Weight dtype of the base model: ``float32``, ``bfloat16`` or ``float16``."""
    load_in_4bit: bool = False
    """Quantize the base weights to 4-bit NF4 with double quantization (QLoRA)."""
    lora_rank: int = 16
    """LoRA rank r."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] | str = "all-linear"
    """Modules that get an adapter; ``all-linear`` means every attention and MLP projection."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant, works with LoRA)."""
    attn_implementation: str = "sdpa"
    """Attention kernel for generation and training."""
    adapter_path: str | None = None
    """Start from a saved peft adapter instead of a fresh one."""
    trust_remote_code: bool = False
    """Allow model code from the hub."""

    def __post_init__(self) -> None:
        check_settings(
            "model.policy",
            self,
            {
                "dtype": (self.dtype in _DTYPES, f"is not one of {sorted(_DTYPES)}"),
                "lora_rank": (self.lora_rank >= 1, "must be >= 1"),
                "lora_alpha": (self.lora_alpha > 0, "must be > 0"),
                "lora_dropout": (0 <= self.lora_dropout < 1, "must be in [0, 1)"),
            },
        )


@dataclass
class SamplingConfig:
    """How responses are sampled."""

    num_generations: int = 8
    """Responses per prompt (the GRPO group size, at least 2)."""
    max_new_tokens: int = 256
    """Longest response; longer ones are truncated."""
    temperature: float = 1.0
    """Sampling temperature (log-probs in the loss use the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Top-k sampling; 0 disables it."""
    extra_eos_token_ids: list[int] = field(default_factory=list)
    """Token ids that also end a response (the tokenizer's and model's EOS always do)."""
    seed: int | None = None
    """Seed of the per-response sampling noise, mixed with the step and the prompt's source
    (None: the run's ``seed_everything`` value), so responses do not depend on rank or batch layout."""
    merge_adapter: bool = True
    """Sample with the LoRA adapter merged into a copy of the base weights (one product per projection
    instead of three; the copy lives while sampling). Bases it cannot merge exactly (4-bit, DoRA) sample
    unmerged."""
    engine: str = "hf"
    """The rollout engine (docs/engines.md): ``hf`` (transformers ``generate``, per-response seeds),
    ``static`` (the same loop on a static KV cache, compiled), ``paged`` (continuous batching)."""
    generation_batch_size: int | None = None
    """Responses sampled at once (None: all of the step's); only one chunk's KV cache is alive. It
    need not divide anything: the last chunk is smaller. With ``hf``/``static`` the tokens are the
    same whatever the chunk size; with ``paged`` it caps the requests decoded together."""
    compile: bool | None = None
    """``static`` only: compile the decoding step with torch.compile (None: on, except on a CPU)."""

    def __post_init__(self) -> None:
        size = self.generation_batch_size
        check_settings(
            "model.sampling",
            self,
            {
                "num_generations": (
                    self.num_generations >= 2,
                    "must be >= 2: advantages are normalised in a group",
                ),
                "max_new_tokens": (self.max_new_tokens >= 1, "must be >= 1"),
                "temperature": (self.temperature > 0, "must be > 0"),
                "top_p": (0 < self.top_p <= 1, "must be in (0, 1]"),
                "top_k": (self.top_k >= 0, "must be >= 0 (0 turns it off)"),
                "engine": (self.engine in ENGINE_NAMES, f"must be one of {', '.join(ENGINE_NAMES)}"),
                "generation_batch_size": (
                    size is None or (type(size) is int and size >= 1),
                    "must be a positive number of responses (or null: all at once)",
                ),
                "compile": (
                    self.compile is None or self.engine == "static",
                    f"is for the static engine only, not engine={self.engine!r}",
                ),
            },
        )


def load_policy(cfg: PolicyConfig) -> PeftModel:
    """Load the base model and wrap it with a trainable LoRA adapter, in train mode."""
    dtype = _DTYPES[cfg.dtype]
    kwargs: dict = dict(
        dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code
    )
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    with model_source_errors(cfg.name_or_path):
        base = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    if cfg.load_in_4bit:
        disable_cpu_4bit_repacking(base)
    if cfg.gradient_checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False  # the cache is only wanted in generate, which turns it on itself
    if cfg.adapter_path:
        model = PeftModel.from_pretrained(base, cfg.adapter_path, is_trainable=True)
    else:
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, lora)
    model.train()  # from_pretrained returns eval mode
    return model


def disable_cpu_4bit_repacking(model: PreTrainedModel) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPU the first eval-mode no-grad forward of a ``Linear4bit`` (inside ``generate``) repacks
    the weight for good, after which training computes wrong gradients silently (or crashes on
    models with q/k/v bias). Returns the number of layers changed.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


# Causal LMs whose logits are exactly ``lm_head(decoder(...).last_hidden_state)``: no soft-capping
# or scaling after the head (Gemma 2 and Granite have some), checked against their modeling code.
_PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})


def decoder_and_head(model: PeftModel | PreTrainedModel) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """The decoder stack and the plain linear LM head of a causal LM, so a caller can apply the
    head to hidden states itself (in chunks, without the ``[N, L, V]`` logits); None where the
    model's logits are anything else (another family, an adapter or quantization on the head).
    Adapters inside the decoder stay in effect, including ``disable_adapter()``."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    head = base.get_output_embeddings()
    if base.config.model_type not in _PLAIN_HEAD_MODEL_TYPES or type(head) is not torch.nn.Linear:
        return None
    return base.get_decoder(), head


def eos_token_ids(model: PreTrainedModel, tokenizer, extra: list[int] = ()) -> list[int]:
    """All ids that end a response: the tokenizer's EOS, the model's generation EOS(s), extras."""
    ids = {tokenizer.eos_token_id, *extra}
    generation_eos = model.generation_config.eos_token_id
    ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    return sorted(i for i in ids if i is not None)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as generation uses them.  # [N, T] -> [N, T]"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
