"""What flow credit adds to a step of a config, measured A/B on identical rollouts in one process.

    python benchmarks/credit_ab.py  # configs/demo-flow.yaml's model and FlowCredit
    python benchmarks/credit_ab.py --config configs/demo-flow.yaml --batches 8 --repeats 12 --threads 1

The config's model samples ``--batches`` batches of rollouts once; then, in each round, every
batch is sampled again (timed) and, right after, the rest of the training step
(``GRPOModule.learn``: no-grad passes, update, the step's scalars written to the config's logger)
runs over its rollouts twice back to back, in alternating order: without credit (no attention
recorded, uniform weights) and with the config's ``FlowCredit`` (recording in the update's
forward, credit per micro-batch, its ``on_rollouts_end`` with its scalars).
Each such pair gives what credit adds (the paired difference) and its share of a step timed at
the same moment (sampling + the rest without credit), so that the machine's drift in speed over
a run cancels out. The adapter, optimizer and schedule are set back after every update
(``TrainingState``), so every update starts from the same state and every sampling samples the
policy that wrote the rollouts. Reported, as medians over the batches and the rounds after the first two:
sampling, the rest without and with credit, the paired difference, the share, the logged capture
and credit seconds and credit's parts (answer search, solver, pruning, graphs, weights). Unlike the logged
``perf/*_share`` scalars, the difference also holds what the stopwatches do not see (switching
the attention implementation, buffers, calls, logging).
``--no-logging`` leaves the logger out (nothing written, in either mode).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import lightning_flow.callbacks.flow_credit as flow_credit
import torch
import yaml
from lightning.pytorch import Callback
from lightning_flow.callbacks import FlowCredit

from lightning_flow.cli import main as cli_main

PARTS = ("answer_masks", "solve_maps", "prune_edges", "solved_graphs", "credit_weights")
"""FlowCredit's parts, timed where it calls them: the answer search, the solver, the graphs, the weights."""


def time_parts(seconds: dict[str, float]) -> None:
    """Wrap FlowCredit's parts (as its module calls them) so each call adds its time to ``seconds``."""
    for name in PARTS:
        inner = getattr(flow_credit, name)

        def timed(*args, _inner=inner, _name=name, **kwargs):
            start = time.perf_counter()
            out = _inner(*args, **kwargs)
            seconds[_name] += time.perf_counter() - start
            return out

        setattr(flow_credit, name, timed)


class TrainingState:
    """The adapter's weights and the optimizer's and the schedule's states, restored after every
    update: each update then starts where the others did, and sampling timed between updates
    samples from the same policy as the rollouts were (at lr 1e-3 the demo's policy, and the
    length of what it writes, would drift over the run's ~200 updates)."""

    def __init__(self, pl_module) -> None:
        self.optimizer, self.scheduler = pl_module.optimizers().optimizer, pl_module.lr_schedulers()
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.weights = [p.detach().clone() for p in self.params]
        self.optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        self.scheduler_state = copy.deepcopy(self.scheduler.state_dict())

    @torch.no_grad()
    def restore(self) -> None:
        for param, weight in zip(self.params, self.weights):
            param.copy_(weight)
        # Copies: loading keeps the given tensors, which the next step would update in place.
        self.optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))
        self.scheduler.load_state_dict(copy.deepcopy(self.scheduler_state))


class OnFirstBatch(Callback):
    """Runs ``fn(trainer, module)`` when the first training batch starts."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.fn(trainer, pl_module)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        default="configs/demo-flow.yaml",
        help="a config whose trainer.callbacks hold a FlowCredit",
    )
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument(
        "--repeats", type=int, default=12, help="rounds over the batches; the first two are warm-up"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--no-logging",
        action="store_true",
        help="leave out the credit's per-step scalars",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # the config's checkpoints and logs land here, not in the repo
    workdir = tempfile.mkdtemp(prefix="credit_ab-")
    logger = (yaml.safe_load(Path(args.config).read_text()).get("trainer") or {}).get("logger")
    if args.no_logging or not logger:
        logging = ["--trainer.logger=false"]
    else:  # the config's logger, writing into the work folder
        logging = (
            [f"--trainer.logger.init_args.save_dir={workdir}"]
            if "save_dir" in (logger.get("init_args") or {})
            else []
        )
    cli = cli_main(
        [
            "--config",
            args.config,
            *logging,
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={workdir}",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
        ],
        run=False,
    )
    credits = [c for c in cli.trainer.callbacks if isinstance(c, FlowCredit)]
    if not credits:
        raise SystemExit(f"{args.config} lists no FlowCredit under trainer.callbacks")
    credit, module, trainer = credits[0], cli.model, cli.trainer
    trainer.callbacks.remove(credit)
    times: dict[str, list[float]] = {
        key: [] for key in ("sampling", "off", "on", "added", "share", "capture", "credit", *PARTS)
    }
    part_seconds = dict.fromkeys(PARTS, 0.0)  # this update's
    time_parts(part_seconds)

    def measure(trainer_, pl_module) -> None:
        loader = iter(trainer_.datamodule.train_dataloader())
        batches = [next(loader) for _ in range(args.batches)]
        rollouts = [pl_module.make_rollouts(batch_) for batch_ in batches]
        layers = pl_module.attention_layers
        state = None  # taken after the first update, when the optimizer holds its moments
        for repeat in range(args.repeats):
            for index, item in enumerate(rollouts):
                # The batch's sampling again (seeded: the same rollouts), right before its pair, so that
                # each pair's share is read against a step timed at the same moment: this machine's
                # speed drifts by tens of percent over a run.
                start = time.perf_counter()
                pl_module.make_rollouts(batches[index])
                sampling = time.perf_counter() - start
                # Off and on back to back on each batch, their order alternating: both see the same
                # allocator state (whole rounds of one mode made page faults land on one side).
                for mode in ("off", "on") if (repeat + index) % 2 == 0 else ("on", "off"):
                    if mode == "on":
                        trainer_.callbacks.append(credit)
                        credit.setup(trainer_, pl_module, "fit")  # asks the module for attention
                    item.token_weights = torch.ones_like(item.completion_mask)
                    item.flow_graphs = []
                    part_seconds.update(dict.fromkeys(PARTS, 0.0))
                    start = time.perf_counter()
                    # the step after sampling, scalars and logging included
                    pl_module.learn(item, sampling_seconds=sampling)
                    elapsed = time.perf_counter() - start
                    state = state or TrainingState(pl_module)
                    state.restore()
                    if mode == "on":
                        trainer_.callbacks.remove(credit)
                        pl_module.attention_layers = layers  # back to no recording
                    if repeat < 2:
                        continue
                    times[mode].append(elapsed)
                    if mode == "on":
                        times["capture"].append(pl_module.capture_seconds)
                        times["credit"].append(pl_module.credit_seconds)
                        for name in PARTS:
                            times[name].append(part_seconds[name])
                if repeat >= 2:
                    times["sampling"].append(sampling)
                    times["added"].append(times["on"][-1] - times["off"][-1])
                    times["share"].append(times["added"][-1] / (sampling + times["off"][-1]))
        trainer_.should_stop = True

    # inside fit, where the update's optimizer and strategy exist
    trainer.callbacks.append(OnFirstBatch(measure))
    try:
        trainer.fit(module, cli.datamodule)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    median = {key: statistics.median(values) for key, values in times.items()}
    added = median["added"]  # the median over batches and repeats of (on - off) on the same batch
    step = median["sampling"] + median["off"]
    print(f"threads {torch.get_num_threads()}; {args.batches} batches x {args.repeats - 2} repeats")
    print(
        f"step without credit {1000 * step:.1f} ms (sampling {1000 * median['sampling']:.1f} + the rest "
        f"{1000 * median['off']:.1f})"
    )
    print(
        f"the rest with credit {1000 * median['on']:.1f} ms: credit adds {1000 * added:.2f} ms = "
        f"{100 * median['share']:.2f} % of the step "
        f"(logged: capture {1000 * median['capture']:.2f} ms, credit {1000 * median['credit']:.2f} ms)"
    )
    print("credit by part: " + ", ".join(f"{name} {1000 * median[name]:.2f} ms" for name in PARTS))


if __name__ == "__main__":
    main()
