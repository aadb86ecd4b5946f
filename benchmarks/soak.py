"""Run the CPU demo for a fixed wall time and report whether it stays healthy.

    python benchmarks/soak.py [--minutes 30] [--window 50]

Builds artifacts/demo-policy first when it is missing, then runs
``fit --config configs/demo.yaml`` without a step limit until ``--minutes`` pass (Lightning's
``max_time``), logging under runs/soak. Reports steps done, resident memory (Linux
/proc/self/status) after warm-up and at the end with the growth between them, non-finite logged
values and skipped steps, and the mean train reward per ``--window`` steps.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]


def resident_mib() -> float:
    """Current resident set size of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (the soak reads memory the Linux way)")


class SoakMonitor(Callback):
    """Samples memory, the reward and non-finite metrics after every training step."""

    def __init__(self, warmup_s: float) -> None:
        self.warmup_s, self.start = warmup_s, time.monotonic()
        self.rewards: list[float] = []
        self.rss: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self.nonfinite_values = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        self.rewards.append(metrics["train/reward"])
        self.nonfinite_values += sum(not math.isfinite(v) for v in metrics.values())
        self.rss.append((time.monotonic() - self.start, resident_mib()))

    def report(self, skipped_steps: int, window: int) -> str:
        after_warmup = next((mib for t, mib in self.rss if t >= self.warmup_s), self.rss[-1][1])
        end = self.rss[-1][1]
        peak = (
            max(mib for t, mib in self.rss if t >= self.warmup_s) if self.rss[-1][0] >= self.warmup_s else end
        )
        lines = [
            f"steps done: {len(self.rewards)} in {self.rss[-1][0] / 60:.1f} min",
            f"RSS: {self.rss[0][1]:.0f} MiB after step 1, {after_warmup:.0f} MiB after warm-up "
            f"({self.warmup_s / 60:.1f} min), "
            f"{end:.0f} MiB at the end (peak after warm-up {peak:.0f} MiB); growth after warm-up "
            f"{100 * (end / after_warmup - 1):+.1f} %",
            f"non-finite logged values: {self.nonfinite_values}; steps skipped for a non-finite gradient: "
            f"{skipped_steps}",
            f"mean train/reward per {window} steps:",
        ]
        for start in range(0, len(self.rewards), window):
            chunk = self.rewards[start : start + window]
            lines.append(f"  steps {start + 1:>5}-{start + len(chunk):<5} {statistics.mean(chunk):.3f}")
        return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="wall time of the fit")
    parser.add_argument(
        "--warmup-minutes",
        type=float,
        default=None,
        help="memory baseline after this (default: 10 %% of --minutes)",
    )
    parser.add_argument("--window", type=int, default=50, help="steps per reward average")
    args = parser.parse_args()
    if not (REPO / "artifacts" / "demo-policy" / "config.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "lightning_flow.demo_policy", "--config", "configs/demo.yaml"],
            cwd=REPO,
            check=True,
        )

    from lightning_flow.cli import main as cli_main

    monitor = SoakMonitor(
        warmup_s=60 * (args.warmup_minutes if args.warmup_minutes is not None else args.minutes / 10)
    )
    seconds = int(args.minutes * 60)
    cli = cli_main(
        [
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--trainer.max_steps=-1",
            f"--trainer.max_time={{'seconds': {seconds}}}",
            f"--trainer.logger.init_args.save_dir={REPO / 'runs'}",
            "--trainer.logger.init_args.name=soak",
            "--trainer.enable_progress_bar=false",
        ],
        run=False,
    )
    cli.trainer.callbacks.append(monitor)
    cli.trainer.fit(cli.model, cli.datamodule)
    print(monitor.report(cli.model.skipped_nonfinite_steps, args.window))


if __name__ == "__main__":
    main()
