"""Shared fixtures: the real data beside the repo, and tiny policies built on the fly."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data folder (../shared/data); tests that need it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the repo as ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def stories260k(shared_data: Path) -> Path:
    """The real 260K-parameter Llama (transformers folder)."""
    path = shared_data / "models" / "stories260K" / "hf"
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny Llama with the character tokenizer, saved as a model folder."""
    from lightning_flow.tiny import build_char_tokenizer, build_tiny_llama

    path = tmp_path_factory.mktemp("tiny-policy")
    tokenizer = build_char_tokenizer()
    build_tiny_llama(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer(shared_data: Path):
    """The GPT-2 tokenizer from shared/data/tokenizer, left-padded with pad = eos."""
    from lightning_flow.tokenizer import load_tokenizer

    return load_tokenizer(str(shared_data / "tokenizer"))


@pytest.fixture(scope="session")
def demo_policy_dir(tmp_path_factory) -> Path:
    """The demo's warm-started policy, built as ``python -m lightning_flow.demo_policy`` builds it
    from configs/demo.yaml (300 supervised steps, about 10 s), into a temporary folder. On one torch
    thread: the weights then do not depend on the machine's core count, and a build sharing the
    cores with other jobs does not stall (two threads once took 350 s here)."""
    import torch

    from lightning_flow.demo_policy import main as build_demo_policy
    from tests.test_demo_policy import demo_config_at

    root = tmp_path_factory.mktemp("demo-policy")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_demo_policy(["--config", str(demo_config_at(root, "policy"))])
    finally:
        torch.set_num_threads(threads)
    return root / "policy"
