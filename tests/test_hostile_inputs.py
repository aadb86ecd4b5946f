"""Hostile rows and responses: each gives a clear error naming its line, a counted skip, or a 0 reward."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from lightning_flow.datamodules.base import DataError

from lightning_flow import rewards
from lightning_flow.loss import completion_mask
from lightning_flow.module import GRPOModule
from lightning_flow.policy import PolicyConfig, SamplingConfig
from lightning_flow.rewards import correctness_reward, verifier_timeouts
from tests.test_datamodules import GOOD_GSM, GOOD_MATH, module_for, write


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "  ", "answer": "#### 4"}, "field 'question' is empty"),
        ({"problem": "", "answer": "4"}, "field 'problem' is empty"),
        ({"question": "What is 2+2?", "answer": "2+2=4 #### "}, "has nothing after its last '####'"),
    ],
)
def test_empty_question_or_gold_names_the_line(
    tmp_path: Path, gpt2_tokenizer, row: dict, message: str
) -> None:
    path = write(tmp_path, "rows.jsonl", [GOOD_GSM, json.dumps(row), GOOD_MATH])
    with pytest.raises(DataError, match=rf"rows\.jsonl:2: .*{message}"):
        module_for(path, path, gpt2_tokenizer).setup()
    data = module_for(path, path, gpt2_tokenizer, skip_invalid=True)
    data.setup()
    assert data.stats["skipped_invalid"] == 2 and data.stats["train_examples"] == 2  # once per split


def test_non_utf8_bytes_name_the_line(tmp_path: Path, gpt2_tokenizer) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        GOOD_GSM.encode()
        + b"\n"
        + '{"question": "Caf\u00e9?", "answer": "#### 1"}'.encode("latin-1")
        + b"\n"
        + GOOD_MATH.encode()
        + b"\n"
    )
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8 \(byte 0xe9 at column 18\)"):
        module_for(str(path), str(path), gpt2_tokenizer).setup()
    data = module_for(str(path), str(path), gpt2_tokenizer, skip_invalid=True)
    data.setup()
    assert data.stats["skipped_invalid"] == 2 and data.stats["train_examples"] == 2


def test_one_megabyte_line_is_dropped_and_counted(tmp_path: Path, gpt2_tokenizer) -> None:
    huge = json.dumps({"question": "Add these: " + "1 + " * 250_000 + "1", "answer": "#### 250001"})
    assert len(huge) > 1_000_000
    path = write(tmp_path, "huge.jsonl", [GOOD_GSM, huge, GOOD_MATH])
    start = time.perf_counter()
    data = module_for(path, path, gpt2_tokenizer, max_prompt_length=256)
    data.setup()
    assert data.stats["dropped_too_long"] == 2 and data.stats["train_examples"] == 2
    assert time.perf_counter() - start < 30


def test_duplicate_rows_are_kept_and_counted(tmp_path: Path, gpt2_tokenizer) -> None:
    path = write(tmp_path, "dupes.jsonl", [GOOD_GSM, GOOD_MATH, GOOD_GSM, GOOD_GSM])
    data = module_for(path, path, gpt2_tokenizer)
    data.setup()
    assert data.stats["train_examples"] == 4 and data.stats["duplicate_prompts"] == 4  # 2 per split
    sources = [s for batch in data.val_dataloader() for s in batch["sources"]]
    assert len(set(sources)) == 4  # each copy keeps its own line, hence its own sampling seed


def test_latex_that_hangs_the_verifier_times_out_scores_zero_and_is_counted(monkeypatch) -> None:
    monkeypatch.setattr(rewards, "_TIMEOUT_S", 1)
    before = verifier_timeouts()
    start = time.perf_counter()
    # sympy tries to evaluate the power tower when comparing it with 5.
    scores = correctness_reward(
        prompts=["", ""], completions=["\\boxed{9^{9^{9^{9}}}}", "\\boxed{5}"], golds=["5", "5"]
    )
    assert scores == [0.0, 1.0]
    assert verifier_timeouts() == before + 1
    assert time.perf_counter() - start < 10


@pytest.fixture(scope="module")
def module(tiny_policy_dir) -> GRPOModule:
    return GRPOModule(
        PolicyConfig(name_or_path=str(tiny_policy_dir), lora_rank=4),
        SamplingConfig(num_generations=2, max_new_tokens=8),
    )


def responses(module: GRPOModule, cases: list[tuple[str, bool, int]]) -> torch.Tensor:
    """Completion ids as generate leaves them: each text's ids, then EOS if it ended, cut at its
    token limit (no EOS then), padded to a common width."""
    rows = []
    for text, ended, limit in cases:
        ids = module.tokenizer(text, add_special_tokens=False).input_ids + (
            [module.tokenizer.eos_token_id] if ended else []
        )
        rows.append(ids[:limit])
    width = max(len(r) for r in rows)
    return torch.tensor([r + [module.tokenizer.pad_token_id] * (width - len(r)) for r in rows])


def test_hostile_responses_score_without_crashing(module) -> None:
    huge = "9" * 3000
    cases = [  # text, ends with EOS, token limit, gold, expected reward, expected truncated
        ("", True, 8, "3", 0.0, False),  # only EOS
        ("1+2=3. " * 10, False, 24, "3", 0.0, True),  # never-ending: cut at 24 tokens, no answer yet
        ("\\boxed{2} then \\boxed{3}", True, 64, "3", 1.0, False),  # several boxes: the last counts
        ("\\boxed{3", True, 64, "3", 0.0, False),  # a box that never closes
        (f"\\boxed{{{huge}}}", True, 4000, huge, 1.0, False),  # a 3000-digit number
        (f"\\boxed{{{huge}}}", True, 4000, "5", 0.0, False),
        (f"\\boxed{{{huge}}}", False, 1500, huge, 0.0, True),  # cut inside the number: box unclosed
    ]
    ids = responses(module, [(text, ended, limit) for text, ended, limit, *_ in cases])
    mask, truncated = completion_mask(ids, module.eos_ids)
    assert mask[0].sum() == 1  # only EOS: one token, the EOS, counts
    texts = module.decode(ids, mask)
    assert texts[0] == "" and len(texts[1]) == 24
    start = time.perf_counter()
    scores = correctness_reward(
        prompts=[""] * len(cases), completions=texts, golds=[case[3] for case in cases]
    )
    assert time.perf_counter() - start < 20
    assert scores == [case[4] for case in cases]
    assert truncated.tolist() == [case[5] for case in cases]
