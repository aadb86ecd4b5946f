"""Prompt DataModules for GRPO on math: files or hub datasets (GSM8K, MATH) and procedural arithmetic."""

from .arithmetic import ArithmeticDataModule, generate_arithmetic
from .base import DataError, MathExample, PromptDataModule
from .math import MathDataModule

__all__ = [
    "ArithmeticDataModule",
    "DataError",
    "MathDataModule",
    "MathExample",
    "PromptDataModule",
    "generate_arithmetic",
]
