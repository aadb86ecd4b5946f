"""The command line: a mistake in a setting, a data file or a path ends the run with a few lines of
stderr naming it (no usage dump, no traceback); --debug brings the traceback back; negative numbers
are values; a user's reward that raises keeps its traceback; the help lists every command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_flow.console import console
from tests.test_fit import DEMO, REPO, scalars, tiny_args


def stderr_of(args: list[str], capfd) -> tuple[int, str]:
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        console(args)
    return exit_info.value.code, capfd.readouterr().err


def assert_short_error(err: str, *names: str) -> None:
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 4, err
    assert "Traceback" not in err and "usage:" not in err, err
    assert all(name in err for name in names), err


def jsonl_with_a_bad_row(folder: Path) -> Path:
    path = folder / "rows.jsonl"
    path.write_text('{"question": "1+1", "answer": "1+1=2\\n#### 2"}\n{"question": "2+2", "answer": \n')
    return path


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        (["--model.grpo.los_type=dapo"], ["model.grpo.los_type"]),  # unknown key
        (["--data.class_path=lightning_flow.datamodules.ArithmeticDataModul"], ["ArithmeticDataModul"]),
        (["--model.sampling.num_generations", "1"], ["model.sampling.num_generations=1"]),
        (["--model.optim.lr", "-1e-3"], ["model.optim.lr=-0.001", "must be > 0"]),  # a negative value parses
        (["--model.grpo.epsilon=1.5"], ["model.grpo.epsilon=1.5"]),
        (["--model.sampling.top_p=0"], ["model.sampling.top_p=0"]),
        (["--data.init_args.batch_size=0"], ["data.init_args.batch_size=0"]),
        (
            ["--model.sampling.max_new_tokens=600"],
            ["longest prompt (", "max_new_tokens=600", "context of 512"],
        ),
        (["--ckpt_path=no/such.ckpt"], ["no/such.ckpt"]),
        (["--model.policy.name_or_path=artifacts/no-such-policy"], ["artifacts/no-such-policy"]),
    ],
)
def test_setting_errors_are_one_line(extra, names, tiny_policy_dir, tmp_path, capfd):
    code, err = stderr_of(["fit", *tiny_args(tiny_policy_dir, tmp_path), *extra], capfd)
    assert code in (1, 2)
    assert_short_error(err, *names)


def test_data_file_errors_name_the_file_and_line(tiny_policy_dir, tmp_path, capfd):
    args = [*tiny_args(tiny_policy_dir, tmp_path), "--data=lightning_flow.datamodules.MathDataModule"]
    bad = jsonl_with_a_bad_row(tmp_path)
    code, err = stderr_of(["fit", *args, f"--data.train={bad}"], capfd)
    assert code == 1
    assert_short_error(err, f"{bad}:2", "malformed JSON")
    code, err = stderr_of(["fit", *args, f"--data.train={tmp_path / 'absent.jsonl'}"], capfd)
    assert_short_error(err, "absent.jsonl")


def test_debug_shows_the_traceback(tiny_policy_dir, tmp_path):
    with pytest.raises(ValueError, match="model.optim.lr=-0.001"):
        console(["fit", *tiny_args(tiny_policy_dir, tmp_path), "--model.optim.lr", "-1e-3", "--debug"])


def raising_reward(prompts: list[str], completions: list[str], golds: list[str]) -> list[float]:
    raise ValueError("a bug in the user's reward")


def test_an_exception_in_a_users_reward_keeps_its_traceback(tiny_policy_dir, tmp_path):
    reward = '--model.rewards.custom={"tests.test_console.raising_reward": 1.0}'
    with pytest.raises(ValueError, match="a bug in the user's reward"):
        console(["fit", *tiny_args(tiny_policy_dir, tmp_path, steps=1), reward])


def test_help_and_program_name():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # The console script runs what python -m does (the same commands).
    assert 'lightning-flow = "lightning_flow.console:console"' in (REPO / "pyproject.toml").read_text()
    done = subprocess.run(
        [sys.executable, "-m", "lightning_flow", "--help"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m lightning_flow")
    assert all(command in done.stdout for command in ("fit", "validate", "trace"))
    assert "__main__.py" not in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "lightning_flow", "fit", "--config", DEMO, "--trainer.max_stepz=3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "python -m lightning_flow fit: error: unrecognized arguments: --trainer.max_stepz=3"
    )


def test_a_fit_ends_with_a_summary(tiny_policy_dir, tmp_path, capfd):
    capfd.readouterr()
    console(["fit", *tiny_args(tiny_policy_dir, tmp_path, steps=2)])  # validation after step 2
    out = capfd.readouterr().out
    run_dir = tmp_path / "runs" / "demo" / "version_0"
    logged = scalars(run_dir)
    summary = out[out.index("fit ended after 2 steps") :].splitlines()
    assert summary[1:] == [
        f"  run folder   {run_dir}",
        f"  last ckpt    {run_dir / 'checkpoints' / 'last.ckpt'}",
        f"  adapter      {run_dir / 'adapter'}",
        f"  final reward {logged['train/reward'][-1]:.4f}",
        f"  val accuracy {logged['val/accuracy'][-1]:.4f}",
    ]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "adapter").is_dir()
