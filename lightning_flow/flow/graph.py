"""The token graph of a response: which attention edges carry capacity, dense and as PyG graphs.

N = responses in the batch, T = positions (padding included). A position is a node when it is a
valid token; an edge i -> k (i < k) carries capacity c(i, k) = Ā[k, i], the head- and
layer-averaged attention of query k to key i. The public dense form is c[n, i, k] (row i lists
what node i sends); internally the solver keeps the attention layout p[n, k, i] = c(i, k), which
pruning (per incoming row) and the forward sweep read contiguously.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch_geometric.data import Batch, Data

ROLE_PROMPT, ROLE_RESPONSE, ROLE_ANSWER = 0, 1, 2


# Pruning defaults, measured against the unpruned flow on real attention (stories260K, 4
# sampled stories of 416 tokens, head mean of the middle-third layers):
#   max_in_degree / min_capacity   capacity kept   same top-40% tokens   max |Δf|   answer_flow (CPU)
#   None / 1e-6 (default)          100.00 %        100.0 %               0.0003     2 ms
#   None / 1e-4                     99.75 %         98.1 %               0.025      2 ms
#   64 / 1e-4                       97.5 %          94.5 %               0.13       6 ms
# The solver is dense, so pruning buys no speed (the top-k even costs some) and only moves f;
# min_capacity only clears numerical dust: a row can lose at most T · min_capacity (< 1 % at 8K).
@dataclass
class FlowConfig:
    """Choices of the flow graph and solver (flow-credit.md marks them "(choice)")."""

    sink_tokens: int = 1
    """Edges out of the first `sink_tokens` valid tokens of each sequence are dropped (attention sinks)."""
    max_in_degree: int | None = None
    """Keep only this many strongest incoming edges per node (ties: earliest source); None keeps all."""
    min_capacity: float = 1e-6
    """Drop edges whose capacity is below this; zero-capacity edges are never edges."""
    top_fraction: float = 0.4
    """Share of response tokens, ranked by throughput, whose advantage is boosted."""
    boost: float = 1.5
    """Weight of the boosted tokens; the other response tokens get 1.0."""
    block_size: int = 512
    """Positions per block of the blocked triangular solves (and rows per block of pruning)."""
    dtype: torch.dtype = torch.float32
    """Working precision of capacities and solves (log h is always kept in float64)."""

    def __post_init__(self) -> None:
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.max_in_degree is not None and self.max_in_degree < 1:
            raise ValueError(f"max_in_degree must be >= 1 or None, got {self.max_in_degree}")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}")
        if not 0.0 <= self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in [0, 1], got {self.top_fraction}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


def check_inputs(attention: Tensor, valid: Tensor, *masks: Tensor) -> None:
    """Raise ValueError unless attention is [N, T, T] and every mask is a [N, T] bool tensor."""
    if attention.dim() != 3 or attention.shape[1] != attention.shape[2]:
        raise ValueError(f"attention must be [N, T, T], got shape {tuple(attention.shape)}")
    for mask in (valid, *masks):
        if mask.shape != attention.shape[:2] or mask.dtype != torch.bool:
            expected = tuple(attention.shape[:2])
            raise ValueError(f"masks must be bool [N, T] = {expected}, got {mask.dtype} {tuple(mask.shape)}")


def sink_mask(valid: Tensor, sink_tokens: int) -> Tensor:
    """[N, T] bool: the first `sink_tokens` valid tokens of each row, wherever the row starts."""
    return valid & (valid.cumsum(-1) <= sink_tokens)  # cumsum: 1 + index among the valid tokens


def _strongest(a: Tensor, k: int) -> Tensor:
    """a  # [N, r, C] -> [N, r, C] with all but the k largest entries of each row zeroed.

    Ties at the k-th value go to the earliest columns: torch.topk leaves that choice open, so
    the k-th value is used as a threshold and tied entries are admitted left to right.
    """
    kth = a.topk(k, dim=-1).values[..., -1:]  # [N, r, 1]
    keep = a >= kth  # [N, r, C]
    excess = (keep.sum(-1, keepdim=True) > k) & (kth > 0)  # [N, r, 1] rows with ties to break
    if excess.any():  # rare with real attention, so the cumsum is only paid when needed
        tied = (a == kth) & excess  # [N, r, C]
        room = k - (a > kth).sum(-1, keepdim=True)  # [N, r, 1] slots left for tied entries
        keep &= ~tied | (torch.cumsum(tied, -1, dtype=torch.int32) <= room)
    return torch.where(keep, a, 0.0)


def incoming_capacities(attention: Tensor, valid: Tensor, cfg: FlowConfig, size: int | None = None) -> Tensor:
    """[N, size, size] pruned capacities in attention layout, p[n, k, i] = c(i, k), zero-padded
    (size >= T). Row k lists the edges into k, which is the layout the pruning and the forward
    sweep read contiguously."""
    n, t, _ = attention.shape
    size = t if size is None else size
    keep_src = (valid & ~sink_mask(valid, cfg.sink_tokens)).to(cfg.dtype)  # [N, T] may send edges
    keep_dst = valid.to(cfg.dtype)  # [N, T]

    def block(r0: int, r1: int) -> Tensor:  # [N, r1 - r0, r1] the edges into query rows r0:r1
        # Keys i < k only: the columns past r1 are never edges, and tril drops i >= k.
        a = attention[:, r0:r1, :r1].to(cfg.dtype).tril(r0 - 1)  # a fresh tensor, so the masks apply in place
        a.mul_(keep_dst[:, r0:r1, None]).mul_(keep_src[:, None, :r1])
        a = torch.where(a >= cfg.min_capacity, a, 0.0)  # also turns NaN into "no edge"
        if cfg.max_in_degree is not None and cfg.max_in_degree < r1:
            a = _strongest(a, cfg.max_in_degree)
        return a

    rows = cfg.block_size  # query rows per step bound the temporaries to [N, rows, rows + r0]
    if size == t <= rows:  # one block, no padding: the block is the whole matrix
        return block(0, t)
    p = torch.zeros(n, size, size, dtype=cfg.dtype, device=attention.device)  # [N, S, S]
    for r0 in range(0, t, rows):
        r1 = min(t, r0 + rows)
        p[:, r0:r1, :r1] = block(r0, r1)
    return p


@torch.no_grad()
def capacities(attention: Tensor, valid: Tensor, cfg: FlowConfig | None = None) -> Tensor:
    """[N, T, T] capacities c[n, i, k] = Ā[n, k, i] on the graph's edges (after sink dropping
    and pruning), zero elsewhere: exactly the edges of `build_token_graphs`. It is a transposed
    view of the attention-layout matrix; call .contiguous() if row-major storage matters."""
    check_inputs(attention, valid)
    return incoming_capacities(attention, valid, cfg or FlowConfig()).transpose(1, 2)


def node_roles(valid: Tensor, prompt: Tensor, answer: Tensor) -> Tensor:
    """[N, T] long: 0 prompt, 1 response, 2 answer (answer wins over response; padding gets 1)."""
    role = torch.full_like(valid, ROLE_RESPONSE, dtype=torch.long)  # [N, T]
    role[prompt] = ROLE_PROMPT
    role[answer & valid & ~prompt] = ROLE_ANSWER
    return role


@torch.no_grad()
def build_token_graphs(
    attention: Tensor, valid: Tensor, prompt: Tensor, answer: Tensor, cfg: FlowConfig | None = None
) -> Batch:
    """One PyG graph per response: nodes are its valid tokens in order (attributes `role` and
    `position`), edges i -> k with `edge_attr` = c(i, k) in local node ids, sorted by (i, k).

    Without a degree cap a long response's graph is nearly complete (~T² / 2 edges): for
    pictures pass a config with `max_in_degree` set."""
    check_inputs(attention, valid, prompt, answer)
    c = capacities(attention, valid, cfg)  # [N, T, T]
    n_idx, src, dst = c.nonzero(as_tuple=True)  # [E] each, sorted by response, then source, target
    local = valid.long().cumsum(-1) - 1  # [N, T] node id of each valid position
    edge_index = torch.stack((local[n_idx, src], local[n_idx, dst]))  # [2, E]
    edge_attr = c[n_idx, src, dst]  # [E]
    role = node_roles(valid, prompt, answer)[valid]  # [V] all nodes, response-major
    position = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)[valid]  # [V]
    # Per-response views of the tensors built above; a Batch needs one Data object per graph.
    edge_counts = torch.bincount(n_idx, minlength=valid.shape[0]).tolist()
    node_counts = valid.sum(-1).tolist()
    graphs = [
        Data(edge_index=ei, edge_attr=ea, role=r, position=p, num_nodes=int(nc))
        for ei, ea, r, p, nc in zip(
            edge_index.split(edge_counts, dim=1),
            edge_attr.split(edge_counts),
            role.split(node_counts),
            position.split(node_counts),
            node_counts,
        )
    ]
    return Batch.from_data_list(graphs)
