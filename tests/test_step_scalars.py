"""Step scalars go to the loggers on the steps, and at the step numbers, that Lightning's own self.log
uses."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_flow.cli import main
from lightning_flow.rollouts import RolloutCallback
from lightning_flow.step_scalars import StepScalars

from .test_fit import tiny_args


class LogThroughLightning(RolloutCallback):
    """A scalar logged the ordinary Lightning way, as the reference for cadence and step numbers."""

    def on_rollouts_end(self, trainer, pl_module, rollouts):
        pl_module.log("probe/lightning", 1.0, on_step=True)


def test_step_scalars_follow_lightnings_cadence_and_steps(tiny_policy_dir, tmp_path):
    # nonzero advantages: credit every step
    cli = main(
        [
            "fit",
            *tiny_args(tiny_policy_dir, tmp_path, steps=7),
            "--trainer.limit_val_batches=0",
            "--trainer.log_every_n_steps=3",
            "--trainer.callbacks+=lightning_flow.callbacks.FlowCredit",
            "--trainer.callbacks+=tests.test_step_scalars.LogThroughLightning",
            '--model.rewards.custom={"tests.test_fit.length_reward": 1.0}',
        ]
    )
    events = EventAccumulator(str(Path(cli.trainer.log_dir)), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    reference = [e.step for e in events.Scalars("probe/lightning")]
    assert reference == [2, 5]  # batches 3 and 6 of 7, numbered from 0
    for tag in [
        "train/reward",
        "train/response_length_max",
        "train/verifier_timeouts",
        "perf/step_time_s",
        "credit/time_s",
        "credit/boosted_fraction",
    ]:
        assert [e.step for e in events.Scalars(tag)] == reference, tag
    assert cli.trainer.callback_metrics["reward"] >= 0  # the progress bar's scalars still go through self.log


def test_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="reduce='median'"):
        StepScalars().add({"x": 1.0}, reduce="median")
