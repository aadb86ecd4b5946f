"""Flow credit end to end: the callback in a real fit, every comparison signal, capture reuse, and
the flow invariants on real attention captured from stories260K."""

from __future__ import annotations

from collections import Counter
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_flow.capture import capture_attention, default_capture_layers
from lightning_flow.cli import main
from lightning_flow.flow import FlowConfig, answer_flow, capacities, edge_flows
from lightning_flow.policy import PolicyConfig, load_policy, position_ids_from_mask
from lightning_flow.rollouts import RolloutCallback, Rollouts, copy_first_maps, first_identical_rows
from lightning_flow.tokenizer import load_tokenizer

from .test_fit import scalars, tiny_args

VARYING_REWARD = '--model.rewards.custom={"tests.test_fit.length_reward": 1.0}'  # nonzero advantages, so rows get credit

FLOW = "lightning_flow.callbacks.FlowCredit"


class RecordWeights(RolloutCallback):
    """Keeps what reached the loss (after the update, every row's final weights)."""

    seen: list[torch.Tensor] = []

    def on_rollouts_end(self, trainer, pl_module, rollouts):
        RecordWeights.seen.append(rollouts.token_weights.clone() * rollouts.completion_mask)


def fit_with_credit(policy: Path, root: Path, signal: str, *extra: str):
    RecordWeights.seen = []
    return main([
        "fit", *tiny_args(policy, root, steps=2), "--trainer.limit_val_batches=0",
        f"--trainer.callbacks+={FLOW}", f"--trainer.callbacks.signal={signal}",
        "--trainer.callbacks+=tests.test_flow_fit.RecordWeights", VARYING_REWARD, *extra,
    ])


def test_flow_credit_fit_logs_and_boosts_the_top_tokens(tiny_policy_dir, tmp_path):
    cli = fit_with_credit(tiny_policy_dir, tmp_path, "flow")
    logged = scalars(Path(cli.trainer.log_dir))
    for tag in ["credit/answer_found_fraction", "credit/fallback_fraction", "credit/top_signal_share", "credit/time_s",
                "credit/copy_fraction", "perf/capture_time_s", "perf/capture_share", "perf/credit_time_s", "perf/credit_share"]:
        assert tag in logged and all(v == v for v in logged[tag]), tag
    assert all(0 <= v <= 1 for v in logged["credit/copy_fraction"])
    assert logged["perf/capture_time_s"][0] > 0  # recorded in the update's forward (mu = 1, beta = 0)
    weights = RecordWeights.seen[0]
    used = weights[weights > 0]
    assert set(used.unique().tolist()) <= {1.0, 1.5}
    fallback = logged["credit/fallback_fraction"][0]
    if fallback < 1:
        assert (used == 1.5).any()


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
        embeddings.register_forward_pre_hook(lambda *_: setattr(CountForwards, "calls", CountForwards.calls + 1))


@pytest.mark.parametrize("extra", [[], ["--model.grpo.num_iterations=2"], ["--model.grpo.beta=0.1"]], ids=["mu1", "mu2", "beta"])
def test_flow_credit_adds_no_forward_pass(tiny_policy_dir, tmp_path, extra):
    """One step with and without FlowCredit (same seed, so the same samples): the same number of
    policy forwards; the attention is recorded in a pass the step runs anyway."""
    counts = {}
    for credit in (False, True):
        args = ["fit", *tiny_args(tiny_policy_dir, tmp_path / str(credit), steps=1), "--trainer.limit_val_batches=0",
                "--trainer.callbacks+=tests.test_flow_fit.CountForwards", *extra]
        if credit:
            args += [f"--trainer.callbacks+={FLOW}", "--trainer.callbacks.signal=flow"]
        cli = main(args)
        counts[credit] = CountForwards.calls
    assert cli.model.attention_layers is not None
    assert counts[True] == counts[False] > 0


class KeepCreditInputs(RolloutCallback):
    """At each credit call, keeps the rows' inputs, recorded maps, entropies and the adapter weights."""

    kept: list[dict] = []

    def on_credit(self, trainer, pl_module, rollouts, rows):
        KeepCreditInputs.kept.append({
            "ids": rollouts.input_ids[rows].clone(), "mask": rollouts.attention_mask[rows].clone(),
            "completion": (rollouts.completion_ids[rows].clone(), rollouts.completion_mask[rows].clone()),
            "attention": rollouts.attention[rows].clone(), "entropy": rollouts.entropy[rows].clone(),
            "recorded": rollouts.attention_recorded[rows].clone(), "advantages": rollouts.advantages[rows].clone(),
            "adapter": {k: v.detach().clone() for k, v in pl_module.policy.named_parameters() if v.requires_grad},
        })


class AskForEveryRow(RolloutCallback):
    def setup(self, trainer, pl_module, stage):
        pl_module.request_attention(None, zero_advantage_rows=True)


@pytest.mark.parametrize("iterations, every_row, precision", [(1, False, "32"), (2, False, "32"), (1, True, "32"), (1, False, "bf16-mixed")])
def test_recorded_attention_equals_a_capture_pass(tiny_policy_dir, tmp_path, iterations, every_row, precision):
    """mu = 1 records in the update's grad forward, mu = 2 in the no-grad old log-prob pass; both
    give, micro-batch by micro-batch (16 rows in 8s), the maps and entropies of a separate pass
    with the weights of that moment (under the step's autocast with bf16-mixed precision). Rows
    with a zero advantage are not recorded (zero maps) unless a callback asks for every row."""
    KeepCreditInputs.kept = []
    reward = ["--trainer.callbacks+=tests.test_flow_fit.AskForEveryRow"] if every_row else [VARYING_REWARD]  # correctness alone: all advantages 0
    cli = main(["fit", *tiny_args(tiny_policy_dir, tmp_path, steps=1), "--trainer.limit_val_batches=0",
                f"--trainer.callbacks+={FLOW}", "--trainer.callbacks+=tests.test_flow_fit.KeepCreditInputs",
                f"--model.grpo.num_iterations={iterations}", f"--trainer.precision={precision}", *reward])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    module = cli.model
    assert [kept["ids"].shape[0] for kept in KeepCreditInputs.kept] == [8, 8]
    recorded = torch.cat([kept["recorded"] for kept in KeepCreditInputs.kept])
    advantages = torch.cat([kept["advantages"] for kept in KeepCreditInputs.kept])
    assert torch.equal(recorded, torch.ones_like(recorded) if every_row else advantages != 0) and recorded.any()
    parameters = dict(module.policy.named_parameters())
    for kept in KeepCreditInputs.kept:
        with torch.no_grad():
            for name, value in kept["adapter"].items():
                parameters[name].copy_(value)
        with autocast:
            expected = capture_attention(module.policy, kept["ids"], kept["mask"], module.attention_layers,
                                         position_ids=position_ids_from_mask(kept["mask"]))
        assert expected.dtype == torch.float32
        expected[~kept["recorded"]] = 0.0
        torch.testing.assert_close(kept["attention"], expected, rtol=1e-5, atol=1e-6)
        prompt = kept["ids"].shape[1] - kept["completion"][0].shape[1]
        rollouts = Rollouts(**{**{f.name: None for f in fields(Rollouts)}, "prompt_ids": kept["ids"][:, :prompt],
                               "prompt_mask": kept["mask"][:, :prompt], "completion_ids": kept["completion"][0],
                               "completion_mask": kept["completion"][1]})
        with torch.no_grad(), autocast:
            entropy = module.completion_logps(rollouts, slice(0, None))[1]
        torch.testing.assert_close(kept["entropy"], entropy, rtol=1e-5, atol=1e-6)


def test_flow_credit_fit_on_real_stories260k(stories260k, shared_data, tmp_path):
    RecordWeights.seen = []
    cli = main([
        "fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"),
        f"--model.policy.name_or_path={stories260k}", "--trainer.max_steps=1",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "--trainer.limit_val_batches=0", "--model.sampling.num_generations=4", "--model.sampling.max_new_tokens=32",
        "--model.grpo.micro_batch_size=8", "--data=lightning_flow.datamodules.MathDataModule",
        f"--data.train={shared_data / 'gsm8k' / 'test.jsonl'}", "--data.limit=16", "--data.val_size=4", "--data.batch_size=2",
        "--data.max_prompt_length=512", f"--trainer.callbacks+={FLOW}", "--trainer.callbacks+=tests.test_flow_fit.RecordWeights",
        VARYING_REWARD,
    ])
    logged = scalars(Path(cli.trainer.log_dir))
    # A story model never writes \boxed{}: the answer falls back to the last token, and flow still routes to it.
    assert logged["credit/answer_found_fraction"][0] == 0.0
    assert logged["credit/fallback_fraction"][0] < 1.0
    assert (RecordWeights.seen[0] == 1.5).any()


def test_flow_invariants_on_real_stories260k_attention(stories260k):
    """Real captured attention, a padded batch: the answer absorbs exactly one unit of flow."""
    model = load_policy(PolicyConfig(str(stories260k), lora_rank=4))
    tokenizer = load_tokenizer(str(stories260k))
    prompts = tokenizer(["Once upon a time", "Lily saw a big red ball in the park and"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        sequences = model.generate(**prompts, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    prompt_length = prompts.input_ids.shape[1]
    mask = torch.cat([prompts.attention_mask, torch.ones(2, sequences.shape[1] - prompt_length, dtype=torch.long)], dim=1)
    mask[1, -5:] = 0  # right padding on the second response
    layers = default_capture_layers(model.config.num_hidden_layers)
    attention = capture_attention(model, sequences, mask, layers, position_ids=position_ids_from_mask(mask))
    valid = mask.bool()
    prompt = torch.zeros_like(valid)
    prompt[:, :prompt_length] = valid[:, :prompt_length]
    answer = torch.zeros_like(valid)
    answer[0, -8:-5] = True  # three tokens before the end; tokens after them must get nothing
    answer[1, -10:-7] = True
    result = answer_flow(attention, valid, prompt, answer, FlowConfig())
    assert not result.degenerate.any()
    torch.testing.assert_close(result.absorbed, torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close((result.flow * answer).sum(1), torch.ones(2), atol=1e-5, rtol=0)
    after = torch.zeros_like(valid)
    after[0, -5:] = True
    after[1, -7:-5] = True
    assert (result.h[after] == 0).all() and (result.flow[after] == 0).all()
    # Conservation: each intermediate token with h > 0 passes on exactly what it receives.
    edge = edge_flows(capacities(attention, valid, FlowConfig()), result, answer)  # [N, T, T] f(i) w(i, k)
    out_flow = edge.sum(dim=2)
    middle = valid & ~answer & (result.h > 0)
    torch.testing.assert_close(out_flow[middle], result.flow[middle], atol=1e-5, rtol=1e-4)


class RecordAdvantages(RolloutCallback):
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_rollouts_end(self, trainer, pl_module, rollouts):
        RecordAdvantages.seen.append((rollouts.advantages.clone(), rollouts.token_weights.clone() * rollouts.completion_mask))


@pytest.mark.parametrize("reward", ["varying", "constant"])
def test_zero_advantage_responses_keep_weight_one_and_are_not_counted(tiny_policy_dir, tmp_path, reward):
    """Rows whose group had equal rewards (advantage 0, so their weights cannot reach the
    gradient) keep weight 1 and stay out of the fractions; with no credited row at all, only
    the credited fraction (0) is logged."""
    RecordAdvantages.seen = []
    extra = [VARYING_REWARD] if reward == "varying" else ["--model.rewards.correctness=0", '--model.rewards.custom={"tests.test_numerics.constant_reward": 1.0}']
    cli = main(["fit", *tiny_args(tiny_policy_dir, tmp_path, steps=1), "--trainer.limit_val_batches=0", f"--trainer.callbacks+={FLOW}",
                "--trainer.callbacks+=tests.test_flow_fit.RecordAdvantages", *extra])
    advantages, weights = RecordAdvantages.seen[0]
    zero = advantages == 0
    kept = weights[zero]
    assert torch.equal(kept[kept > 0], torch.ones_like(kept[kept > 0]))
    logged = scalars(Path(cli.trainer.log_dir))
    assert logged["credit/credited_fraction"] == [pytest.approx((~zero).float().mean().item())]
    if reward == "constant":
        events = EventAccumulator(str(cli.trainer.log_dir), size_guidance={"histograms": 0})
        events.Reload()
        assert zero.all() and "credit/fallback_fraction" not in logged and "credit/weights" not in events.Tags()["histograms"]
    else:
        assert (~zero).any() and (weights[~zero] == 1.5).any()
        # The weight histogram counts the credited responses' tokens, one bucket per distinct weight.
        events = EventAccumulator(str(cli.trainer.log_dir), size_guidance={"histograms": 0})
        events.Reload()
        histogram = events.Histograms("credit/weights")[0].histogram_value
        tokens = [w for w in weights[~zero].flatten().tolist() if w > 0]  # weights were multiplied by the completion mask
        expected = sorted(Counter(tokens).items())
        assert list(zip(histogram.bucket_limit, histogram.bucket)) == [(value, float(count)) for value, count in expected]
        assert histogram.num == len(tokens) and histogram.sum == pytest.approx(sum(tokens))


def hand_made_rollouts(tokenizer, advantages: list[float], prompt: int = 5, length: int = 9) -> Rollouts:
    """Responses "i+i=\\boxed{2i}" after a prompt of ones, with random causal attention maps."""
    n = len(advantages)
    generator = torch.Generator().manual_seed(0)
    completion_ids = torch.tensor([tokenizer.encode(f"{i}+{i}=\\boxed{{{2 * i}}}", add_special_tokens=False)[:length] for i in range(n)])
    attention = torch.rand(n, prompt + length, prompt + length, generator=generator).tril()
    attention = attention / attention.sum(-1, keepdim=True)
    return Rollouts(**{
        **{f.name: None for f in fields(Rollouts)},
        "prompt_ids": torch.ones(n, prompt, dtype=torch.long), "prompt_mask": torch.ones(n, prompt, dtype=torch.long),
        "completion_ids": completion_ids, "completion_mask": torch.ones(n, length),
        "completions": [tokenizer.decode(row) for row in completion_ids.tolist()], "attention": attention,
        "advantages": torch.tensor(advantages),
    })


def test_skipping_zero_advantage_rows_leaves_the_credited_rows_weights(tiny_policy_dir):
    """The weights of a credited response are the same whether its neighbours in the batch are credited or skipped."""
    from lightning_flow.callbacks import FlowCredit

    tokenizer = load_tokenizer(str(tiny_policy_dir))
    every = hand_made_rollouts(tokenizer, [1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    some = hand_made_rollouts(tokenizer, [1.0, 0.0, 0.5, 0.0, 0.0, -2.0])
    n = len(every)
    all_weights, all_stats = FlowCredit().compute(every, slice(0, n), tokenizer)
    some_weights, some_stats = FlowCredit().compute(some, slice(0, n), tokenizer)
    credited = some.advantages != 0
    assert torch.equal(some_weights[credited], all_weights[credited])
    assert torch.equal(some_weights[~credited], torch.ones_like(some_weights[~credited]))
    assert (all_weights[~credited] == 1.5).any()  # the skipped rows would have had credit
    assert torch.equal(some_stats["top_share"], all_stats["top_share"][credited])


def test_top_share_and_token_counts_of_the_credited_rows(tiny_policy_dir):
    """top_share = signal on the boosted tokens / signal on all response tokens, written out here;
    a row whose map is not finite falls back with share 0 (not NaN) and nothing boosted."""
    from lightning_flow.callbacks import FlowCredit

    tokenizer = load_tokenizer(str(tiny_policy_dir))
    rollouts = hand_made_rollouts(tokenizer, [1.0, -1.0, 0.5, 2.0])
    rollouts.attention[2, -1, 0] = float("nan")
    weights, stats = FlowCredit(signal="attention_received").compute(rollouts, slice(0, 4), tokenizer)
    prompt = rollouts.prompt_ids.shape[1]
    assert stats["fallback"].tolist() == [False, False, True, False] and stats["top_share"][2] == 0
    assert stats["tokens"].tolist() == [9] * 4 and stats["boosted"].tolist() == [4, 4, 0, 4]  # round(0.4 · 9)
    for row in (0, 1, 3):
        # attention_received: mean attention a response token gets from the later valid tokens
        att = rollouts.attention[row]
        signal = [float(att[k + 1 :, k].mean()) if k + 1 < att.shape[0] else 0.0 for k in range(prompt, att.shape[0])]
        boosted = weights[row, prompt:] == 1.5
        expected = sum(s for s, b in zip(signal, boosted.tolist()) if b) / sum(signal)
        assert float(stats["top_share"][row]) == pytest.approx(expected, rel=1e-5)


def test_first_identical_rows_points_each_candidate_to_the_first_candidate_with_its_tokens():
    tokens = torch.tensor([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4], [1, 2]])
    everyone = torch.ones(6, dtype=torch.bool)
    assert first_identical_rows(tokens, everyone) == [0, 1, 0, 3, 1, 0]
    not_first = torch.tensor([False, True, True, True, True, True])  # row 0 is no candidate: row 2 is the first [1, 2]
    assert first_identical_rows(tokens, not_first) == [0, 1, 2, 3, 1, 2]
    assert first_identical_rows(tokens[:1], everyone[:1]) == [0]
    repeated = torch.tensor([[1, 2], [3, 4], [1, 2], [1, 2], [3, 4], [1, 2]])
    assert first_identical_rows(repeated, everyone) == [0, 1, 0, 0, 1, 0]
    assert first_identical_rows(repeated, everyone, block=3) == [0, 1, 0, 3, 4, 3]  # rows 3..5 match only among themselves
    assert first_identical_rows(torch.tensor([[1, 2], [1, 3]]), everyone[:2]) == [0, 1]  # one differing token


def test_credited_and_recorded_rows_of_a_later_micro_batch(tiny_policy_dir):
    """Rows 4..7: 4, 6 and 7 credited, 6 a copy of 4 (2 of 0 in the first micro-batch)."""
    rollouts = hand_made_rollouts(load_tokenizer(str(tiny_policy_dir)), [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, -1.0, 1.0])
    rollouts.attention_recorded = rollouts.credited
    rollouts.first_copy = [0, 1, 0, 3, 4, 5, 4, 7]
    local, solved, copy_of, is_copy = rollouts.credited_rows(slice(4, 8))
    assert (local.tolist(), solved.tolist(), copy_of.tolist(), is_copy.tolist()) == ([0, 2, 3], [4, 7], [0, 0, 1], [False, True, False])
    local, solved, copy_of, is_copy = rollouts.credited_rows(slice(4, 8), follow_copies=False)
    assert (local.tolist(), solved.tolist(), copy_of, is_copy.tolist()) == ([0, 2, 3], [4, 6, 7], None, [False] * 3)
    assert rollouts.recorded_rows(slice(4, 8)).tolist() == [0, 3]
    assert rollouts.recorded_rows(slice(0, 4)).tolist() == [0, 3]
    rollouts.attention_recorded = torch.ones(8, dtype=torch.bool)  # every row asked for: the copies still take their first row's map
    assert rollouts.recorded_rows(slice(4, 8)).tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="contiguous slice"):
        rollouts.credited_rows(slice(0, 8, 2))


def test_copies_are_solved_once_and_get_the_weights_and_stats_of_solving_each(tiny_policy_dir, monkeypatch):
    """Rows 0, 2 and 4 share their tokens and map (row 4 with a zero advantage, so not credited)."""
    import lightning_flow.callbacks.flow_credit as flow_credit
    from lightning_flow.callbacks import FlowCredit

    tokenizer = load_tokenizer(str(tiny_policy_dir))
    rollouts = hand_made_rollouts(tokenizer, [1.0, -1.0, 1.0, 0.5, 0.0, -0.5])
    for row in (2, 4):
        rollouts.completion_ids[row], rollouts.completions[row], rollouts.attention[row] = (
            rollouts.completion_ids[0], rollouts.completions[0], rollouts.attention[0])
    solved = []
    inner = flow_credit.answer_flow
    monkeypatch.setattr(flow_credit, "answer_flow", lambda maps, *a, **k: solved.append(len(maps)) or inner(maps, *a, **k))
    each_weights, each_stats = FlowCredit().compute(rollouts, slice(0, 6), tokenizer)  # no first_copy: every row solved
    tokens = rollouts.input_ids.masked_fill(rollouts.attention_mask == 0, -1)
    rollouts.first_copy = first_identical_rows(tokens, rollouts.credited)
    assert rollouts.first_copy == [0, 1, 0, 3, 4, 5]
    once_weights, once_stats = FlowCredit().compute(rollouts, slice(0, 6), tokenizer)
    assert solved == [5, 4]  # the credited rows, then without row 2
    assert torch.equal(once_weights, each_weights) and (once_weights == 1.5).any()
    assert once_stats.pop("copy").tolist() == [False, False, True, False, False]  # the credited rows 0, 1, 2, 3, 5
    assert not each_stats.pop("copy").any()
    for key, value in each_stats.items():
        assert torch.equal(once_stats[key], value), key


def test_a_copy_is_not_recorded_and_gets_its_first_rows_map(tiny_policy_dir, monkeypatch):
    from lightning_flow.module import GRPOConfig, GRPOModule
    from lightning_flow.policy import SamplingConfig

    module = GRPOModule(PolicyConfig(str(tiny_policy_dir), lora_rank=4), SamplingConfig(num_generations=2), GRPOConfig(micro_batch_size=4))
    module.request_attention(None)
    tokenizer = load_tokenizer(str(tiny_policy_dir))
    rollouts = hand_made_rollouts(tokenizer, [1.0, -1.0, 1.0, 0.5, -0.5, 0.5, 1.0, -1.0])
    rollouts.completion_ids[2] = rollouts.completion_ids[0]  # a copy in the same micro-batch
    rollouts.completion_ids[4] = rollouts.completion_ids[0]  # the same tokens in the next micro-batch: recorded there
    recorded_rows = []
    run = module.attention_recorder.run
    monkeypatch.setattr(module.attention_recorder, "run", lambda *a, rows=None, **k: recorded_rows.append(rows.tolist()) or run(*a, rows=rows, **k))
    with torch.no_grad(), module.first_pass_recording(rollouts) as recorder:
        for rows in module.micro_batches(rollouts):
            module.completion_logps(rollouts, rows, recorder)
            recorder.take()
            copy_first_maps(rollouts, rows)
    assert rollouts.first_copy == [0, 1, 0, 3, 4, 5, 6, 7]
    assert recorded_rows == [[0, 1, 3], [0, 1, 2, 3]]  # per micro-batch, local rows; row 2 left out
    expected = capture_attention(module.policy, rollouts.input_ids, rollouts.attention_mask, module.attention_layers,
                                 position_ids=position_ids_from_mask(rollouts.attention_mask))
    torch.testing.assert_close(rollouts.attention, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(rollouts.attention[2], rollouts.attention[0])
