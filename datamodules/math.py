"""GSM8K- and MATH-style problems from local JSON Lines files or the Hugging Face hub."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from lightning_flow.rewards import last_boxed_content

from .base import DataError, MathExample, PromptDataModule, Split

# Suffixes and prefixes that mark a string as a local path rather than a hub dataset name.
_PATH_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".txt", ".csv", ".parquet")
_PATH_PREFIXES = ("/", "./", "../", "~")
_CALC_ANNOTATION = re.compile(r"<<[^<>]*>>")  # GSM8K calculator notes such as <<16-3-4=9>>


def example_from_row(row: Any, source: str) -> MathExample:
    """A MathExample from a GSM8K row (question, answer with '#### N') or a MATH row (problem,
    solution/answer).

    GSM8K: gold is the text after the last '####' with commas stripped; the solution drops the
    calculator annotations and ends in ``\\boxed{gold}`` like the prompts ask. MATH: ``answer``
    wins when present, else the last ``\\boxed{}`` of ``solution``.
    """
    if not isinstance(row, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(row).__name__}")
    if "question" in row and "answer" in row:
        question, answer = _text_field(row, "question", source), _text_field(row, "answer", source)
        if "####" not in answer:
            raise DataError(f"{source}: GSM8K answer has no '#### <final answer>' line: {answer[-80:]!r}")
        reasoning, _, final = answer.rpartition("####")
        gold = final.strip().replace(",", "")
        if not gold:
            raise DataError(f"{source}: GSM8K answer has nothing after its last '####'")
        solution = f"{_CALC_ANNOTATION.sub('', reasoning).strip()}\n\\boxed{{{gold}}}"
        return MathExample(question=question, gold=gold, solution=solution, source=source)
    if "problem" in row and ("solution" in row or "answer" in row):
        question = _text_field(row, "problem", source)
        solution = _text_field(row, "solution", source) if row.get("solution") is not None else None
        answer = row.get("answer")
        if answer is not None and str(answer).strip():
            gold = str(answer).strip()
        else:
            gold = last_boxed_content(solution) if solution is not None else None
            if gold is None or not gold.strip():
                raise DataError(
                    f"{source}: MATH row has no 'answer' and its solution has no \\boxed{{...}} answer"
                )
            gold = gold.strip()
        return MathExample(question=question, gold=gold, solution=solution, source=source)
    raise DataError(
        f"{source}: expected fields 'question' and 'answer' (GSM8K) or 'problem' and 'solution'/'answer' "
        "(MATH); "
        f"the row has fields {sorted(row)}"
    )


def _text_field(row: dict, name: str, source: str) -> str:
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{source}: field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{source}: field {name!r} is empty")
    return value


def looks_like_local_path(name: str) -> bool:
    """True for strings that name a file (by suffix or prefix) rather than a hub dataset."""
    return name.endswith(_PATH_SUFFIXES) or name.startswith(_PATH_PREFIXES) or "\\" in name


class MathDataModule(PromptDataModule):
    """Math word problems (GSM8K, MATH, MATH-500 or any file in those formats) with checked final answers."""

    def __init__(
        self,
        train: str,
        val: str | None = None,
        val_size: int = 100,
        hub_config: str | None = None,
        train_split: str = "train",
        val_split: str = "test",
        limit: int | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            train: local JSON Lines file, or a hub dataset name such as "openai/gsm8k".
            val: file or hub name of the validation set; None holds out val_size examples of train.
            val_size: examples held out of train (chosen with seed) when val is None.
            hub_config: hub dataset configuration, e.g. "main" for openai/gsm8k.
            train_split: hub split read for train.
            val_split: hub split read for val (when val names a hub dataset).
            limit: keep at most this many examples per split, for quick runs.
            **kwargs: PromptDataModule arguments (tokenizer, batch_size, instruction, ...).
        """
        super().__init__(**kwargs)
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        if val is None and val_size < 1:
            raise ValueError(f"val_size must be >= 1 when val is None, got {val_size}")
        for name, value in (("train", train), ("val", val)):
            if value and looks_like_local_path(value) and not Path(value).expanduser().exists():
                raise FileNotFoundError(f"data.init_args.{name}: data file not found: {value}")
        self.train, self.val, self.val_size = train, val, val_size
        self.hub_config, self.train_split, self.val_split, self.limit = (
            hub_config,
            train_split,
            val_split,
            limit,
        )
        self._cache: dict[tuple[str, str], list[MathExample]] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self._items:
            self._cache = {}  # re-read so that skip counts belong to this setup
        super().setup(stage)

    def load_examples(self, split: Split) -> list[MathExample]:
        if self.val is not None:
            name, hub_split = (
                (self.train, self.train_split) if split == "train" else (self.val, self.val_split)
            )
            examples = self._read(name, hub_split)
        else:
            pool = self._read(self.train, self.train_split)
            if self.val_size >= len(pool):
                raise DataError(
                    f"{self.train}: val_size {self.val_size} leaves no training examples out of {len(pool)}"
                )
            order = list(range(len(pool)))
            random.Random(self.seed).shuffle(order)
            held_out = set(order[: self.val_size])
            # Both splits keep file order, so a limit takes the same leading rows on every run.
            examples = [e for i, e in enumerate(pool) if (i in held_out) == (split == "val")]
        return examples[: self.limit] if self.limit is not None else examples

    def _read(self, name: str, hub_split: str) -> list[MathExample]:
        key = (name, hub_split)
        if key not in self._cache:
            path = Path(name).expanduser()
            if path.is_file():
                self._cache[key] = self._read_jsonl(path)
            elif looks_like_local_path(name) and not path.exists():
                raise FileNotFoundError(f"data file not found: {name} (looked at {path.resolve()})")
            else:  # a hub name, or a local dataset folder that datasets.load_dataset reads too
                self._cache[key] = self._read_hub(name, hub_split)
        return self._cache[key]

    def _read_jsonl(self, path: Path) -> list[MathExample]:
        examples = []
        with path.open("rb") as lines:  # decoded line by line, so a bad byte names its line
            for number, raw in enumerate(lines, start=1):
                source = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    self.skip_or_raise(
                        DataError(
                            f"{source}: not UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1})"
                        )
                    )
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    self.skip_or_raise(
                        DataError(f"{source}: malformed JSON ({error.msg} at column {error.colno})")
                    )
                    continue
                try:
                    examples.append(example_from_row(row, source))
                except DataError as error:
                    self.skip_or_raise(error)
        return examples

    def _read_hub(self, name: str, hub_split: str) -> list[MathExample]:
        import datasets  # imported here: it is slow to import and only hub names need it

        try:
            rows = datasets.load_dataset(name, self.hub_config, split=hub_split)
        except Exception as error:
            raise DataError(
                f"cannot load hub dataset {name!r} (config {self.hub_config!r}, split {hub_split!r}); "
                f"for a local file give an existing .jsonl path: {error}"
            ) from error
        tag = f"{name}:{self.hub_config}" if self.hub_config else name
        examples = []
        for index, row in enumerate(rows):
            try:
                examples.append(example_from_row(dict(row), f"{tag}[{hub_split}]:{index}"))
            except DataError as error:
                self.skip_or_raise(error)
        return examples
