"""Answer-conditioned flow, solved exactly on the attention maps (or on pruned flow graphs): the Doob
h-transform and the prompt-to-answer throughput.

Both sweeps go over blocks of consecutive positions, batched over the responses of a chunk of maps:
  h:  h(a) = 1 on the answer, h(i) = Σ_k c(i, k) h(k) elsewhere; last block first;
  f:  f(k) = μ(k) + Σ_i f(i) w(i, k), w(i, k) = c(i, k) h(k) / h(i) for senders i ∉ S; first block first.
The capacities c(i, k) = Ā[k, i] are read from the map one [N, b, b] tile at a time (sinks, answer
sources, padding and edges below ``min_capacity`` masked out there): a block is one dense float64
triangular solve, and what it passes to earlier (h) or receives from earlier (f) blocks is a product
with the tiles between them. So the solve is exact, it costs O(T²) per response, and besides the
maps it holds a few tiles and [N, T] vectors: nothing is pruned before the credit is known.
``solve_graphs`` runs the same sweeps on flow graphs (``prune_before_solve``): each tile is scattered from
the graphs' edges between its two blocks, so it holds O(edges + N × block²).

h can span far more than any float range on long responses (it decays backwards when attention rows
sum below 1 and grows when they sum above 1), so every block is solved in its own scale and h is kept
as float64 logs; float64 inside a block leaves a span of about 1e300 between a block's largest and
smallest h. A block that still overflows marks its response degenerate (counted, weights uniform),
never NaN. h(i) is stored as the sum Σ_k c(i, k) h(k) from the solved h of its targets, so the
conditioned weights out of every sender sum to 1 to float64 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from torch_geometric.data import Batch

from .graph import (
    _SMALL_MAP,
    ROLE_ANSWER,
    FlowConfig,
    KeptEdges,
    check_inputs,
    flow_graphs,
    prune_edges,
    sink_mask,
)

_NEG_INF = float("-inf")


def vector_matrix(x: Tensor, m: Tensor) -> Tensor:
    """[..., a] x [..., a, b] -> [..., b]: Σ_a x[..., a] m[..., a, b], batched over the leading dims.

    A product with a row vector on the left: on a CPU the BLAS runs it several times faster than
    the matrix-times-column-vector that ``einsum`` makes of these sums, whichever way ``m`` is laid
    out, so a sum over m's last index is written ``vector_matrix(x, m.mT)``."""
    return torch.matmul(x.unsqueeze(-2), m).squeeze(-2)


def _finite_max(x: Tensor) -> Tensor:
    """[G, 1] row max over the finite entries of a [G, B] tensor, 0 for rows with none."""
    top = x.amax(-1, keepdim=True)  # [G, 1]
    return torch.where(torch.isfinite(top), top, torch.zeros_like(top))


def solver_block(n: int, t: int, block_size: int) -> int:
    """Positions per block: ``block_size`` at most, and on large maps at most T / 20, so that a
    tile's temporaries (about 32 B an entry) stay within 2 % of the [N, T, T] float32 maps they are
    read from (the maps are alive while the credit is solved)."""
    if n * t * t <= _SMALL_MAP:
        return max(1, min(block_size, t))
    return max(16, min(block_size, t // 20 // 16 * 16))


class _MapTiles:
    """Capacity tiles of a chunk of maps, [N, r, c] float64 blocks p[n, k, i] = c(i, k) for targets k in
    [r0, r1) and sources i in [c0, c1). ``diagonal`` is zero where i cannot send (``sends``: sinks,
    answer tokens and padding send nothing), k is padding, i >= k, or Ā[k, i] is below ``min_capacity``;
    ``between`` (sources before r0) applies ``min_capacity`` only: the sweeps mask the vectors they
    multiply it with, which costs a vector instead of a pass over the tile (a NaN there stays: its
    response is degenerate, ``solve_maps`` checks each map once)."""

    def __init__(self, attention: Tensor, valid: Tensor, answer: Tensor, cfg: FlowConfig) -> None:
        self.attention, self.min_capacity = attention, cfg.min_capacity
        self.sends = valid & ~sink_mask(valid, cfg.sink_tokens) & ~answer  # [N, T]
        self.valid = valid
        # a > below ⟺ a >= min_capacity in the map's dtype: one fused threshold, not a compare and a select
        floor = torch.tensor(cfg.min_capacity, dtype=attention.dtype)
        self.below = float(torch.nextafter(floor, torch.tensor(float("-inf"), dtype=attention.dtype)))

    def between(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        return torch.nn.functional.threshold(self.attention[:, r0:r1, c0:c1], self.below, 0.0).double()

    def diagonal(self, s: int, e: int) -> Tensor:
        a = self.attention[:, s:e, s:e]
        ok = (a >= self.min_capacity) & self.valid[:, s:e, None] & self.sends[:, None, s:e]
        ok &= torch.ones(e - s, e - s, dtype=torch.bool, device=a.device).tril(-1)  # sources before targets
        return torch.where(ok, a, 0.0).double()


class _GraphTiles:
    """The same tiles as ``_MapTiles``, scattered from the edges of flow graphs (a ``Batch`` over the
    positions of ``valid``): the edges are sorted once by (target block, source block), and a tile is
    made from the edges between its two blocks, zero elsewhere (answer tokens send nothing)."""

    def __init__(self, graphs: Batch, valid: Tensor, answer: Tensor, cfg: FlowConfig, size: int) -> None:
        self.sends = valid & ~sink_mask(valid, cfg.sink_tokens) & ~answer  # [N, T]
        self.n, self.size, blocks = valid.shape[0], size, -(-valid.shape[1] // size)
        source, target = graphs.position[graphs.edge_index]  # [E] positions each
        key = target // size * blocks + source // size  # [E] the tile each edge falls in
        order = torch.argsort(key, stable=True)
        self.graph, self.source, self.target = (
            graphs.batch[graphs.edge_index[1]][order],
            source[order],
            target[order],
        )
        self.capacity = graphs.edge_attr[order].double()
        counts = torch.bincount(key, minlength=blocks * blocks)
        self.offsets = [0, *counts.cumsum(0).tolist()]  # edges of tile k: offsets[k]:offsets[k + 1]
        self.blocks = blocks

    def between(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        k = r0 // self.size * self.blocks + c0 // self.size
        e = slice(self.offsets[k], self.offsets[k + 1])
        tile = torch.zeros(self.n, r1 - r0, c1 - c0, dtype=torch.float64, device=self.capacity.device)
        tile[self.graph[e], self.target[e] - r0, self.source[e] - c0] = self.capacity[e]
        return tile

    def diagonal(self, s: int, e: int) -> Tensor:
        return self.between(s, e, s, e) * self.sends[:, None, s:e]


def _blocks(t: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(t, s + size)) for s in range(0, t, size)]


def _solve_h(
    tiles: _MapTiles | _GraphTiles, answer: Tensor, blocks: list[tuple[int, int]]
) -> tuple[Tensor, Tensor]:
    """(log h [N, T] float64, overflowed [N] bool) by back-substitution, last block first."""
    log_h = torch.full(answer.shape, _NEG_INF, dtype=torch.float64, device=answer.device)  # [N, T]
    # [N, T] log Σ c(i, k) h(k) over k in the blocks solved so far
    log_later = torch.full_like(log_h, _NEG_INF)
    overflowed = torch.zeros(answer.shape[0], dtype=torch.bool, device=answer.device)
    for b in reversed(range(len(blocks))):
        s, e = blocks[b]
        p = tiles.diagonal(s, e)  # [N, k, i]
        log_rhs = torch.where(answer[:, s:e], 0.0, log_later[:, s:e])  # [N, b]; h(a) = 1
        scale = _finite_max(log_rhs)  # [N, 1]
        rhs = (log_rhs - scale).exp()  # [N, b] max 1 (or all 0)
        # (I - C) x = rhs with C[i, k] = p[k, i] strictly upper: x = h / e^scale
        x = torch.linalg.solve_triangular(-p.mT, rhs[..., None], upper=True, unitriangular=True).squeeze(-1)
        finite = torch.isfinite(x).all(-1)  # [N]
        overflowed |= ~finite
        x = torch.where(finite[:, None], x.clamp_min(0), 0.0)
        within = vector_matrix(x, p)  # [N, b] Σ_k c(i, k) h(k) / e^scale over k in the block
        log_h[:, s:e] = torch.where(
            answer[:, s:e], 0.0, torch.logaddexp(log_later[:, s:e], within.log() + scale)
        )
        for c0, c1 in blocks[:b]:  # what the block's tokens pass back to earlier sources
            later = vector_matrix(x, tiles.between(s, e, c0, c1)) * tiles.sends[:, c0:c1]  # [N, c]
            log_later[:, c0:c1] = torch.logaddexp(log_later[:, c0:c1], later.log() + scale)
    return log_h, overflowed


def _solve_f(
    tiles: _MapTiles | _GraphTiles, log_h: Tensor, mu: Tensor, sends: Tensor, blocks: list[tuple[int, int]]
) -> tuple[Tensor, Tensor]:
    """(f, log g) [N, T] float64 by forward substitution, first block first; g = f / h on senders
    (-inf elsewhere) carries the flow between blocks, each source block in its own scale, and w is
    formed in log space inside a block (each w <= 1, so nothing overflows)."""
    f = torch.zeros_like(mu)  # [N, T]
    log_g = torch.full_like(mu, _NEG_INF)  # [N, T]
    for b, (s, e) in enumerate(blocks):
        rhs = mu[:, s:e].clone()  # [N, b]
        # f(k) += h(k) Σ_i c(i, k) g(i) over each earlier block (g is 0 where i does not send, and h(k)
        # where k is padding)
        for c0, c1 in blocks[:b]:
            sigma = _finite_max(log_g[:, c0:c1])  # [N, 1]
            into = vector_matrix((log_g[:, c0:c1] - sigma).exp(), tiles.between(s, e, c0, c1).mT)  # [N, b]
            rhs += (into.log() + sigma + log_h[:, s:e]).exp()
        p = tiles.diagonal(s, e)  # [N, k, i]
        log_w = p.log() + log_h[:, s:e, None] - log_h[:, None, s:e]  # [N, k, i] log w(i, k)
        # [N, k, i] -w(i, k), senders only (no -inf - -inf)
        minus_wt = torch.where(sends[:, None, s:e] & (p > 0), -log_w.exp(), 0.0)
        f[:, s:e] = torch.linalg.solve_triangular(
            minus_wt, rhs[..., None], upper=False, unitriangular=True
        ).squeeze(-1)
        log_g[:, s:e] = torch.where(sends[:, s:e], f[:, s:e].log() - log_h[:, s:e], _NEG_INF)
    return f, log_g


@dataclass
class FlowSolution:
    """The flow of a chunk of maps or graphs, per position (padding: 0, -inf in the logs)."""

    f: Tensor  # [N, T] float64 throughput in [0, 1]; all 0 on degenerate rows
    log_h: Tensor  # [N, T] float64 log of the unscaled h (-inf where no path reaches the answer)
    # [N, T] float64 log f / h on senders (-inf elsewhere): f(i) w(i, k) = c(i, k) e^(log_g(i) + log_h(k))
    log_g: Tensor
    # [N] bool: no answer, no response, Σ_prompt h = 0, h beyond float64 in a block, or a non-finite map
    degenerate: Tensor
    nonfinite: Tensor  # [N] bool: the map has a NaN or inf (an overflowing forward)


def _solve(
    tiles: _MapTiles | _GraphTiles,
    valid: Tensor,
    prompt: Tensor,
    answer: Tensor,
    nonfinite: Tensor,
    size: int,
) -> FlowSolution:
    blocks = _blocks(valid.shape[1], size)
    log_h, overflowed = _solve_h(tiles, answer, blocks)
    # Super-source over the prompt, conditioned like every other edge: μ(i) ∝ h(i).
    log_source = torch.where(prompt & valid, log_h, _NEG_INF)  # [N, T]
    log_z = torch.logsumexp(log_source, dim=-1, keepdim=True)  # [N, 1] log Σ_P h
    has_source = torch.isfinite(log_z) & ~overflowed[:, None]  # [N, 1]
    mu = torch.where(has_source, (log_source - torch.where(has_source, log_z, 0.0)).exp(), 0.0)  # [N, T]
    sends = valid & ~answer & torch.isfinite(log_h)  # [N, T]
    f, log_g = _solve_f(tiles, log_h, mu, sends, blocks)
    # No answer, an empty response or fewer than two valid tokens all leave Σ_prompt h = 0.
    degenerate = ~has_source.squeeze(-1) | nonfinite  # [N]
    f = torch.where(degenerate[:, None], 0.0, f.clamp_(0.0, 1.0))
    log_g = torch.where(degenerate[:, None], _NEG_INF, log_g)
    log_h = torch.where(nonfinite[:, None], _NEG_INF, log_h)
    return FlowSolution(f=f, log_h=log_h, log_g=log_g, degenerate=degenerate, nonfinite=nonfinite)


@torch.no_grad()
def solve_maps(
    attention: Tensor, valid: Tensor, prompt: Tensor, answer: Tensor, cfg: FlowConfig | None = None
) -> FlowSolution:
    """The exact answer-conditioned flow of dense maps  # [N, T, T] (query, key), masks [N, T] bool.
    A map with a NaN or inf (an overflowing forward) is a degenerate row."""
    check_inputs(attention, valid, prompt, answer)
    cfg = cfg or FlowConfig()
    n, t = valid.shape
    answer = answer & valid & ~prompt
    nonfinite = ~torch.isfinite(attention.sum(dim=(1, 2)))  # [N] a sum is non-finite iff an entry is
    tiles = _MapTiles(attention, valid, answer, cfg)
    return _solve(tiles, valid, prompt, answer, nonfinite, solver_block(n, t, cfg.block_size))


@torch.no_grad()
def solve_graphs(
    graphs: Batch, kept: KeptEdges, prompt: Tensor, answer: Tensor, cfg: FlowConfig
) -> FlowSolution:
    """The answer-conditioned flow on the edges of flow graphs (``flow_graphs(kept, ...)``) alone: the
    credit of the pruned graphs (``prune_before_solve``), in the blocks ``solve_maps`` would use."""
    valid = kept.valid
    n, t = valid.shape
    answer = answer & valid & ~prompt
    size = solver_block(n, t, cfg.block_size)
    tiles = _GraphTiles(graphs, valid, answer, cfg, size)
    return _solve(tiles, valid, prompt, answer, kept.nonfinite, size)


@torch.no_grad()
def solved_graphs(
    kept: KeptEdges, prompt: Tensor, answer: Tensor, cfg: FlowConfig, solution: FlowSolution | None = None
) -> tuple[Batch, FlowSolution]:
    """The flow graphs of the kept edges with the flow written into their nodes: ``solution`` (solved on
    the maps before pruning) or, without one, the flow solved now on the graphs (``solve_graphs``)."""
    graphs = flow_graphs(kept, prompt, answer)
    if solution is None:
        solution = solve_graphs(graphs, kept, prompt, answer, cfg)
    nodes = kept.valid  # [N, T]; the Batch's nodes are the valid positions in (graph, position) order
    h = (solution.log_h - solution.log_h.amax(-1, keepdim=True).nan_to_num(0.0, 0.0, 0.0)).exp()  # [N, T]
    graphs.f.copy_(solution.f[nodes])
    graphs.h.copy_(h[nodes])
    graphs.log_h.copy_(solution.log_h[nodes])
    graphs.degenerate.copy_(solution.degenerate)
    if kept.incoming is not None:
        graphs.incoming_flow.copy_(kept.incoming[nodes])
    else:  # the graphs carry all of their own flow
        graphs.incoming_flow.index_add_(0, graphs.edge_index[1], edge_flow(graphs).double())
    return graphs, solution


def edge_flow(graphs: Batch) -> Tensor:
    """[E] edge flow f(i) · w(i, k) of solved graphs, w(i, k) = c(i, k) h(k) / h(i); 0 out of
    answer tokens (they absorb) and out of tokens with h = 0 or f = 0."""
    source, target = graphs.edge_index
    sends = torch.isfinite(graphs.log_h[source]) & (graphs.f[source] > 0)
    sends &= graphs.role[source] != ROLE_ANSWER
    log_edge = (
        graphs.edge_attr.double().log()
        + graphs.log_h[target]
        - graphs.log_h[source]
        + graphs.f[source].double().log()
    )
    return torch.where(sends, log_edge.exp(), 0.0).to(graphs.edge_attr.dtype)


@dataclass
class FlowResult:
    """The solved flow of a batch of responses, per position (padding: 0, -inf in log_h)."""

    flow: Tensor  # [N, T] throughput f in [0, 1]; all 0 on degenerate rows
    # [N] bool: no answer, empty response, < 2 valid tokens, Σ_prompt h = 0 or h beyond float64 in a block
    degenerate: Tensor
    answer: Tensor  # [N, T] bool: the answer tokens the flow was conditioned on (within the response)
    log_h: Tensor  # [N, T] float64 log of the unscaled h (-inf where h = 0)
    graphs: Batch  # the flow graphs: the edges that carry the flow (pruned), nodes with f, h, log_h

    @cached_property
    def h(self) -> Tensor:
        """[N, T] influence on the answer, scaled to max 1 per response; 0 where no path."""
        return (self.log_h - _finite_max(self.log_h)).exp().to(self.flow.dtype)

    @cached_property
    def absorbed(self) -> Tensor:
        """[N] flow absorbed by the answer: 1 where not degenerate, 0 where degenerate."""
        return (self.flow * self.answer).sum(-1)


@torch.no_grad()
def answer_flow(
    attention: Tensor, valid: Tensor, prompt: Tensor, answer: Tensor, cfg: FlowConfig | None = None
) -> FlowResult:
    """The flow of dense maps and their flow graphs: solved exactly, then the graphs keep the edges that
    carry it (pruned by ``cfg``); with ``cfg.prune_before_solve``, pruned by capacity, then solved on the
    graphs.

    attention  # [N, T, T] head- and layer-mean attention (query, key); masks  # [N, T] bool"""
    cfg = cfg or FlowConfig()
    solution = None if cfg.prune_before_solve else solve_maps(attention, valid, prompt, answer, cfg)
    kept = prune_edges(attention, valid, answer, cfg, solution)
    graphs, solution = solved_graphs(kept, prompt, answer, cfg, solution)
    return FlowResult(
        flow=solution.f.to(cfg.dtype),
        degenerate=solution.degenerate,
        answer=answer & valid & ~prompt,
        log_h=solution.log_h,
        graphs=graphs,
    )
