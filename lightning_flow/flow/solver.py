"""Answer-conditioned flow on the flow graphs: the Doob h-transform and the prompt-to-answer throughput.

Both sweeps go over blocks of ``block_size`` consecutive nodes, batched over the graphs:
  h:  h(a) = 1 on the answer, h(i) = Σ_k c(i, k) h(k) elsewhere; last block first;
  f:  f(k) = μ(k) + Σ_i f(i) w(i, k), w(i, k) = c(i, k) h(k) / h(i) for senders i ∉ S; first block first.
Inside a block the edges are scattered into a dense [G, b, b] float64 matrix and the block is one
triangular solve; between blocks the contributions go over the edges by scatter, so memory is
O(edges + graphs × block²). h can span far more than any float range on long responses (it decays
backwards when attention rows sum below 1 and grows when they sum above 1), so every block is
solved in its own scale and h is kept as float64 logs: a block's right-hand side is normalised to
max 1, and float64 inside the block leaves a span of about 1e300 between a block's largest and
smallest h. A block that still overflows marks its graph degenerate (counted, weights uniform),
never NaN.

h(i) is stored as the sum Σ_k c(i, k) h(k) computed from the solved h of its targets, so the
conditioned weights out of every sender sum to 1 to float64 rounding and no flow leaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from torch_geometric.data import Batch

from .graph import ROLE_ANSWER, ROLE_PROMPT, FlowConfig, build_flow_graphs

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


@dataclass
class _Layout:
    """Where each node and edge of a batch of graphs sits in a [G, S] grid of blocks of ``size`` nodes."""

    graphs: int
    size: int  # block size
    blocks: int
    node_graph: Tensor  # [V] graph of each node
    node_local: Tensor  # [V] index of each node in its graph
    source: Tensor  # [E] local index of each edge's source
    target: Tensor  # [E] local index of each edge's target
    edge_graph: Tensor  # [E]
    by_block: list[Tensor]  # per target block, the edges into it (indices into E)

    @classmethod
    def of(cls, graphs: Batch, block_size: int) -> _Layout:
        counts = graphs.ptr.diff()  # [G] nodes per graph
        longest = int(counts.max()) if len(counts) else 0
        size = max(1, min(block_size, longest))
        blocks = max(1, -(-longest // size))
        node_graph = graphs.batch
        node_local = torch.arange(graphs.num_nodes, device=node_graph.device) - graphs.ptr[node_graph]
        source, target = node_local[graphs.edge_index]
        target_block = target // size
        order = torch.argsort(target_block, stable=True)
        by_block = list(order.split(torch.bincount(target_block, minlength=blocks).tolist()))
        return cls(
            len(counts),
            size,
            blocks,
            node_graph,
            node_local,
            source,
            target,
            node_graph[graphs.edge_index[0]],
            by_block,
        )

    def grid(self, values: Tensor, fill: float | bool = 0) -> Tensor:
        """[G, S] from per-node [V] values (``fill`` where a graph has no node)."""
        out = values.new_full((self.graphs, self.blocks * self.size), fill)
        out[self.node_graph, self.node_local] = values
        return out


def _solve_h(layout: _Layout, capacity: Tensor, answer: Tensor) -> tuple[Tensor, Tensor]:
    """(log h [G, S] float64, overflowed [G] bool) by back-substitution, last block first.
    capacity  # [E] float64, 0 on edges out of answer tokens (they feed the super-sink only)"""
    g, bs = layout.graphs, layout.size
    log_h = torch.full(answer.shape, _NEG_INF, dtype=torch.float64, device=answer.device)  # [G, S]
    # [G, S] log Σ c(i, k) h(k) over k in the blocks solved so far
    log_later = torch.full_like(log_h, _NEG_INF)
    overflowed = torch.zeros(g, dtype=torch.bool, device=answer.device)
    for b in reversed(range(layout.blocks)):
        s, e = b * bs, (b + 1) * bs
        edges = layout.by_block[b]
        graph, source, target, c = (
            layout.edge_graph[edges],
            layout.source[edges],
            layout.target[edges] - s,
            capacity[edges],
        )
        inner = source >= s
        log_rhs = torch.where(answer[:, s:e], 0.0, log_later[:, s:e])  # [G, bs]; h(a) = 1
        scale = _finite_max(log_rhs)  # [G, 1]
        rhs = (log_rhs - scale).exp()  # [G, bs] max 1 (or all 0)
        # [G, i, k] -c(i, k) inside the block
        minus_m = torch.zeros(g, bs, bs, dtype=torch.float64, device=c.device)
        minus_m[graph[inner], source[inner] - s, target[inner]] = -c[inner]
        # [G, bs] h / e^scale
        x = torch.linalg.solve_triangular(minus_m, rhs[..., None], upper=True, unitriangular=True).squeeze(-1)
        finite = torch.isfinite(x).all(-1)  # [G]
        overflowed |= ~finite
        x = torch.where(finite[:, None], x.clamp_min(0), 0.0)
        within = -vector_matrix(x, minus_m.mT)  # [G, bs] Σ_k c(i, k) h(k) / e^scale over k in the block
        log_h[:, s:e] = torch.where(
            answer[:, s:e], 0.0, torch.logaddexp(log_later[:, s:e], within.log() + scale)
        )
        # What the block's tokens pass back to earlier sources, in the log domain (blocks differ in scale).
        # [G, S]
        later = torch.zeros_like(log_h).index_put_(
            (graph[~inner], source[~inner]),
            c[~inner] * x[graph[~inner], target[~inner]],
            accumulate=True,
        )
        log_later[:, :s] = torch.logaddexp(log_later[:, :s], later[:, :s].log() + scale)
    return log_h, overflowed


def _solve_f(layout: _Layout, capacity: Tensor, log_h: Tensor, mu: Tensor, sends: Tensor) -> Tensor:
    """f [G, S] float64 by forward substitution, first block first; w is formed per edge in log space
    (each w <= 1, so nothing overflows)."""
    g, bs = layout.graphs, layout.size
    f = torch.zeros_like(mu)  # [G, S]
    for b in range(layout.blocks):
        s, e = b * bs, (b + 1) * bs
        edges = layout.by_block[b]
        graph, source, target = layout.edge_graph[edges], layout.source[edges], layout.target[edges]
        log_w = capacity[edges].log() + log_h[graph, target] - log_h[graph, source]
        w = torch.where(sends[graph, source], log_w.exp(), 0.0)  # [e] w(i, k); senders only (no -inf - -inf)
        inner = source >= s
        rhs = mu[:, s:e].index_put(
            (graph[~inner], target[~inner] - s), f[graph[~inner], source[~inner]] * w[~inner], accumulate=True
        )
        # [G, k, i] -w(i, k) inside the block
        minus_wt = torch.zeros(g, bs, bs, dtype=torch.float64, device=mu.device)
        minus_wt[graph[inner], target[inner] - s, source[inner] - s] = -w[inner]
        f[:, s:e] = torch.linalg.solve_triangular(
            minus_wt, rhs[..., None], upper=False, unitriangular=True
        ).squeeze(-1)
    return f


@torch.no_grad()
def solve_flow(graphs: Batch, block_size: int = 512) -> Batch:
    """Fill the node attributes ``log_h`` (float64, -inf where no path reaches the answer), ``h``
    (scaled to max 1 per graph), ``f`` (throughput in [0, 1]) and the graph attribute
    ``degenerate`` (no answer, no response, Σ_prompt h = 0, or a block's h beyond float64:
    f = 0 there) of graphs made by ``build_flow_graphs``, in place; returns them."""
    if graphs.num_graphs == 0:
        return graphs
    layout = _Layout.of(graphs, block_size)
    answer = layout.grid(graphs.role == ROLE_ANSWER, False)  # [G, S]
    prompt = layout.grid(graphs.role == ROLE_PROMPT, False)  # [G, S]
    passes = graphs.role[graphs.edge_index[0]] != ROLE_ANSWER  # [E] answer tokens absorb
    capacity = torch.where(passes, graphs.edge_attr.double(), 0.0)  # [E]
    log_h, overflowed = _solve_h(layout, capacity, answer)
    # Super-source over the prompt, conditioned like every other edge: μ(i) ∝ h(i).
    log_source = torch.where(prompt, log_h, _NEG_INF)  # [G, S]
    log_z = torch.logsumexp(log_source, dim=-1, keepdim=True)  # [G, 1] log Σ_P h
    has_source = torch.isfinite(log_z) & ~overflowed[:, None]  # [G, 1]
    mu = torch.where(has_source, (log_source - torch.where(has_source, log_z, 0.0)).exp(), 0.0)  # [G, S]
    sends = ~answer & torch.isfinite(log_h)  # [G, S]
    f = _solve_f(layout, capacity, log_h, mu, sends).clamp_(0.0, 1.0)  # [G, S]
    # No answer, an empty response or fewer than two valid tokens all leave Σ_prompt h = 0.
    degenerate = ~has_source.squeeze(-1)  # [G]
    at = (layout.node_graph, layout.node_local)
    graphs.log_h = log_h[at]
    graphs.h = (log_h - _finite_max(log_h)).exp()[at].to(graphs.h.dtype)
    graphs.f = torch.where(degenerate[:, None], 0.0, f)[at].to(graphs.f.dtype)
    graphs.degenerate = degenerate
    return graphs


def edge_flow(graphs: Batch) -> Tensor:
    """[E] edge flow f(i) · w(i, k) of solved graphs, w(i, k) = c(i, k) h(k) / h(i); 0 out of
    answer tokens and tokens with h = 0 or f = 0."""
    source, target = graphs.edge_index
    sends = (
        (graphs.role[source] != ROLE_ANSWER) & torch.isfinite(graphs.log_h[source]) & (graphs.f[source] > 0)
    )
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
    graphs: Batch  # the solved graphs (node attributes f, h, log_h)

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
    """Flow graphs of dense maps, solved, with their node results laid out per position.

    attention  # [N, T, T] head- and layer-mean attention (query, key); masks  # [N, T] bool"""
    cfg = cfg or FlowConfig()
    graphs = solve_flow(build_flow_graphs(attention, valid, prompt, answer, cfg), cfg.block_size)
    n, t = valid.shape
    at = (graphs.batch, graphs.position)
    flow = attention.new_zeros(n, t, dtype=cfg.dtype).index_put_(at, graphs.f)
    log_h = torch.full((n, t), _NEG_INF, dtype=torch.float64, device=valid.device).index_put_(
        at, graphs.log_h
    )
    return FlowResult(
        flow=flow, degenerate=graphs.degenerate, answer=answer & valid & ~prompt, log_h=log_h, graphs=graphs
    )
