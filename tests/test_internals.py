"""Each private API of lightning_flow/internals.py still behaves as the project relies on it."""

from __future__ import annotations

import inspect

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_flow.internals import (
    attention_implementation,
    batches_that_stepped,
    in_backward,
    profiler_enabled,
    reopen_cut_epoch,
)


class TwoUpdatesPerBatch(L.LightningModule):
    """Manual optimisation with two optimizer steps a batch, as num_iterations = 2 does."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, int, int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((batch_idx, batches_that_stepped(self.trainer), self.trainer.global_step))
        optimizer = self.optimizers()
        for _ in range(2):
            optimizer.zero_grad()
            self.manual_backward((self.weight - batch.sum()).pow(2).sum())
            optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(3, 1), batch_size=1)


def quiet_trainer(folder, **limits) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
        **limits,
    )


def test_batches_that_stepped_counts_batches_not_optimizer_steps(tmp_path):
    module = TwoUpdatesPerBatch()
    quiet_trainer(tmp_path, max_epochs=1).fit(module)
    assert module.seen == [(0, 0, 0), (1, 1, 2), (2, 2, 4)]


def test_attention_implementation_reads_what_the_public_setter_set():
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("eager")
    assert attention_implementation(model.config) == "eager"
    model.set_attn_implementation("sdpa")
    assert attention_implementation(model.config) == "sdpa"


def test_in_backward_is_true_only_inside_a_backward():
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", in_backward()))
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            seen.append(("backward", in_backward()))
            return grad * 2

    x = torch.ones(2, requires_grad=True)
    Probe.apply(x).sum().backward()
    assert seen == [("forward", False), ("backward", True)]
    assert not in_backward()


def test_profiler_enabled_only_while_profiling():
    assert not profiler_enabled()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert profiler_enabled()
    assert not profiler_enabled()


def test_reopen_cut_epoch_gives_the_loop_state_of_a_checkpoint_taken_at_the_batch_end(tmp_path):
    """A fit stopped by max_steps after 1 of 3 batches: Lightning's checkpoint after fit says the epoch
    ended; reopened, its loop counters equal those of the checkpoint Lightning's own ModelCheckpoint
    wrote at that batch's end (the state a run killed there resumes from)."""
    module = TwoUpdatesPerBatch()
    at_batch_end = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=2, save_last=False
    )
    trainer = L.Trainer(
        max_steps=2,  # one batch: two optimizer steps
        accelerator="cpu",
        logger=False,
        callbacks=[at_batch_end],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module)
    trainer.save_checkpoint(tmp_path / "cut.ckpt")
    cut = torch.load(tmp_path / "cut.ckpt", weights_only=False)
    reference = torch.load(at_batch_end.best_model_path, weights_only=False)
    assert cut["epoch"] == 1 and reference["epoch"] == 0  # the cut checkpoint says the epoch ended

    def counters(checkpoint):
        loop = checkpoint["loops"]["fit_loop"]
        return (
            checkpoint["epoch"],
            loop["epoch_progress"],
            loop["epoch_loop.batch_progress"],
            loop["epoch_loop.state_dict"]["_batches_that_stepped"],
        )

    reopen_cut_epoch(cut)
    assert counters(cut) == counters(reference)


def test_the_private_methods_overridden_still_exist_with_their_parameters():
    assert list(inspect.signature(LightningCLI._parse_ckpt_path).parameters) == ["self"]
    assert list(inspect.signature(LightningCLI._add_subcommands).parameters)[:2] == ["self", "parser"]
    assert list(inspect.signature(LightningCLI._instantiate_trainer).parameters) == [
        "self",
        "config",
        "callbacks",
    ]
    assert list(inspect.signature(RichProgressBar._get_train_description).parameters) == [
        "self",
        "current_epoch",
    ]
    parser = LightningArgumentParser()
    parser.add_subcommands()
    assert hasattr(parser._subcommands_action, "add_subcommand")
