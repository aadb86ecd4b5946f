"""Config mistakes stop before any work with one readable message naming the setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_flow.cli import main
from lightning_flow.tiny import build_char_tokenizer, build_tiny_llama
from lightning_flow.tokenizer import load_tokenizer
from tests.test_fit import DEMO, tiny_args


def parse_error(args: list[str], capsys) -> str:
    """jsonargparse's message for a rejected command line (it exits with status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args, run=False)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--model.grpo.los_type=dapo"], ["los_type"]),  # unknown key
        (["--model.grpo.epsilon=wide"], ["epsilon", "wide"]),  # wrong type
        (["--model.grpo.loss_type=ppo"], ["loss_type", "ppo"]),  # not one of the choices
        (["--trainer.max_stepz=3"], ["max_stepz"]),
    ],
)
def test_bad_keys_and_types_are_named(args, names, capsys):
    message = parse_error(["--config", DEMO, *args], capsys)
    assert all(name in message for name in names), message


def test_unknown_key_in_a_yaml_file_is_named(tmp_path, capsys):
    extra = tmp_path / "typo.yaml"
    extra.write_text("model:\n  sampling:\n    num_generation: 4\n")
    message = parse_error(["--config", DEMO, "--config", str(extra)], capsys)
    assert "num_generation" in message


def test_micro_batch_that_does_not_divide_the_step(tiny_policy_dir, tmp_path):
    cli = main([*tiny_args(tiny_policy_dir, tmp_path), "--model.grpo.micro_batch_size=6"], run=False)
    with pytest.raises(ValueError, match=r"micro_batch_size=6 must divide the 16 responses"):
        cli.trainer.fit(cli.model, cli.datamodule)


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder /nonexistent/policy does not exist"):
        main([*tiny_args(Path("/nonexistent/policy"), tmp_path)], run=False)
    # artifacts/... could be an owner/name hub id, but it names a local folder: no hub lookup.
    with pytest.raises(FileNotFoundError, match="model folder artifacts/no-such-policy does not exist"):
        load_tokenizer("artifacts/no-such-policy")
    (tmp_path / "runs").mkdir()  # a name whose parent folder exists is local too
    with pytest.raises(FileNotFoundError, match="model folder runs/policy does not exist"):
        load_tokenizer_in(tmp_path, "runs/policy")


def load_tokenizer_in(folder: Path, name: str) -> None:
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        load_tokenizer(name)
    finally:
        os.chdir(cwd)


def hub_lookup(name: str, **env: str) -> subprocess.CompletedProcess:
    code = f"from lightning_flow.tokenizer import load_tokenizer; load_tokenizer({name!r})"
    environment = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return subprocess.run(
        [sys.executable, "-c", code], env={**environment, **env}, capture_output=True, text=True, timeout=120
    )


def test_hub_id_fails_at_once_when_the_hub_cannot_be_reached(tmp_path):
    # Port 9 (discard) refuses at once: the hub is unreachable, and nothing is cached under HF_HOME.
    done = hub_lookup("someone/no-such-model", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path))
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("OSError: cannot load model 'someone/no-such-model': no such folder here"), (
        done.stderr[-2000:]
    )
    assert "Hugging Face hub (http://127.0.0.1:9) cannot be reached" in last_line
    # Offline mode: transformers looks in the cache only, and the error names the model.
    done = hub_lookup("someone/no-such-model", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    last_line = done.stderr.strip().splitlines()[-1]
    assert "cannot load model 'someone/no-such-model'" in last_line
    assert "not loadable from the Hugging Face hub" in last_line


def test_tokenizer_without_pad_token_is_handled(tmp_path):
    tokenizer = build_char_tokenizer()
    tokenizer.pad_token = None
    policy = tmp_path / "no-pad"
    build_tiny_llama(tokenizer).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    cli = main(
        [
            "fit",
            *tiny_args(policy, tmp_path, steps=1),
            "--trainer.limit_val_batches=0",
            "--trainer.val_check_interval=null",
        ]
    )
    assert cli.trainer.global_step == 1
    assert cli.model.tokenizer.pad_token == cli.model.tokenizer.eos_token == "</s>"


def test_gpu_only_options_on_a_cpu_machine(tiny_policy_dir, tmp_path):
    with pytest.raises(ValueError, match="trainer.accelerator=gpu but this machine has no CUDA GPU"):
        main([*tiny_args(tiny_policy_dir, tmp_path), "--trainer.accelerator=gpu"], run=False)
    # Lightning's own check, before bitsandbytes is touched.
    with pytest.raises(RuntimeError, match="Bitsandbytes is only supported on CUDA GPUs"):
        main(
            [
                *tiny_args(tiny_policy_dir, tmp_path),
                "--trainer.plugins=lightning.pytorch.plugins.BitsandbytesPrecision",
                "--trainer.plugins.mode=nf4",
            ],
            run=False,
        )
