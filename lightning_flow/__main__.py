"""``python -m lightning_flow fit|validate|test|predict|trace ...``: see lightning_flow.console."""

from lightning_flow.console import console

console(prog="python -m lightning_flow")
