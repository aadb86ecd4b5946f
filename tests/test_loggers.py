"""The one-event TensorBoard logger writes what Lightning's own TensorBoardLogger writes."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_flow.loggers import TensorBoardLogger


def read_scalars(logger) -> dict[str, list[tuple[int, float]]]:
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("prefix", ["", "run"])
def test_same_tags_steps_and_values_as_lightnings_logger(tmp_path, prefix):
    steps = [
        {"train/reward": 0.25, "train/loss": torch.tensor(-1.5), "perf/step_time_s": 0.123456789, "credit/fallback_fraction": 0},
        {"train/reward": 0.5, "val/accuracy": torch.tensor([0.75])},
    ]
    ours = TensorBoardLogger(tmp_path / "ours", prefix=prefix)
    theirs = LightningTensorBoardLogger(tmp_path / "theirs", prefix=prefix)
    for step, metrics in enumerate(steps):
        ours.log_metrics(metrics, step)
        theirs.log_metrics(metrics, step)
    expected = read_scalars(theirs)
    assert read_scalars(ours) == expected
    assert (f"{prefix}-train/reward" if prefix else "train/reward") in expected and len(expected) == 5


def test_dict_metrics_still_go_through_add_scalars(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_metrics({"plain": 1.0, "grouped": {"a": 1.0, "b": 2.0}}, 3)
    assert read_scalars(logger) == {"plain": [(3, 1.0)]}  # add_scalars writes "grouped" into sub-runs of its own
    assert sorted(p.name for p in (tmp_path / "lightning_logs" / "version_0").iterdir() if p.is_dir()) == ["grouped_a", "grouped_b"]


def test_a_value_that_is_not_a_number_is_named(tmp_path):
    with pytest.raises(ValueError, match="metric 'train/text' = 'high' is not a number"):
        TensorBoardLogger(tmp_path).log_metrics({"train/text": "high"}, 0)
