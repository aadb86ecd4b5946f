"""Flow core: answer-conditioned flow solved on attention maps, the token graphs that carry it, and
credit weights.

Imports only torch and torch_geometric, so it can be tested and reused without a model.
"""

from .graph import (
    ROLE_ANSWER,
    ROLE_PROMPT,
    ROLE_RESPONSE,
    FlowConfig,
    KeptEdges,
    capacities,
    dense_graph,
    flow_graphs,
    kept_flow,
    prune_edges,
    sink_mask,
)
from .signals import attention_received, boosted_count, credit_weights, random_signal
from .solver import FlowResult, FlowSolution, answer_flow, edge_flow, solve_graphs, solve_maps, solved_graphs

__all__ = [
    "ROLE_ANSWER",
    "ROLE_PROMPT",
    "ROLE_RESPONSE",
    "FlowConfig",
    "FlowResult",
    "FlowSolution",
    "KeptEdges",
    "answer_flow",
    "attention_received",
    "boosted_count",
    "capacities",
    "credit_weights",
    "dense_graph",
    "edge_flow",
    "flow_graphs",
    "kept_flow",
    "prune_edges",
    "random_signal",
    "sink_mask",
    "solve_graphs",
    "solve_maps",
    "solved_graphs",
]
