"""Checks lightning_flow.loss against formulas written out here with python floats (float64).

Every expected number below comes from explicit loops and `math`, never from the code under
test, so a wrong sign, a wrong normaliser or a wrong clip branch shows up as a mismatch.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lightning_flow.loss import completion_mask, group_advantages, token_logprobs_and_entropy
from lightning_flow.objectives import LossStats, gradient_accumulation_divisor, policy_loss

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


# ---- reference: every objective, token by token --------------------------------------------
def reference_loss(
    logps,
    old,
    adv,
    mask,
    loss_type,
    eps_low=0.2,
    eps_high=None,
    beta=0.0,
    ref=None,
    weights=None,
    max_len=None,
    num_items=None,
    kl_correction=True,
    level="token",
    delta=None,
    tau_pos=1.0,
    tau_neg=1.05,
    entropy=None,
    threshold=None,
    num_micro_batches=1,
):
    """Returns (loss, dloss/dlogps as nested lists), all python floats: this micro-batch's share
    of the step's loss (entropy bonus aside, see reference_entropy_bonus)."""
    eps_high = eps_low if eps_high is None else eps_high
    n, length = len(logps), len(logps[0])
    counts = [sum(row) for row in mask]
    total = sum(counts)
    loss, grad = 0.0, [[0.0] * length for _ in range(n)]
    for i in range(n):
        tokens = [t for t in range(length) if mask[i][t]]
        # sequence level: one ratio per response, exp(mean log-ratio); d rho / d logp_u = rho / |o_i| for each
        # of its tokens
        seq_rho = math.exp(sum(logps[i][t] - old[i][t] for t in tokens) / max(len(tokens), 1))
        for t in tokens:
            a = adv[i] * (weights[i][t] if weights is not None else 1.0)
            rho = math.exp(logps[i][t] - old[i][t]) if level == "token" else seq_rho
            d_rho, d_logp = 0.0, 0.0  # partial derivatives of the token's loss
            if loss_type == "cispo":  # -sg(min(rho, eps_high)) * a * logp
                token_loss = -min(rho, eps_high) * a * logps[i][t]
                d_logp = -min(rho, eps_high) * a
            elif loss_type == "sapo":  # -(4 / tau) sigmoid(tau (rho - 1)) a
                tau = tau_pos if a > 0 else tau_neg
                sig = 1 / (1 + math.exp(-tau * (rho - 1)))
                token_loss = -sig * 4 / tau * a
                d_rho = -4 * a * sig * (1 - sig)
            else:  # -min(rho' a, clip(rho) a), rho' = min(rho, delta)
                unclipped_rho = rho if delta is None else min(rho, delta)
                clipped_rho = min(max(rho, 1 - eps_low), 1 + eps_high)
                unclipped_term, clipped_term = unclipped_rho * a, clipped_rho * a
                token_loss = -min(unclipped_term, clipped_term)
                # The clipped branch is flat once rho is outside the range, the unclipped one above delta;
                # on a tie (rho inside the range) torch.min sends half the gradient down each branch.
                d_unclipped = -a if delta is None or rho < delta else 0.0
                d_clipped = -a if 1 - eps_low <= rho <= 1 + eps_high else 0.0
                if unclipped_term < clipped_term:
                    d_rho = d_unclipped
                elif clipped_term < unclipped_term:
                    d_rho = d_clipped
                else:
                    d_rho = (d_unclipped + d_clipped) / 2
            if threshold is not None and not entropy[i][t] >= threshold:  # the high-entropy mask
                token_loss, d_rho, d_logp = 0.0, 0.0, 0.0
            if beta:
                d = ref[i][t] - logps[i][t]
                k3, d_k3 = math.exp(d) - d - 1, 1 - math.exp(d)
                weight = rho if kl_correction else 1.0  # rho * k3: both factors carry a gradient
                token_loss += beta * k3 * weight
                d_logp += beta * d_k3 * weight
                d_rho += beta * k3 if kl_correction else 0.0
            if loss_type in ("grpo", "sapo"):
                scale = 1 / (max(counts[i], 1) * n * num_micro_batches)
            elif loss_type == "bnpo":
                scale = 1 / (max(total, 1) * num_micro_batches)
            elif loss_type == "dr_grpo":
                scale = 1 / (n * max_len * num_micro_batches)
            elif loss_type == "luspo":
                scale = 1 / (n * num_micro_batches)
            else:  # dapo, cispo: the whole generation batch's tokens, summed over micro-batches
                scale = 1 / max(num_items, 1)
            loss += scale * token_loss
            grad[i][t] += scale * d_logp
            if level == "token":
                grad[i][t] += scale * d_rho * rho
            else:
                for u in tokens:
                    grad[i][u] += scale * d_rho * rho / len(tokens)
    return loss, grad


def reference_entropy_bonus(entropy, mask, coef, threshold=None, num_micro_batches=1):
    """-coef × the mean entropy of the tokens the policy term reads, / micro-batches; and its gradient w.r.t.
    each entropy."""
    kept = [
        [bool(m) and (threshold is None or h >= threshold) for h, m in zip(hs, ms)]
        for hs, ms in zip(entropy, mask)
    ]
    count = max(sum(map(sum, kept)), 1)
    value = (
        -coef
        * sum(h for hs, ks in zip(entropy, kept) for h, k in zip(hs, ks) if k)
        / count
        / num_micro_batches
    )
    return value, [[-coef / count / num_micro_batches if k else 0.0 for k in ks] for ks in kept]


def reference_quantile(values, q):
    """Linear interpolation between the order statistics (numpy's and torch's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def to_lists(t):
    return t.detach().double().tolist()


def run_loss(case, loss_type, **kwargs):
    """(loss, grad w.r.t. logps, stats) from the code under test."""
    logps = case["logps"].clone().requires_grad_(True)
    loss, stats = policy_loss(logps, case["old"], case["adv"], case["mask"], loss_type=loss_type, **kwargs)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss, grad, stats


@pytest.fixture
def case():
    """3 responses x 4 tokens. Log-ratios put rho above 1.28 and below 0.8 for both signs of A.

    row 0 (A=+1):   rho 1.5 (clipped high -> grad 0), rho 0.5 (min takes rho*A -> grad), inside, inside
    row 1 (A=-0.5): rho 1.5 (min takes rho*A -> grad), rho 0.5 (clipped low -> grad 0), inside, masked
    row 2 (A=+2):   fully masked, with a log-ratio of 800 that would overflow exp if not masked
    """
    logps = torch.tensor(
        [[-1.2, -0.3, -2.0, -0.7], [-0.5, -1.1, -0.9, -3.0], [-0.4, -0.6, -0.8, -1.0]], dtype=torch.float64
    )
    log_ratio = torch.tensor(
        [[math.log(1.5), math.log(0.5), 0.1, 0.0], [math.log(1.5), math.log(0.5), -0.05, 0.3], [800.0] * 4],
        dtype=torch.float64,
    )
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float64)
    ref = logps + torch.tensor(
        [[0.3, -0.2, 0.5, 0.0], [-0.4, 0.1, 0.2, 0.7], [0.1, 0.1, 0.1, 0.1]], dtype=torch.float64
    )
    return {
        "logps": logps,
        "old": logps - log_ratio,
        "adv": torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64),
        "mask": mask,
        "ref": ref,
    }


def normaliser_kwargs(loss_type, mask):
    # dapo: the batch is bigger
    return {
        "max_completion_length": 6,
        "num_items_in_batch": int(mask.sum()) + 5,
    }


def reference_for(case, loss_type, **kwargs):
    return reference_loss(
        to_lists(case["logps"]),
        to_lists(case["old"]),
        to_lists(case["adv"]),
        to_lists(case["mask"]),
        loss_type,
        max_len=kwargs.get("max_completion_length"),
        num_items=kwargs.get("num_items_in_batch"),
        eps_low=kwargs.get("epsilon_low", 0.2),
        eps_high=kwargs.get("epsilon_high"),
        beta=kwargs.get("beta", 0.0),
        ref=to_lists(case["ref"]),
        weights=to_lists(kwargs["token_weights"]) if "token_weights" in kwargs else None,
        kl_correction=kwargs.get("kl_bias_correction", True),
    )


# ---- policy_loss ----------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_loss_value_and_gradient_match_reference(case, loss_type, epsilon_high):
    kwargs = {**normaliser_kwargs(loss_type, case["mask"]), "epsilon_high": epsilon_high}
    loss, grad, _ = run_loss(case, loss_type, **kwargs)
    expected_loss, expected_grad = reference_for(case, loss_type, **kwargs)
    assert not torch.isnan(loss) and not torch.isnan(grad).any()
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=torch.float64), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_is_zero_exactly_where_min_picks_the_clipped_branch(case, loss_type):
    _, grad, _ = run_loss(case, loss_type, **normaliser_kwargs(loss_type, case["mask"]))
    assert grad[0, 0] == 0 and grad[1, 1] == 0  # A>0 with rho>1+eps, A<0 with rho<1-eps
    assert grad[0, 1] < 0 and grad[1, 0] > 0  # unclipped: the gradient is -rho*A times the normaliser
    assert (grad[1, 3] == 0) and (grad[2] == 0).all()  # masked tokens


def test_clip_ratios_count_only_masked_clipped_tokens(case):
    _, _, stats = run_loss(case, "grpo", epsilon_high=0.28)
    # 7 unmasked tokens; row 0 token 0 is clipped high, row 1 token 1 is clipped low.
    # row 1 token 3 (rho = e^0.3 > 1.28 but A < 0, and masked) must not count.
    assert stats.clip_ratio_high.item() == pytest.approx(1 / 7)
    assert stats.clip_ratio_low.item() == pytest.approx(1 / 7)
    assert stats.clip_ratio.item() == pytest.approx(2 / 7)
    assert stats.kl.item() == 0.0


def test_first_iteration_gradient_is_minus_advantage(case):
    # num_iterations == 1: old_logps is logps itself, rho == 1 and nothing is clipped.
    logps = case["logps"].clone().requires_grad_(True)
    loss, stats = policy_loss(logps, logps.detach(), case["adv"], case["mask"], loss_type="grpo")
    (grad,) = torch.autograd.grad(loss, logps)
    expected = [
        [
            -case["adv"][i].item() * case["mask"][i, t].item() / (max(case["mask"][i].sum().item(), 1) * 3)
            for t in range(4)
        ]
        for i in range(3)
    ]
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=torch.float64))
    assert stats.clip_ratio.item() == 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_token_weights_scale_the_advantage(case, loss_type):
    kwargs = normaliser_kwargs(loss_type, case["mask"])
    twice = torch.full_like(case["logps"], 2.0)
    loss_w, grad_w, stats_w = run_loss(case, loss_type, token_weights=twice, **kwargs)
    loss_a, grad_a, _ = run_loss({**case, "adv": case["adv"] * 2}, loss_type, **kwargs)
    loss_1, grad_1, _ = run_loss(case, loss_type, **kwargs)
    torch.testing.assert_close(loss_w, loss_a)
    torch.testing.assert_close(grad_w, grad_a)
    torch.testing.assert_close(loss_w, 2 * loss_1)  # -min(rho*2A, c*2A) == 2 * -min(rho*A, c*A)
    torch.testing.assert_close(grad_w, 2 * grad_1)
    # Uneven weights, including a zero and a sign flip, against the reference.
    weights = torch.tensor([[2.0, 0.5, 1.0, 0.0], [1.0, -1.0, 3.0, 1.0], [1.0] * 4], dtype=torch.float64)
    loss, grad, stats = run_loss(case, loss_type, token_weights=weights, **kwargs)
    expected_loss, expected_grad = reference_for(case, loss_type, token_weights=weights, **kwargs)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=torch.float64))
    # Row 1 token 1 has A_t = +0.5 now, and rho 0.5 < 0.8 -> no longer a low clip.
    assert stats.clip_ratio_low.item() == 0.0


def test_no_gradient_flows_into_advantages_or_token_weights(case):
    adv = case["adv"].clone().requires_grad_(True)
    weights = torch.ones_like(case["logps"], requires_grad=True)
    logps = case["logps"].clone().requires_grad_(True)
    loss, _ = policy_loss(logps, case["old"], adv, case["mask"], token_weights=weights)
    assert torch.autograd.grad(loss, [adv, weights], allow_unused=True) == (None, None)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("kl_bias_correction", [False, True])
def test_kl_penalty_value_and_gradient(case, loss_type, kl_bias_correction):
    kwargs = {
        **normaliser_kwargs(loss_type, case["mask"]),
        "beta": 0.04,
        "kl_bias_correction": kl_bias_correction,
    }
    loss, grad, stats = run_loss(case, loss_type, ref_logps=case["ref"], **kwargs)
    expected_loss, expected_grad = reference_for(case, loss_type, **kwargs)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=torch.float64))
    rows = zip(to_lists(case["logps"]), to_lists(case["old"]), to_lists(case["ref"]), to_lists(case["mask"]))
    k3 = [
        (math.exp(r - lp) - (r - lp) - 1) * (math.exp(lp - o) if kl_bias_correction else 1.0)
        for lr, olr, rr, mr in rows
        for lp, o, r, m in zip(lr, olr, rr, mr)
        if m
    ]
    assert stats.kl.item() == pytest.approx(sum(k3) / len(k3), rel=1e-12)


def test_kl_bias_correction_changes_the_gradient_but_not_the_value_on_policy(case):
    # mu = 1: rho = exp(logps - logps.detach()) is 1 in value but d rho / d logp = 1, so the
    # corrected gradient gains beta * k3 per token (times the normaliser).
    def first_iteration(correction):
        logps = case["logps"].clone().requires_grad_(True)
        loss, _ = policy_loss(
            logps,
            logps.detach(),
            case["adv"],
            case["mask"],
            beta=0.1,
            ref_logps=case["ref"],
            kl_bias_correction=correction,
        )
        return loss, torch.autograd.grad(loss, logps)[0]

    plain_loss, plain_grad = first_iteration(False)
    corrected_loss, corrected_grad = first_iteration(True)
    assert corrected_loss.item() == pytest.approx(plain_loss.item(), rel=1e-14)
    d = case["ref"] - case["logps"]
    counts = case["mask"].sum(1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(
        corrected_grad - plain_grad, 0.1 * (d.exp() - d - 1) * case["mask"] / (counts * 3)
    )


def test_kl_stat_is_reported_with_ref_even_when_beta_is_zero(case):
    loss0, _, stats = run_loss(case, "bnpo", ref_logps=case["ref"])
    loss1, _, _ = run_loss(case, "bnpo")
    assert stats.kl.item() > 0
    torch.testing.assert_close(loss0, loss1)  # beta == 0 keeps KL out of the loss


def test_stats_are_frozen_detached_scalars(case):
    _, _, stats = run_loss(case, "grpo", beta=0.1, ref_logps=case["ref"])
    assert isinstance(stats, LossStats)
    for value in dataclasses.asdict(stats).values():
        assert value.shape == () and not value.requires_grad
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.kl = torch.tensor(0.0)


def test_all_masked_batch_gives_zero_not_nan(case):
    mask = torch.zeros_like(case["mask"])
    for loss_type in LOSS_TYPES:
        loss, grad, stats = run_loss(
            {**case, "mask": mask},
            loss_type,
            max_completion_length=4,
            num_items_in_batch=0,
            beta=0.1,
            ref_logps=case["ref"],
        )
        assert loss.item() == 0.0 and (grad == 0).all()
        assert all(v.item() == 0.0 for v in dataclasses.asdict(stats).values())


def test_loss_input_validation(case):
    lp, old, adv, mask = case["logps"], case["old"], case["adv"], case["mask"]
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo"):
        policy_loss(lp, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match=r"mask has shape \(3, 3\).*logps has shape \(3, 4\)"):
        policy_loss(lp, old, adv, mask[:, :3])
    with pytest.raises(ValueError, match=r"advantages has shape \(2,\)"):
        policy_loss(lp, old, adv[:2], mask)
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(lp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(lp, old, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        policy_loss(lp, old, adv, mask, loss_type="dapo")


# ---- gradient accumulation -----------------------------------------------------------------
def test_gradient_accumulation_divisor():
    assert [gradient_accumulation_divisor(t, 4) for t in LOSS_TYPES] == [4, 4, 4, 1]
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo"):
        gradient_accumulation_divisor("sum", 2)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_accumulated_micro_batches_equal_the_whole_batch(loss_type):
    gen = torch.Generator().manual_seed(0)
    logps = -torch.rand(4, 5, generator=gen, dtype=torch.float64) * 2
    old = logps + (torch.rand(4, 5, generator=gen, dtype=torch.float64) - 0.5)  # some tokens clipped
    adv = torch.tensor([1.0, -1.0, 0.5, -0.3], dtype=torch.float64)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float64
    )
    kwargs = {"loss_type": loss_type, "max_completion_length": 5, "num_items_in_batch": int(mask.sum())}
    whole_lp = logps.clone().requires_grad_(True)
    whole, _ = policy_loss(whole_lp, old, adv, mask, **kwargs)
    whole.backward()
    micro_lp = logps.clone().requires_grad_(True)
    divisor = gradient_accumulation_divisor(loss_type, 2)
    total = 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        loss, _ = policy_loss(micro_lp[rows], old[rows], adv[rows], mask[rows], **kwargs)
        (loss / divisor).backward()
        total += loss.item() / divisor
    assert total == pytest.approx(whole.item(), rel=1e-12)
    torch.testing.assert_close(micro_lp.grad, whole_lp.grad)


# ---- group_advantages ----------------------------------------------------------------------
def test_group_advantages_hand_numbers():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv, zero = group_advantages(rewards, 4)
    std = math.sqrt(4 * 0.5**2 / 3)  # unbiased: divide by G - 1
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert zero.tolist() == [False]
    adv, zero = group_advantages(rewards, 2)
    std = math.sqrt(2 * 0.5**2 / 1)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert zero.tolist() == [False, False]


def test_equal_group_gets_exact_zero_and_flag():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 2.0])
    for scale in ("group", "batch", "none"):
        adv, zero = group_advantages(rewards, 3, scale)
        assert adv[:3].tolist() == [0.0, 0.0, 0.0] and not adv.isnan().any()
        assert zero.tolist() == [True, False]
    adv, zero = group_advantages(torch.ones(4), 2)
    assert adv.tolist() == [0.0] * 4 and zero.tolist() == [True, True]


def test_group_advantages_batch_and_none_scaling():
    rewards = [1.0, 0.0, 3.0, 1.0]
    centred = [0.5, -0.5, 1.0, -1.0]  # minus the mean of each group of 2
    mean = sum(rewards) / 4
    batch_std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 3)
    adv, _ = group_advantages(torch.tensor(rewards), 2, "batch")
    torch.testing.assert_close(adv, torch.tensor([c / (batch_std + 1e-4) for c in centred]))
    adv, _ = group_advantages(torch.tensor(rewards), 2, "none")
    torch.testing.assert_close(adv, torch.tensor(centred))


def test_group_advantages_validation():
    with pytest.raises(ValueError, match="not divisible"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(torch.zeros(4), 2, "global")


# ---- completion_mask -----------------------------------------------------------------------
def test_completion_mask_includes_first_eos_and_flags_truncation():
    eos, pad = 9, 0
    ids = torch.tensor([[5, 6, 9, pad, pad], [9, pad, pad, pad, pad], [5, 6, 7, 8, 4], [5, 9, 9, 3, pad]])
    mask, truncated = completion_mask(ids, eos)
    assert mask.dtype == torch.float32
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert truncated.tolist() == [False, False, True, False]
    mask, _ = completion_mask(ids, eos, mask_truncated=True)
    assert mask[2].tolist() == [0] * 5 and mask[0].tolist() == [1, 1, 1, 0, 0]


def test_completion_mask_multiple_eos_ids():
    ids = torch.tensor([[5, 8, 9, 1], [5, 6, 9, 8], [5, 6, 7, 1]])
    mask, truncated = completion_mask(ids, [9, 8])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]
    with pytest.raises(ValueError):
        completion_mask(ids, [])


# ---- token_logprobs_and_entropy ------------------------------------------------------------
def reference_logps_entropy(logits, targets, temperature):
    """Unchunked autograd path in fp32 (what the chunked code must reproduce)."""
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_p.gather(-1, targets[..., None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def test_logps_and_entropy_match_explicit_formula():
    logits = torch.tensor(
        [[[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0]], [[-2.0, 1.5, 1.5, 0.2], [4.0, -4.0, 0.0, 0.0]]]
    )
    targets = torch.tensor([[1, 3], [0, 2]])
    temperature = 0.7
    logps, entropy = token_logprobs_and_entropy(logits, targets, temperature, chunk_tokens=1)
    for i in range(2):
        for t in range(2):
            z = [v / temperature for v in logits[i, t].tolist()]
            log_norm = math.log(sum(math.exp(v) for v in z))
            assert logps[i, t].item() == pytest.approx(z[targets[i, t]] - log_norm, abs=1e-6)
            assert entropy[i, t].item() == pytest.approx(
                -sum(math.exp(v - log_norm) * (v - log_norm) for v in z), abs=1e-6
            )


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_masked_vocabulary_entries_leave_entropy_and_gradient_finite_and_logits_unchanged(temperature):
    # -inf logits (a masked vocabulary entry) have probability 0: the entropy and the gradient are
    # those of the finite entries alone, computed here as a softmax over them.
    logits = torch.tensor([[[2.0, float("-inf"), 0.5, -1.0], [float("-inf"), 1.0, 1.0, float("-inf")]]])
    targets = torch.tensor([[0, 2]])
    leaf = logits.clone().requires_grad_(True)
    logps, entropy = token_logprobs_and_entropy(leaf, targets, temperature, chunk_tokens=1)
    logps.sum().backward()
    assert torch.equal(leaf.detach(), logits)  # the caller's logits are not scaled or normalised in place
    for t, finite in enumerate([[0, 2, 3], [1, 2]]):
        z = [logits[0, t, v].item() / temperature for v in finite]
        log_norm = math.log(sum(math.exp(v) for v in z))
        p = [math.exp(v - log_norm) for v in z]
        assert entropy[0, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-6)
        expected_grad = [0.0] * 4  # d log p_y / d z_v = (1[v == y] - p_v) / T
        for v, q in zip(finite, p):
            expected_grad[v] = ((v == targets[0, t].item()) - q) / temperature
        assert leaf.grad[0, t].tolist() == pytest.approx(expected_grad, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
# L = 6: 1 and 4 split rows (4 leaves a piece of 2), 12 takes 2 of the 5 rows a block, 100 all.
@pytest.mark.parametrize("chunk_tokens", [1, 4, 12, 100])
def test_chunked_logps_match_unchunked_values_and_gradients(dtype, temperature, chunk_tokens):
    gen = torch.Generator().manual_seed(1)
    full = (torch.randn(5, 7, 33, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, 33, (5, 6), generator=gen)
    upstream = torch.randn(5, 6, generator=gen)
    # A non-contiguous [:, :-1] view, as the module passes it.
    a = full.clone().requires_grad_(True)
    logps, entropy = token_logprobs_and_entropy(a[:, :-1], targets, temperature, chunk_tokens)
    b = full.clone().requires_grad_(True)
    ref_logps, ref_entropy = reference_logps_entropy(b[:, :-1], targets, temperature)
    assert logps.dtype == entropy.dtype == torch.float32
    assert not entropy.requires_grad
    torch.testing.assert_close(logps, ref_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
    (logps * upstream).sum().backward()
    (ref_logps * upstream).sum().backward()
    assert a.grad.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    torch.testing.assert_close(a.grad.float(), b.grad.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 100])
@pytest.mark.parametrize("head_trainable", [False, True])
def test_head_on_hidden_states_matches_autograd_through_linear_and_log_softmax(
    dtype, chunk_tokens, head_trainable
):
    gen = torch.Generator().manual_seed(2)
    hidden_full = torch.randn(5, 7, 16, generator=gen).to(dtype)
    weight0 = (torch.randn(33, 16, generator=gen) / 2).to(dtype)
    bias0 = torch.randn(33, generator=gen).to(dtype)
    targets = torch.randint(0, 33, (5, 6), generator=gen)
    upstream = torch.randn(5, 6, generator=gen)

    def leaves():
        return (
            hidden_full.clone().requires_grad_(True),
            weight0.clone().requires_grad_(head_trainable),
            bias0.clone().requires_grad_(head_trainable),
        )

    h, w, b = leaves()
    logps, entropy = token_logprobs_and_entropy(
        h[:, :-1], targets, 0.8, chunk_tokens, head_weight=w, head_bias=b
    )
    rh, rw, rb = leaves()
    ref_logps, ref_entropy = reference_logps_entropy(
        torch.nn.functional.linear(rh[:, :-1], rw, rb), targets, 0.8
    )
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(logps, ref_logps, **tol)
    torch.testing.assert_close(entropy, ref_entropy, **tol)
    (logps * upstream).sum().backward()
    (ref_logps * upstream).sum().backward()
    assert h.grad.dtype == dtype
    torch.testing.assert_close(h.grad.float(), rh.grad.float(), **tol)
    if head_trainable:
        torch.testing.assert_close(w.grad.float(), rw.grad.float(), **tol)
        torch.testing.assert_close(b.grad.float(), rb.grad.float(), **tol)
    else:
        assert w.grad is None and b.grad is None


def test_head_never_saves_logits_and_ignores_autocast():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 5, 8, generator=gen, requires_grad=True)
    weight = torch.randn(50, 8, generator=gen)
    targets = torch.randint(0, 50, (4, 5), generator=gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape[-1]) or t, lambda t: t):
        # the head runs in its weight's dtype, as in backward
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, _ = token_logprobs_and_entropy(hidden, targets, chunk_tokens=3, head_weight=weight)
    assert saved and 50 not in saved  # hidden states, targets and the [V, D] weight; no [..., V] logits
    ref_logps, _ = reference_logps_entropy(hidden.detach() @ weight.T, targets, 1.0)
    torch.testing.assert_close(logps, ref_logps, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"hidden states \[N, L, 8\]"):
        token_logprobs_and_entropy(torch.randn(4, 5, 9), targets, head_weight=weight)


def test_no_full_fp32_logits_are_saved_for_backward():
    logits = torch.randn(6, 4, 50, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append((t.dtype, t.numel())) or t, lambda t: t
    ):
        logps, _ = token_logprobs_and_entropy(logits, torch.zeros(6, 4, dtype=torch.long), chunk_tokens=8)
    assert (torch.float32, logits.numel()) not in saved
    logps.sum().backward()
    assert logits.grad.shape == logits.shape


def test_logps_work_without_grad_and_validate_shapes():
    with torch.no_grad():
        logps, _ = token_logprobs_and_entropy(torch.randn(3, 2, 5), torch.zeros(3, 2, dtype=torch.long))
    assert logps.shape == (3, 2) and not logps.requires_grad
    with pytest.raises(ValueError, match=r"\(3, 2, 5\) and \(3, 3\)"):
        token_logprobs_and_entropy(torch.randn(3, 2, 5), torch.zeros(3, 3, dtype=torch.long))


@pytest.mark.parametrize("chunk_tokens", [2, 100])
def test_scored_positions_match_all_positions_there_and_are_zero_elsewhere(chunk_tokens):
    gen = torch.Generator().manual_seed(4)
    hidden_full = torch.randn(3, 6, 8, generator=gen)
    weight = torch.randn(40, 8, generator=gen)
    targets = torch.randint(0, 40, (3, 6), generator=gen)
    upstream = torch.randn(3, 6, generator=gen)
    # Responses of 6, 2 and 0 scored tokens (an all-padding row, as a masked truncated response is).
    positions = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0], [0] * 6], dtype=torch.bool)
    h = hidden_full.clone().requires_grad_(True)
    logps, entropy = token_logprobs_and_entropy(
        h, targets, 0.9, chunk_tokens, head_weight=weight, positions=positions
    )
    rh = hidden_full.clone().requires_grad_(True)
    ref_logps, ref_entropy = reference_logps_entropy(torch.nn.functional.linear(rh, weight), targets, 0.9)
    torch.testing.assert_close(logps[positions], ref_logps[positions], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[positions], ref_entropy[positions], rtol=1e-5, atol=1e-5)
    assert logps[~positions].eq(0).all() and entropy[~positions].eq(0).all()
    (logps * upstream).sum().backward()
    (ref_logps * upstream * positions).sum().backward()
    torch.testing.assert_close(h.grad, rh.grad, rtol=1e-5, atol=1e-6)
    assert h.grad[~positions].eq(0).all()


def test_no_scored_position_gives_zeros_and_a_zero_gradient():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    logps, entropy = token_logprobs_and_entropy(
        hidden,
        torch.zeros(2, 3, dtype=torch.long),
        head_weight=torch.randn(5, 4),
        positions=torch.zeros(2, 3, dtype=torch.bool),
    )
    logps.sum().backward()
    assert logps.eq(0).all() and entropy.eq(0).all() and hidden.grad.eq(0).all()


def test_positions_of_another_shape_are_refused():
    with pytest.raises(ValueError, match="positions must be"):
        token_logprobs_and_entropy(
            torch.randn(2, 3, 4),
            torch.zeros(2, 3, dtype=torch.long),
            head_weight=torch.randn(5, 4),
            positions=torch.ones(2, 4, dtype=torch.bool),
        )
