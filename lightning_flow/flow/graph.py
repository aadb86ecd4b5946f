"""The flow graph of a response: which attention edges are candidates, and the torch-geometric
graphs that keep the ones carrying the flow.

N = responses, T = positions (padding included). A position is a node when it is a valid token;
an edge i -> k (i < k) carries capacity c(i, k) = Ā[k, i], the head- and layer-mean attention of
query k to key i. The sinks send nothing and capacities below ``min_capacity`` are no edges: the rest
are the candidates the credit is solved on, exactly (``solver.solve_maps``). Then, per target token,
pruning keeps the incoming edges that carry the most of the solved flow, ``keep_mass`` of it (at most
``max_in_degree``), and those become the graphs (``prune_edges`` then ``flow_graphs``: a ``Batch`` with
one ``Data`` per response, O(edges) memory) that credit, pictures and traces read. Pruning changes what
the graphs show, never the credit.

With ``prune_before_solve`` the order is the other one: pruning keeps each token's strongest incoming
edges by capacity, and the flow is solved on the graphs that are left (``solver.solve_graphs``): the
credit is then that of the pruned graphs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch_geometric.data import Batch, Data

if TYPE_CHECKING:
    from .solver import FlowSolution

ROLE_PROMPT, ROLE_RESPONSE, ROLE_ANSWER = 0, 1, 2

_BUILD_ELEMENTS = 2**16
"""Candidate edges per pruning step at least (256 KiB in float32); above that, a 512th of the map."""
_SMALL_MAP = 2**20
"""Maps of at most this many elements (4 MiB) are pruned in one step and solved in blocks of ``block_size``:
their temporaries cost nothing that matters."""


@dataclass
class FlowConfig:
    """Choices of the flow graph and the credit (docs/method.md marks them "choice")."""

    sink_tokens: int = 1
    """Edges out of the first `sink_tokens` valid tokens of each sequence are dropped (attention sinks)."""
    keep_mass: float = 1.0
    """Per token, the graph keeps the incoming edges carrying the most flow until this share of its incoming
    flow is kept; 1 with no ``max_in_degree`` prunes nothing: every candidate edge, flow or not."""
    max_in_degree: int | None = None
    """At most this many incoming edges per token in the graph (ties: earliest source); None: no cap."""
    min_capacity: float = 1e-6
    """Drop edges whose capacity is below this; zero-capacity edges are never edges."""
    top_fraction: float = 0.4
    """Share of response tokens, ranked by throughput, whose advantage is boosted."""
    boost: float = 1.5
    """Weight of the boosted tokens; the other response tokens get 1.0."""
    block_size: int = 512
    """Positions per block of the solver at most (dense triangular solves inside a block, tile products
    between blocks); large maps use smaller blocks (``solver.solver_block``)."""
    dtype: torch.dtype = torch.float32
    """Precision of the graphs' capacities and of the returned flow (the solver works in float64 inside
    blocks, log scales between them)."""
    prune_before_solve: bool = False
    """Prune first, by capacity (``keep_mass`` of each token's incoming capacity, at most ``max_in_degree``
    edges), and solve the flow on the pruned graphs; False: solve on every candidate edge, then prune by
    the solved flow (the credit is exact whatever the pruning)."""

    def __post_init__(self) -> None:
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if not 0.0 < self.keep_mass <= 1.0:
            raise ValueError(f"keep_mass must be in (0, 1], got {self.keep_mass}")
        if self.max_in_degree is not None and self.max_in_degree < 1:
            raise ValueError(f"max_in_degree must be >= 1 or None, got {self.max_in_degree}")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}")
        if not 0.0 <= self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in [0, 1], got {self.top_fraction}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    @property
    def prunes(self) -> bool:
        return self.keep_mass < 1.0 or self.max_in_degree is not None


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


def node_roles(valid: Tensor, prompt: Tensor, answer: Tensor) -> Tensor:
    """[N, T] long: 0 prompt, 1 response, 2 answer (answer wins over response; padding gets 1)."""
    role = torch.full_like(valid, ROLE_RESPONSE, dtype=torch.long)  # [N, T]
    role[prompt] = ROLE_PROMPT
    role[answer & valid & ~prompt] = ROLE_ANSWER
    return role


def prune_incoming(
    a: Tensor, keep_mass: float, max_in_degree: int | None, score: Tensor | None = None
) -> Tensor:
    """a  # [..., C] candidate capacities of each row's incoming edges (0: no edge) -> the same with
    the pruned edges zeroed: per row, ranked by ``score`` (default: the capacities; ties: the earlier
    column), the shortest run whose score sums to ``keep_mass`` of the row's, cut at ``max_in_degree``
    edges; edges of score 0 are never kept. ``keep_mass`` 1 with no cap prunes nothing: ``a`` itself."""
    score = a if score is None else score
    if keep_mass >= 1.0 and max_in_degree is None:
        return a
    if max_in_degree is not None and max_in_degree < a.shape[-1]:
        value, index = _top_columns(score, max_in_degree)  # [..., max_in_degree]
    else:
        value, index = score.sort(dim=-1, descending=True, stable=True)  # [..., C]
    keep = value > 0
    if keep_mass < 1.0:
        before = value.cumsum(-1) - value  # score of the higher-ranked edges of the row
        keep &= before < keep_mass * score.sum(-1, keepdim=True)
    return torch.zeros_like(a).scatter_(-1, index, a.gather(-1, index) * keep)


def _top_columns(score: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of ``score``  # [..., C] and their columns, largest first, ties to
    the earlier column: the order of a stable descending sort cut at k, without sorting whole rows
    (``topk`` finds the k-th value; which of the entries equal to it are kept is decided by column)."""
    kth = score.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # [..., 1]
    above = score > kth
    tied = score == kth
    room = k - above.sum(-1, keepdim=True, dtype=torch.int32)  # [..., 1] tied entries that fit
    chosen = above | (tied & (tied.cumsum(-1, dtype=torch.int32) <= room))  # exactly k per row
    index = chosen.nonzero()[:, -1].view(*score.shape[:-1], k)  # columns in increasing order
    value, order = score.gather(-1, index).sort(dim=-1, descending=True, stable=True)
    return value, index.gather(-1, order)


def _rows_per_step(n: int, t: int) -> int:
    """Query rows pruned at once: a step's temporaries (the edge flows, masks, a sort's or topk's
    values and indices: about 5x the block in bytes) stay near 1 % of the map (4 % at 2K positions,
    where the floor binds); small maps go in one step."""
    if n * t * t <= _SMALL_MAP:
        return max(1, t)
    return max(1, min(t, max(_BUILD_ELEMENTS, n * t * t // 512) // max(1, n * t)))


def candidate_rows(attention: Tensor, valid: Tensor, cfg: FlowConfig) -> Iterator[tuple[int, Tensor]]:
    """(r0, a) for consecutive blocks of query rows: a  # [N, r, r0 + r] the candidate capacities of
    rows r0 : r0 + r in attention layout, a[n, k - r0, i] = c(i, k) (keys i < k only; sinks, padding,
    entries below ``min_capacity`` and NaN are no edges). The answer tokens' out-edges are candidates
    here; they carry no flow."""
    n, t, _ = attention.shape
    keep_src = (valid & ~sink_mask(valid, cfg.sink_tokens)).to(cfg.dtype)  # [N, T] may send edges
    keep_dst = valid.to(cfg.dtype)  # [N, T]
    rows = _rows_per_step(n, t)
    for r0 in range(0, t, rows):
        r1 = min(t, r0 + rows)
        a = attention[:, r0:r1, :r1].to(cfg.dtype).tril(r0 - 1)  # a fresh tensor, so the masks apply in place
        a.mul_(keep_dst[:, r0:r1, None]).mul_(keep_src[:, None, :r1])
        yield r0, torch.where((a >= cfg.min_capacity) & torch.isfinite(a), a, 0.0)


@torch.no_grad()
def capacities(attention: Tensor, valid: Tensor, cfg: FlowConfig | None = None) -> Tensor:
    """[N, T, T] c[n, i, k] = Ā[n, k, i] on every candidate edge (sinks, padding and ``min_capacity``
    applied, nothing pruned): the capacities the credit is solved on, densely, for tests and references."""
    check_inputs(attention, valid)
    n, t, _ = attention.shape
    cfg = cfg or FlowConfig()
    p = torch.zeros(n, t, t, dtype=cfg.dtype, device=attention.device)  # [N, T, T] p[n, k, i] = c(i, k)
    for r0, block in candidate_rows(attention, valid, cfg):
        p[:, r0 : r0 + block.shape[1], : block.shape[2]] = block
    return p.transpose(1, 2)


@dataclass
class KeptEdges:
    """The edges pruning kept from a chunk of maps, compactly (8 B an edge), so the maps can be
    freed before the graphs are assembled (``flow_graphs``)."""

    valid: Tensor  # [N, T] bool
    nonfinite: Tensor  # [N] bool: the map has a NaN or inf (an overflowing forward)
    # [N, T] each target's incoming flow before pruning (float64); None when pruned before the solve
    incoming: Tensor | None
    # per block of target rows: (r0, edges per row [N, r] int32, source positions [e] int32, capacities [e])
    steps: list[tuple[int, Tensor, Tensor, Tensor]]


@torch.no_grad()
def prune_edges(
    attention: Tensor, valid: Tensor, answer: Tensor, cfg: FlowConfig, solution: FlowSolution | None = None
) -> KeptEdges:
    """Read the maps  # [N, T, T] a block of query rows at a time and keep, per target token, the
    incoming edges that carry the most of the solved flow (``solution``: f(i) w(i, k) =
    c(i, k) e^(log g(i) + log h(k))), or without a solution (``prune_before_solve``) the strongest by
    capacity: ``keep_mass`` of its incoming flow (capacity), at most ``max_in_degree`` edges; edges into
    answer tokens are all kept (a few rows), edges without flow (capacity) never. Besides the maps only
    one block's temporaries (a few % of the maps) and the kept edges exist. Without pruning
    (``keep_mass`` 1, no cap) every candidate edge is kept, those without flow too."""
    check_inputs(attention, valid, answer)
    if solution is None:
        incoming, nonfinite = None, ~torch.isfinite(attention.sum(dim=(1, 2)))  # [N] one pass over the maps
    else:
        incoming, nonfinite = (
            torch.zeros(valid.shape, dtype=torch.float64, device=attention.device),
            solution.nonfinite,
        )
        log_g, log_h = solution.log_g.to(cfg.dtype), solution.log_h.to(cfg.dtype)  # [N, T] each
    steps = []
    for r0, a in candidate_rows(attention, valid, cfg):
        r1 = r0 + a.shape[1]
        if solution is None:
            score = a
        else:  # [N, r, c] edge flows
            score = a.log().add_(log_g[:, None, :r1]).add_(log_h[:, r0:r1, None]).exp_()
            incoming[:, r0:r1] = score.sum(-1, dtype=torch.float64)
        kept = prune_incoming(a, cfg.keep_mass, cfg.max_in_degree, score)
        if cfg.prunes:  # edges into answer tokens are never pruned
            kept = torch.where(answer[:, r0:r1, None] & (score > 0), a, kept)
        edges = kept != 0  # [N, r, c]
        # (graph, target, source) order
        steps.append((r0, edges.sum(-1, dtype=torch.int32), edges.nonzero()[:, 2].int(), kept[edges]))
        del a, score, kept, edges
    return KeptEdges(valid, nonfinite, incoming, steps)


@torch.no_grad()
def flow_graphs(kept: KeptEdges, prompt: Tensor, answer: Tensor) -> Batch:
    """One graph per response from the kept edges: its valid tokens in order are the nodes (``role``,
    ``position``; ``f``, ``h``, ``log_h``, ``incoming_flow`` and per graph ``degenerate`` are zeros until
    ``solver.solved_graphs`` writes the flow into them), ``edge_index`` [2, E] holds (source, target) in
    local node ids sorted by (target, source), ``edge_attr`` [E] the capacities. Memory: about 2.5 times
    the Batch's edges while it is assembled."""
    valid = kept.valid
    n, t = valid.shape
    graph_ids, targets, sources, capacities_ = [], [], [], []
    for r0, counts, source, capacity in kept.steps:  # rows of one step are in (graph, target) order
        r = counts.shape[1]
        flat = counts.flatten().long()
        graph_ids.append(torch.arange(n, device=valid.device).repeat_interleave(r).repeat_interleave(flat))
        targets.append(torch.arange(r0, r0 + r, device=valid.device).repeat(n).repeat_interleave(flat))
        sources.append(source)
        capacities_.append(capacity)
    # [E] each
    graph, target, source, capacity = (torch.cat(x) for x in (graph_ids, targets, sources, capacities_))
    # steps are target-major over the whole batch: regroup by graph, keeping the order
    if len(kept.steps) > 1:
        order = torch.argsort(graph, stable=True)
        graph, target, source, capacity = graph[order], target[order], source[order], capacity[order]
    local = valid.long().cumsum(-1) - 1  # [N, T] node id of each valid position
    edge_index = torch.stack((local[graph, source.long()], local[graph, target]))  # [2, E]
    edge_counts = torch.bincount(graph, minlength=n).tolist()
    del graph, target, source
    roles = node_roles(valid, prompt, answer)
    position = torch.arange(t, device=valid.device).expand_as(valid)
    data = []
    for g, (edges, caps) in enumerate(zip(edge_index.split(edge_counts, dim=1), capacity.split(edge_counts))):
        nodes = valid[g]
        size = int(nodes.sum())
        data.append(
            Data(
                edge_index=edges,
                edge_attr=caps,
                role=roles[g][nodes],
                position=position[g][nodes],
                incoming_flow=torch.zeros(size, dtype=torch.float64, device=valid.device),
                f=caps.new_zeros(size),
                h=caps.new_zeros(size),
                log_h=torch.zeros(size, dtype=torch.float64, device=valid.device),
                degenerate=torch.zeros(1, dtype=torch.bool, device=valid.device),
                num_nodes=size,
            )
        )
    return Batch.from_data_list(data)


def kept_flow(graphs: Batch, edge_flows: Tensor) -> Tensor:
    """[V] share of each node's incoming flow (before pruning) that its kept edges carry, from the solved
    graphs' ``edge_flows`` [E] (``edge_flow``); 1 where no flow enters."""
    kept = torch.zeros_like(graphs.incoming_flow).index_add_(0, graphs.edge_index[1], edge_flows.double())
    total = graphs.incoming_flow
    return torch.where(total > 0, (kept / total.clamp_min(torch.finfo(total.dtype).tiny)).clamp(max=1.0), 1.0)


def dense_graph(graphs: Batch, values: Tensor, t: int) -> Tensor:
    """[G, T, T] per-edge ``values`` [E] (e.g. capacities or edge flows) at [graph, source position,
    target position], zero elsewhere; for pictures and tests of a few short responses."""
    source, target = graphs.edge_index
    out = values.new_zeros(graphs.num_graphs, t, t)
    out[graphs.batch[source], graphs.position[source], graphs.position[target]] = values
    return out
