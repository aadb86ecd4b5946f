"""Print a run's reward curve, validation accuracy, step time and, with flow credit, what capture and credit
cost.

python benchmarks/read_curve.py runs/demo/version_0 [--window 50]
"""

from __future__ import annotations

import argparse
import statistics

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("log_dir")
    parser.add_argument("--window", type=int, default=50, help="steps per averaged window")
    parser.add_argument(
        "--skip", type=int, default=5, help="first steps left out of the cost medians (warm-up)"
    )
    args = parser.parse_args()
    events = EventAccumulator(args.log_dir)
    events.Reload()
    tags = events.Tags()["scalars"]
    rewards = [e.value for e in events.Scalars("train/reward")]
    print(f"steps: {len(rewards)}")
    for start in range(0, len(rewards), args.window):
        window = rewards[start : start + args.window]
        print(
            f"steps {start + 1:>4}-{start + len(window):<4} mean train/reward {statistics.mean(window):.3f}"
        )
    if "val/accuracy" in tags:
        print(
            "val/accuracy at step: "
            + ", ".join(f"{e.step}: {e.value:.3f}" for e in events.Scalars("val/accuracy"))
        )
    step_times = [e.value for e in events.Scalars("perf/step_time_s")]
    print(f"median step time {statistics.median(step_times):.3f} s")
    if "credit/kept_flow" in tags:  # pruning of the flow graphs: share of the incoming flow their edges carry
        kept = [e.value for e in events.Scalars("credit/kept_flow")]
        print(
            "mean credit/kept_flow per window: "
            + ", ".join(
                f"{statistics.mean(kept[start : start + args.window]):.3f}"
                for start in range(0, len(kept), args.window)
            )
        )
    if "perf/capture_time_s" in tags and "credit/time_s" in tags:  # a run with a credit callback
        skip = args.skip

        def median(tag: str) -> float:
            return statistics.median(e.value for e in events.Scalars(tag)[skip:])

        shares = [
            a.value + b.value
            for a, b in zip(
                events.Scalars("perf/capture_share")[skip:], events.Scalars("perf/credit_share")[skip:]
            )
        ]
        print(
            f"medians after the first {skip} steps: step {median('perf/step_time_s'):.4f} s, capture "
            f"{1000 * median('perf/capture_time_s'):.2f} ms "
            f"({100 * median('perf/capture_share'):.2f} %), credit {1000 * median('perf/credit_time_s'):.2f} "
            "ms "
            f"({100 * median('perf/credit_share'):.2f} %), capture + credit "
            f"{100 * statistics.median(shares):.2f} % of the step"
        )


if __name__ == "__main__":
    main()
