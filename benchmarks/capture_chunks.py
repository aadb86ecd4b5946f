"""The capture's chunking on this device: its settings against each other, in one process.

    python benchmarks/capture_chunks.py --lengths 256 1024 --batches 16                # CPU, tiny Llama
    python benchmarks/capture_chunks.py --shape qwen2.5-1.5b --lengths 256 1024 --batches 16 64

The recorder splits each recorded layer's scores into chunks of heads x query rows: a chunk holds
at most an eighth of the [n, T, T] map or ``_MIN_CHUNK_ELEMENTS`` (whichever is larger), and a
causal layer of ``_CAUSAL_SPLIT`` rows or more takes at least 4 row chunks, whose queries score
only the keys they see. Both defaults were chosen on this project's CPU; on a GPU, where many small
chunks may cost more in launches than they save in arithmetic, they are an open question. Here
the update of flow_overhead.py records attention under each setting in turn (alternating,
``--repeats`` rounds after a warm-up of each), and per (L, N) prints each setting's median
capture seconds (the recorder's stopwatch) and its ratio to the default, and checks that every
setting records the same maps as the default (largest absolute difference).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flow_overhead import StepParts, add_shape_arguments, build_module, make_rollouts  # noqa: E402
from lightning_flow.callbacks.flow_credit import FlowCredit  # noqa: E402

import lightning_flow.capture as capture  # noqa: E402

SETTINGS = {
    "default": (capture._MIN_CHUNK_ELEMENTS, capture._CAUSAL_SPLIT),
    "no causal split": (capture._MIN_CHUNK_ELEMENTS, sys.maxsize),
    "chunk floor 16M": (2**24, capture._CAUSAL_SPLIT),
    "chunk floor 16M, no split": (2**24, sys.maxsize),
}
"""Name -> (``_MIN_CHUNK_ELEMENTS``, ``_CAUSAL_SPLIT``). Chunks per recorded layer of Qwen2.5-1.5B
(12 heads) in micro-batches of 8 (by ``_chunk_shape``): at L = 256 (T = 320) 48, 12, 4 and 1 in
this order; at L = 1024 (T = 1088) 96, 96, 48 and 12. A 16M-element floor allows 64 MiB of float32
scores, and as much again for their probabilities, per chunk."""


def record_with(setting: str, parts: StepParts) -> tuple[float, torch.Tensor]:
    """Capture seconds of one recorded update under ``setting``, and the maps it recorded (all
    micro-batches')."""
    capture._MIN_CHUNK_ELEMENTS, capture._CAUSAL_SPLIT = SETTINGS[setting]
    try:
        seconds = parts.update(record=True)
    finally:
        capture._MIN_CHUNK_ELEMENTS, capture._CAUSAL_SPLIT = SETTINGS["default"]
    return seconds, torch.cat([maps for _, maps in parts.maps])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_shape_arguments(parser)
    parser.set_defaults(lengths=[256, 1024], batches=[16], repeats=4)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        module = build_module(args, Path(tmp))
        print(
            f"device: {device}; model: {args.shape}; capture layers {module.attention_layers}; micro-batches "
            f"of {args.micro_batch}"
        )
        print(
            f"{'L':>5} {'N':>4}  "
            + "  ".join(f"{name:>26}" for name in SETTINGS)
            + "   largest map difference"
        )
        for length in args.lengths:
            for n in args.batches:
                rollouts = make_rollouts(module, n, args.prompt_length, length, seed=length + n)
                parts = StepParts(module, rollouts, length, FlowCredit(signal="flow"))
                seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
                maps = {name: record_with(name, parts)[1] for name in SETTINGS}  # warm-up of each
                difference = max(float((maps[name] - maps["default"]).abs().max()) for name in SETTINGS)
                for repeat in range(args.repeats):
                    order = list(SETTINGS) if repeat % 2 == 0 else list(reversed(SETTINGS))
                    for name in order:
                        seconds[name].append(record_with(name, parts)[0])
                medians = {name: statistics.median(values) for name, values in seconds.items()}
                cells = [
                    f"{medians[name]:>13.4f} s ({medians[name] / medians['default']:>5.2f}x)"
                    for name in SETTINGS
                ]
                print(
                    f"{length:>5} {n:>4}  "
                    + "  ".join(f"{cell:>26}" for cell in cells)
                    + f"   {difference:.2e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
