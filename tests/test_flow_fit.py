"""Flow credit end to end: the callback in a real fit, every comparison signal, capture reuse, and
the flow invariants on real attention captured from stories260K."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch
from lightning_flow.callbacks import FlowCredit

from lightning_flow.capture import capture_attention, default_capture_layers
from lightning_flow.cli import main
from lightning_flow.flow import FlowConfig, answer_flow, dense_graph, edge_flow
from lightning_flow.policy import PolicyConfig, load_policy, position_ids_from_mask
from lightning_flow.rollouts import RolloutCallback, Rollouts
from lightning_flow.tokenizer import load_tokenizer

from .test_fit import scalars, tiny_args
from .test_flow import float64_dense_flow, pruned_by_capacity

# nonzero advantages, so rows get credit
VARYING_REWARD = '--model.rewards.custom={"tests.test_fit.length_reward": 1.0}'

FLOW = "lightning_flow.callbacks.FlowCredit"


class RecordWeights(RolloutCallback):
    """Keeps what reached the loss (after the update, every row's final weights)."""

    seen: list[torch.Tensor] = []

    graphs: list = []

    def on_rollouts_end(self, trainer, pl_module, rollouts):
        RecordWeights.seen.append(rollouts.token_weights.clone() * rollouts.completion_mask)
        RecordWeights.graphs.append(list(rollouts.flow_graphs))


def fit_with_credit(policy: Path, root: Path, signal: str, *credit_options: str):
    RecordWeights.seen, RecordWeights.graphs = [], []
    return main(
        [
            "fit",
            *tiny_args(policy, root, steps=2),
            "--trainer.limit_val_batches=0",
            f"--trainer.callbacks+={FLOW}",
            f"--trainer.callbacks.signal={signal}",
            *(f"--trainer.callbacks.{option}" for option in credit_options),
            "--trainer.callbacks+=tests.test_flow_fit.RecordWeights",
            VARYING_REWARD,
        ]
    )


@pytest.mark.parametrize("prune_before_solve", [False, True])
def test_flow_credit_fit_logs_and_boosts_the_top_tokens(tiny_policy_dir, tmp_path, prune_before_solve):
    cli = fit_with_credit(tiny_policy_dir, tmp_path, "flow", f"prune_before_solve={prune_before_solve}")
    assert cli.trainer.callbacks[0].flow_config.prune_before_solve is prune_before_solve
    logged = scalars(Path(cli.trainer.log_dir))
    for tag in [
        "credit/answer_found_fraction",
        "credit/fallback_fraction",
        "credit/top_signal_share",
        "credit/time_s",
        "credit/kept_flow",
        "credit/edges_per_token",
        "perf/capture_time_s",
        "perf/capture_share",
        "perf/credit_time_s",
        "perf/credit_share",
    ]:
        assert tag in logged and all(v == v for v in logged[tag]), tag
    # keep_mass 0.999; the cap of 64 does not bind at T < 64 (solved on the pruned graphs: all their flow)
    assert all(0.999 <= v <= 1 for v in logged["credit/kept_flow"])
    assert logged["perf/capture_time_s"][0] > 0  # recorded in the update's forward (mu = 1, beta = 0)
    weights = RecordWeights.seen[0]
    used = weights[weights > 0]
    assert set(used.unique().tolist()) <= {1.0, 1.5}
    fallback = logged["credit/fallback_fraction"][0]
    if fallback < 1:
        assert (used == 1.5).any()
    # The step kept the solved graph of every credited row: its f decides the boosted tokens.
    graphs = RecordWeights.graphs[0]
    rows = [row for chunk, _ in graphs for row in chunk]
    assert rows == sorted(rows) and len(rows) == len(set(rows)) > 0
    for chunk, batch in graphs:
        assert batch.num_graphs == len(chunk) and batch.f.shape == batch.h.shape == (batch.num_nodes,)


@pytest.mark.parametrize("signal", ["uniform", "random", "entropy", "attention_received"])
def test_every_comparison_signal_runs_through_the_same_switch(tiny_policy_dir, tmp_path, signal):
    cli = fit_with_credit(tiny_policy_dir, tmp_path, signal)
    assert cli.trainer.global_step == 2
    weights = RecordWeights.seen[0]
    used = weights[weights > 0]
    if signal == "uniform":
        assert torch.equal(used, torch.ones_like(used))
    else:  # 40% of each response's tokens, rounded, get the boost
        assert (used == 1.5).any() and (used == 1.0).any()
    needs_attention = signal == "attention_received"
    assert (cli.model.attention_layers is not None) == needs_attention


class CountForwards(RolloutCallback):
    """Counts every forward of the policy's decoder (generation steps included) during fit."""

    calls = 0

    def on_fit_start(self, trainer, pl_module):
        CountForwards.calls = 0
        embeddings = pl_module.policy.get_input_embeddings()
        embeddings.register_forward_pre_hook(
            lambda *_: setattr(CountForwards, "calls", CountForwards.calls + 1)
        )


@pytest.mark.parametrize(
    "extra", [[], ["--model.grpo.num_iterations=2"], ["--model.grpo.beta=0.1"]], ids=["mu1", "mu2", "beta"]
)
def test_flow_credit_adds_no_forward_pass(tiny_policy_dir, tmp_path, extra):
    """One step with and without FlowCredit (same seed, so the same samples): the same number of
    policy forwards; the attention is recorded in a pass the step runs anyway."""
    counts = {}
    for credit in (False, True):
        args = [
            "fit",
            *tiny_args(tiny_policy_dir, tmp_path / str(credit), steps=1),
            "--trainer.limit_val_batches=0",
            "--trainer.callbacks+=tests.test_flow_fit.CountForwards",
            *extra,
        ]
        if credit:
            args += [f"--trainer.callbacks+={FLOW}", "--trainer.callbacks.signal=flow"]
        cli = main(args)
        counts[credit] = CountForwards.calls
    assert cli.model.attention_layers is not None
    assert counts[True] == counts[False] > 0


class KeepCreditInputs(RolloutCallback):
    """At each credit call (listed before FlowCredit, so it gets the forward's own maps), keeps the
    micro-batch's inputs, the recorded rows and their maps, entropies and the adapter weights."""

    kept: list[dict] = []

    def on_credit(self, trainer, pl_module, rollouts, micro_batch):
        rows = micro_batch.rows
        chunks = [(chunk, maps.clone()) for chunk, maps in micro_batch.attention_maps()]
        KeepCreditInputs.kept.append(
            {
                "start": rows.start,
                "ids": rollouts.input_ids[rows].clone(),
                "mask": rollouts.attention_mask[rows].clone(),
                "completion": (rollouts.completion_ids[rows].clone(), rollouts.completion_mask[rows].clone()),
                "recorded": [row for chunk, _ in chunks for row in chunk],
                "chunks": [len(chunk) for chunk, _ in chunks],
                "attention": torch.cat([maps for _, maps in chunks]) if chunks else None,
                "entropy": rollouts.entropy[rows].clone(),
                "advantages": rollouts.advantages[rows].clone(),
                "adapter": {
                    k: v.detach().clone() for k, v in pl_module.policy.named_parameters() if v.requires_grad
                },
            }
        )


class AskForEveryRow(RolloutCallback):
    def setup(self, trainer, pl_module, stage):
        pl_module.request_attention(None, zero_advantage_rows=True)


@pytest.mark.parametrize(
    "iterations, every_row, precision, budget",
    [
        (1, False, "32", None),
        (2, False, "32", None),
        (1, True, "32", None),
        (1, False, "bf16-mixed", None),
        (1, True, "32", 1),
        (2, True, "32", 1),
    ],
)
def test_recorded_attention_equals_a_capture_pass(
    tiny_policy_dir, tmp_path, iterations, every_row, precision, budget
):
    """mu = 1 records in the update's grad forward, mu = 2 in the no-grad old log-prob pass; both
    give, micro-batch by micro-batch (16 rows in 8s), the maps and entropies of a separate pass
    with the weights of that moment (under the step's autocast with bf16-mixed precision). Rows
    with a zero advantage are not recorded unless a callback asks for every row. With an attention
    budget of ``budget`` rows' maps, the rows come in chunks of that many (the first recorded by
    the forward, the others by extra passes), with the same maps."""
    KeepCreditInputs.kept = []
    # correctness alone: all advantages 0
    reward = ["--trainer.callbacks+=tests.test_flow_fit.AskForEveryRow"] if every_row else [VARYING_REWARD]
    # tiny_args: T <= 32 prompt + 12 new tokens
    budget_mb = None if budget is None else budget * 4 * 44 * 44 / 2**20
    extra = [] if budget is None else [f"--trainer.callbacks.max_attention_mb={budget_mb}"]
    cli = main(
        [
            "fit",
            *tiny_args(tiny_policy_dir, tmp_path, steps=1),
            "--trainer.limit_val_batches=0",
            "--trainer.callbacks+=tests.test_flow_fit.KeepCreditInputs",
            f"--trainer.callbacks+={FLOW}",
            *extra,
            f"--model.grpo.num_iterations={iterations}",
            f"--trainer.precision={precision}",
            *reward,
        ]
    )
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    module = cli.model
    assert [kept["ids"].shape[0] for kept in KeepCreditInputs.kept] == [8, 8]
    for kept in KeepCreditInputs.kept:
        expected_rows = [kept["start"] + j for j in range(8) if every_row or kept["advantages"][j] != 0]
        assert kept["recorded"] == expected_rows
        # as many rows as fit the budget at this step's length (at least the asked-for number)
        if budget is not None:
            chunk = int(budget_mb * 2**20) // (4 * kept["ids"].shape[1] ** 2)
            assert chunk >= budget and kept["chunks"] == [min(chunk, 8 - i) for i in range(0, 8, chunk)]
    assert any(kept["recorded"] for kept in KeepCreditInputs.kept)
    # extra passes ran
    assert budget is None or any(len(kept["chunks"]) > 1 for kept in KeepCreditInputs.kept)
    parameters = dict(module.policy.named_parameters())
    for kept in KeepCreditInputs.kept:
        if not kept["recorded"]:
            continue
        with torch.no_grad():
            for name, value in kept["adapter"].items():
                parameters[name].copy_(value)
        local = [row - kept["start"] for row in kept["recorded"]]
        with autocast:
            expected = capture_attention(
                module.policy,
                kept["ids"][local],
                kept["mask"][local],
                module.attention_layers,
                position_ids=position_ids_from_mask(kept["mask"][local]),
            )
        assert expected.dtype == torch.float32
        torch.testing.assert_close(kept["attention"], expected, rtol=1e-5, atol=1e-6)
        prompt = kept["ids"].shape[1] - kept["completion"][0].shape[1]
        rollouts = Rollouts(
            **{
                **{f.name: None for f in fields(Rollouts)},
                "prompt_ids": kept["ids"][:, :prompt],
                "prompt_mask": kept["mask"][:, :prompt],
                "completion_ids": kept["completion"][0],
                "completion_mask": kept["completion"][1],
            }
        )
        with torch.no_grad(), autocast:
            entropy = module.completion_logps(rollouts, slice(0, None))[1]
        torch.testing.assert_close(kept["entropy"], entropy, rtol=1e-5, atol=1e-6)


def test_flow_credit_fit_on_real_stories260k(stories260k, shared_data, tmp_path):
    RecordWeights.seen = []
    cli = main(
        [
            "fit",
            "--config",
            str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"),
            f"--model.policy.name_or_path={stories260k}",
            "--trainer.max_steps=1",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            "--trainer.limit_val_batches=0",
            "--model.sampling.num_generations=4",
            "--model.sampling.max_new_tokens=32",
            "--model.grpo.micro_batch_size=8",
            "--data=lightning_flow.datamodules.MathDataModule",
            f"--data.train={shared_data / 'gsm8k' / 'test.jsonl'}",
            "--data.limit=16",
            "--data.val_size=4",
            "--data.batch_size=2",
            "--data.max_prompt_length=512",
            f"--trainer.callbacks+={FLOW}",
            "--trainer.callbacks+=tests.test_flow_fit.RecordWeights",
            VARYING_REWARD,
        ]
    )
    logged = scalars(Path(cli.trainer.log_dir))
    # A story model never writes \boxed{}: the answer falls back to the last token, and flow still routes to
    # it.
    assert logged["credit/answer_found_fraction"][0] == 0.0
    assert logged["credit/fallback_fraction"][0] < 1.0
    assert (RecordWeights.seen[0] == 1.5).any()


def test_flow_invariants_on_real_stories260k_attention(stories260k):
    """Real captured attention, a padded batch: the answer absorbs exactly one unit of flow."""
    model = load_policy(PolicyConfig(str(stories260k), lora_rank=4))
    tokenizer = load_tokenizer(str(stories260k))
    prompts = tokenizer(
        ["Once upon a time", "Lily saw a big red ball in the park and"], return_tensors="pt", padding=True
    )
    model.eval()
    with torch.no_grad():
        sequences = model.generate(
            **prompts,
            max_new_tokens=40,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=None,
        )
    prompt_length = prompts.input_ids.shape[1]
    mask = torch.cat(
        [prompts.attention_mask, torch.ones(2, sequences.shape[1] - prompt_length, dtype=torch.long)], dim=1
    )
    mask[1, -5:] = 0  # right padding on the second response
    layers = default_capture_layers(model.config.num_hidden_layers)
    attention = capture_attention(model, sequences, mask, layers, position_ids=position_ids_from_mask(mask))
    valid = mask.bool()
    prompt = torch.zeros_like(valid)
    prompt[:, :prompt_length] = valid[:, :prompt_length]
    answer = torch.zeros_like(valid)
    answer[0, -8:-5] = True  # three tokens before the end; tokens after them must get nothing
    answer[1, -10:-7] = True
    result = answer_flow(attention, valid, prompt, answer, FlowCredit().flow_config)  # the default pruning
    assert not result.degenerate.any()
    # The credit is exact: two dense float64 solves per response, written out in the tests.
    flow, log_h, degenerate = float64_dense_flow(attention, valid, prompt, answer)
    assert not degenerate.any()
    torch.testing.assert_close(result.flow.double(), flow, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.absorbed, torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close((result.flow * answer).sum(1), torch.ones(2), atol=1e-5, rtol=0)
    after = torch.zeros_like(valid)
    after[0, -5:] = True
    after[1, -7:-5] = True
    assert (result.h[after] == 0).all() and (result.flow[after] == 0).all()
    # Pruned by capacity before the solve: the dense float64 flow of the maps pruned by the tests' own loops.
    cfg = FlowConfig(keep_mass=0.95, max_in_degree=8, prune_before_solve=True)
    first = answer_flow(attention, valid, prompt, answer, cfg)
    flow, _, degenerate = float64_dense_flow(
        pruned_by_capacity(attention, valid, answer, cfg), valid, prompt, answer
    )
    assert not degenerate.any() and first.graphs.num_edges < result.graphs.num_edges
    torch.testing.assert_close(first.flow.double(), flow, atol=1e-5, rtol=0)
    # Conservation: each intermediate token with h > 0 passes on exactly what it receives.
    result = answer_flow(attention, valid, prompt, answer, FlowConfig())  # every edge with flow in the graphs
    edge = dense_graph(result.graphs, edge_flow(result.graphs), valid.shape[1])  # [N, T, T] f(i) w(i, k)
    out_flow = edge.sum(dim=2)
    middle = valid & ~answer & (result.h > 0)
    torch.testing.assert_close(out_flow[middle], result.flow[middle], atol=1e-5, rtol=1e-4)


class RecordAdvantages(RolloutCallback):
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_rollouts_end(self, trainer, pl_module, rollouts):
        RecordAdvantages.seen.append(
            (rollouts.advantages.clone(), rollouts.token_weights.clone() * rollouts.completion_mask)
        )


@pytest.mark.parametrize("reward", ["varying", "constant"])
def test_zero_advantage_responses_keep_weight_one_and_are_not_counted(tiny_policy_dir, tmp_path, reward):
    """Rows whose group had equal rewards (advantage 0, so their weights cannot reach the
    gradient) keep weight 1 and stay out of the fractions; with no credited row at all, only
    the credited fraction (0) is logged."""
    RecordAdvantages.seen = []
    extra = (
        [VARYING_REWARD]
        if reward == "varying"
        else [
            "--model.rewards.correctness=0",
            '--model.rewards.custom={"tests.test_numerics.constant_reward": 1.0}',
        ]
    )
    cli = main(
        [
            "fit",
            *tiny_args(tiny_policy_dir, tmp_path, steps=1),
            "--trainer.limit_val_batches=0",
            f"--trainer.callbacks+={FLOW}",
            "--trainer.callbacks+=tests.test_flow_fit.RecordAdvantages",
            *extra,
        ]
    )
    advantages, weights = RecordAdvantages.seen[0]
    zero = advantages == 0
    kept = weights[zero]
    assert torch.equal(kept[kept > 0], torch.ones_like(kept[kept > 0]))
    logged = scalars(Path(cli.trainer.log_dir))
    assert logged["credit/credited_fraction"] == [pytest.approx((~zero).float().mean().item())]
    if reward == "constant":
        assert (
            zero.all()
            and "credit/fallback_fraction" not in logged
            and "credit/boosted_fraction" not in logged
        )
    else:
        assert (~zero).any() and (weights[~zero] == 1.5).any()
        # The boosted share counts the credited responses' tokens (weights were multiplied by the
        # completion mask, so padding is 0) whose weight is the boost.
        tokens = [w for w in weights[~zero].flatten().tolist() if w > 0]
        assert set(tokens) <= {1.0, 1.5}
        assert logged["credit/boosted_fraction"] == [pytest.approx(tokens.count(1.5) / len(tokens))]


def hand_made_rollouts(
    tokenizer, advantages: list[float], prompt: int = 5, length: int = 9
) -> tuple[Rollouts, torch.Tensor]:
    """Responses "i+i=\\boxed{2i}" after a prompt of ones, and random causal attention maps [N, T, T]."""
    n = len(advantages)
    generator = torch.Generator().manual_seed(0)
    completion_ids = torch.tensor(
        [tokenizer.encode(f"{i}+{i}=\\boxed{{{2 * i}}}", add_special_tokens=False)[:length] for i in range(n)]
    )
    attention = torch.rand(n, prompt + length, prompt + length, generator=generator).tril()
    attention = attention / attention.sum(-1, keepdim=True)
    rollouts = Rollouts(
        **{
            **{f.name: None for f in fields(Rollouts) if f.name != "flow_graphs"},
            "prompt_ids": torch.ones(n, prompt, dtype=torch.long),
            "prompt_mask": torch.ones(n, prompt, dtype=torch.long),
            "completion_ids": completion_ids,
            "completion_mask": torch.ones(n, length),
            "completions": [tokenizer.decode(row) for row in completion_ids.tolist()],
            "advantages": torch.tensor(advantages),
        }
    )
    return rollouts, attention


def test_skipping_zero_advantage_rows_leaves_the_credited_rows_weights(tiny_policy_dir):
    """The weights of a credited response are the same whether its neighbours in the batch are credited or
    skipped."""
    from lightning_flow.callbacks import FlowCredit

    tokenizer = load_tokenizer(str(tiny_policy_dir))
    every, maps = hand_made_rollouts(tokenizer, [1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    some, _ = hand_made_rollouts(tokenizer, [1.0, 0.0, 0.5, 0.0, 0.0, -2.0])
    all_weights, all_stats = FlowCredit().compute(every, list(range(6)), maps, tokenizer)
    credited = (some.advantages != 0).nonzero().flatten().tolist()
    some_weights, some_stats = FlowCredit().compute(some, credited, maps[credited], tokenizer)
    assert torch.equal(some_weights, all_weights[credited])
    skipped = [row for row in range(6) if row not in credited]
    assert (all_weights[skipped] == 1.5).any()  # the skipped rows would have had credit
    assert torch.equal(some_stats["top_share"], all_stats["top_share"][credited])
    assert [row for chunk, _ in some.flow_graphs for row in chunk] == credited


def test_top_share_and_token_counts_of_the_credited_rows(tiny_policy_dir):
    """top_share = signal on the boosted tokens / signal on all response tokens, written out here;
    a row whose map is not finite falls back with share 0 (not NaN) and nothing boosted."""
    from lightning_flow.callbacks import FlowCredit

    tokenizer = load_tokenizer(str(tiny_policy_dir))
    rollouts, maps = hand_made_rollouts(tokenizer, [1.0, -1.0, 0.5, 2.0])
    maps[2, -1, 0] = float("nan")
    weights, stats = FlowCredit(signal="attention_received").compute(rollouts, [0, 1, 2, 3], maps, tokenizer)
    prompt = rollouts.prompt_ids.shape[1]
    assert stats["fallback"].tolist() == [False, False, True, False] and stats["top_share"][2] == 0
    assert stats["tokens"].tolist() == [9] * 4 and stats["boosted"].tolist() == [4, 4, 0, 4]  # round(0.4 · 9)
    for row in (0, 1, 3):
        # attention_received: mean attention a response token gets from the later valid tokens
        att = maps[row]
        signal = [
            float(att[k + 1 :, k].mean()) if k + 1 < att.shape[0] else 0.0
            for k in range(prompt, att.shape[0])
        ]
        boosted = weights[row, prompt:] == 1.5
        expected = sum(s for s, b in zip(signal, boosted.tolist()) if b) / sum(signal)
        assert float(stats["top_share"][row]) == pytest.approx(expected, rel=1e-5)
