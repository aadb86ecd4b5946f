"""policy_loss against TRL 1.16's own ``GRPOTrainer._compute_loss`` on the same tensors.

TRL's method runs unchanged on a stand-in trainer: its options, one process, and a policy whose
forward returns the given log-probs and entropies (leaves, so both sides' gradients w.r.t. them
can be compared). Per-token credit enters TRL as [n, L] advantages w_t · A_i, the form its
``_compute_loss`` accepts. Needs the ``bench`` extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lightning_flow.objectives import entropy_threshold, policy_loss
from tests.test_objectives import (
    CLIPPED,
    EPSILON_HIGH,
    KEEP,
    LEVELS,
    LOSS_TYPES,
    MODIFIERS,
    batch,  # noqa: F401 (the fixture)
)

trl = pytest.importorskip(
    "trl", reason="TRL is not installed (the optional 'bench' extra: pip install -e '.[bench]')"
)
if trl.__version__ != "1.16.0":
    pytest.skip(
        f"these tests pin TRL 1.16.0's definitions; installed is {trl.__version__}", allow_module_level=True
    )
from trl import GRPOTrainer  # noqa: E402

# TRL picks SAPO's temperature with torch.where over python floats, which makes a float32 tensor:
# temperatures exact in float32 keep the comparison at float64 precision.
SAPO_TEMPERATURES = (1.0, 1.25)


class TRLLossOnly:
    """A stand-in ``self`` for TRL's ``_compute_loss`` and ``get_high_entropy_mask``."""

    _compute_loss = GRPOTrainer._compute_loss
    get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask

    def __init__(self, logps, entropy, loss_type, level, spec, accumulation):
        self.outputs = (logps, entropy)
        self.loss_type, self.importance_sampling_level = loss_type, level
        self.epsilon_low, self.epsilon_high = 0.2, EPSILON_HIGH.get(loss_type, 0.28)
        self.beta = spec.get("beta", 0.0)
        self.top_entropy_quantile = KEEP if spec.get("mask_entropy") else 1.0
        self.entropy_coef = spec.get("entropy_coef", 0.0)
        self._entropy_bonus_enabled, self.use_adaptive_entropy = self.entropy_coef != 0, False
        self.off_policy_mask_threshold, self.use_vllm, self.aux_loss_enabled = None, False, False
        self.max_completion_length, self.current_gradient_accumulation_steps = 6, accumulation
        self.args = SimpleNamespace(
            use_bias_correction_kl=spec.get("kl_bias_correction", True),
            delta=spec.get("delta") if loss_type in CLIPPED else None,
            sapo_temperature_pos=SAPO_TEMPERATURES[0],
            sapo_temperature_neg=SAPO_TEMPERATURES[1],
            steps_per_generation=accumulation,
        )
        self.model = SimpleNamespace(training=True)
        self.accelerator = SimpleNamespace(
            num_processes=1,
            sync_gradients=True,
            gather=lambda t: t,
            gather_for_metrics=lambda t: t,
            reduce=lambda t, reduction: t,
            pad_across_processes=lambda t, dim, pad_index: t,
        )
        self._metrics = {"train": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        return (*self.outputs, None)


@pytest.fixture(scope="module")
def trl_batch(batch):  # noqa: F811 (the fixture imported above)
    """The objectives' batch, but TRL exponentiates padding log-ratios unmasked: a finite one there."""
    old = batch["old"].clone()
    old[5] = batch["logps"][5] - 0.3
    return {**batch, "old": old}


def both_losses(
    batch,  # noqa: F811 (a plain argument)
    loss_type,
    level,
    spec,
    rows,
    accumulation,
):
    mask, adv = batch["mask"][rows], batch["adv"][rows]
    weights = batch["weights"][rows] if spec.get("weights") else torch.ones_like(mask)
    tokens = batch["mask"].sum()  # of the whole generation batch

    theirs_logps = batch["logps"][rows].clone().requires_grad_(True)
    theirs_entropy = batch["entropy"][rows].clone().requires_grad_(True)
    trainer = TRLLossOnly(theirs_logps, theirs_entropy, loss_type, level, spec, accumulation)
    n, length = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, length, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv[:, None] * weights,
        "old_per_token_logps": batch["old"][rows],
        "ref_per_token_logps": batch["ref"][rows],
        "num_items_in_batch": tokens,
    }
    theirs = trainer._compute_loss(None, inputs)

    ours_logps = batch["logps"][rows].clone().requires_grad_(True)
    ours_entropy = batch["entropy"][rows].clone().requires_grad_(True)
    ours, _ = policy_loss(
        ours_logps,
        batch["old"][rows],
        adv,
        mask,
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon_high=trainer.epsilon_high,
        delta=trainer.args.delta,
        sapo_temperature_pos=SAPO_TEMPERATURES[0],
        sapo_temperature_neg=SAPO_TEMPERATURES[1],
        beta=trainer.beta,
        ref_logps=batch["ref"][rows],
        kl_bias_correction=trainer.args.use_bias_correction_kl,
        token_weights=weights,
        entropy=ours_entropy,
        entropy_threshold=entropy_threshold(ours_entropy.detach(), mask, KEEP)
        if spec.get("mask_entropy")
        else None,
        entropy_coef=trainer.entropy_coef,
        max_completion_length=6,
        num_items_in_batch=tokens,
        num_micro_batches=accumulation,
    )
    grads = [
        torch.autograd.grad(loss, [lp, h], allow_unused=True)
        for loss, lp, h in ((theirs, theirs_logps, theirs_entropy), (ours, ours_logps, ours_entropy))
    ]
    return (theirs, ours), [[torch.zeros_like(mask) if g is None else g for g in pair] for pair in grads]


def assert_same(losses, grads):
    (theirs, ours), ((their_logps, their_entropy), (our_logps, our_entropy)) = losses, grads
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10, abs=1e-14)
    torch.testing.assert_close(our_logps, their_logps, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(our_entropy, their_entropy, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("modifier", list(MODIFIERS))
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_one_micro_batch_equals_trl(trl_batch, loss_type, level, modifier):
    assert_same(*both_losses(trl_batch, loss_type, level, MODIFIERS[modifier], slice(None), accumulation=1))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_two_accumulated_micro_batches_equal_trl(trl_batch, loss_type, level):
    """TRL takes the entropy threshold of each micro-batch, ours of the generation batch, so the
    high-entropy mask is left out here (they agree when the step is one micro-batch, above)."""
    everything_but_the_mask = {**MODIFIERS["all"], "mask_entropy": False}
    losses, grads = [], []
    for rows in (slice(0, 4), slice(4, 8)):
        pair, pair_grads = both_losses(
            trl_batch, loss_type, level, everything_but_the_mask, rows, accumulation=2
        )
        losses.append(pair)
        grads.append(pair_grads)
    theirs, ours = (sum(pair[side] for pair in losses) for side in (0, 1))
    stacked = [[torch.cat([g[side][which] for g in grads]) for which in (0, 1)] for side in (0, 1)]
    assert_same((theirs, ours), stacked)
