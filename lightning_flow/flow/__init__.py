"""Flow core: token graphs from attention, answer-conditioned flow, and credit weights.

Imports only torch and torch_geometric, so it can be tested and reused without a model.
"""

from .graph import ROLE_ANSWER, ROLE_PROMPT, ROLE_RESPONSE, FlowConfig, build_token_graphs, capacities, sink_mask
from .signals import attention_received, boosted_count, credit_weights, random_signal
from .solver import FlowResult, answer_flow, backbone, edge_flows

__all__ = [
    "ROLE_ANSWER",
    "ROLE_PROMPT",
    "ROLE_RESPONSE",
    "FlowConfig",
    "FlowResult",
    "answer_flow",
    "attention_received",
    "backbone",
    "boosted_count",
    "build_token_graphs",
    "capacities",
    "credit_weights",
    "edge_flows",
    "random_signal",
    "sink_mask",
]
