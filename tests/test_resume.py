"""Runs that survive: a SIGKILLed fit resumed with ``--ckpt_path last`` equals an uninterrupted one;
checkpoints are written atomically and bad ones give errors that name the file."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from lightning_flow.checkpoint_io import AtomicCheckpointIO, CheckpointError
from lightning_flow.cli import main
from tests.test_fit import REPO, tiny_args

STEPS = 6
EVERY_STEP = str(REPO / "tests" / "every-step.yaml")
TAGS = ["train/reward", "train/loss", "train/grad_norm"]


def cli_fit(*args: str) -> list[str]:
    """``python -m lightning_flow fit`` with ``args``, on this interpreter."""
    return [sys.executable, "-m", "lightning_flow", "fit", *args]


def fit_command(policy: Path, root: Path, *extra: str) -> list[str]:
    """A 6-step fit over 2 epochs (3 batches each), dropout on, a checkpoint after every step."""
    return cli_fit(
        *tiny_args(policy, root, steps=STEPS),
        "--config",
        EVERY_STEP,
        "--trainer.limit_val_batches=0",
        "--trainer.val_check_interval=null",
        "--data.init_args.num_train=12",
        "--model.policy.lora_dropout=0.1",
        "--model.optim.lr=0.02",
        '--model.rewards.custom={"tests.test_fit.length_reward": 1.0}',
        *extra,
    )


def run_dir(root: Path) -> Path:
    return root / "runs" / "demo" / "version_0"


def launch(command: list[str], root: Path, **env: str) -> subprocess.Popen:
    """``command`` in a subprocess from the repo root, its stderr appended to ``root/stderr.log``."""
    root.mkdir(exist_ok=True)
    return subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        stdout=subprocess.DEVNULL,
        stderr=(root / "stderr.log").open("a"),
    )


def stderr_tail(root: Path) -> str:
    return (root / "stderr.log").read_text()[-2000:]


def kill_after_checkpoint(process: subprocess.Popen, root: Path, step: int, timeout_s: float) -> int:
    """SIGKILL ``process`` (no handler, no cleanup) once its checkpoint of ``step`` is on disk; the
    global step of the ``last.ckpt`` it left behind."""
    checkpoints = run_dir(root) / "checkpoints"
    deadline = time.monotonic() + timeout_s
    while (
        not list(checkpoints.glob(f"*step={step}.ckpt"))
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, stderr_tail(root)
    return torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    """The resumed fit logged the uninterrupted one's reward, loss and gradient norm at every step and
    ended with the same adapter, bit for bit."""
    assert logged_by_step(run_dir(resumed), TAGS) == logged_by_step(run_dir(uninterrupted), TAGS)
    final = adapter_tensors(run_dir(resumed) / "checkpoints" / "last.ckpt")
    expected = adapter_tensors(run_dir(uninterrupted) / "checkpoints" / "last.ckpt")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def logged_by_step(log_dir: Path, tags: list[str]) -> dict[str, dict[int, float]]:
    """Scalars per tag and step over all event files in write order; a step logged again by the
    resumed run replaces what the killed run wrote for it."""
    values: dict[str, dict[int, float]] = {tag: {} for tag in tags}
    for events_file in sorted(log_dir.glob("events.out.tfevents.*"), key=os.path.getmtime):
        events = EventAccumulator(str(events_file))
        events.Reload()
        for tag in tags:
            for event in events.Scalars(tag) if tag in events.Tags()["scalars"] else []:
                values[tag][event.step] = event.value
    return values


def adapter_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.parametrize("engine", ["hf", "paged"])  # paged: one seed per step's batch, docs/engines.md
def test_sigkill_and_resume_equals_an_uninterrupted_run(tiny_policy_dir, tmp_path, engine):
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    def command(root: Path, *extra: str) -> list[str]:
        return fit_command(tiny_policy_dir, root, f"--model.sampling.engine={engine}", *extra)

    uninterrupted = launch(command(straight), straight)
    # Meanwhile, kill the second run once its checkpoint of step 4 (one batch into the second epoch) is on
    # disk.
    resumed_from = kill_after_checkpoint(launch(command(killed), killed), killed, step=4, timeout_s=120)
    assert 3 <= resumed_from < STEPS  # the step-4 file is written before last.ckpt: the kill may fall between

    assert launch(command(killed, "--ckpt_path=last"), killed).wait() == 0, stderr_tail(killed)
    assert uninterrupted.wait() == 0, stderr_tail(straight)
    assert len(logged_by_step(run_dir(straight), TAGS)["train/reward"]) == STEPS
    assert_same_run(killed, straight)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {}, "bad": Unpicklable()}, target)
    assert torch.equal(io.load_checkpoint(target)["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_unreadable_checkpoints_name_the_file(tmp_path):
    io = AtomicCheckpointIO()
    good = tmp_path / "good.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    other = tmp_path / "other.ckpt"
    torch.save({"weights": torch.ones(1)}, other)
    for path, message in [
        (tmp_path / "absent.ckpt", "does not exist"),
        (truncated, "truncated, corrupt or not a PyTorch file"),
        (text, "truncated, corrupt or not a PyTorch file"),
        (other, "not a Lightning checkpoint"),
    ]:
        with pytest.raises(CheckpointError, match=message) as error:
            io.load_checkpoint(path)
        assert str(path) in str(error.value)


def test_checkpoint_of_another_lora_config_is_refused_by_name(tiny_policy_dir, tmp_path):
    cli = main(
        [
            "fit",
            *tiny_args(tiny_policy_dir, tmp_path, steps=1),
            "--trainer.limit_val_batches=0",
            "--trainer.val_check_interval=null",
        ]
    )
    checkpoint = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    # Through the CLI the checkpoint's own hyperparameters rebuild the policy; a module built
    # otherwise can still meet a checkpoint of another LoRA shape.
    args = [*tiny_args(tiny_policy_dir, tmp_path, steps=2), "--trainer.limit_val_batches=0"]
    other = main([*args, "--model.policy.lora_rank=4"], run=False)
    with pytest.raises(
        CheckpointError, match=r"lora_A.*has shape \(8, \d+\), this policy's has \(4, \d+\)"
    ) as error:
        other.trainer.fit(other.model, other.datamodule, ckpt_path=checkpoint)
    assert str(checkpoint) in str(error.value)
    other = main(
        [
            *args,
            "--model.policy.lora_target_modules=[q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj,lm_head]",
        ],
        run=False,
    )
    with pytest.raises(CheckpointError, match="lacks .* adapter tensors") as error:
        other.trainer.fit(other.model, other.datamodule, ckpt_path=checkpoint)
    assert str(checkpoint) in str(error.value)


def test_cli_names_a_corrupt_checkpoint(tmp_path):
    corrupt = tmp_path / "last.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="cannot read checkpoint " + re.escape(str(corrupt))) as error:
        main(["fit", "--config", str(REPO / "configs" / "demo.yaml"), f"--ckpt_path={corrupt}"])
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no trace from inside torch


def test_saved_adapter_gives_the_training_modules_logprobs(tiny_policy_dir, tmp_path):
    """The adapter written at the end of a fit, loaded in plain transformers + peft, scores a
    response exactly as the trained module does."""
    cli = main(
        [
            "fit",
            *tiny_args(tiny_policy_dir, tmp_path, steps=2),
            "--trainer.limit_val_batches=0",
            "--trainer.val_check_interval=null",
            "--model.optim.lr=0.05",
            '--model.rewards.custom={"tests.test_fit.length_reward": 1.0}',
        ]
    )
    module = cli.model.eval()
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_policy_dir), Path(cli.trainer.log_dir) / "adapter"
    ).eval()
    ids = module.tokenizer(["3+4-2\n3+4=7. 7-2=5. \\boxed{5}"], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = torch.log_softmax(module.policy(input_ids=ids).logits[:, :-1], -1).gather(
            -1, ids[:, 1:, None]
        )
        got = torch.log_softmax(plain(input_ids=ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None])
    assert any("lora_B" in n and p.abs().max() > 0 for n, p in plain.named_parameters())  # it trained
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_flow_credit_random_signal_resumes_its_generator():
    from lightning_flow.callbacks import FlowCredit

    credit = FlowCredit(signal="random", seed=3)
    torch.rand(5, generator=credit.generator)
    saved = credit.state_dict()
    expected = torch.rand(5, generator=credit.generator)
    resumed = FlowCredit(signal="random", seed=3)
    resumed.load_state_dict(saved)
    assert torch.equal(torch.rand(5, generator=resumed.generator), expected)
