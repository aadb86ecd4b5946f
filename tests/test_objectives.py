"""Every objective and option of lightning_flow.objectives against the float64 formulas of
tests/test_loss.py (loss value and gradient w.r.t. the current log-probs, token by token), on a
batch that looks like the second of μ = 2 iterations: ratios clipped on both sides at both
levels, ragged masks, an empty response, a zero-advantage group, non-uniform token weights.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import get_args

import pytest
import torch

from lightning_flow.loss import token_logprobs_and_entropy
from lightning_flow.module import GRPOConfig
from lightning_flow.objectives import (
    OBJECTIVES,
    LossType,
    entropy_threshold,
    gradient_accumulation_divisor,
    policy_loss,
)
from tests.test_loss import reference_entropy_bonus, reference_loss, reference_quantile, to_lists

LOSS_TYPES = list(get_args(LossType))
CLIPPED = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]
LEVELS = ["token", "sequence"]
EPSILON_HIGH = {"cispo": 1.3}  # cispo's cap on the ratio itself (TRL's ε_max); 1.3 so that some tokens hit it
DELTA = 1.4
KEEP = 0.4  # top_entropy_quantile


@pytest.fixture(scope="module")
def batch():
    """8 responses x 5 tokens (groups of 2). Per-token log-ratios and, per row, the sequence ratio:

    row 0 A=+1.0  ρ_t 1.5 (high clip) 0.5 0.1 ... ; sequence ρ 0.95 (inside)
    row 1 A=-0.5  ρ_t 1.5 (> δ) 0.5 (low clip) ...; sequence ρ 0.89
    row 2 A=+0.7  ρ_t up to 1.8;                  sequence ρ 1.35 (high clip, below δ)
    row 3 A=-1.2  ρ_t 0.61 0.67 0.90 0.74;        sequence ρ 0.72 (low clip)
    row 4 A=-0.8  ρ_t 1.82 1.65 1.49 (> δ);       sequence ρ 1.65 (> δ)
    row 5 A=+2.0  no valid token, a log-ratio of 800 that would overflow exp if not masked
    rows 6, 7     A = 0: a group whose rewards were all equal
    """
    log_ratio = torch.tensor(
        [
            [math.log(1.5), math.log(0.5), 0.1, 0.0, 0.05],
            [math.log(1.5), math.log(0.5), -0.05, 0.3, 0.0],
            [0.6, 0.5, 0.3, 0.1, 0.0],
            [-0.5, -0.4, -0.1, -0.3, 0.0],
            [0.6, 0.5, 0.4, 0.0, 0.0],
            [800.0] * 5,
            [0.3, -0.2, 0.1, 0.0, 0.0],
            [-0.3, 0.25, 0.0, 0.1, 0.2],
        ],
        dtype=torch.float64,
    )
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.float64,
    )
    gen = torch.Generator().manual_seed(20)
    logps = -0.1 - 2.9 * torch.rand(8, 5, generator=gen, dtype=torch.float64)
    # Distinct entropies that are exact in float32 (multiples of 1/8): no quantile lands on a tie by rounding.
    entropy = (torch.randperm(40, generator=gen).reshape(8, 5).to(torch.float64) + 1) / 8
    weights = 0.25 + 1.75 * torch.rand(8, 5, generator=gen, dtype=torch.float64)
    weights[0, 2] = 0.0  # a token credit switches off
    return {
        "logps": logps,
        "old": logps - log_ratio,
        "mask": mask,
        "adv": torch.tensor([1.0, -0.5, 0.7, -1.2, -0.8, 2.0, 0.0, 0.0], dtype=torch.float64),
        "ref": logps + 0.3 * torch.randn(8, 5, generator=gen, dtype=torch.float64),
        "entropy": entropy,
        "weights": weights,
    }


def valid_entropies(batch) -> list[float]:
    return [
        h for hs, ms in zip(to_lists(batch["entropy"]), to_lists(batch["mask"])) for h, m in zip(hs, ms) if m
    ]


MODIFIERS = {
    "plain": {},
    "weights": {"weights": True},
    "delta": {"delta": DELTA},
    "entropy_mask": {"mask_entropy": True},
    "kl": {"beta": 0.05, "kl_bias_correction": True},
    "kl_uncorrected": {"beta": 0.05, "kl_bias_correction": False},
    "entropy_bonus": {"entropy_coef": 0.03},
    "all": {
        "weights": True,
        "delta": DELTA,
        "mask_entropy": True,
        "beta": 0.05,
        "kl_bias_correction": True,
        "entropy_coef": 0.03,
    },
}


def options(batch, loss_type, level, modifier, rows=slice(None)):
    """(keyword arguments of policy_loss, of reference_loss, entropy bonus coefficient, threshold) for one
    setting."""
    spec = dict(MODIFIERS[modifier])
    delta = spec.get("delta") if loss_type in CLIPPED else None
    threshold = reference_quantile(valid_entropies(batch), 1 - KEEP) if spec.get("mask_entropy") else None
    weights = batch["weights"][rows] if spec.get("weights") else None
    mask = batch["mask"][rows]
    ours = {
        "loss_type": loss_type,
        "importance_sampling_level": level,
        "epsilon_high": EPSILON_HIGH.get(loss_type, 0.28),
        "delta": delta,
        "beta": spec.get("beta", 0.0),
        "ref_logps": batch["ref"][rows],
        "kl_bias_correction": spec.get("kl_bias_correction", True),
        "token_weights": weights,
        "entropy": batch["entropy"][rows],
        "entropy_threshold": threshold,
        "entropy_coef": spec.get("entropy_coef", 0.0),
        "max_completion_length": 6,
        "num_items_in_batch": int(batch["mask"].sum()),
    }
    reference = {
        "eps_high": ours["epsilon_high"],
        "beta": ours["beta"],
        "ref": to_lists(batch["ref"][rows]),
        "kl_correction": ours["kl_bias_correction"],
        "weights": None if weights is None else to_lists(weights),
        "max_len": 6,
        "num_items": ours["num_items_in_batch"],
        "level": level,
        "delta": delta,
        "entropy": to_lists(batch["entropy"][rows]),
        "threshold": threshold,
    }
    return ours, reference, ours["entropy_coef"], threshold, mask


def run(batch, rows=slice(None), num_micro_batches=1, **kwargs):
    """(loss, d loss / d logps, d loss / d entropy, stats) of policy_loss on ``rows``."""
    logps = batch["logps"][rows].clone().requires_grad_(True)
    entropy = kwargs.pop("entropy").clone().requires_grad_(True)
    loss, stats = policy_loss(
        logps,
        batch["old"][rows],
        batch["adv"][rows],
        batch["mask"][rows],
        entropy=entropy,
        num_micro_batches=num_micro_batches,
        **kwargs,
    )
    grad_logps, grad_entropy = torch.autograd.grad(loss, [logps, entropy], allow_unused=True)
    return loss, grad_logps, torch.zeros_like(entropy) if grad_entropy is None else grad_entropy, stats


def expected(batch, loss_type, reference, coef, threshold, rows=slice(None), num_micro_batches=1):
    loss, grad = reference_loss(
        to_lists(batch["logps"][rows]),
        to_lists(batch["old"][rows]),
        to_lists(batch["adv"][rows]),
        to_lists(batch["mask"][rows]),
        loss_type,
        num_micro_batches=num_micro_batches,
        **reference,
    )
    bonus, grad_entropy = reference_entropy_bonus(
        reference["entropy"], to_lists(batch["mask"][rows]), coef, threshold, num_micro_batches
    )
    return (
        loss + bonus,
        torch.tensor(grad, dtype=torch.float64),
        torch.tensor(grad_entropy, dtype=torch.float64),
    )


def assert_matches(got, want):
    loss, grad, grad_entropy = got
    want_loss, want_grad, want_grad_entropy = want
    assert not torch.isnan(loss) and not grad.isnan().any()
    assert loss.item() == pytest.approx(want_loss, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad_entropy, want_grad_entropy, rtol=1e-12, atol=1e-15)


# ---- every objective × ratio level × option, against the formula ----------------------------
def test_every_loss_type_is_registered_once():
    assert set(LOSS_TYPES) == set(OBJECTIVES)


@pytest.mark.parametrize("modifier", list(MODIFIERS))
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_value_and_gradient_match_the_formula(batch, loss_type, level, modifier):
    ours, reference, coef, threshold, _ = options(batch, loss_type, level, modifier)
    loss, grad, grad_entropy, _ = run(batch, **ours)
    assert_matches((loss, grad, grad_entropy), expected(batch, loss_type, reference, coef, threshold))


def test_the_batch_clips_on_both_sides_at_both_levels(batch):
    """The fixture really exercises both clip branches and delta (else the tests above would not)."""
    for level in LEVELS:
        ours, *_ = options(batch, "grpo", level, "plain")
        _, _, _, stats = run(batch, **ours)
        assert stats.clip_ratio_low > 0 and stats.clip_ratio_high > 0, level
    plain, *_ = options(batch, "grpo", "token", "plain")
    with_delta, *_ = options(batch, "grpo", "token", "delta")
    assert not torch.equal(run(batch, **plain)[1], run(batch, **with_delta)[1])


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_advantage_group_and_empty_response_give_no_policy_gradient(batch, loss_type, level):
    ours, *_ = options(batch, loss_type, level, "weights")
    _, grad, _, _ = run(batch, **ours)
    assert grad[5:].eq(0).all()  # the empty response and the zero-advantage group
    assert grad[:5].ne(0).any()
    ours, *_ = options(batch, loss_type, level, "kl")
    _, grad, _, _ = run(batch, **ours)
    assert grad[6:].ne(0).any() and grad[5].eq(0).all()  # the KL term still pulls the zero-advantage rows


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_accumulation_over_micro_batches(batch, loss_type, level):
    """Two micro-batches of 4 responses, every option on: the shares add up to the step's loss as
    TRL accumulates it (the entropy bonus a mean of the micro-batches' means), and the policy
    part, but for bnpo (a mean over each micro-batch's own tokens), to the whole batch's."""
    total, bonus, grad, grad_entropy = (
        0.0,
        0.0,
        torch.zeros_like(batch["logps"]),
        torch.zeros_like(batch["entropy"]),
    )
    want_total, want_grad, want_grad_entropy = 0.0, torch.zeros_like(grad), torch.zeros_like(grad)
    for rows in (slice(0, 4), slice(4, 8)):
        ours, reference, coef, threshold, mask = options(batch, loss_type, level, "all", rows)
        loss, grad[rows], grad_entropy[rows], _ = run(batch, rows, num_micro_batches=2, **ours)
        total += loss.item()
        want = expected(batch, loss_type, reference, coef, threshold, rows, num_micro_batches=2)
        want_total += want[0]
        want_grad[rows], want_grad_entropy[rows] = want[1], want[2]
        bonus += reference_entropy_bonus(
            reference["entropy"], to_lists(mask), coef, threshold, num_micro_batches=2
        )[0]
    assert_matches(
        (torch.tensor(total, dtype=torch.float64), grad, grad_entropy),
        (want_total, want_grad, want_grad_entropy),
    )
    if loss_type != "bnpo":
        _, reference, *_ = options(batch, loss_type, level, "all")
        whole_loss, whole_grad = reference_loss(
            to_lists(batch["logps"]),
            to_lists(batch["old"]),
            to_lists(batch["adv"]),
            to_lists(batch["mask"]),
            loss_type,
            **reference,
        )
        assert total - bonus == pytest.approx(whole_loss, rel=1e-12)
        torch.testing.assert_close(
            grad, torch.tensor(whole_grad, dtype=torch.float64), rtol=1e-12, atol=1e-15
        )


def test_accumulation_divisor_follows_the_normaliser():
    assert {t: gradient_accumulation_divisor(t, 4) for t in LOSS_TYPES} == {
        "grpo": 4,
        "bnpo": 4,
        "dr_grpo": 4,
        "dapo": 1,
        "cispo": 1,
        "sapo": 4,
        "luspo": 4,
    }


# ---- what a token weight means --------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "sapo", "luspo"])
def test_under_sequence_ratios_a_token_weight_only_scales_its_response(batch, loss_type):
    """With one ratio per response every token's log-prob enters only through it, so weights
    w_t ≥ 0 act as the response's advantage times their mean over its tokens: the same loss and
    gradient as uniform weights with A_i · mean_t(w_t)."""
    ours, *_ = options(batch, loss_type, "sequence", "weights")
    weighted = run(batch, **ours)
    mask, weights = batch["mask"], batch["weights"]
    mean_weight = (weights * mask).sum(1) / mask.sum(1).clamp(min=1)
    uniform = run({**batch, "adv": batch["adv"] * mean_weight}, **{**ours, "token_weights": None})
    torch.testing.assert_close(weighted[0], uniform[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(weighted[1], uniform[1], rtol=1e-12, atol=1e-15)
    # ... and so moving the weight between a response's tokens changes nothing.
    shuffled = weights.clone()
    shuffled[2] = weights[2].flip(0)
    moved = run(batch, **{**ours, "token_weights": shuffled})
    torch.testing.assert_close(moved[1][2], weighted[1][2], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("level", LEVELS)
def test_cispo_keeps_a_per_token_weight_at_both_levels(batch, level):
    """CISPO's ratio is a detached coefficient, so a token's gradient is -c · w_t · A_i / N: its own
    weight."""
    ours, *_ = options(batch, "cispo", level, "weights")
    _, grad, _, _ = run(batch, **ours)
    _, grad_uniform, _, _ = run(batch, **{**ours, "token_weights": None})
    valid = (batch["mask"] > 0) & (batch["adv"][:, None] != 0)
    torch.testing.assert_close(grad[valid], (grad_uniform * batch["weights"])[valid], rtol=1e-12, atol=1e-15)


# ---- the high-entropy threshold ---------------------------------------------------------------
@pytest.mark.parametrize("keep", [0.2, 0.4, 0.5, 1.0])
def test_entropy_threshold_is_the_quantile_of_the_valid_tokens(batch, keep):
    threshold = entropy_threshold(batch["entropy"], batch["mask"], keep)
    assert threshold.item() == pytest.approx(reference_quantile(valid_entropies(batch), 1 - keep), rel=1e-12)
    kept = (batch["entropy"] >= threshold) & (batch["mask"] > 0)
    assert kept.sum().item() == pytest.approx(keep * batch["mask"].sum().item(), abs=1)  # about that share


def test_entropy_threshold_of_no_valid_token_keeps_nothing_and_refuses_a_bad_share(batch):
    assert entropy_threshold(batch["entropy"], torch.zeros_like(batch["mask"]), 0.2).item() == math.inf
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="top_entropy_quantile"):
            entropy_threshold(batch["entropy"], batch["mask"], bad)


def test_masked_tokens_report_their_share(batch):
    ours, *_ = options(batch, "grpo", "token", "entropy_mask")
    _, grad, _, stats = run(batch, **ours)
    kept = (batch["entropy"] >= ours["entropy_threshold"]) & (batch["mask"] > 0)
    assert stats.policy_token_fraction.item() == pytest.approx(kept.sum().item() / batch["mask"].sum().item())
    assert grad[~kept].eq(0).all()  # no KL here: the masked tokens get no gradient at all


# ---- the entropy bonus through the log-softmax ----------------------------------------------
def test_entropy_bonus_gradient_reaches_the_logits_exactly():
    """From logits: the objective with an entropy bonus against float64 autograd through an
    explicit log-softmax, with a masked vocabulary entry, temperature and row chunks."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 4, 9, generator=gen, dtype=torch.float64) * 2
    logits[0, 1, 3] = -math.inf
    targets = torch.randint(0, 9, (3, 4), generator=gen)
    targets[0, 1] = 0
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    old = -torch.rand(3, 4, generator=gen, dtype=torch.float64) * 3
    kwargs = {"loss_type": "dapo", "num_items_in_batch": 12, "entropy_coef": 0.1, "entropy_threshold": 1.2}

    ours = logits.clone().requires_grad_(True)
    logps, entropy = token_logprobs_and_entropy(
        ours, targets, temperature=0.7, chunk_tokens=3, entropy_grad=True
    )
    loss, _ = policy_loss(logps.double(), old, adv, mask, entropy=entropy.double(), **kwargs)
    loss.backward()

    exact = logits.clone().requires_grad_(True)
    log_p = torch.log_softmax(exact / 0.7, dim=-1)
    exact_logps = log_p.gather(-1, targets[..., None]).squeeze(-1)
    exact_entropy = -(log_p.exp() * log_p.masked_fill(log_p == -math.inf, 0.0)).sum(-1)
    exact_loss, _ = policy_loss(exact_logps, old, adv, mask, entropy=exact_entropy, **kwargs)
    exact_loss.backward()
    assert loss.item() == pytest.approx(exact_loss.item(), rel=1e-6)
    assert ours.grad.isfinite().all()
    torch.testing.assert_close(ours.grad, exact.grad, rtol=1e-5, atol=1e-7)
    assert exact.grad[0, 1, 3] == 0 and ours.grad[0, 1, 3] == 0


def test_entropy_stays_detached_unless_asked():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    _, entropy = token_logprobs_and_entropy(logits, torch.zeros(2, 3, dtype=torch.long))
    assert not entropy.requires_grad
    logps, entropy = token_logprobs_and_entropy(
        logits, torch.zeros(2, 3, dtype=torch.long), entropy_grad=True
    )
    assert entropy.requires_grad
    entropy.sum().backward()  # the entropy alone (the log-probs unused) has a gradient too
    assert logits.grad.abs().sum() > 0


# ---- pure-function input checks ---------------------------------------------------------------
def test_policy_loss_refuses_what_it_cannot_compute(batch):
    lp, old, adv, mask = batch["logps"], batch["old"], batch["adv"], batch["mask"]
    with pytest.raises(ValueError, match="importance_sampling_level"):
        policy_loss(lp, old, adv, mask, importance_sampling_level="batch")
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(lp, old, adv, mask, entropy_threshold=1.0)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(lp, old, adv, mask, entropy_coef=0.1)
    with pytest.raises(ValueError, match=r"entropy has shape \(8, 4\)"):
        policy_loss(lp, old, adv, mask, entropy=batch["entropy"][:, :4], entropy_coef=0.1)
    with pytest.raises(ValueError, match="cispo.*epsilon_high"):
        policy_loss(lp, old, adv, mask, loss_type="cispo", num_items_in_batch=10)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        policy_loss(lp, old, adv, mask, loss_type="cispo", epsilon_high=5.0)


# ---- GRPOConfig: bad input before the first step ----------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"top_entropy_quantile": 0.0}, r"model.grpo.top_entropy_quantile=0.0: .* \(0, 1\]"),
        ({"top_entropy_quantile": 1.2}, r"model.grpo.top_entropy_quantile=1.2"),
        ({"delta": 1.2}, r"model.grpo.delta=1.2 must exceed 1 \+ epsilon_high = 1.2"),
        (
            {"delta": 1.25, "epsilon_high": 0.28},
            r"model.grpo.delta=1.25 must exceed 1 \+ epsilon_high = 1.28",
        ),
        ({"delta": 2.0, "loss_type": "sapo"}, r"model.grpo.delta=2.0: .*not loss_type=sapo"),
        (
            {"loss_type": "cispo"},
            r"model.grpo.epsilon_high=None: loss_type=cispo caps the ratio at epsilon_high itself",
        ),
        ({"loss_type": "cispo", "epsilon_high": 0.28}, r"model.grpo.epsilon_high=0.28"),
        ({"sapo_temperature_neg": 0.0}, r"model.grpo.sapo_temperature_neg=0.0 must be > 0"),
    ],
)
def test_config_refuses_bad_options_naming_them(fields, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**fields)


@pytest.mark.parametrize("loss_type", ["bnpo", "dr_grpo", "dapo", "cispo"])
def test_config_warns_of_sequence_ratios_in_a_loss_that_sums_tokens(loss_type):
    with pytest.warns(
        UserWarning,
        match=f"importance_sampling_level=sequence with loss_type={loss_type}: this loss sums token terms",
    ):
        GRPOConfig(
            loss_type=loss_type,
            importance_sampling_level="sequence",
            epsilon_high=5.0 if loss_type == "cispo" else None,
        )


def test_config_warns_of_token_level_luspo_and_accepts_the_sound_settings():
    with pytest.warns(UserWarning, match="luspo is defined with importance_sampling_level=sequence"):
        GRPOConfig(loss_type="luspo")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GRPOConfig(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4)
        GRPOConfig(loss_type="luspo", importance_sampling_level="sequence")
        GRPOConfig(loss_type="cispo", epsilon_high=5.0, top_entropy_quantile=0.2, entropy_coef=0.01)
        GRPOConfig(loss_type="dapo", epsilon_high=0.28, delta=1.5)


# ---- the demo configs of the objectives ------------------------------------------------------
def test_every_objective_demo_config_is_valid_and_reaches_the_credit_study():
    """Each demo config's model.grpo section builds a GRPOConfig without a warning, and
    credit_study.py passes exactly that section on top of a task config."""
    import sys

    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from credit_study import LOSSES, loss_overrides, run_name

    for loss, config in LOSSES.items():
        if config is None:
            assert loss_overrides(loss) == [] and run_name(loss, "flow") == "flow"
            continue
        grpo = yaml.safe_load((Path(__file__).resolve().parents[1] / config).read_text())["model"]["grpo"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            GRPOConfig(**grpo)
        assert grpo["num_iterations"] == 2  # off-policy, where the objectives differ
        assert loss_overrides(loss) == [f"--model.grpo.{key}={value}" for key, value in grpo.items()]
        assert run_name(loss, "flow") == f"{loss}-flow"
