"""``python -m lightning_flow fit|validate --config configs/X.yaml`` through LightningCLI."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI

from lightning_flow.checkpoint_io import AtomicCheckpointIO, CheckpointError
from lightning_flow.datamodules import PromptDataModule
from lightning_flow.module import GRPOModule

# A checkpoint taken after the step's optimizer updates is exactly the state to resume from;
# Lightning's advice to save the pre-update weights does not apply to these steps.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
# The DataModule resumes mid-epoch itself (GlobalBatchSampler skips the batches already trained).
warnings.filterwarnings(
    "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
)


class FlowCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The prompts must be tokenized by the policy's own tokenizer.
        parser.link_arguments("model.policy.name_or_path", "data.init_args.tokenizer")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters with a bare torch.load before
        # anything else; check the file first so a bad one gives an error naming it, not a torch trace.
        config = self.config.get(self.config.get("subcommand") or "", {}) or {}
        path = config.get("ckpt_path") if hasattr(config, "get") else None
        if path and path not in ("last", "best", "hpc", "registry") and not Path(path).is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if path and Path(path).is_file():
            AtomicCheckpointIO().load_checkpoint(path, weights_only=True)
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
            # Lightning would only say "No supported gpu backend found!"
            raise ValueError(
                f"trainer.accelerator={config.trainer.accelerator} but this machine has no CUDA GPU; use "
                "--trainer.accelerator=cpu"
            )
        if config.get("ckpt_path") == "last":
            resume_in_latest_version(config.trainer)


def resume_in_latest_version(trainer_config) -> None:
    """``--ckpt_path last``: Lightning looks for last.ckpt under the logger's version folder, and a
    logger without a fixed version would open a new, empty one. Pin the version to the newest
    existing one, so the run finds its checkpoint and goes on logging in the same folder."""
    logger = trainer_config.get("logger")
    init = logger.get("init_args") if hasattr(logger, "get") else None
    if init is None or init.get("version") is not None or not init.get("save_dir"):
        return
    run_dir = Path(init["save_dir"]) / (init.get("name") or "lightning_logs")
    versions = [
        int(d.name.split("_")[1]) for d in run_dir.glob("version_*") if d.name.split("_")[1].isdigit()
    ]
    if versions:
        init["version"] = max(versions)


def main(args: list[str] | None = None, run: bool = True) -> FlowCLI:
    """Parse ``args`` (default: sys.argv) and run the subcommand; with ``run=False`` only build
    the model, data and trainer from a config without a subcommand (for scripts)."""
    return FlowCLI(
        GRPOModule,
        PromptDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # Checkpoints are written beside their target, fsynced and renamed into place.
        trainer_defaults={"plugins": [{"class_path": "lightning_flow.checkpoint_io.AtomicCheckpointIO"}]},
        args=args,
        run=run,
    )
