"""Flow core: token graphs from attention, answer-conditioned flow on them, and credit weights.

Imports only torch and torch_geometric, so it can be tested and reused without a model.
"""

from .graph import (
    ROLE_ANSWER,
    ROLE_PROMPT,
    ROLE_RESPONSE,
    FlowConfig,
    KeptEdges,
    build_flow_graphs,
    capacities,
    dense_graph,
    flow_graphs,
    kept_capacity,
    prune_edges,
    sink_mask,
)
from .signals import attention_received, boosted_count, credit_weights, random_signal
from .solver import FlowResult, answer_flow, edge_flow, solve_flow

__all__ = [
    "ROLE_ANSWER",
    "ROLE_PROMPT",
    "ROLE_RESPONSE",
    "FlowConfig",
    "FlowResult",
    "KeptEdges",
    "answer_flow",
    "attention_received",
    "boosted_count",
    "build_flow_graphs",
    "capacities",
    "credit_weights",
    "dense_graph",
    "edge_flow",
    "flow_graphs",
    "kept_capacity",
    "prune_edges",
    "random_signal",
    "sink_mask",
    "solve_flow",
]
