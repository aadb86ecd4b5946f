"""FlowPictures in real fits: what reaches TensorBoard, on which steps, and that it shows the loss's
weights."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning_flow.callbacks import FlowPictures
from lightning_flow.callbacks.flow_pictures import completions_table, pick_rows
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_flow.cli import main
from lightning_flow.flow import ROLE_ANSWER
from lightning_flow.rollouts import RolloutCallback

from .test_fit import tiny_args

FLOW = "lightning_flow.callbacks.FlowCredit"
PICTURES = "tests.test_flow_pictures.RecordingPictures"


class RecordingPictures(FlowPictures):
    """FlowPictures that keeps the traces it drew, with the weights the loss got for those rows."""

    traces: list = []

    def row_trace(self, rollouts, row, graph, pl_module, layers, meta):
        trace = super().row_trace(rollouts, row, graph, pl_module, layers, meta)
        used = rollouts.token_weights[row][rollouts.completion_mask[row] > 0]
        credited = rollouts.flow_graph(row)
        # The graph drawn is the one FlowCredit solved when it credited the row (same object's tensors).
        same = (
            credited is not None
            and torch.equal(credited.f, graph.f)
            and torch.equal(credited.edge_attr, graph.edge_attr)
        )
        # what the edges bring the answer
        answer_inflow = float(graph.incoming_flow[graph.role == ROLE_ANSWER].sum())
        RecordingPictures.traces.append((trace, used.clone(), same, answer_inflow))
        return trace


class CountSteps(RolloutCallback):
    steps: list[int] = []

    def on_rollouts_end(self, trainer, pl_module, rollouts):
        CountSteps.steps.append(rollouts.step)


def events(log_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(
        str(log_dir), size_guidance={"images": 0, "histograms": 0, "tensors": 0, "scalars": 0}
    )
    accumulator.Reload()
    return accumulator


def fit(policy: Path, root: Path, steps: int, *extra: str):
    RecordingPictures.traces, CountSteps.steps = [], []
    return main(
        [
            "fit",
            *tiny_args(policy, root, steps=steps),
            "--trainer.limit_val_batches=0",
            *extra,
            "--trainer.callbacks+=tests.test_flow_pictures.CountSteps",
        ]
    )


def test_pictures_table_and_histograms_only_on_logging_steps(tiny_policy_dir, tmp_path, monkeypatch):
    import lightning_flow.callbacks.flow_pictures as module

    captured = []
    real = module.capture_attention
    monkeypatch.setattr(
        module,
        "capture_attention",
        lambda model, ids, *a, **k: captured.append(ids.shape[0]) or real(model, ids, *a, **k),
    )
    cli = fit(
        tiny_policy_dir,
        tmp_path,
        4,
        f"--trainer.callbacks+={FLOW}",
        f"--trainer.callbacks+={PICTURES}",
        "--trainer.callbacks.every_n_steps=2",
        "--trainer.callbacks.pictures=2",
        '--model.rewards.custom={"tests.test_fit.length_reward": 1.0}',
    )
    assert CountSteps.steps == [0, 1, 2, 3]
    logged = events(Path(cli.trainer.log_dir))
    tags = logged.Tags()
    assert {"flow/picture_0", "flow/picture_1"} <= set(tags["images"])
    for tag in ["flow/picture_0", "flow/picture_1"]:
        images = logged.Images(tag)
        # Lightning's cadence, as every scalar: batches 2 and 4 of 4, numbered from 0
        assert [i.step for i in images] == [1, 3] and all(i.width > 100 and i.height > 100 for i in images)
    for tag in ["flow/values", "flow/token_weights"]:
        assert [h.step for h in logged.Histograms(tag)] == [1, 3]
    assert [s.step for s in logged.Scalars("perf/flow_pictures_time_s")] == [1, 3]
    assert all(s.value > 0 for s in logged.Scalars("perf/flow_pictures_time_s"))
    assert [s.step for s in logged.Scalars("flow/top_share")] == [1, 3]
    assert all(0 < s.value <= 1 for s in logged.Scalars("flow/top_share"))
    [text_tag] = [t for t in tags["tensors"] if t.startswith("flow/completions")]
    texts = logged.Tensors(text_tag)
    assert [t.step for t in texts] == [1, 3]
    table = texts[0].tensor_proto.string_val[0].decode()
    assert table.startswith(
        "| row | group | pick | prompt | response | extracted | gold | correctness | "
        "tests.test\\_fit.length\\_reward | total | advantage |"
    )
    assert len(table.splitlines()) == 2 + 4  # header, rule, best and worst of two groups

    # The pictures show what reached the loss, and the flow the method defines.
    assert len(RecordingPictures.traces) == 4
    # FlowCredit solved the graphs of the rows with a nonzero advantage, and those are drawn; only the
    # drawn rows it skipped (groups with equal rewards) are captured for the pictures.
    assert sum(captured) == sum(not credited for _, _, credited, _ in RecordingPictures.traces)
    assert any(credited for _, _, credited, _ in RecordingPictures.traces)
    for trace, used, _credited, answer_inflow in RecordingPictures.traces:
        response = [t for t in trace.tokens if t.role != "prompt"]
        assert torch.equal(torch.tensor([t.weight for t in response]), used.float())
        if not trace.degenerate:
            assert abs(sum(t.f for t in trace.tokens if t.role == "answer") - 1) < 1e-5
            # the unit of flow reaches the answer over the map's edges (the source feeds the prompt only)
            assert abs(answer_inflow - 1) < 1e-5


def test_pictures_without_flow_credit_capture_only_the_drawn_rows(tiny_policy_dir, tmp_path, monkeypatch):
    calls = []
    import lightning_flow.callbacks.flow_pictures as module

    real = module.capture_attention
    monkeypatch.setattr(
        module,
        "capture_attention",
        lambda model, ids, *a, **k: calls.append(ids.shape[0]) or real(model, ids, *a, **k),
    )
    cli = fit(
        tiny_policy_dir, tmp_path, 1, f"--trainer.callbacks+={PICTURES}", "--trainer.callbacks.pictures=1"
    )
    assert cli.model.attention_layers is None  # no per-step capture was requested
    assert calls == [1]
    logged = events(Path(cli.trainer.log_dir))
    assert [i.step for i in logged.Images("flow/picture_0")] == [0]
    [(trace, used, recorded, _)] = RecordingPictures.traces
    assert not recorded and torch.equal(used, torch.ones_like(used))  # plain GRPO: all ones


def test_pick_rows_takes_best_and_worst_of_groups_that_differ():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 0.5, 0.5, 0.5, 3.0])  # groups of 3
    nonempty = torch.ones(9, dtype=torch.bool)
    best_worst = lambda rows: [(rows[0], "best"), (rows[1], "worst")]  # noqa: E731
    # groups 1 and 2 differ and come first (ties: earlier best, later worst); group 0 is all equal
    assert pick_rows(rewards, 3, 2, nonempty) == best_worst([4, 3]) + best_worst([8, 7])
    assert pick_rows(rewards[:3], 3, 1, nonempty[:3]) == best_worst([0, 2])  # all equal: first and last
    nonempty[4] = False  # an empty response is never shown
    assert pick_rows(rewards, 3, 1, nonempty) == best_worst([5, 3])
    nonempty[3:6] = torch.tensor([False, True, False])
    assert pick_rows(rewards, 3, 1, nonempty) == [(4, "best")]  # one row left in group 1


def test_completions_table_escapes_markdown_and_shortens():
    rollouts = SimpleNamespace(
        prompts=["What is 2|3?\n"],
        completions=["a*b_c " + "x" * 50 + " \\boxed{7}"],
        golds=["7"],
        rewards=torch.tensor([[1.0, 0.0]]),
        total_rewards=torch.tensor([1.0]),
        advantages=torch.tensor([0.5]),
    )
    table = completions_table(rollouts, [(0, "best")], ["correctness", "format"], group=8, limit=30)
    row = table.splitlines()[2]
    # eleven cells, no stray separators from the text
    assert row.startswith("| 0 | 0 | best | ") and row.count(" | ") == 10
    assert "2\\|3?↵" in row and "a\\*b\\_c" in row and " … " in row and "\\\\boxed\\{7\\}" in row
    assert row.endswith("| 7 | 7 | 1 | 0 | 1 | +0.500 |")


@pytest.mark.parametrize("every", [0, -1])
def test_every_n_steps_must_be_positive(every):
    with pytest.raises(ValueError):
        FlowPictures(every_n_steps=every)
