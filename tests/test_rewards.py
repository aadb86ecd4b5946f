"""Answer extraction, math_verify-based rewards on real GSM8K / MATH-500 golds, and RewardSuite."""

from __future__ import annotations

import math
import re
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lightning_flow import rewards
from lightning_flow.rewards import (
    GoldParseError,
    RewardConfig,
    RewardSuite,
    correctness_reward,
    extract_answer,
    extract_answer_text,
    format_reward,
    load_reward_function,
    parse_completion,
    parse_gold,
)


def score(completions: list[str], golds: list[str], fn=correctness_reward) -> list[float]:
    return fn(prompts=[""] * len(completions), completions=completions, golds=golds)


# ---- extract_answer -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is \\boxed{42}.", "42"),
        ("so $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("first \\boxed{1}, then \\boxed{2}, finally \\boxed{x^{2}}", "x^{2}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not close the box
        ("\\boxed{5} and an unclosed \\boxed{6", "5"),
        ("an unclosed \\boxed{ around \\boxed{7}", "7"),
        ("\\boxed{8 then #### 9", "9"),  # unclosed box ignored, falls back to ####
        ("She makes 9 * 2 = 18.\n#### 18", "18"),
        ("#### 10\nwait\n#### 1,234", "1,234"),
        ("####   -3.5 dollars", "-3.5"),
        ("no final answer here 17", None),
        ("#### none", None),
        ("\\boxed{", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    span = extract_answer(text)
    assert extract_answer_text(text) == expected
    if expected is None:
        assert span is None
    else:
        start, end = span
        assert text[start:end] == expected


# ---- parse_gold ---------------------------------------------------------------------------
def test_parse_gold_values() -> None:
    assert parse_gold("18")[0] == 18
    assert parse_gold("1,234")[0] == 1234
    assert parse_gold("\\frac{14}{3}")[0] == rewards.parse_gold("\\dfrac{14}{3}")[0]
    assert len(parse_gold("\\left( 3, \\frac{\\pi}{2} \\right)")[0]) == 2  # a 2-tuple
    assert parse_gold("\\frac \\pi4 + 2 - \\sqrt2")  # the one full-MATH gold math_verify misreads unaided
    assert parse_gold("\\frac{12}{5,\\!525}")[0] == parse_gold("\\frac{12}{5525}")[0]


@pytest.mark.parametrize("gold", ["", "   ", "\\frac{", "}{", "???"])
def test_parse_gold_rejects(gold: str) -> None:
    with pytest.raises(GoldParseError, match="cannot parse the gold"):
        parse_gold(gold)
    assert issubclass(GoldParseError, ValueError)


# ---- real data ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_golds(shared_data: Path) -> dict[str, list[str]]:
    """Golds of all GSM8K test and MATH-500 rows, read through MathDataModule."""
    from lightning_flow.datamodules import MathDataModule

    out = {}
    for name, path in [("gsm8k", "gsm8k/test.jsonl"), ("math500", "math500/test.jsonl")]:
        data = MathDataModule(train=str(shared_data / path), val=str(shared_data / path))
        out[name] = [example.gold for example in data.load_examples("val")]
    assert (len(out["gsm8k"]), len(out["math500"])) == (1319, 500)
    return out


def test_every_real_gold_parses(real_golds: dict[str, list[str]]) -> None:
    failures = []
    for gold in real_golds["gsm8k"] + real_golds["math500"]:
        try:
            parse_gold(gold)
        except GoldParseError:
            failures.append(gold)
    assert failures == []


def test_boxed_gold_scores_one(real_golds: dict[str, list[str]]) -> None:
    golds = real_golds["math500"] + real_golds["gsm8k"]
    completions = [f"Some reasoning.\nSo the answer is $\\boxed{{{gold}}}$." for gold in golds]
    scores = score(completions, golds)
    assert [g for g, s in zip(golds, scores) if s != 1.0] == []


def test_gsm8k_hash_completion_scores_one(real_golds: dict[str, list[str]]) -> None:
    golds = real_golds["gsm8k"][:300]
    # Thousands commas as a model might write them.
    completions = [f"She pays 3 * 4 = 12.\n#### {int(gold):,}" for gold in golds]
    assert score(completions, golds) == [1.0] * len(golds)


def _wrong(gold: str) -> str | None:
    """A clearly different answer for integer and simple-fraction golds, else None."""
    if re.fullmatch(r"-?\d+", gold):
        return str(int(gold) + 1)
    match = re.fullmatch(r"\\[d]?frac\{(\d+)\}\{(\d+)\}", gold)
    if match:
        return f"\\frac{{{int(match[1]) + 1}}}{{{match[2]}}}"
    return None


def test_wrong_answers_score_zero(real_golds: dict[str, list[str]]) -> None:
    pairs = [(g, _wrong(g)) for g in real_golds["math500"] + real_golds["gsm8k"][:300]]
    pairs = [(g, w) for g, w in pairs if w is not None]
    assert len(pairs) > 500
    scores = score([f"The answer is \\boxed{{{w}}}." for _, w in pairs], [g for g, _ in pairs])
    assert [p for p, s in zip(pairs, scores) if s != 0.0] == []
    # The last box counts, not an earlier correct one.
    assert score(["\\boxed{18} no wait \\boxed{19}"], ["18"]) == [0.0]


def test_correctness_edge_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    assert score(["", "no answer", "\\boxed{", "The answer is 18."], ["18"] * 4) == [0.0, 0.0, 0.0, 1.0]
    assert score(["\\boxed{0.5}", "\\boxed{\\frac{2}{4}}"], ["\\frac{1}{2}"] * 2) == [1.0, 1.0]

    def boom(*args, **kwargs):
        raise RuntimeError("math_verify failed")

    monkeypatch.setattr(rewards, "verify", boom)
    assert score(["\\boxed{18}"], ["18"]) == [0.0]  # never crash the step
    with pytest.raises(ValueError, match="differ in length"):
        correctness_reward(prompts=["p"], completions=["a", "b"], golds=["1"])


def test_correctness_in_worker_thread() -> None:
    # Golds no other test uses, so parse_gold runs (and caches) inside the worker thread.
    golds = ["\\frac{7}{13}", "4321", "\\sqrt{29}", "-17"]
    completions = ["\\boxed{\\frac{14}{26}}", "#### 4,321", "\\boxed{\\sqrt{28}}", "\\boxed{-17}"]

    def run() -> tuple[list[float], bool]:
        return score(completions, golds), threading.current_thread() is threading.main_thread()

    with ThreadPoolExecutor(max_workers=2) as pool:
        values, in_main = pool.submit(run).result(timeout=60)
    assert not in_main
    assert values == [1.0, 1.0, 0.0, 1.0]


# ---- format_reward ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("3+4=7. \\boxed{7}", 1.0),
        ("so $\\boxed{\\frac{1}{2}}$.\n", 1.0),
        ("\\[\\boxed{5}\\]", 1.0),
        ("\\boxed{5}<|endoftext|>", 1.0),
        ("\\boxed{5} </s>", 1.0),
        ("\\boxed{5} because", 0.0),  # text after the box
        ("\\boxed{5} \\boxed{5}", 0.0),  # two boxes
        ("\\boxed{\\boxed{5}}", 0.0),  # nested boxes count twice
        ("\\boxed{5", 0.0),  # unclosed
        ("#### 5", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion: str, expected: float) -> None:
    assert score([completion], ["5"], fn=format_reward) == [expected]


# ---- load_reward_function -----------------------------------------------------------------
@pytest.fixture
def custom_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module with custom reward functions; returns its name."""
    name = "lf_test_custom_rewards"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            NOT_CALLABLE = 3

            def length_penalty(prompts, completions, golds):
                return [-len(c) / 100 for c in completions]

            def too_short(prompts, completions, golds):
                return [0.0] * (len(completions) - 1)

            def not_finite(prompts, completions, golds):
                return [float("nan")] * len(completions)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_load_reward_function(custom_module: str) -> None:
    assert load_reward_function("lightning_flow.rewards:format_reward") is format_reward
    assert load_reward_function("lightning_flow.rewards.correctness_reward") is correctness_reward
    assert load_reward_function(f"{custom_module}:length_penalty")(
        prompts=[""], completions=["ab"], golds=["1"]
    ) == [-0.02]
    with pytest.raises(ImportError, match="no_such_pkg.mod:fn"):
        load_reward_function("no_such_pkg.mod:fn")
    with pytest.raises(AttributeError, match="lightning_flow.rewards:nope"):
        load_reward_function("lightning_flow.rewards:nope")
    with pytest.raises(TypeError, match="NOT_CALLABLE"):
        load_reward_function(f"{custom_module}.NOT_CALLABLE")
    with pytest.raises(ValueError, match="package.module:function"):
        load_reward_function("justaname")


# ---- RewardSuite --------------------------------------------------------------------------
def test_reward_suite_default() -> None:
    suite = RewardSuite(RewardConfig())
    assert suite.names == ["correctness"]
    out = suite(prompts=["", ""], completions=["\\boxed{3}", "\\boxed{4}"], golds=["3", "3"])
    assert out.dtype == torch.float32 and out.shape == (2, 1)
    assert suite.total(out).tolist() == [1.0, 0.0]


def test_reward_suite_weights_and_custom(custom_module: str) -> None:
    custom = f"{custom_module}:length_penalty"
    suite = RewardSuite(RewardConfig(correctness=2.0, format=0.5, custom={custom: 1.0}))
    assert suite.names == ["correctness", "format", custom]
    assert suite.weights.tolist() == [2.0, 0.5, 1.0]
    completions = ["\\boxed{3}", "\\boxed{3} extra text", "\\boxed{4}"]
    out = suite(prompts=[""] * 3, completions=completions, golds=["3"] * 3)
    assert out.shape == (3, 3)
    expected = torch.tensor([[1.0, 1.0, -0.09], [1.0, 0.0, -0.20], [0.0, 1.0, -0.09]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(suite.total(out), expected @ torch.tensor([2.0, 0.5, 1.0]))


def test_reward_suite_errors(custom_module: str) -> None:
    for fn, message in [("too_short", "returned 2 values for 3"), ("not_finite", "non-finite")]:
        suite = RewardSuite(RewardConfig(custom={f"{custom_module}:{fn}": 1.0}))
        with pytest.raises(ValueError, match=f"{custom_module}:{fn}.*{message}"):
            suite(prompts=[""] * 3, completions=["a"] * 3, golds=["1"] * 3)
    with pytest.raises(ValueError, match="every reward weight is 0"):
        RewardSuite(RewardConfig(correctness=0.0))
    with pytest.raises(ValueError, match="finite"):
        RewardSuite(RewardConfig(format=math.inf))
    with pytest.raises(ValueError, match="shape"):
        RewardSuite().total(torch.zeros(3, 2))


def test_completion_parses_are_cached_per_answer_text_and_handed_out_as_fresh_lists():
    rewards._parse_answer_text.cache_clear()
    first = parse_completion("so \\boxed{12}")
    first.append("changed by a caller")
    second = parse_completion("then #### 12")  # the same answer text, "12"
    assert second == first[:-1] and second
    assert rewards._parse_answer_text.cache_info().hits == 1
    assert correctness_reward([""], ["\\boxed{12}"], ["12"]) == [1.0]
