"""Time per step of writing a step's scalars with Lightning's TensorBoardLogger and with ours.

    python benchmarks/logger_cost.py                 # 41 scalars a step (about what a demo step logs), 300 steps
    python benchmarks/logger_cost.py --scalars 80 --steps 500

Both loggers write the same metrics into event files in a temporary folder, in alternating order
step by step; reported: the median time of one ``log_metrics`` call and of ``log_metrics`` +
``save`` (what ``StepScalars.write`` calls on every logging step), and ours / Lightning's.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger

from lightning_flow.loggers import TensorBoardLogger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scalars", type=int, default=41)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    # Numbers and one-element tensors, as a step's scalars arrive.
    metrics = {f"group{i % 4}/scalar{i}": (torch.tensor(i / 7) if i % 2 else i / 7) for i in range(args.scalars)}
    folder = Path(tempfile.mkdtemp(prefix="logger_cost-"))
    try:
        loggers = {"lightning": LightningTensorBoardLogger(folder / "lightning"), "ours": TensorBoardLogger(folder / "ours")}
        times: dict[str, list[float]] = {f"{name} {part}": [] for name in loggers for part in ("log", "log+save")}
        for step in range(args.steps):
            for name, logger in (loggers.items() if step % 2 else reversed(loggers.items())):
                start = time.perf_counter()
                logger.log_metrics(metrics, step)
                logged = time.perf_counter()
                logger.save()
                saved = time.perf_counter()
                if step >= 10:  # warm-up: event files opened, first flushes done
                    times[f"{name} log"].append(logged - start)
                    times[f"{name} log+save"].append(saved - start)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    median = {key: statistics.median(values) for key, values in times.items()}
    print(f"{args.scalars} scalars a step, median over {args.steps - 10} steps")
    for part in ("log", "log+save"):
        lightning, ours = median[f"lightning {part}"], median[f"ours {part}"]
        print(f"{part:9s} Lightning {1000 * lightning:.3f} ms, ours {1000 * ours:.3f} ms, ours / Lightning {ours / lightning:.3f}")


if __name__ == "__main__":
    main()
