"""``lightning-flow fit|validate ...`` through LightningCLI: ``main`` for Python callers and tests
(errors raise as usual); the command line itself is ``lightning_flow.console``."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_flow.checkpoint_io import AtomicCheckpointIO, CheckpointError
from lightning_flow.console import OneLineErrors
from lightning_flow.datamodules import PromptDataModule
from lightning_flow.module import GRPOModule
from lightning_flow.progress import ProgressBar
from lightning_flow.tokenizer import check_model_source

# A checkpoint taken after the step's optimizer updates is exactly the state to resume from;
# Lightning's advice to save the pre-update weights does not apply to these steps.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
# The DataModule resumes mid-epoch itself (GlobalBatchSampler skips the batches already trained).
warnings.filterwarnings(
    "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
)


class FlowArgumentParser(OneLineErrors, LightningArgumentParser):
    pass


class FlowCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The prompts must be tokenized by the policy's own tokenizer.
        parser.link_arguments("model.policy.name_or_path", "data.init_args.tokenizer")

    def _add_subcommands(self, parser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        # Only for --help: ``console`` hands ``trace`` to trace_cli before this parser runs.
        trace = ArgumentParser(prog=f"{parser.prog} trace", add_help=False)
        parser._subcommands_action.add_subcommand(
            "trace", trace, help="Trace a response's flow (trace --help)"
        )

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
                f"trainer.accelerator={config.trainer.accelerator} but this machine has no CUDA GPU; "
                "use --trainer.accelerator=auto or cpu"
            )
        policy = config.model.policy
        for name in (policy.name_or_path, policy.adapter_path):
            if name:  # before anything loads: a missing folder or an unreachable hub fails at once
                check_model_source(name)
        if config.get("ckpt_path"):  # a resumed run writes into its own checkpoint folder
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        if config.get("ckpt_path"):
            resume_in_latest_version(config.trainer, config.ckpt_path)

    def _instantiate_trainer(self, config: dict, callbacks: list) -> object:
        given = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, LightningProgressBar) for c in given
        ):
            callbacks = [*callbacks, ProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        check_context(self.model, self.datamodule, "fit")

    def before_validate(self) -> None:
        check_context(self.model, self.datamodule, "validate")

    def after_fit(self) -> None:
        summary = run_summary(self.trainer)  # on every rank: trainer.log_dir is a collective call under DDP
        if self.trainer.is_global_zero:
            print(summary, flush=True)


def check_context(model: GRPOModule, datamodule: PromptDataModule | None, stage: str) -> None:
    """The longest prompt plus ``max_new_tokens`` must fit the policy's positions: checked before the
    first step (the DataModule's setup runs here, once; the Trainer's finds it done)."""
    context = getattr(model.policy.config, "max_position_embeddings", None)
    if context is None or not isinstance(datamodule, PromptDataModule):
        return
    datamodule.setup(stage)
    longest, new = datamodule.longest_prompt(), model.sampling.max_new_tokens
    if longest + new > context:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + model.sampling.max_new_tokens={new} = {longest + new} "
            f"positions exceed the policy's context of {context} (max_position_embeddings); "
            "lower max_new_tokens, or data.init_args.max_prompt_length to drop the longest prompts"
        )


def run_summary(trainer) -> str:
    """Where a finished fit put its run, checkpoints and adapter, and its last reward and accuracy."""
    run_dir = Path(trainer.log_dir or trainer.default_root_dir)
    lines = [f"fit ended after {trainer.global_step} steps", f"  run folder   {run_dir}"]
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.last_model_path:
        lines.append(f"  last ckpt    {checkpoint.last_model_path}")
    if checkpoint is not None and checkpoint.monitor and checkpoint.best_model_path:
        score = f"{checkpoint.monitor} {checkpoint.best_model_score:.4g}"
        lines.append(f"  best ckpt    {checkpoint.best_model_path} ({score})")
    if (run_dir / "adapter").is_dir():
        lines.append(f"  adapter      {run_dir / 'adapter'}")
    metrics = trainer.callback_metrics
    for name, label in (("reward", "final reward"), ("val/accuracy", "val accuracy")):
        if name in metrics and math.isfinite(float(metrics[name])):
            lines.append(f"  {label:<12} {float(metrics[name]):.4f}")
    return "\n".join(lines)


def resume_in_latest_version(trainer_config, ckpt_path: str) -> None:
    """A resumed run logs into the version folder it resumes: Lightning looks for ``last`` under the
    logger's version folder, and a logger without a fixed version would open a new, empty one. With
    ``--ckpt_path last`` the version is pinned to the newest existing one; with the path of a
    checkpoint in ``<save_dir>/<name>/version_<n>/checkpoints/``, to n."""
    logger = trainer_config.get("logger")
    init = logger.get("init_args") if hasattr(logger, "get") else None
    if init is None or init.get("version") is not None or not init.get("save_dir"):
        return
    run_dir = Path(init["save_dir"]) / (init.get("name") or "lightning_logs")
    versions = [
        int(d.name.split("_")[1]) for d in run_dir.glob("version_*") if d.name.split("_")[1].isdigit()
    ]
    folder = Path(ckpt_path).resolve().parent
    if ckpt_path == "last" and versions:
        init["version"] = max(versions)
    elif folder.name == "checkpoints" and folder.parent.parent == run_dir.resolve():
        version = folder.parent.name.removeprefix("version_")
        init["version"] = int(version) if version.isdigit() else folder.parent.name


def main(args: list[str] | None = None, run: bool = True, prog: str = "lightning-flow") -> FlowCLI:
    """Parse ``args`` (default: sys.argv) and run the subcommand; with ``run=False`` only build
    the model, data and trainer from a config without a subcommand (for scripts)."""
    return FlowCLI(
        GRPOModule,
        PromptDataModule,
        subclass_mode_data=True,
        parser_class=FlowArgumentParser,
        parser_kwargs={
            "prog": prog,
            "description": "GRPO-family LoRA fine-tuning on math, with token credit from attention",
        },
        save_config_kwargs={"overwrite": True},
        # Checkpoints are written beside their target, fsynced and renamed into place.
        trainer_defaults={"plugins": [{"class_path": "lightning_flow.checkpoint_io.AtomicCheckpointIO"}]},
        args=args,
        run=run,
    )
