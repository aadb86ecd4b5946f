"""Callbacks for ``trainer.callbacks``: per-token credit from the policy's attention."""

from .flow_credit import FlowCredit

__all__ = ["FlowCredit"]
