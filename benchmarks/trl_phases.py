"""Generation and update of a GRPO step, ours against TRL's GRPOTrainer, alternating in one process.

    python benchmarks/trl_phases.py --models smoke --max-new-tokens 16                     # CPU check
    python benchmarks/trl_phases.py --device cuda --models qwen2.5-0.5b --repeats 5        # GPU

``trl_compare.py`` times whole steps, each framework in a process of its own; on a GPU machine
whose generation is host-bound, its runs of the same code spread by 10-20 %. Here both frameworks
are built once in one process, from the same model folder with the same settings as
``trl_compare.py``, and each phase is timed call by call in alternation (ours, TRL, ours, ...),
so that a difference between the frameworks' code shows apart from the machine's drift:

- generation: ``GRPOModule.make_rollouts`` against TRL's ``_generate_and_score_completions``
  (sample, decode, score and normalise one batch of the same prompts), under the autocast that
  each framework's bf16 setting puts around it;
- update: the forward, loss and backward over one generation batch in micro-batches, without the
  optimizer step (AdamW over the same LoRA parameters on both sides): ours
  ``GRPOModule.completion_logps`` and ``micro_batch_loss``, TRL's ``compute_loss``.

Per phase: the median seconds of each framework and the median of the per-repeat ratios
ours / TRL (after ``--warmup`` repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import paired_ratio  # noqa: E402
from gpu_check import synchronize  # noqa: E402
from trl_compare import add_workload_arguments, model_folder, our_cli, prompts_in_our_order, trl_trainer  # noqa: E402


def timed(call) -> float:
    synchronize()
    start = time.perf_counter()
    call()
    synchronize()
    return time.perf_counter() - start


def trl_micro_batch(inputs: dict, rows: slice) -> dict:
    """TRL's generation output restricted to ``rows`` (per-row tensors sliced, the rest as is)."""
    count = len(inputs["completion_ids"])
    return {
        k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and len(v) == count else v
        for k, v in inputs.items()
    }


def our_update(module, rollouts) -> None:
    """The update's forward, loss and backward per micro-batch as ``GRPOModule.update`` runs them, without the
    optimizer step."""
    tokens = rollouts.completion_mask.sum()
    for rows in module.micro_batches(rollouts):
        logps, _ = module.completion_logps(rollouts, rows)
        loss, _ = module.micro_batch_loss(rollouts, rows, logps, tokens)
        loss.backward()
    module.policy.zero_grad(set_to_none=True)


def trl_update(trainer, inputs: dict, micro_batches: list[slice]) -> None:
    """TRL's ``compute_loss`` and backward over the same micro-batches."""
    for rows in micro_batches:
        with trainer.accelerator.autocast():
            loss = trainer.compute_loss(trainer.model, trl_micro_batch(inputs, rows))
        loss.backward()
    trainer.model.zero_grad(set_to_none=True)


def measure(args, folder: Path, workdir: str) -> dict:
    cli = our_cli(args, folder, workdir, callbacks=[])
    module, data = cli.model, cli.datamodule
    module.to(args.device)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    prompts, golds = prompts_in_our_order(args, folder)
    trainer = trl_trainer(args, folder, workdir, prompts, golds, callbacks=[])
    # As Trainer's loop does before its first step: onto the device, forward wrapped in bf16 autocast.
    trainer.model = trainer.model_wrapped = trainer.accelerator.prepare_model(trainer.model)
    trainer.model.train()
    # set by Trainer's loop, read by compute_loss
    trainer.current_gradient_accumulation_steps = args.prompts_per_step * args.group // args.micro_batch
    # TRL's generation batch: each prompt repeated group times, as its sampler yields them.
    examples = [
        {"prompt": p, "golds": g}
        for p, g in zip(prompts[: args.prompts_per_step], golds[: args.prompts_per_step])
        for _ in range(args.group)
    ]
    autocast = torch.autocast(args.device, torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    last = {}  # each framework's latest generation batch, which its update then trains on

    def ours_generation():
        with autocast:
            last["ours"] = module.make_rollouts(batch)

    def trl_generation():
        last["trl"] = trainer._generate_and_score_completions(examples)

    def ours_update():
        with autocast:
            our_update(module, last["ours"])

    def trl_update_():
        # both batches hold prompts x group rows
        trl_update(trainer, last["trl"], module.micro_batches(last["ours"]))

    times = {phase: {"ours": [], "trl": []} for phase in ("generation", "update")}
    for repeat in range(args.warmup + args.repeats):
        # Alternate which framework goes first, so neither always follows the other.
        order = [("ours", ours_generation, ours_update), ("trl", trl_generation, trl_update_)]
        for name, generation, update in order if repeat % 2 == 0 else order[::-1]:
            generation_s, update_s = timed(generation), timed(update)
            if repeat >= args.warmup:
                times["generation"][name].append(generation_s)
                times["update"][name].append(update_s)
        print(
            f"repeat {repeat}: "
            + json.dumps({p: {n: round(t[n][-1], 4) for n in t if t[n]} for p, t in times.items()}),
            flush=True,
        )
    tokens = {
        "ours": {
            "prompt": int(last["ours"].prompt_mask.sum()),
            "completion": int(last["ours"].completion_mask.sum()),
        },
        "trl": {
            "prompt": int(last["trl"]["prompt_mask"].sum()),
            "completion": int(last["trl"]["completion_mask"].sum()),
        },
    }
    return {
        "tokens": tokens,
        "times": times,
        "medians_s": {p: {n: statistics.median(v) for n, v in t.items()} for p, t in times.items()},
        "ratio_ours_over_trl": {p: paired_ratio(t["ours"], t["trl"]) for p, t in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_arguments(parser)
    parser.add_argument("--models", nargs="+", default=["demo"], help="as trl_compare.py's --models")
    parser.add_argument("--warmup", type=int, default=1, help="alternations left out of the medians")
    parser.add_argument("--repeats", type=int, default=5, help="alternations measured")
    parser.add_argument("--out", type=Path, default=None, help="also write the times and summaries as JSON")
    args = parser.parse_args()
    args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    args.steps = 1  # one training batch's prompts
    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"cpu ({torch.get_num_threads()} torch threads)"
    )
    results = {
        "device": device,
        "settings": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            result = measure(args, model_folder(model, Path(tmp)), tmp)
            results["models"][model] = result
            print(
                f"\n{model}: median seconds per call over {args.repeats} alternations; tokens "
                f"{json.dumps(result['tokens'])}"
            )
            print("| phase | ours s | TRL s | ours / TRL (paired median) |\n|---|---|---|---|")
            for phase, medians in result["medians_s"].items():
                print(
                    f"| {phase} | {medians['ours']:.4f} | {medians['trl']:.4f} | "
                    f"{result['ratio_ours_over_trl'][phase]:.3f} |"
                )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
