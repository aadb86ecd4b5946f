"""Callbacks for ``trainer.callbacks``: per-token credit from the policy's attention."""

from .flow_credit import FlowCredit
from .flow_pictures import FlowPictures

__all__ = ["FlowCredit", "FlowPictures"]
