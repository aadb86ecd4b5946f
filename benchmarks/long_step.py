"""Training steps with flow credit at paper-scale response lengths, on a GPU capped at 24 GB.

    python benchmarks/long_step.py --out results/long_step.json
        # CUDA: Qwen2.5-1.5B's shape, 16 x 8,192 tokens
    python benchmarks/long_step.py --smoke                          # CPU: tiny shapes, checks the script

Qwen2.5-1.5B's shape with random weights (no hub), bf16 weights + LoRA r 16 under bf16-mixed,
gradient checkpointing, FlowCredit with its defaults, N = 16 responses (2 prompts x 8) of
``--length`` new tokens, micro-batches of ``--micro-batch``, through the CLI and a real Trainer. The
process's CUDA memory is capped at ``--cap-gib`` (``torch.cuda.set_per_process_memory_fraction``), so
needing more is an out-of-memory error here, as on a 24 GB card.

- ``update``: ``--steps`` training steps whose rollouts are fixed random responses of exactly
  ``--length`` tokens ending in a boxed answer (``GRPOModule.make_rollouts`` is replaced by them;
  rewards are random 0/1 so advantages are not 0): the step's first pass records attention, FlowCredit
  credits, the update runs, the step logs. Per step: wall time, the CUDA allocator's peak, and the
  time in recording and in credit as the module counts them (its perf/capture_share and
  perf/credit_share), which is the credit's share of this step without sampling.
- ``sampling``: ``GRPOModule.make_rollouts`` for real (merged adapter, per-response seeds) with
  ``--sample-tokens`` new tokens (a random model never samples EOS, so every response runs to the
  end): tokens per second and the allocator's peak. Sampling ``--length`` tokens is not run here (at
  tens of ms a token it would take minutes of the GPU budget); its time is extrapolated from this and
  marked as such.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import SHAPES, SMOKE_SHAPE, random_model_folder, synchronize  # noqa: E402

from lightning_flow.cli import main as cli_main  # noqa: E402
from lightning_flow.loss import completion_mask, group_advantages  # noqa: E402
from lightning_flow.module import GRPOModule  # noqa: E402
from lightning_flow.rollouts import Rollouts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class StepProbe(Callback):
    """Per training step: wall time, allocator peak, and the module's capture and credit seconds."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize()
        seconds = time.perf_counter() - self._start
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        self.steps.append(
            dict(
                step_s=seconds,
                peak_gib=peak,
                capture_s=pl_module.capture_seconds,
                credit_s=pl_module.credit_seconds,
                credit_share=(pl_module.capture_seconds + pl_module.credit_seconds) / seconds,
            )
        )
        print(json.dumps({"update_step": self.steps[-1]}), flush=True)


def fixed_rollouts(length: int):
    """A ``make_rollouts`` that returns random responses of exactly ``length`` tokens ending in
    ``\\boxed{7}`` and EOS, with random 0/1 rewards (group-normalised advantages)."""

    def make_rollouts(self: GRPOModule, batch: dict) -> Rollouts:
        group, device = self.sampling.num_generations, self.device
        n = len(batch["golds"]) * group
        generator = torch.Generator().manual_seed(self.global_step)
        tail = self.tokenizer("\\boxed{7}", add_special_tokens=False).input_ids + [
            self.tokenizer.eos_token_id
        ]
        low = len(self.tokenizer.all_special_ids) + 1
        ids = torch.randint(low, len(self.tokenizer), (n, length), generator=generator)
        ids[:, -len(tail) :] = torch.tensor(tail)
        mask, truncated = completion_mask(ids, self.eos_ids)
        rewards = (
            torch.randint(0, 2, (n, len(self.reward_suite.names)), generator=generator).float().to(device)
        )
        total = self.reward_suite.total(rewards)
        advantages, zero_std = group_advantages(total, group, self.grpo.scale_rewards)
        return Rollouts(
            prompt_ids=batch["prompt_ids"].repeat_interleave(group, 0),
            prompt_mask=batch["prompt_mask"].repeat_interleave(group, 0),
            completion_ids=ids.to(device),
            completion_mask=mask.to(device),
            is_truncated=truncated.to(device),
            prompts=[p for p in batch["prompts"] for _ in range(group)],
            completions=self.decode(ids, mask),
            golds=["7"] * n,
            rewards=rewards,
            total_rewards=total,
            advantages=advantages.to(device),
            zero_std_groups=zero_std.to(device),
            token_weights=torch.ones_like(mask).to(device),
            step=self.global_step,
        )

    return make_rollouts


def build_cli(folder: Path, workdir: Path, args: argparse.Namespace):
    overrides = (
        ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--model.policy.dtype=float32"]
        if args.smoke
        else []
    )
    return cli_main(
        [
            "--config",
            str(REPO / "configs" / "qwen2.5-0.5b-lora-gsm8k.yaml"),
            f"--model.policy.name_or_path={folder}",
            "--model.policy.gradient_checkpointing=true",
            f"--trainer.max_steps={args.steps}",
            "--trainer.limit_val_batches=0",
            "--trainer.val_check_interval=null",
            "--trainer.enable_checkpointing=false",
            "--trainer.callbacks=[]",
            "--trainer.callbacks+=lightning_flow.callbacks.FlowCredit",
            f"--trainer.default_root_dir={workdir}",
            f"--trainer.logger.init_args.save_dir={workdir / 'runs'}",
            "--data=lightning_flow.datamodules.ArithmeticDataModule",
            "--data.batch_size=2",
            "--data.max_prompt_length=256",
            "--model.sampling.num_generations=8",
            f"--model.sampling.max_new_tokens={args.length}",
            f"--model.grpo.micro_batch_size={args.micro_batch}",
            *overrides,
        ],
        run=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--length", type=int, default=8192, help="new tokens per response")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="update steps (the first pays for warm-up)")
    parser.add_argument("--sample-tokens", type=int, default=256)
    parser.add_argument("--cap-gib", type=float, default=24.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args()
    if args.smoke:
        args.length, args.sample_tokens, args.steps = min(args.length, 64), min(args.sample_tokens, 8), 1
    elif not torch.cuda.is_available():
        raise SystemExit("long_step.py needs a CUDA GPU (or --smoke)")
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)",
        "length": args.length,
        "responses": 16,
        "micro_batch": args.micro_batch,
        "cap_gib": args.cap_gib,
    }
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(
            args.cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory
        )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        random_model_folder(SMOKE_SHAPE if args.smoke else SHAPES["qwen2.5-1.5b"], folder)
        real_make_rollouts = GRPOModule.make_rollouts
        GRPOModule.make_rollouts = fixed_rollouts(args.length)
        probe = StepProbe()
        cli = build_cli(folder, Path(tmp), args)
        cli.trainer.callbacks.append(probe)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        GRPOModule.make_rollouts = real_make_rollouts
        result["update_steps"] = probe.steps
        timed = probe.steps[1:] or probe.steps
        result["update_step_s_median"] = statistics.median(s["step_s"] for s in timed)
        result["credit_share_of_update_median"] = statistics.median(s["credit_share"] for s in timed)

        module = cli.model
        module.sampling.max_new_tokens = args.sample_tokens
        batch = next(iter(cli.datamodule.train_dataloader()))
        batch = {k: (v.to(module.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        synchronize()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        rollouts = module.make_rollouts(batch)
        synchronize()
        seconds = time.perf_counter() - start
        tokens = int(rollouts.completion_mask.sum())
        per_token = seconds / args.sample_tokens
        result["sampling"] = dict(
            new_tokens=args.sample_tokens,
            seconds=seconds,
            tokens_per_s=tokens / seconds,
            peak_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            extrapolated_s_for_length=per_token * args.length,
        )
        result["step_s_estimate"] = result["update_step_s_median"] + per_token * args.length
        result["credit_share_of_step_estimate"] = (
            statistics.median(s["capture_s"] + s["credit_s"] for s in timed) / result["step_s_estimate"]
        )
    print(json.dumps(result), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
