"""The one-event TensorBoard logger writes what Lightning's own TensorBoardLogger writes, and the
direct histogram what ``SummaryWriter.add_histogram_raw`` writes."""

from __future__ import annotations

import random

import pytest
import tensorboard.summary.writer.record_writer as record_writer
import torch
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tensorboard_masked_crc32c

from lightning_flow.loggers import TensorBoardLogger, masked_crc32c, write_bucket_histogram


def read_scalars(logger) -> dict[str, list[tuple[int, float]]]:
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("prefix", ["", "run"])
def test_same_tags_steps_and_values_as_lightnings_logger(tmp_path, prefix):
    steps = [
        {
            "train/reward": 0.25,
            "train/loss": torch.tensor(-1.5),
            "perf/step_time_s": 0.123456789,
            "credit/fallback_fraction": 0,
        },
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
    assert read_scalars(logger) == {
        "plain": [(3, 1.0)]
    }  # add_scalars writes "grouped" into sub-runs of its own
    assert sorted(p.name for p in (tmp_path / "lightning_logs" / "version_0").iterdir() if p.is_dir()) == [
        "grouped_a",
        "grouped_b",
    ]


def test_a_value_that_is_not_a_number_is_named(tmp_path):
    with pytest.raises(ValueError, match="metric 'train/text' = 'high' is not a number"):
        TensorBoardLogger(tmp_path).log_metrics({"train/text": "high"}, 0)


def test_bucket_histogram_is_the_event_add_histogram_raw_writes(tmp_path):
    ours, theirs = TensorBoardLogger(tmp_path / "ours"), TensorBoardLogger(tmp_path / "theirs")
    write_bucket_histogram(
        ours.experiment, "credit/weights", {1.5: 4, 1.0: 6, 2.0: 0}, 7
    )  # an empty bucket is left out
    theirs.experiment.add_histogram_raw(
        "credit/weights",
        min=1.0,
        max=1.5,
        num=10,
        sum=6 * 1.0 + 4 * 1.5,
        sum_squares=6 * 1.0 + 4 * 2.25,
        bucket_limits=[1.0, 1.5],
        bucket_counts=[6, 4],
        global_step=7,
    )
    write_bucket_histogram(ours.experiment, "credit/weights", {1.0: 0}, 8)  # nothing to draw: no event
    write_bucket_histogram(object(), "credit/weights", {1.0: 3}, 9)  # not a SummaryWriter: nothing, no error
    read = []
    for logger in (ours, theirs):
        logger.experiment.flush()
        events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
        events.Reload()
        read.append([(e.step, e.histogram_value) for e in events.Histograms("credit/weights")])
    assert read[0] == read[1] and len(read[0]) == 1


def test_record_checksums_are_tensorboards_own(tmp_path):
    """Ours in C, TensorBoard's in Python; TensorBoard's reader checks every record's checksum, so
    the reads of the tests above hold only if the records our logger's writer checksummed are right."""
    generator = random.Random(0)
    for size in (0, 1, 7, 8, 9, 1500):
        data = bytes(generator.randrange(256) for _ in range(size))
        assert masked_crc32c(data) == tensorboard_masked_crc32c(data), size
    TensorBoardLogger(tmp_path)
    assert record_writer.masked_crc32c is masked_crc32c
