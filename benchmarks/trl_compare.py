"""Step throughput and peak memory of this project's GRPO step against TRL's GRPOTrainer.

    pip install -e '.[bench]'                                   # TRL, pinned
    python benchmarks/trl_compare.py                            # CPU: demo policy and stories260K
    python benchmarks/trl_compare.py --device cuda --models qwen2.5-0.5b --steps 4 --max-new-tokens 256 \\
        --micro-batch 16 --prompts-per-step 4                   # GPU: real shape, random weights

Both frameworks run the same workload from the same model folder: the same prompts in the same
order (the arithmetic DataModule's training batches), the same group size, response length, LoRA
rank/alpha/targets, loss type (beta 0, one update per generated batch, no old-log-prob pass),
learning rate, clipping and number of steps, with logging, checkpoints and progress bars off.
Each run is its own subprocess (so its peak memory is its own); the three runs of a round (ours,
TRL, ours with flow credit) alternate, rotating their order each round.

Per step, timed identically in both (see ``StepRecord``):
- whole step: from the framework's step-begin hook to its step-end hook (Lightning
  ``on_train_batch_start/end``, transformers ``on_step_begin/end``);
- generation: the call that samples, decodes, scores and normalises a batch (our
  ``GRPOModule.make_rollouts``, TRL's ``_generate_and_score_completions``); generation tokens/s
  counts response tokens up to and including the first EOS;
- update: the rest of the step (for ours with flow credit that includes capture and credit);
  update tokens/s counts prompt + response tokens.
A run reports the median over its steps after ``--warmup``; a table entry is the median over
``--repeats`` runs; a ratio is the median over rounds of the ratio within a round. Peak memory
is the process's RSS high-water mark on the CPU (libraries included) and
``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import median_after_warmup, paired_ratio  # noqa: E402
from gpu_check import SHAPES, SMOKE_SHAPE, peak_memory_bytes, random_model_folder, synchronize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {
    "demo": REPO / "artifacts" / "demo-policy",
    "stories260K": REPO.parent / "shared" / "data" / "models" / "stories260K" / "hf",
}
# round 1 runs this order: ours vs TRL first, where a time limit may cut a round
FRAMEWORKS = [
    "ours",
    "trl",
    "ours+flow",
]


class StepRecord:
    """Per-step timestamps and token counts, filled by the framework's own step hooks; on a GPU
    also the peak memory of each step's generation and of its update; with ``profile_step`` set,
    that step also runs under torch.profiler (``profile_table``)."""

    def __init__(self, profile_step: int | None = None) -> None:
        self.steps: list[dict] = []
        self._current: dict = {}
        self.profile_step = profile_step
        self._profiler: torch.profiler.profile | None = None
        self.profile_table = ""
        self.peak_bytes = 0  # the run's peak, kept across the per-phase resets

    def _phase_peak_mib(self) -> float | None:
        """Peak CUDA memory since the last call (None on a CPU), then a fresh peak count."""
        if not torch.cuda.is_available():
            return None
        peak = torch.cuda.max_memory_allocated()
        self.peak_bytes = max(self.peak_bytes, peak)
        torch.cuda.reset_peak_memory_stats()
        return peak / 2**20

    def begin(self) -> None:
        synchronize()
        if len(self.steps) == self.profile_step:
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            )
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()
        self._phase_peak_mib()  # what came before this step is not its generation's
        self._current = {"start": time.perf_counter()}

    def generated(self, seconds: float, completion_mask: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        responses = completion_mask.sum().item()
        self._current.update(
            generation_s=seconds,
            generation_tokens=responses,
            update_tokens=responses + prompt_mask.sum().item(),
            response_length=responses / completion_mask.shape[0],
            generation_peak_mib=self._phase_peak_mib(),
        )

    def end(self) -> None:
        synchronize()
        step = self._current.pop("start")
        self._current["step_s"] = time.perf_counter() - step
        self._current["update_peak_mib"] = self._phase_peak_mib()
        self.steps.append(self._current)
        if self._profiler is not None:  # timed above without the profiler's own cost
            self._profiler.stop()
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            self.profile_table = self._profiler.key_averages().table(sort_by=sort, row_limit=40)
            self._profiler = None


def time_generation(owner, name: str, record: StepRecord, masks) -> None:
    """Wrap ``owner.name`` (the framework's generate-and-score call) so each call is timed and counted."""
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        synchronize()
        record.generated(time.perf_counter() - start, *masks(out))
        return out

    setattr(owner, name, timed)


class LightningSteps(Callback):
    def __init__(self, record: StepRecord) -> None:
        self.record = record

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record.begin()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record.end()


def our_cli(args, folder: Path, workdir: str, callbacks: list):
    """Our LightningCLI for the workload (demo config's task, the comparison's settings), not run."""
    from lightning_flow.cli import main as cli_main

    cli = cli_main(
        [
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            f"--model.policy.name_or_path={folder}",
            f"--model.policy.dtype={args.dtype}",
            f"--model.policy.lora_rank={args.lora_rank}",
            f"--model.policy.lora_alpha={args.lora_alpha}",
            f"--model.sampling.num_generations={args.group}",
            f"--model.sampling.max_new_tokens={args.max_new_tokens}",
            f"--model.grpo.loss_type={args.loss_type}",
            f"--model.grpo.micro_batch_size={args.micro_batch}",
            f"--model.optim.lr={args.lr}",
            f"--data.batch_size={args.prompts_per_step}",
            f"--trainer.accelerator={args.device}",
            f"--trainer.max_steps={args.steps}",
            # bf16 weights: autocast around the step, as TRL's bf16=True (the fp32 LoRA matmuls then run in
            # bf16)
            f"--trainer.precision={'bf16-mixed' if args.dtype == 'bfloat16' else '32-true'}",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_checkpointing=false",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks=[]",
            f"--trainer.default_root_dir={workdir}",
        ],
        run=False,
    )
    cli.trainer.callbacks.extend(callbacks)
    return cli


def run_ours(args, record: StepRecord, flow: bool, workdir: str) -> None:
    from lightning_flow.callbacks import FlowCredit

    # FlowCredit's defaults are configs/demo-flow.yaml's settings (signal flow, top 40 %, boost 1.5).
    cli = our_cli(
        args,
        args.model_path,
        workdir,
        [LightningSteps(record), *([FlowCredit(signal="flow")] if flow else [])],
    )
    time_generation(
        cli.model, "make_rollouts", record, lambda rollouts: (rollouts.completion_mask, rollouts.prompt_mask)
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def prompts_in_our_order(args, folder: Path) -> tuple[list[str], list[str]]:
    """The prompts and golds of our first ``steps`` training batches, in the order our DataModule yields
    them."""
    from lightning_flow.datamodules import ArithmeticDataModule

    from lightning_flow.demo_policy import demo_settings

    _, data_args = demo_settings(str(REPO / "configs" / "demo.yaml"))
    data = ArithmeticDataModule(
        **{**data_args, "tokenizer": str(folder), "batch_size": args.prompts_per_step}
    )
    data.setup("fit")
    prompts, golds = [], []
    for _, batch in zip(range(args.steps), data.train_dataloader()):
        prompts += batch["prompts"]
        golds += batch["golds"]
    return prompts, golds


def trl_trainer(args, folder: Path, workdir: str, prompts: list[str], golds: list[str], callbacks: list):
    """TRL's GRPOTrainer for the same workload as ``our_cli``, on ``prompts`` in this order, not run."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from lightning_flow.rewards import correctness_reward
    from lightning_flow.tokenizer import load_tokenizer

    responses = args.prompts_per_step * args.group
    config = GRPOConfig(
        output_dir=workdir,
        max_steps=args.steps,
        seed=0,
        use_cpu=args.device == "cpu",
        bf16=args.dtype == "bfloat16",
        # One optimizer step per generated batch of `responses`, in micro-batches of `micro_batch`, as ours
        # does.
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=responses // args.micro_batch,
        num_generations=args.group,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        loss_type=args.loss_type,
        beta=0.0,
        epsilon=0.2,
        num_iterations=1,
        scale_rewards="group",
        learning_rate=args.lr,
        warmup_steps=10,
        lr_scheduler_type="constant_with_warmup",
        max_grad_norm=1.0,
        weight_decay=0.0,
        gradient_checkpointing=False,
        shuffle_dataset=False,
        report_to="none",
        logging_steps=args.steps,
        save_strategy="no",
        disable_tqdm=True,
        log_completions=False,
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, args.dtype), attn_implementation="sdpa"
    )
    return GRPOTrainer(
        model=model,
        reward_funcs=correctness_reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts, "golds": golds}),
        processing_class=load_tokenizer(str(folder)),
        peft_config=LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
        callbacks=callbacks,
    )


def run_trl(args, record: StepRecord, workdir: str) -> None:
    from transformers import TrainerCallback

    class TrainerSteps(TrainerCallback):
        def on_step_begin(self, *_, **__) -> None:
            record.begin()

        def on_step_end(self, *_, **__) -> None:
            record.end()

    trainer = trl_trainer(
        args,
        args.model_path,
        workdir,
        *prompts_in_our_order(args, args.model_path),
        callbacks=[TrainerSteps()],
    )
    time_generation(
        trainer,
        "_generate_and_score_completions",
        record,
        lambda out: (out["completion_mask"], out["prompt_mask"]),
    )
    trainer.train()


def worker(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    record = StepRecord(profile_step=args.warmup if args.profile else None)
    with tempfile.TemporaryDirectory() as workdir:
        if args.worker == "trl":
            run_trl(args, record, workdir)
        else:
            run_ours(args, record, args.worker == "ours+flow", workdir)
    peak = max(record.peak_bytes, peak_memory_bytes())
    args.result.write_text(
        json.dumps({"steps": record.steps, "peak_memory_bytes": peak, "profile": record.profile_table})
    )


def summarise_run(run: dict, warmup: int) -> dict:
    """One run's medians over its steps after warm-up."""
    steps = run["steps"]

    def median(key) -> float:
        return median_after_warmup([key(s) for s in steps], warmup)

    return {
        "step_s": median(lambda s: s["step_s"]),
        "generation_tokens_per_s": median(lambda s: s["generation_tokens"] / s["generation_s"]),
        "update_tokens_per_s": median(lambda s: s["update_tokens"] / (s["step_s"] - s["generation_s"])),
        "response_length": median(lambda s: s["response_length"]),
        "peak_memory_mib": run["peak_memory_bytes"] / 2**20,
        # GPU only (else NaN): the highest generation and update peaks over the run's steps
        "generation_peak_mib": max(s["generation_peak_mib"] or math.nan for s in steps),
        "update_peak_mib": max(s["update_peak_mib"] or math.nan for s in steps),
    }


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Medians over repeats per framework, and ratios paired within each round."""
    import statistics

    keys = [
        "step_s",
        "generation_tokens_per_s",
        "update_tokens_per_s",
        "response_length",
        "peak_memory_mib",
        "generation_peak_mib",
        "update_peak_mib",
    ]
    medians = {fw: {k: statistics.median(r[k] for r in rs) for k in keys} for fw, rs in runs.items()}
    ratios = {
        f"{a} / {b}": {k: paired_ratio([r[k] for r in runs[a]], [r[k] for r in runs[b]]) for k in keys}
        for a, b in (("ours", "trl"), ("ours+flow", "ours"))
    }
    return {"medians": medians, "ratios": ratios}


def model_folder(name: str, workdir: Path) -> Path:
    if name in FOLDERS:
        if not (FOLDERS[name] / "config.json").is_file():
            raise SystemExit(
                f"{FOLDERS[name]} is missing (demo: python -m lightning_flow.demo_policy --config "
                "configs/demo.yaml)"
            )
        return FOLDERS[name]
    folder = workdir / name
    random_model_folder(SMOKE_SHAPE if name == "smoke" else SHAPES[name], folder)
    return folder


def print_table(model: str, summary: dict) -> None:
    print(f"\n{model}: medians over repeats")
    print(
        "| run | step s | generation tok/s | update tok/s | peak memory MiB | generation / update peak MiB "
        "| mean response tokens |\n|---|---|---|---|---|---|---|"
    )
    for fw, m in summary["medians"].items():
        print(
            f"| {fw} | {m['step_s']:.3f} | {m['generation_tokens_per_s']:.0f} | "
            f"{m['update_tokens_per_s']:.0f} | {m['peak_memory_mib']:.0f} "
            f"| {m['generation_peak_mib']:.0f} / {m['update_peak_mib']:.0f} | {m['response_length']:.1f} |"
        )
    for name, r in summary["ratios"].items():
        print(
            f"| ratio {name} | {r['step_s']:.3f} | {r['generation_tokens_per_s']:.3f} | "
            f"{r['update_tokens_per_s']:.3f} | {r['peak_memory_mib']:.3f} "
            f"| {r['generation_peak_mib']:.3f} / {r['update_peak_mib']:.3f} | {r['response_length']:.3f} |"
        )


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload both frameworks run (shared with trl_phases.py)."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group", type=int, default=8, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--micro-batch", type=int, default=64, help="responses per forward/backward")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--loss-type", default="grpo", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    parser.add_argument("--lr", type=float, default=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["demo", "stories260K"],
        help="demo, stories260K, smoke (2-layer random Qwen2) or a real shape with random weights: "
        + ", ".join(SHAPES),
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--warmup", type=int, default=5, help="first steps of each run left out of its medians"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (ours, ours+flow, TRL)")
    parser.add_argument(
        "--first-round",
        type=int,
        default=1,
        help="number of the first round, whose order rotation it takes "
        "(a second call with --first-round 2 continues a first's rotation)",
    )
    add_workload_arguments(parser)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per run (0: torch's default); 1 is steadier on a busy CPU",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write runs and summaries as JSON")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile each run's first step after warm-up (left out of its medians) "
        "and write the op tables next to --out",
    )
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if (args.prompts_per_step * args.group) % args.micro_batch:
        raise SystemExit("--micro-batch must divide prompts-per-step x group")
    if args.worker:
        return worker(args)

    threads = args.threads or torch.get_num_threads()
    device = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({threads} torch threads per run)"
    )
    hidden = ("worker", "model_path", "result", "out")
    results = {
        "device": device,
        "settings": {k: str(v) for k, v in vars(args).items() if k not in hidden},
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            folder = model_folder(model, Path(tmp))
            runs = {fw: [] for fw in FRAMEWORKS}
            for round_ in range(args.first_round - 1, args.first_round - 1 + args.repeats):
                for fw in FRAMEWORKS[round_ % 3 :] + FRAMEWORKS[: round_ % 3]:
                    result = Path(tmp) / "result.json"
                    command = [
                        sys.executable,
                        __file__,
                        *sys.argv[1:],
                        "--worker",
                        fw,
                        "--model-path",
                        str(folder),
                        "--result",
                        str(result),
                    ]
                    done = subprocess.run(command, capture_output=True, text=True)
                    if done.returncode:
                        raise SystemExit(f"{fw} on {model} failed:\n{done.stderr[-4000:]}")
                    run = json.loads(result.read_text())
                    table = run.pop("profile")
                    if table and args.out:
                        args.out.parent.mkdir(parents=True, exist_ok=True)
                        args.out.with_name(
                            f"{args.out.stem}-{model}-{fw}-round{round_ + 1}.profile.txt"
                        ).write_text(table)
                    # the profiled step left out
                    runs[fw].append({**summarise_run(run, args.warmup + args.profile), "raw": run})
                    print(
                        f"{model} round {round_ + 1} {fw}: "
                        + json.dumps({k: round(v, 4) for k, v in runs[fw][-1].items() if k != "raw"}),
                        flush=True,
                    )
            summary = summarise(runs)
            results["models"][model] = {**summary, "runs": runs}
            print_table(model, summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
