"""Time per step of writing a step's scalars with Lightning's TensorBoardLogger and with ours.

    python benchmarks/logger_cost.py                 # 41 scalars a step (about what a demo step logs), 300 steps
    python benchmarks/logger_cost.py --scalars 80 --steps 500

Three writers write the same metrics into event files in a temporary folder, in rotating order
step by step: Lightning's logger as it ships (TensorBoard's Python record checksum), ours with that
checksum (one event per step alone) and ours as it runs (one event, checksums in C). Reported: the
median time of one ``log_metrics`` call and of ``log_metrics`` + ``save`` (what
``StepScalars.write`` calls on every logging step), and each as a fraction of Lightning's.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import tensorboard.summary.writer.record_writer as record_writer
import torch
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger

from lightning_flow.loggers import TensorBoardLogger, masked_crc32c

PYTHON_CRC = record_writer.masked_crc32c
"""TensorBoard's own record checksum (Python, without TensorFlow), before our logger swaps it."""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scalars", type=int, default=41)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    # Numbers and one-element tensors, as a step's scalars arrive.
    metrics = {
        f"group{i % 4}/scalar{i}": (torch.tensor(i / 7) if i % 2 else i / 7) for i in range(args.scalars)
    }
    folder = Path(tempfile.mkdtemp(prefix="logger_cost-"))
    try:
        # (logger, the record checksum its writer uses): save() waits for the writer thread, so each
        # measured call uses the checksum set just before it.
        loggers = {
            "Lightning": (LightningTensorBoardLogger(folder / "lightning"), PYTHON_CRC),
            "ours, Python CRC": (TensorBoardLogger(folder / "ours-python-crc"), PYTHON_CRC),
            "ours": (TensorBoardLogger(folder / "ours"), masked_crc32c),
        }
        times: dict[str, list[float]] = {
            f"{name} {part}": [] for name in loggers for part in ("log", "log+save")
        }
        for step in range(args.steps):
            order = list(loggers.items())
            for name, (logger, checksum) in order[step % 3 :] + order[: step % 3]:
                record_writer.masked_crc32c = checksum
                start = time.perf_counter()
                logger.log_metrics(metrics, step)
                logged = time.perf_counter()
                logger.save()
                saved = time.perf_counter()
                if step >= 10:  # warm-up: event files opened, first flushes done
                    times[f"{name} log"].append(logged - start)
                    times[f"{name} log+save"].append(saved - start)
    finally:
        record_writer.masked_crc32c = masked_crc32c
        shutil.rmtree(folder, ignore_errors=True)
    median = {key: statistics.median(values) for key, values in times.items()}
    print(f"{args.scalars} scalars a step, median over {args.steps - 10} steps")
    for part in ("log", "log+save"):
        lightning = median[f"Lightning {part}"]
        print(
            f"{part:9s} "
            + ", ".join(
                f"{name} {1000 * median[f'{name} {part}']:.3f} ms ({median[f'{name} {part}'] / lightning:.3f} of Lightning's)"
                for name in loggers
            )
        )


if __name__ == "__main__":
    main()
