"""Answer extraction and reward functions for math completions.

Every reward function takes keyword lists ``prompts``, ``completions`` and ``golds`` of equal
length and returns one float per completion. ``RewardSuite`` combines several of them.
"""

from __future__ import annotations

import importlib
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

RewardFunction = Callable[..., list[float]]

_BOXED = "\\boxed{"
# A number after "####": optional "$", digits with optional thousands commas and decimals.
_HASH_NUMBER = re.compile(r"\s*\$?\s*(-?\d(?:[\d,]*\d)?(?:\.\d+)?)")
# Completion tails that format_reward tolerates after the box (see its docstring).
_FORMAT_TAIL = re.compile(r"(?:\s|\$|\\\]|\\\)|\.|</s>|<\|[^|<>]{1,40}\|>)*")
# The gold wrapper: math_verify's boxed extraction parses plain numbers, "1,234" and LaTeX alike.
_LATEX_ONLY = [LatexExtractionConfig()]
# Free-text fallback for completions without a box or "####": boxes first, then the last
# LaTeX expression or number (math_verify scans matches right to left).
_FREE_TEXT = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
_TIMEOUT_S = 5
# LaTeX spellings that math_verify misreads, rewritten before parsing (seen in MATH golds):
# "5,\!525" (thin-space thousands separator) and "\frac \pi4" (brace-less fraction).
_LATEX_THOUSANDS = re.compile(r"(\d),\\!(?=\d{3})")
_BRACELESS_FRAC = re.compile(r"(\\[dt]?frac)\s*(\\[A-Za-z]+|[0-9A-Za-z])\s*(\\[A-Za-z]+|[0-9A-Za-z])")


class GoldParseError(ValueError):
    """A gold answer string that math_verify cannot turn into anything comparable."""


# ---- extraction ---------------------------------------------------------------------------
def _boxed_spans(text: str) -> list[tuple[int, int]]:
    """Content spans of the top-level, balanced ``\\boxed{...}`` in ``text``, left to right."""
    spans = []
    search_from = 0
    while (start := text.find(_BOXED, search_from)) != -1:
        content_start = start + len(_BOXED)
        depth, i, end = 1, content_start, None
        while i < len(text):
            char = text[i]
            if char == "\\":
                i += 2  # an escaped character (e.g. "\{") never opens or closes a group
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    end = i
                    break
            i += 1
        if end is None:
            # Unclosed box: ignore it but still look for complete boxes inside or after it.
            search_from = content_start
        else:
            spans.append((content_start, end))
            search_from = end + 1
    return spans


def last_boxed_content(text: str) -> str | None:
    """Content of the last balanced ``\\boxed{...}`` in ``text``, or None."""
    spans = _boxed_spans(text)
    return text[spans[-1][0] : spans[-1][1]] if spans else None


def extract_answer(text: str) -> tuple[int, int] | None:
    """Character span [start, end) of the final answer in ``text``, or None.

    The content of the last balanced ``\\boxed{...}`` wins; else the number after the last
    ``####`` (the span keeps any thousands commas); else None.
    """
    spans = _boxed_spans(text)
    if spans:
        return spans[-1]
    marker = text.rfind("####")
    if marker == -1:
        return None
    match = _HASH_NUMBER.match(text, marker + 4)
    return match.span(1) if match else None


def extract_answer_text(text: str) -> str | None:
    """The text of ``extract_answer``'s span, or None."""
    span = extract_answer(text)
    return None if span is None else text[span[0] : span[1]]


# ---- parsing and verification ----------------------------------------------------------------
def _in_main_thread() -> bool:
    # math_verify's timeouts use signal.alarm, which raises outside the main thread.
    return threading.current_thread() is threading.main_thread()


def _timeout() -> int | None:
    return _TIMEOUT_S if _in_main_thread() else None


def _parse_answer(answer: str, raise_on_error: bool = False) -> list:
    """math_verify parse of a bare answer string (gold, box content or "####" number)."""
    answer = _BRACELESS_FRAC.sub(r"\1{\2}{\3}", _LATEX_THOUSANDS.sub(r"\1", answer))
    return parse(
        _BOXED + answer + "}",
        _LATEX_ONLY,
        fallback_mode="no_fallback",
        parsing_timeout=_timeout(),
        raise_on_error=raise_on_error,
    )


@lru_cache(maxsize=65536)
def parse_gold(gold: str) -> list:
    """math_verify parse of a gold answer such as ``"18"``, ``"1,234"`` or ``"\\frac{14}{3}"``.

    Raises GoldParseError when nothing parses.
    """
    parsed = _parse_answer(gold.strip()) if gold.strip() else []
    if not parsed:
        raise GoldParseError(f"math_verify cannot parse the gold answer {gold!r}")
    return parsed


@lru_cache(maxsize=65536)
def _parse_answer_text(answer: str) -> tuple:
    """``_parse_answer`` of a completion's answer text, raising on errors and timeouts. Cached: the
    same answers come back step after step (a group's responses, small integers), and a parse is
    most of what scoring costs; a raise is not cached, so each timeout is met and counted anew."""
    return tuple(_parse_answer(answer, raise_on_error=True))


def parse_completion(completion: str) -> list:
    """math_verify parse of a completion's final answer: last box, else "####" number, else free text.

    Errors and timeouts raise (math_verify's ``TimeoutException`` is a BaseException).
    """
    answer = extract_answer_text(completion)
    if answer is not None:
        return list(_parse_answer_text(answer))  # a list of its own: the cached parse stays as parsed
    return parse(
        completion, _FREE_TEXT, fallback_mode="no_fallback", parsing_timeout=_timeout(), raise_on_error=True
    )


_verifier_timeouts = 0


def verifier_timeouts() -> int:
    """Completions whose parse or comparison ran past math_verify's time limit (each scored 0)
    in this process so far."""
    return _verifier_timeouts


def _check_lengths(prompts: list[str], completions: list[str], golds: list[str]) -> None:
    if not len(prompts) == len(completions) == len(golds):
        raise ValueError(
            f"reward inputs differ in length: {len(prompts)} prompts, {len(completions)} completions, "
            f"{len(golds)} golds"
        )


# ---- reward functions ---------------------------------------------------------------------
def correctness_reward(prompts: list[str], completions: list[str], golds: list[str], **_: Any) -> list[float]:
    """1.0 where math_verify finds the completion's final answer equal to the gold, else 0.0.

    A gold that does not parse raises GoldParseError (a data bug); any error while parsing or
    comparing a completion scores 0.0, so one odd sample never stops training, and LaTeX whose
    evaluation does not end (``9^{9^{9^{9}}}``) is stopped after 5 s, scored 0.0 and counted
    in ``verifier_timeouts()``.
    """
    global _verifier_timeouts
    _check_lengths(prompts, completions, golds)
    scores = []
    for completion, gold in zip(completions, golds):
        gold_parsed = parse_gold(gold)
        try:
            answer = parse_completion(completion)
            ok = bool(answer) and verify(gold_parsed, answer, timeout_seconds=_timeout(), raise_on_error=True)
        except TimeoutException:
            _verifier_timeouts += 1
            ok = False
        except Exception:
            ok = False
        scores.append(1.0 if ok else 0.0)
    return scores


def format_reward(prompts: list[str], completions: list[str], golds: list[str], **_: Any) -> list[float]:
    """1.0 for a completion that ends with its one and only answer box, else 0.0.

    Exact rule: the text contains ``\\boxed`` exactly once, that box is balanced, and after its
    closing brace come only whitespace, ``$``, ``\\]``, ``\\)``, ``.`` and EOS-like markers
    (``</s>`` or ``<|...|>`` such as ``<|endoftext|>``), in any order.
    """
    _check_lengths(prompts, completions, golds)
    scores = []
    for completion in completions:
        spans = _boxed_spans(completion)
        ok = (
            completion.count("\\boxed") == 1
            and len(spans) == 1
            and _FORMAT_TAIL.fullmatch(completion, spans[0][1] + 1) is not None
        )
        scores.append(1.0 if ok else 0.0)
    return scores


def load_reward_function(import_path: str) -> RewardFunction:
    """Import ``"package.module:function"`` or ``"package.module.function"`` and check it is callable."""
    if ":" in import_path:
        module_name, _, attribute = import_path.partition(":")
    else:
        module_name, _, attribute = import_path.rpartition(".")
    if not module_name or not attribute or not all(part.isidentifier() for part in attribute.split(".")):
        raise ValueError(
            f"reward function path {import_path!r} must look like 'package.module:function' or "
            "'package.module.function'"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"reward function {import_path!r}: cannot import module {module_name!r} ({error})"
        ) from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise AttributeError(
                f"reward function {import_path!r}: module {module_name!r} has no attribute {attribute!r}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"reward function {import_path!r} is a {type(target).__name__}, not a callable")
    return target


# ---- combining ----------------------------------------------------------------------------
@dataclass
class RewardConfig:
    """Reward functions and their weights; a weight of 0 leaves that function out."""

    correctness: float = 1.0
    """Weight of correctness_reward (math_verify equality with the gold)."""
    format: float = 0.0
    """Weight of format_reward (one \\boxed{} at the end); 0 disables it."""
    custom: dict[str, float] = field(default_factory=dict)
    """Extra reward functions: import path ("package.module:function") -> weight."""


class RewardSuite:
    """The configured reward functions: per-function scores [N, F] and their weighted sum [N]."""

    def __init__(self, config: RewardConfig | None = None) -> None:
        config = config if config is not None else RewardConfig()
        entries: list[tuple[str, RewardFunction, float]] = [
            ("correctness", correctness_reward, config.correctness),
            ("format", format_reward, config.format),
        ]
        entries += [(path, load_reward_function(path), weight) for path, weight in config.custom.items()]
        for name, _, weight in entries:
            if not math.isfinite(float(weight)):
                raise ValueError(f"reward weight for {name!r} must be finite, got {weight!r}")
        entries = [entry for entry in entries if float(entry[2]) != 0.0]
        if not entries:
            raise ValueError("every reward weight is 0: enable at least one reward function")
        self.names: list[str] = [name for name, _, _ in entries]
        """One name per function: "correctness", "format" or the custom import path."""
        self.functions: list[RewardFunction] = [fn for _, fn, _ in entries]
        """The callables, in the order of ``names``."""
        self.weights: torch.Tensor = torch.tensor([float(w) for _, _, w in entries], dtype=torch.float32)
        """[F] weight per function."""

    def __call__(self, prompts: list[str], completions: list[str], golds: list[str]) -> torch.Tensor:
        """[N, F] float32 unweighted reward of each completion under each function."""
        _check_lengths(prompts, completions, golds)
        columns = []
        for name, fn in zip(self.names, self.functions):
            values = list(fn(prompts=prompts, completions=completions, golds=golds))
            if len(values) != len(completions):
                raise ValueError(
                    f"reward function {name!r} returned {len(values)} values for {len(completions)} "
                    "completions"
                )
            try:
                column = torch.tensor([float(v) for v in values], dtype=torch.float32)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"reward function {name!r} returned a non-numeric value ({error})"
                ) from error
            if not torch.isfinite(column).all():
                bad = int((~torch.isfinite(column)).nonzero()[0])
                raise ValueError(
                    f"reward function {name!r} returned a non-finite value {values[bad]!r} at index {bad}"
                )
            columns.append(column)
        return torch.stack(columns, dim=1)

    def total(self, per_function: torch.Tensor) -> torch.Tensor:
        """[N] weighted sum over the functions of a [N, F] reward matrix."""
        if per_function.ndim != 2 or per_function.shape[1] != len(self.names):
            raise ValueError(
                f"expected rewards of shape [N, {len(self.names)}], got {tuple(per_function.shape)}"
            )
        return per_function @ self.weights.to(per_function.device, per_function.dtype)
