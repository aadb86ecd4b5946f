"""The benchmark scripts' result arithmetic: medians, paired ratios, mean and spread over seeds."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_stats import curve_over_seeds, mean_and_std, median_after_warmup, paired_ratio  # noqa: E402
from credit_study import markdown_table, read_val_curve, summarise  # noqa: E402
from trl_compare import summarise_run  # noqa: E402


def test_mean_and_std_match_the_sample_formula():
    values = [0.30, 0.42, 0.39]
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (3 - 1))
    assert mean_and_std(values) == pytest.approx((mean, std))
    assert mean_and_std([0.5]) == (0.5, 0.0)


def test_median_after_warmup_skips_the_first_steps():
    assert median_after_warmup([9.0, 9.0, 1.0, 3.0, 2.0], warmup=2) == 2.0
    assert median_after_warmup([4.0, 6.0], warmup=5) == 5.0  # too few steps: all of them


def test_paired_ratio_pairs_runs_of_the_same_round():
    # Round-wise ratios 0.5, 2.0, 1.0: their median, not the ratio of the medians (3 / 3).
    assert paired_ratio([1.0, 4.0, 3.0], [2.0, 2.0, 3.0]) == 1.0
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_curve_over_seeds_keeps_shared_steps():
    curves = [{0: 0.2, 10: 0.4, 20: 0.5}, {0: 0.2, 10: 0.6}]
    assert curve_over_seeds(curves) == [
        (0, 0.2, 0.0),
        (10, pytest.approx(0.5), pytest.approx(math.sqrt(0.02))),
    ]


def test_read_val_curve_takes_validation_rows_only(tmp_path):
    csv_file = tmp_path / "metrics.csv"
    csv_file.write_text("epoch,step,train/reward,val/accuracy\n0,0,0.4,\n0,24,,0.35\n0,49,,0.5\n")
    assert read_val_curve(csv_file) == {25: 0.35, 50: 0.5}  # row step s follows s + 1 optimizer steps


def test_summarise_and_table_over_seeds():
    runs = {
        "uniform": [{"seed": 0, "curve": {25: 0.3, 50: 0.4}}, {"seed": 1, "curve": {25: 0.5, 50: 0.6}}],
        "flow": [{"seed": 0, "curve": {25: 0.4, 50: 0.5}}, {"seed": 1, "curve": {25: 0.4, 50: 0.5}}],
    }
    summary = summarise(runs, start=0.25)
    assert summary["uniform"]["final_step"] == 50
    assert summary["uniform"]["final_mean"] == pytest.approx(0.5)
    assert summary["uniform"]["final_std"] == pytest.approx(math.sqrt(0.02))
    assert summary["flow"]["curve"][0] == (0, 0.25, 0.0)  # every seed starts from the warm start
    # Per-seed means over the validations: 0.35 and 0.55 -> mean 0.45, std sqrt(0.02).
    assert summary["uniform"]["curve_mean"] == pytest.approx(0.45)
    assert summary["uniform"]["curve_std"] == pytest.approx(math.sqrt(0.02))
    table = markdown_table({"task": summary})
    assert "| credit signal | task: step 50 | task: mean of steps 25-50 |" in table
    assert "| uniform | 0.500 ± 0.141 | 0.450 ± 0.141 |" in table
    assert "| flow | 0.500 ± 0.000 | 0.450 ± 0.000 |" in table
    # One seed (the quick mode) has no spread: the table shows the mean alone.
    single = markdown_table({"task": summarise({"flow": runs["flow"][:1]}, start=0.25)})
    assert "| flow | 0.500 | 0.450 |" in single and "±" not in single


def test_summarise_run_rates_from_step_records():
    step = {
        "step_s": 2.0,
        "generation_s": 1.0,
        "generation_tokens": 100,
        "update_tokens": 150,
        "response_length": 10.0,
    }
    phases = [(None, None)] * 3  # a CPU run records no per-phase peaks
    summary = summarise_run(
        {
            "steps": [{**step, "generation_peak_mib": g, "update_peak_mib": u} for g, u in phases],
            "peak_memory_bytes": 3 * 2**20,
        },
        warmup=1,
    )
    assert {k: v for k, v in summary.items() if "_peak_" not in k} == {
        "step_s": 2.0,
        "generation_tokens_per_s": 100.0,
        "update_tokens_per_s": 150.0,
        "response_length": 10.0,
        "peak_memory_mib": 3.0,
    }
    assert math.isnan(summary["generation_peak_mib"]) and math.isnan(summary["update_peak_mib"])
    phases = [(50.0, 70.0), (60.0, 65.0), (55.0, 80.0)]  # GPU: the highest of each phase over the steps
    summary = summarise_run(
        {
            "steps": [{**step, "generation_peak_mib": g, "update_peak_mib": u} for g, u in phases],
            "peak_memory_bytes": 3 * 2**20,
        },
        warmup=1,
    )
    assert (summary["generation_peak_mib"], summary["update_peak_mib"]) == (60.0, 80.0)


def test_every_capture_chunk_setting_records_the_maps_of_a_capture_pass(tmp_path):
    """capture_chunks.py's settings change how the scores are cut, not the maps; its recorded
    update is flow_overhead.py's, the path the GPU checks time (T = 264: the causal split is on)."""
    import argparse

    from capture_chunks import SETTINGS, record_with
    from flow_overhead import StepParts, build_module, make_rollouts
    from lightning_flow.callbacks.flow_credit import FlowCredit

    from lightning_flow.capture import capture_attention
    from lightning_flow.policy import position_ids_from_mask

    args = argparse.Namespace(shape="tiny", qlora=False, micro_batch=2)
    module = build_module(args, tmp_path)
    rollouts = make_rollouts(module, 2, 64, 200, seed=0)
    parts = StepParts(module, rollouts, 200, FlowCredit())
    expected = capture_attention(
        module.policy,
        rollouts.input_ids,
        rollouts.attention_mask,
        module.attention_layers,
        position_ids=position_ids_from_mask(rollouts.attention_mask),
    )
    for setting in SETTINGS:
        seconds, maps = record_with(setting, parts)
        assert seconds > 0
        torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)
    parts.solve()  # FlowCredit on the recorded maps: one solved graph per response
    assert [rows for rows, _ in rollouts.flow_graphs] == [[0, 1]] and rollouts.flow_graphs[0][
        1
    ].num_graphs == 2


def test_recompile_summary_takes_medians_over_runs_and_compares_with_hf():
    from engine_throughput import compared_with, recompile_summary

    from lightning_flow.engines import Completions

    def call(seconds: float, unlike: int, gap: float) -> dict:
        return dict(
            change="same shapes",
            prompt_width=6,
            rows=8,
            seconds=seconds,
            hf_seconds=seconds * 2,
            frames_compiled=0,
            responses_unlike_hf=unlike,
            max_logp_gap_to_hf=gap,
        )

    summary = recompile_summary([[call(3.0, 0, 1e-6)], [call(1.0, 1, 3e-6)], [call(2.0, 0, 2e-6)]])
    assert summary == [
        dict(
            change="same shapes",
            prompt_width=6,
            rows=8,
            median_s=2.0,
            hf_median_s=4.0,
            frames_compiled=[0, 0, 0],
            responses_unlike_hf=[0, 1, 0],
            max_logp_gap_to_hf=3e-6,
        )
    ]
    # Rows compared up to their EOS: padding and a wider batch do not count, a shorter or other
    # row does; the log-prob gap is over the rows alike only (row 0: 0.25, not row 2's 5).
    ids = torch.tensor([[5, 2, 0], [7, 7, 7], [4, 4, 4]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    logps = torch.tensor([[-1.0, -0.5, 0.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    other_logps = torch.tensor([[-1.25, -0.5], [-1.0, -1.0], [-6.0, -1.0]])
    no = torch.zeros(3, dtype=torch.bool)
    other = Completions(torch.tensor([[5, 2], [7, 7], [4, 3]]), torch.ones(3, 2), no, other_logps)
    assert compared_with(Completions(ids, mask, no, logps), other) == (2, 0.25)
