"""``python -m lightning_flow fit|validate --config configs/X.yaml`` through LightningCLI."""

from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningCLI

from lightning_flow.datamodules import PromptDataModule
from lightning_flow.module import GRPOModule


# A checkpoint taken after the step's optimizer updates is exactly the state to resume from;
# Lightning's advice to save the pre-update weights does not apply to these steps.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
# The DataModule resumes mid-epoch itself (GlobalBatchSampler skips the batches already trained).
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class FlowCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The prompts must be tokenized by the policy's own tokenizer.
        parser.link_arguments("model.policy.name_or_path", "data.init_args.tokenizer")


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
