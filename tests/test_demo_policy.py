"""The offline demo policy is reproducible and its warm start learns the task's format."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from lightning_flow.demo_policy import main as build_demo_policy
from lightning_flow.tiny import build_char_tokenizer

REPO = Path(__file__).resolve().parents[1]


def demo_config_at(tmp_path: Path, name: str) -> Path:
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["model"]["policy"]["name_or_path"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_demo_policy_is_bitwise_reproducible(tmp_path):
    for name in ("a", "b"):
        build_demo_policy(["--config", str(demo_config_at(tmp_path, name)), "--steps", "15"])
    first, second = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_char_tokenizer_round_trips_text_with_one_token_per_character():
    tokenizer = build_char_tokenizer()
    text = "3+14=17. 17-5=12. \\boxed{12}\n"
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert len(encoding.input_ids) == len(text)
    assert encoding.offset_mapping == [(i, i + 1) for i in range(len(text))]
    assert tokenizer.decode(encoding.input_ids) == text
