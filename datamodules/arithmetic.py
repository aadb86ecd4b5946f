"""Procedural multi-step arithmetic ("3+4-2"): exact answers, no download, for the demo and tests."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from .base import DataError, MathExample, PromptDataModule, Split


def _check_ranges(min_ops: int, max_ops: int, max_operand: int) -> None:
    if min_ops < 1 or max_ops < min_ops:
        raise ValueError(f"need 1 <= min_ops <= max_ops, got min_ops={min_ops}, max_ops={max_ops}")
    if max_operand < 0:
        raise ValueError(f"max_operand must be >= 0, got {max_operand}")


def _arithmetic_stream(seed: int, min_ops: int, max_ops: int, max_operand: int) -> Iterator[MathExample]:
    """Endless examples from random.Random(seed); the i-th is the same on every run."""
    _check_ranges(min_ops, max_ops, max_operand)
    rng = random.Random(seed)
    index = 0
    while True:
        num_ops = rng.randint(min_ops, max_ops)
        value = rng.randint(0, max_operand)
        question, steps = str(value), []
        for _ in range(num_ops):
            op, operand = rng.choice("+-"), rng.randint(0, max_operand)
            result = value + operand if op == "+" else value - operand
            question += f"{op}{operand}"
            steps.append(f"{value}{op}{operand}={result}.")
            value = result
        solution = " ".join(steps) + f" \\boxed{{{value}}}"
        yield MathExample(
            question=question, gold=str(value), solution=solution, source=f"arithmetic:seed={seed}:i={index}"
        )
        index += 1


def generate_arithmetic(
    num_examples: int, seed: int, min_ops: int = 1, max_ops: int = 2, max_operand: int = 9
) -> list[MathExample]:
    """``num_examples`` left-to-right + / - expressions over integers 0..max_operand, deterministic for a
    seed.

    Example: question "3+4-2", solution "3+4=7. 7-2=5. \\boxed{5}", gold "5".
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    stream = _arithmetic_stream(seed, min_ops, max_ops, max_operand)
    return [next(stream) for _ in range(num_examples)]


class ArithmeticDataModule(PromptDataModule):
    """Random arithmetic expressions; the val set uses another seed and excludes questions seen in train."""

    def __init__(
        self,
        num_train: int = 2000,
        num_val: int = 200,
        min_ops: int = 1,
        max_ops: int = 2,
        max_operand: int = 9,
        val_seed_offset: int = 1000,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            num_train: training examples (duplicates possible: the expression space is small).
            num_val: validation examples, none of whose questions occurs in train.
            min_ops: fewest operations per expression.
            max_ops: most operations per expression.
            max_operand: operands are drawn from 0..max_operand.
            val_seed_offset: val is generated with seed + val_seed_offset (must not be 0).
            **kwargs: PromptDataModule arguments (tokenizer, batch_size, instruction, ...).
        """
        super().__init__(**kwargs)
        _check_ranges(min_ops, max_ops, max_operand)
        if num_train < 1 or num_val < 1:
            raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
        if val_seed_offset == 0:
            raise ValueError("val_seed_offset must not be 0: val would repeat the training stream")
        self.num_train, self.num_val = num_train, num_val
        self.min_ops, self.max_ops, self.max_operand = min_ops, max_ops, max_operand
        self.val_seed_offset = val_seed_offset

    def load_examples(self, split: Split) -> list[MathExample]:
        train = generate_arithmetic(self.num_train, self.seed, self.min_ops, self.max_ops, self.max_operand)
        if split == "train":
            return train
        seen = {example.question for example in train}
        stream = _arithmetic_stream(
            self.seed + self.val_seed_offset, self.min_ops, self.max_ops, self.max_operand
        )
        # Bounded search: with a small expression space train may cover almost every question.
        budget = 100 * self.num_val + 10_000
        val = []
        for _, example in zip(range(budget), stream):
            if example.question not in seen:
                val.append(example)
                if len(val) == self.num_val:
                    return val
        raise DataError(
            f"found only {len(val)} of {self.num_val} val questions outside train in {budget} draws; "
            "raise max_operand or max_ops, or lower num_train"
        )
