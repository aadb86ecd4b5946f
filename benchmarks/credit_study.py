"""Does flow credit learn faster? Held-out accuracy of GRPO with each credit signal, over seeds.

    python benchmarks/credit_study.py  # full study: 2 tasks x 5 signals x 3 seeds (< 1 h on 2 CPU cores)
    python benchmarks/credit_study.py --quick    # 1 seed, 40 steps (a few minutes), written to runs/
    python benchmarks/credit_study.py --losses grpo cispo gspo --signals uniform flow
        # any loss x credit signal

For each task (``configs/demo.yaml``: 1-2 operations; ``configs/demo-long.yaml``: 3-4 operations,
its own warm-started policy) it builds the warm-start policy if missing (deterministic), measures
its greedy accuracy on the held-out split once (step 0: every run starts from it, the LoRA update
being zero at init), then trains with ``FlowCredit(signal=...)`` for every loss, signal and seed
through our own CLI, the same number of generated batches, validating every ``--val-every`` of
them. ``uniform`` is plain GRPO through the same code path. A loss other than the task config's
own (``grpo``) takes the ``model.grpo`` section of its demo config (``configs/demo-<loss>.yaml``,
see docs/losses.md) on top of the task config; with μ updates per batch it runs μ times the
optimizer steps. The seed sets sampling, the LoRA init and the ``random`` signal; the data (train
order, held-out problems) is the same for every run.

Each run logs to ``runs/credit-study[-quick]/<task>/[<loss>-]<signal>/seed<n>/metrics.csv``; the study writes
``<out>/credit-study-cpu.json`` (every curve) and ``credit-study-cpu.png`` (mean curve with a +-1 std
band per signal), and prints the table of final accuracy (mean and sample std over seeds) for docs/results.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import curve_over_seeds, mean_and_std  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Task -> (fit config, supervised warm-start steps). 300 steps leave the long-chain policy at 0.07
# greedy accuracy (almost no group ever has a correct answer to learn from); 800 give 0.47.
TASKS = {
    "short chains (1-2 ops)": ("configs/demo.yaml", 300),
    "long chains (3-4 ops)": ("configs/demo-long.yaml", 800),
}
SIGNALS = ["uniform", "random", "entropy", "attention_received", "flow"]
# Loss -> the demo config whose model.grpo section sets it (None: the task config's own, grpo).
LOSSES = {
    "grpo": None,
    **{name: f"configs/demo-{name}.yaml" for name in ("gspo", "cispo", "sapo", "luspo", "80-20")},
}


def loss_overrides(loss: str) -> list[str]:
    """``--model.grpo.<option>=<value>`` for every option of the loss's demo config."""
    if LOSSES[loss] is None:
        return []
    grpo = yaml.safe_load((REPO / LOSSES[loss]).read_text())["model"]["grpo"]
    return [f"--model.grpo.{key}={value}" for key, value in grpo.items()]


def run_name(loss: str, signal: str) -> str:
    """A run's label and folder: the signal alone for the task's own loss."""
    return signal if LOSSES[loss] is None else f"{loss}-{signal}"


def read_val_curve(metrics_csv: Path) -> dict[int, float]:
    """``val/accuracy`` by training batches done (the optimizer steps at μ = 1), from a CSVLogger
    ``metrics.csv`` (other rows skipped).

    Lightning logs a validation with the 0-based index of the training batch it follows (not of
    the optimizer step: μ of those per batch), so the row of step s comes after s + 1 batches.
    """
    with open(metrics_csv, newline="") as handle:
        return {
            int(row["step"]) + 1: float(row["val/accuracy"])
            for row in csv.DictReader(handle)
            if row.get("val/accuracy")
        }


def cli_command(
    subcommand: str, config: str, run_dir: Path, name: str, version: str, args, extra: list[str]
) -> list[str]:
    """Our CLI on a task config, logging to ``run_dir/name/version/metrics.csv`` with a larger held-out
    set."""
    return [
        sys.executable,
        "-m",
        "lightning_flow",
        subcommand,
        "--config",
        config,
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        f"--trainer.logger.init_args.name={name}",
        f"--trainer.logger.init_args.version={version}",
        "--trainer.enable_progress_bar=false",
        f"--data.init_args.num_val={args.num_val}",
        f"--data.init_args.val_batch_size={args.num_val}",
        *extra,
    ]


def run(command: list[str], threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def wait(process: subprocess.Popen, what: str) -> None:
    _, stderr = process.communicate()
    if process.returncode:
        raise SystemExit(f"{what} failed:\n{stderr[-4000:]}")


def train_runs(task: str, config: str, run_dir: Path, args) -> dict[str, list[dict]]:
    """Every (loss, signal, seed) fit of one task, ``--jobs`` at a time; returns curves (by generated
    batch) and wall times per run name."""
    pending = [
        (loss, signal, seed) for seed in range(args.seeds) for loss in args.losses for signal in args.signals
    ]
    running: list[tuple[str, int, subprocess.Popen, float]] = []
    results: dict[str, list[dict]] = {
        run_name(loss, signal): [] for loss in args.losses for signal in args.signals
    }
    while pending or running:
        while pending and len(running) < args.jobs:
            loss, signal, seed = pending.pop(0)
            overrides = loss_overrides(loss)
            # trainer.max_steps counts optimizer steps: μ per generated batch.
            iterations = int(
                next((o.split("=")[1] for o in overrides if o.startswith("--model.grpo.num_iterations=")), 1)
            )
            callbacks = json.dumps(
                [
                    {
                        "class_path": "lightning_flow.callbacks.FlowCredit",
                        "init_args": {"signal": signal, "seed": seed},
                    }
                ]
            )
            extra = [
                f"--seed_everything={seed}",
                f"--trainer.max_steps={args.steps * iterations}",
                f"--trainer.val_check_interval={args.val_every}",
                "--trainer.enable_checkpointing=false",
                f"--trainer.callbacks={callbacks}",
                *overrides,
            ]
            command = cli_command("fit", config, run_dir, run_name(loss, signal), f"seed{seed}", args, extra)
            running.append((run_name(loss, signal), seed, run(command, args.threads), time.perf_counter()))
        name, seed, process, start = running.pop(0)
        wait(process, f"{task} {name} seed {seed}")
        curve = read_val_curve(run_dir / name / f"seed{seed}" / "metrics.csv")
        results[name].append({"seed": seed, "curve": curve, "wall_s": time.perf_counter() - start})
        print(f"{task} {name} seed {seed}: final accuracy {curve[max(curve)]:.3f}", flush=True)
    return results


def start_accuracy(config: str, run_dir: Path, args) -> float:
    """Greedy held-out accuracy of the warm-start policy (what every run starts from)."""
    wait(
        run(cli_command("validate", config, run_dir, "start", "warm", args, []), args.threads * args.jobs),
        f"validate {config}",
    )
    with open(run_dir / "start" / "warm" / "metrics.csv", newline="") as handle:
        return float(next(row["val/accuracy"] for row in csv.DictReader(handle) if row.get("val/accuracy")))


def summarise(task_runs: dict[str, list[dict]], start: float) -> dict[str, dict]:
    """Per signal, mean and std over seeds of: the curve (step 0 = the warm start), the final
    accuracy, and each run's mean accuracy over its validations (how early it learned)."""
    summary = {}
    for signal, runs in task_runs.items():
        curves = [{0: start, **run["curve"]} for run in runs]
        final_step = min(max(curve) for curve in curves)
        final_mean, final_std = mean_and_std([curve[final_step] for curve in curves])
        curve_mean, curve_std = mean_and_std([sum(run["curve"].values()) / len(run["curve"]) for run in runs])
        summary[signal] = {
            "curve": curve_over_seeds(curves),
            "final_step": final_step,
            "final_mean": final_mean,
            "final_std": final_std,
            "first_step": min(min(run["curve"]) for run in runs),
            "curve_mean": curve_mean,
            "curve_std": curve_std,
            "seeds": len(runs),
        }
    return summary


def _cell(mean: float, std: float, seeds: int) -> str:
    """'mean ± std'; one seed has no spread to report (the quick mode), so the mean alone."""
    return f"{mean:.3f} ± {std:.3f}" if seeds > 1 else f"{mean:.3f}"


def markdown_table(summaries: dict[str, dict[str, dict]]) -> str:
    """Final accuracy and mean accuracy over the validations, mean ± std over seeds, per task and signal."""
    header, cells = ["credit signal"], {}
    for task, summary in summaries.items():
        any_signal = next(iter(summary.values()))
        header += [
            f"{task}: step {any_signal['final_step']}",
            f"{task}: mean of steps {any_signal['first_step']}-{any_signal['final_step']}",
        ]
        for signal, s in summary.items():
            cells.setdefault(signal, []).extend(
                [
                    _cell(s["final_mean"], s["final_std"], s["seeds"]),
                    _cell(s["curve_mean"], s["curve_std"], s["seeds"]),
                ]
            )
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += [f"| {signal} | " + " | ".join(row) + " |" for signal, row in cells.items()]
    return "\n".join(lines) + "\n"


def plot(summaries: dict[str, dict[str, dict]], starts: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(6 * len(summaries), 4.2), squeeze=False)
    for ax, (task, summary) in zip(axes[0], summaries.items()):
        for signal, s in summary.items():
            steps, mean, std = zip(*s["curve"])
            (line,) = ax.plot(
                steps,
                mean,
                marker="o",
                markersize=3,
                label=signal,
                linewidth=2.2 if signal == "flow" else 1.3,
            )
            ax.fill_between(
                steps,
                [m - d for m, d in zip(mean, std)],
                [m + d for m, d in zip(mean, std)],
                color=line.get_color(),
                alpha=0.12,
            )
        ax.set_title(f"{task} (warm start {starts[task]:.2f})")
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("greedy held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    seeds = next(iter(next(iter(summaries.values())).values()))["seeds"]
    fig.suptitle(
        f"Mean over {seeds} seed{'s' if seeds > 1 else ''}" + (", band: ±1 std" if seeds > 1 else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_results(
    out: Path,
    settings: dict,
    minutes: float,
    starts: dict[str, float],
    runs: dict[str, dict[str, list[dict]]],
) -> None:
    summaries = {task: summarise(task_runs, starts[task]) for task, task_runs in runs.items()}
    (out / "credit-study-cpu.json").write_text(
        json.dumps(
            {
                "settings": settings,
                "minutes": minutes,
                "start_accuracy": starts,
                "summary": summaries,
                "runs": runs,
            },
            indent=1,
        )
    )
    table = markdown_table(summaries)
    plot(summaries, starts, out / "credit-study-cpu.png")
    print(f"\n{table}\nwarm start: {starts}; {minutes:.1f} min; written to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, 40 steps, validation every 20: a few minutes"
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--signals", nargs="+", default=SIGNALS, choices=SIGNALS)
    parser.add_argument(
        "--losses",
        nargs="+",
        default=["grpo"],
        choices=list(LOSSES),
        help="objectives (docs/losses.md); grpo: the task config's own",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument(
        "--num-val", type=int, default=400, help="held-out problems (the demo configs use 100)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default docs/results/, or runs/credit-study-quick with --quick)",
    )
    parser.add_argument(
        "--replot", action="store_true", help="only redo the table and plot from <out>/credit-study-cpu.json"
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.val_every = 1, 40, 20
    # every run's metrics.csv
    runs_root = REPO / "runs" / ("credit-study-quick" if args.quick else "credit-study")
    out = args.out or (runs_root if args.quick else REPO / "docs" / "results")
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        saved = json.loads((out / "credit-study-cpu.json").read_text())
        runs = {
            task: {
                signal: [{**r, "curve": {int(k): v for k, v in r["curve"].items()}} for r in rs]
                for signal, rs in by_signal.items()
            }
            for task, by_signal in saved["runs"].items()
        }
        return write_results(out, saved["settings"], saved["minutes"], saved["start_accuracy"], runs)

    started = time.perf_counter()
    starts, runs = {}, {}
    for task in args.tasks:
        config, warm_steps = TASKS[task]
        warm_start = [
            sys.executable,
            "-m",
            "lightning_flow.demo_policy",
            "--config",
            config,
            "--steps",
            str(warm_steps),
        ]
        wait(run(warm_start, args.threads * args.jobs), f"warm start {config}")
        run_dir = runs_root / Path(config).stem
        starts[task] = start_accuracy(config, run_dir, args)
        runs[task] = train_runs(task, config, run_dir, args)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "replot")}
    write_results(out, settings, (time.perf_counter() - started) / 60, starts, runs)


if __name__ == "__main__":
    main()
