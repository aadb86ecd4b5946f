"""What the GRPO-family losses read, as pure tensor functions (formulas follow TRL's GRPOTrainer):
group-normalised advantages, the completion mask, and each token's log-prob and entropy. The
objectives themselves are in ``lightning_flow.objectives``.

N = responses in the generation batch (prompts × G, groups contiguous), n = responses in one
micro-batch, L = completion length, V = vocabulary size. Nothing here knows about models,
trainers or tokenizers, so every function can be checked by hand on small tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

ScaleRewards = Literal["group", "batch", "none"]

_STD_EPS = 1e-4  # added to the std, as TRL does, so tiny spreads do not explode
_BLOCK_ELEMENTS = 2**25  # vocabulary entries per log-prob block by default: 128 MiB per fp32 temporary


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")


def check_shape(name: str, tensor: Tensor, expected: torch.Size, expected_name: str) -> None:
    if tensor.shape != expected:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but {expected_name} has shape {tuple(expected)}"
        )


# ---- rewards -> advantages -----------------------------------------------------------------
def group_advantages(
    rewards: Tensor, num_generations: int, scale_rewards: ScaleRewards = "group"
) -> tuple[Tensor, Tensor]:
    """Group-relative advantages.

    rewards  # [N], rows g*G .. g*G+G-1 form group g
    Returns (advantages [N], zero_std_groups [N // G] bool).
    A = r - group mean, divided by (unbiased std + 1e-4) of the group ("group") or of the whole
    batch ("batch"), or left unscaled ("none"). Groups with all-equal rewards get exactly 0.
    """
    check_choice("scale_rewards", scale_rewards, get_args(ScaleRewards))
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 (a group needs a spread), got {num_generations}")
    if rewards.numel() % num_generations:
        raise ValueError(
            f"number of rewards {rewards.numel()} is not divisible by num_generations {num_generations}"
        )
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    grouped = rewards.view(-1, num_generations)  # [N / G, G]
    zero_std = (grouped == grouped[:, :1]).all(dim=1)  # [N / G]
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + _STD_EPS)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + _STD_EPS)
    # The mean of equal floats can be off by an ulp; force the "no signal" groups to exact zero.
    advantages = torch.where(zero_std[:, None], torch.zeros_like(advantages), advantages)
    return advantages.reshape(-1), zero_std


# ---- which tokens count --------------------------------------------------------------------
def completion_mask(
    completion_ids: Tensor, eos_token_ids: int | Sequence[int], mask_truncated: bool = False
) -> tuple[Tensor, Tensor]:
    """Mask of the tokens that belong to each response.

    completion_ids  # [N, L] as generated, padding after the end
    Returns (mask [N, L] float32, 1 up to and including the first EOS; is_truncated [N] bool,
    True for rows with no EOS). With mask_truncated, truncated rows get an all-zero mask.
    """
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_ids must be 2-D [N, L], got shape {tuple(completion_ids.shape)}")
    ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    if not ids:
        raise ValueError("eos_token_ids must name at least one token id")
    is_eos = torch.isin(completion_ids, torch.tensor(ids, device=completion_ids.device))  # [N, L]
    is_truncated = ~is_eos.any(dim=1)  # [N]
    # Position after the first EOS; L for rows without one. cumsum of "seen an EOS before me"
    # is zero exactly up to and including the first EOS.
    eos_before = is_eos.int().cumsum(dim=1) - is_eos.int()  # [N, L]
    mask = (eos_before == 0).float()
    if mask_truncated:
        mask = mask * (~is_truncated).float()[:, None]
    return mask, is_truncated


# ---- log-probs from logits or hidden states, chunked ----------------------------------------
def _tempered(chunk: Tensor, temperature: float) -> Tensor:
    """chunk / T, left in its dtype at T = 1 (the softmax kernels then read it and write float32
    in one pass, instead of reading a float32 copy made first)."""
    return chunk if temperature == 1.0 else chunk.float() / temperature


def _log_normalised(chunk: Tensor, temperature: float) -> Tensor:
    """log softmax(chunk / T) in float32."""
    return torch.log_softmax(_tempered(chunk, temperature), dim=-1, dtype=torch.float32)


def _normalised(chunk: Tensor, temperature: float) -> Tensor:
    """softmax(chunk / T) in float32."""
    return torch.softmax(_tempered(chunk, temperature), dim=-1, dtype=torch.float32)


def _token_blocks(n: int, length: int, chunk_tokens: int):
    """(rows, positions) slices covering an [n, length] grid, each holding at most chunk_tokens
    tokens: whole rows when a row fits, else pieces of one row (long responses)."""
    if length <= chunk_tokens:
        rows_per_block = chunk_tokens // max(length, 1)
        for start in range(0, n, rows_per_block):
            yield slice(start, start + rows_per_block), slice(None)
    else:
        for row in range(n):
            for start in range(0, length, chunk_tokens):
                yield slice(row, row + 1), slice(start, start + chunk_tokens)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Forward and backward both walk blocks of at most `chunk_tokens` tokens.

    Plain autograd through log_softmax would keep an fp32 [N, L, V] output alive until backward;
    here only the inputs are saved and each block's softmax is recomputed in backward. With a
    head (weight, bias) the inputs are hidden states and each block's logits are recomputed too,
    so the [N, L, V] logits and their gradient never exist. The head runs in its weight's dtype
    with autocast off, so forward and backward see the same logits. The entropy is detached
    unless ``entropy_grad`` (an entropy bonus); then its gradient joins the same block pass.
    """

    @staticmethod
    # [r, c, D] -> [r, c, V]
    def _block_logits(inputs: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        if weight is None:
            return inputs
        with torch.autocast(inputs.device.type, enabled=False):
            return torch.nn.functional.linear(inputs.to(weight.dtype), weight, bias)

    @staticmethod
    def forward(
        ctx,
        inputs: Tensor,
        targets: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        temperature: float,
        chunk_tokens: int,
        entropy_grad: bool,
    ):
        logps = inputs.new_empty(targets.shape, dtype=torch.float32)  # [N, L]
        entropy = inputs.new_empty(targets.shape, dtype=torch.float32)  # [N, L]
        for rows, cols in _token_blocks(*targets.shape, chunk_tokens):
            logits = _ChunkedTokenLogprobs._block_logits(inputs[rows, cols], weight, bias)  # [r, c, V]
            log_p = _log_normalised(logits, temperature)  # [r, c, V] fp32
            del logits
            logps[rows, cols] = log_p.gather(-1, targets[rows, cols, None]).squeeze(-1)
            # H = -sum p log p; nan_to_num: a -inf logit gives 0 * -inf, whose limit is 0
            entropy[rows, cols] = -log_p.exp().mul_(log_p).nan_to_num_(nan=0.0).sum(dim=-1)
            del log_p  # free this block before the next
        ctx.save_for_backward(inputs, targets, weight, bias, entropy if entropy_grad else None)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None, not zeros
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps: Tensor | None, grad_entropy: Tensor | None):  # [N, L]
        inputs, targets, weight, bias, entropy = ctx.saved_tensors
        if grad_logps is None:
            grad_logps = torch.zeros_like(targets, dtype=torch.float32)
        grad_inputs = torch.empty_like(inputs)
        grad_weight = (
            torch.zeros_like(weight, dtype=torch.float32)
            if weight is not None and ctx.needs_input_grad[2]
            else None
        )
        grad_bias = (
            torch.zeros_like(bias, dtype=torch.float32)
            if bias is not None and ctx.needs_input_grad[3]
            else None
        )
        for rows, cols in _token_blocks(*targets.shape, ctx.chunk_tokens):
            block = inputs[rows, cols]  # [r, c, D or V]
            g = grad_logps[rows, cols, None].float()  # [r, c, 1]
            if grad_entropy is None:
                # d log p_y / d z_v = (1[v == y] - p_v) / T
                grad = _normalised(
                    _ChunkedTokenLogprobs._block_logits(block, weight, bias), ctx.temperature
                ).mul_(-g)
            else:
                # d H / d z_v = -p_v (log p_v + H) / T; with the log-prob's: (g 1[v == y] - p_v (g + g_H (log
                # p_v + H))) / T
                log_p = _log_normalised(
                    _ChunkedTokenLogprobs._block_logits(block, weight, bias), ctx.temperature
                )
                grad = log_p.exp()
                log_p.add_(entropy[rows, cols, None]).mul_(grad_entropy[rows, cols, None].float()).add_(g)
                # a -inf logit: p = 0 times -inf, whose limit is 0
                grad.mul_(log_p).neg_().nan_to_num_(nan=0.0)
                del log_p
            grad.scatter_add_(-1, targets[rows, cols, None], g)  # [r, c, V] fp32
            if ctx.temperature != 1.0:
                grad.div_(ctx.temperature)
            if weight is None:
                grad_inputs[rows, cols] = grad
            else:
                grad_inputs[rows, cols] = grad.to(weight.dtype) @ weight
                if grad_weight is not None:
                    grad_weight += grad.flatten(0, 1).T @ block.flatten(0, 1).float()
                if grad_bias is not None:
                    grad_bias += grad.sum((0, 1))
            del grad
        return (
            grad_inputs,
            None,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
        )


def token_logprobs_and_entropy(
    inputs: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    head_weight: Tensor | None = None,
    head_bias: Tensor | None = None,
    positions: Tensor | None = None,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """Log-prob of each target token and entropy of the tempered distribution.

    inputs       # [N, L, V] logits (any float dtype), or [N, L, D] hidden states with head_weight
    targets      # [N, L] long
    head_weight  # [V, D] optional LM head applied to `inputs` block by block (head_bias [V])
    Returns (logps [N, L] float32, differentiable w.r.t. inputs and the head; entropy [N, L]
    float32, detached unless ``entropy_grad``). At most `chunk_tokens` positions are cast to fp32
    at once (default: as many as make 2^25 vocabulary entries, 220 with a 152K vocabulary, all of
    a small model's micro-batch), so each fp32 temporary is chunk_tokens × V × 4 bytes (128 MiB
    at the default) whatever N and L are; a block holds at most two of them; with a head no
    [N, L, V] tensor is made at all. With ``positions`` ([N, L] bool) only those positions are scored (the
    loss's
    completion tokens, not the padding after EOS); the others get 0 and no gradient. Selecting
    them copies their inputs, so pass it with hidden states, not with full logits.
    """
    width = inputs.shape[-1] if head_weight is None else head_weight.shape[1]
    if inputs.dim() != 3 or targets.shape != inputs.shape[:2] or inputs.shape[-1] != width:
        expected = (
            "logits [N, L, V]"
            if head_weight is None
            else f"hidden states [N, L, {width}] for a head of shape {tuple(head_weight.shape)}"
        )
        raise ValueError(
            f"expected {expected} and targets [N, L], got {tuple(inputs.shape)} and {tuple(targets.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens is None:
        vocabulary = inputs.shape[-1] if head_weight is None else head_weight.shape[0]
        chunk_tokens = max(1, _BLOCK_ELEMENTS // vocabulary)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if positions is None:
        return _ChunkedTokenLogprobs.apply(
            inputs,
            targets.long(),
            head_weight,
            head_bias,
            float(temperature),
            int(chunk_tokens),
            entropy_grad,
        )
    if positions.shape != targets.shape:
        raise ValueError(
            f"positions must be [N, L] like targets {tuple(targets.shape)}, got {tuple(positions.shape)}"
        )
    positions = positions.bool()
    picked = _ChunkedTokenLogprobs.apply(  # the M scored positions as one row: [1, M] each
        inputs[positions][None],
        targets[positions].long()[None],
        head_weight,
        head_bias,
        float(temperature),
        int(chunk_tokens),
        entropy_grad,
    )
    zeros = inputs.new_zeros(targets.shape, dtype=torch.float32)
    logps, entropy = (zeros.masked_scatter(positions, values[0]) for values in picked)
    return logps, entropy
