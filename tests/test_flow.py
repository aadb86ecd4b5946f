"""Flow core: token graphs, answer-conditioned flow and credit weights (docs/method.md).

The vectorised code is checked against hand-built graphs, against the method's invariants, and
against an independent float64 reference written with plain Python loops below.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_flow.flow import (
    FlowConfig,
    answer_flow,
    attention_received,
    boosted_count,
    capacities,
    credit_weights,
    dense_graph,
    edge_flow,
    kept_flow,
    prune_edges,
    random_signal,
    solve_maps,
    solved_graphs,
)
from lightning_flow.flow.graph import prune_incoming

TOL = 1e-5


# ---- inputs --------------------------------------------------------------------------------
def layout(
    rows: list[tuple[int, int, int, int, int]], t: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks from (left_pad, prompt_len, response_len, answer_start, answer_len) per response,
    answer_start counted inside the response; the rest of each row is right padding."""
    valid, prompt, answer = (torch.zeros(len(rows), t, dtype=torch.bool) for _ in range(3))
    for n, (left, p, r, a0, a) in enumerate(rows):
        assert left + p + r <= t and a0 + a <= r
        valid[n, left : left + p + r] = True
        prompt[n, left : left + p] = True
        answer[n, left + p + a0 : left + p + a0 + a] = True
    return valid, prompt, answer


def random_attention(valid: torch.Tensor, gen: torch.Generator, sharpness: float = 2.0) -> torch.Tensor:
    """[N, T, T] causal softmax attention over valid keys (self included), zero at padding."""
    n, t = valid.shape
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None] & valid[:, None, :] & valid[:, :, None]
    logits = torch.randn(n, t, t, generator=gen) * sharpness
    att = torch.where(allowed, logits, float("-inf")).softmax(-1)
    return torch.where(allowed, att, 0.0)  # rows with no allowed key are NaN before this


def random_layout(gen: torch.Generator, t: int) -> tuple[int, int, int, int, int]:
    """A hole-free valid run anywhere in [0, t) with a prompt of >= 2 tokens and an answer."""
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    length = ri(min(4, t), t)
    left = ri(0, t - length)
    p = ri(2, length - 2)
    r = length - p
    a = ri(1, min(3, r))
    return left, p, r, ri(0, r - a), a


def dense_from_graph(batch, t: int) -> torch.Tensor:
    """[N, T, T] c[n, i, k] rebuilt from the PyG batch through the `position` attribute."""
    c = torch.zeros(batch.num_graphs, t, t)
    graph = batch.batch[batch.edge_index[0]]  # [E]
    c[graph, batch.position[batch.edge_index[0]], batch.position[batch.edge_index[1]]] = batch.edge_attr
    return c


def edge_flows(result, t: int) -> torch.Tensor:
    """[N, T, T] edge flows f(i) w(i, k) of a solved result at [n, i, k] (positions)."""
    return dense_graph(result.graphs, edge_flow(result.graphs), t)


def weights_of(log_h: torch.Tensor, c: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """[N, T, T] float64 w(i, k) = c(i, k) h(k) / h(i), rows of answer and h = 0 tokens zero."""
    stops = answer | ~torch.isfinite(log_h)
    log_w = c.double().log() + log_h[:, None, :] - torch.where(stops, math.inf, log_h)[:, :, None]
    return log_w.exp()


# ---- independent reference: dicts and loops, the doc's formulas in token order --------------
def reference(att, valid, prompt, answer, cfg: FlowConfig) -> dict:
    """One response, float64, literally: graph, h in reverse order, μ, f in forward order, edge flows,
    then the graph's pruning by edge flow. The credit is solved on every candidate edge."""
    t = len(valid)
    nodes = [i for i in range(t) if valid[i]]
    sinks = set(nodes[: cfg.sink_tokens])
    cap: dict[tuple[int, int], float] = {}
    for k in nodes:
        for i in nodes:
            a = float(att[k][i])
            if i < k and i not in sinks and a > 0 and a >= cfg.min_capacity:
                cap[(i, k)] = a
    resp = [i for i in nodes if not prompt[i]]
    ans = {i for i in resp if answer[i]}
    targets = {i: [(k, c) for (j, k), c in cap.items() if j == i and i not in ans] for i in nodes}
    sources = {k: [(i, c) for (i, j), c in cap.items() if j == k and i not in ans] for k in nodes}
    h: dict[int, float] = {}
    for i in reversed(nodes):
        h[i] = 1.0 if i in ans else sum(c * h[k] for k, c in targets[i])
    z = sum(h[i] for i in nodes if prompt[i])
    degenerate = not ans or not resp or z == 0 or len(nodes) < 2
    mu = {i: (h[i] / z if prompt[i] and not degenerate else 0.0) for i in nodes}
    f: dict[int, float] = {}
    flow: dict[tuple[int, int], float] = {}
    for k in nodes:
        for i, c in sources[k]:
            flow[(i, k)] = f[i] * c * h[k] / h[i] if h[i] > 0 else 0.0
        f[k] = mu[k] + sum(flow[(i, k)] for i, _ in sources[k])
    flow |= {(i, k): 0.0 for i, k in cap if i in ans}  # answer tokens absorb: nothing leaves them
    kept = set() if cfg.prunes else set(cap)  # no pruning: every candidate, flow or not
    for k in nodes if cfg.prunes else []:
        into = [(flow[(i, k)], i) for i, _ in sources[k] if flow[(i, k)] > 0]
        into.sort(key=lambda e: (-e[0], e[1]))  # most flow first, ties to the earlier source
        if k not in ans:  # edges into answer tokens are never pruned
            total, chosen = sum(x for x, _ in into), []
            for x, i in into[: cfg.max_in_degree]:
                if sum(y for y, _ in chosen) >= cfg.keep_mass * total:
                    break
                chosen.append((x, i))
            into = chosen
        kept |= {(i, k) for _, i in into}
    ranked = sorted(resp, key=lambda i: (-f[i], i))
    boosted = set() if degenerate else set(ranked[: math.floor(cfg.top_fraction * len(resp) + 0.5)])
    weights = [cfg.boost if i in boosted else 1.0 for i in range(t)]
    return dict(
        cap=cap,
        h=h,
        mu=mu,
        f=f,
        flow=flow,
        kept=kept,
        ans=ans,
        degenerate=degenerate,
        weights=weights,
        nodes=nodes,
    )


REF_CONFIGS = [
    FlowConfig(),
    FlowConfig(sink_tokens=2, max_in_degree=3, min_capacity=0.05, block_size=4),
    FlowConfig(sink_tokens=0, max_in_degree=None, min_capacity=0.0, block_size=7),
    FlowConfig(keep_mass=0.8, max_in_degree=5, block_size=6),
]


@pytest.mark.parametrize("t", [5, 17, 40])
@pytest.mark.parametrize("cfg_id", range(len(REF_CONFIGS)))
def test_matches_python_reference(t: int, cfg_id: int) -> None:
    cfg = REF_CONFIGS[cfg_id]
    gen = torch.Generator().manual_seed(100 * t + cfg_id)
    rows = [random_layout(gen, t) for _ in range(4)]
    valid, prompt, answer = layout(rows, t)
    att = random_attention(valid, gen, sharpness=3.0)
    result = answer_flow(att, valid, prompt, answer, cfg)
    c = capacities(att, valid, cfg)
    weights = credit_weights(result.flow, valid & ~prompt, cfg.top_fraction, cfg.boost, result.degenerate)
    flows = edge_flows(result, t)
    kept = dense_graph(result.graphs, torch.ones(result.graphs.num_edges, dtype=torch.bool), t)  # [N, T, T]
    for n in range(len(rows)):
        ref = reference(att[n].tolist(), valid[n].tolist(), prompt[n].tolist(), answer[n].tolist(), cfg)
        assert bool(result.degenerate[n]) == ref["degenerate"]
        dense = {(i, k): float(c[n, i, k]) for i, k in c[n].nonzero().tolist()}
        assert dense == pytest.approx(ref["cap"], abs=0)  # the same candidate edges, the same values
        top = max(ref["h"].values())
        for i in ref["nodes"]:
            assert float(result.h[n, i]) == pytest.approx(ref["h"][i] / top if top > 0 else 0.0, abs=TOL)
            if not ref["degenerate"]:
                assert float(result.flow[n, i]) == pytest.approx(ref["f"][i], abs=TOL)
        # The graph keeps the edges the reference's pruning by flow keeps, with their flows.
        assert {tuple(e) for e in kept[n].nonzero().tolist()} == ref["kept"]
        for i, k in ref["kept"]:
            assert float(flows[n, i, k]) == pytest.approx(ref["flow"][(i, k)], abs=TOL)
        assert weights[n].tolist() == ref["weights"]
        if not ref["degenerate"]:
            # The identity behind the capacity-only solve: g = f / h satisfies
            # g(k) = μ(k) / h(k) + Σ_{i ∉ S, h(i) > 0} g(i) c(i, k) wherever h(k) > 0.
            h, f = ref["h"], ref["f"]
            g = {i: f[i] / h[i] for i in ref["nodes"] if h[i] > 0}
            for k in g:
                into_k = [
                    (i, cc)
                    for (i, kk), cc in ref["cap"].items()
                    if kk == k and i in g and i not in ref["ans"]
                ]
                rhs = ref["mu"][k] / h[k] + sum(g[i] * cc for i, cc in into_k)
                assert g[k] == pytest.approx(rhs, rel=1e-9, abs=1e-12)


# ---- graph construction ----------------------------------------------------------------------
def hand_attention() -> tuple[torch.Tensor, ...]:
    """One response at positions 1..5 (position 0 is left padding): prompt 1-2, response 3-5, answer 4."""
    att = torch.zeros(1, 6, 6)
    att[0, 1, 1] = 1.0
    att[0, 2, [1, 2]] = torch.tensor([0.6, 0.4])
    att[0, 3, [1, 2, 3]] = torch.tensor([0.5, 0.3, 0.2])
    att[0, 4, [1, 2, 3, 4]] = torch.tensor([0.4, 0.00005, 0.35, 0.24995])
    att[0, 5, [1, 2, 3, 4, 5]] = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
    valid, prompt, answer = layout([(1, 2, 3, 1, 1)], 6)
    return att, valid, prompt, answer


def test_vector_matrix_is_the_sum_over_the_shared_index_in_any_layout() -> None:
    from lightning_flow.flow.solver import vector_matrix

    g = torch.Generator().manual_seed(0)
    x, m = (
        torch.rand(3, 5, generator=g, dtype=torch.float64),
        torch.rand(3, 5, 4, generator=g, dtype=torch.float64),
    )
    expected = [[sum(x[n, a] * m[n, a, b] for a in range(5)) for b in range(4)] for n in range(3)]
    assert torch.allclose(vector_matrix(x, m), torch.tensor(expected, dtype=torch.float64))
    # a transposed view: the sum over the last index
    square = torch.rand(3, 5, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(
        vector_matrix(x, square.mT),
        torch.tensor(
            [[sum(square[n, k, a] * x[n, a] for a in range(5)) for k in range(5)] for n in range(3)],
            dtype=torch.float64,
        ),
    )
    # two batch dims, as the blocked sweep uses it
    blocks = torch.rand(2, 3, 5, 4, generator=g, dtype=torch.float64)
    y = torch.rand(2, 3, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(vector_matrix(y, blocks), (y[..., None] * blocks).sum(-2))


def test_graph_hand_built() -> None:
    att, valid, prompt, answer = hand_attention()
    cfg = FlowConfig(sink_tokens=1, max_in_degree=2, min_capacity=1e-4)
    r = answer_flow(att, valid, prompt, answer, cfg)
    g = r.graphs
    assert g.num_graphs == 1 and g.num_nodes == 5
    assert g.role.tolist() == [0, 0, 1, 2, 1]
    assert g.position.tolist() == [1, 2, 3, 4, 5]
    # Candidates: out of position 1 (the sink: first VALID token) nothing; 2 -> 4 is below min_capacity.
    # By hand: h(4) = 1, h(5) = 0 (after the answer), h(3) = 0.35, h(2) = 0.3 * 0.35, h(1) = 0; all the flow
    # enters at 2 and goes 2 -> 3 -> 4. The edges into 5 carry nothing, so the graph keeps two edges.
    assert g.edge_index.tolist() == [[1, 2], [2, 3]]
    assert g.edge_attr.tolist() == pytest.approx([0.3, 0.35])
    assert g.f.tolist() == pytest.approx([0, 1, 1, 1, 0], abs=TOL)
    assert g.h.tolist() == pytest.approx([0, 0.105, 0.35, 1, 0], abs=TOL)
    assert edge_flow(g).tolist() == pytest.approx([1, 1], abs=TOL)


def test_candidate_edges_follow_the_sink_and_min_capacity_options() -> None:
    att, valid, _, _ = hand_attention()
    edges = lambda cfg: {tuple(e) for e in capacities(att, valid, cfg)[0].nonzero().tolist()}  # noqa: E731
    everything = {(1, 2), (1, 3), (2, 3), (1, 4), (2, 4), (3, 4), (1, 5), (2, 5), (3, 5), (4, 5)}
    assert edges(FlowConfig(sink_tokens=0, min_capacity=0.0)) == everything
    assert edges(FlowConfig(sink_tokens=2, min_capacity=0.0)) == {(3, 4), (3, 5), (4, 5)}
    strong = {(1, 2), (1, 3), (2, 3), (1, 4), (3, 4), (3, 5)}
    assert edges(FlowConfig(sink_tokens=0, min_capacity=0.3)) == strong
    # pruning options shape the graphs, not the candidates the credit is solved on
    assert edges(FlowConfig(sink_tokens=0, min_capacity=0.0, keep_mass=0.5, max_in_degree=1)) == everything


def test_graph_keeps_the_edges_with_the_most_flow_not_the_most_attention() -> None:
    """Token 2 gets little flow (weak edges from the prompt), so its strong edge into 3 carries less flow
    than the weaker edges from the prompt. Edge flows by hand: out of a prompt token i, μ(i) c h(k) / h(i) =
    c h(k) / z; out of 2, f(2) c h(k) / h(2) with f(2) = (0.01 + 0.01) h(2) / z."""
    edges = {(0, 2): 0.01, (1, 2): 0.01, (0, 3): 0.2, (1, 3): 0.1, (2, 3): 0.6, (3, 4): 0.9, (2, 4): 0.05}
    att, valid, prompt, answer = small_graph(5, edges, [0, 1], [4])
    h3, h2 = 0.9, 0.6 * 0.9 + 0.05
    z = (0.01 * h2 + 0.2 * h3) + (0.01 * h2 + 0.1 * h3)  # h(0) + h(1)
    into_3 = {0: 0.2 * h3 / z, 1: 0.1 * h3 / z, 2: 0.02 / z * 0.6 * h3}  # 0.639, 0.319, 0.038
    assert into_3[0] > into_3[1] > into_3[2]

    def kept(keep_mass: float, max_in_degree: int | None) -> set[tuple[int, int]]:
        cfg = FlowConfig(sink_tokens=0, min_capacity=0.0, keep_mass=keep_mass, max_in_degree=max_in_degree)
        r = answer_flow(att, valid, prompt, answer, cfg)
        if keep_mass == 1.0 and max_in_degree is None:  # every edge: its flow is the hand-computed one
            flows = edge_flows(r, 5)[0]
            assert [float(flows[i, 3]) for i in range(3)] == pytest.approx(list(into_3.values()), abs=TOL)
        return {tuple(e) for e in r.graphs.edge_index.T.tolist()}

    assert kept(1.0, None) == set(edges)
    # Into 3 the strongest attention is from 2, the most flow from 0; into 2 the two tie (the earlier wins).
    # Edges into the answer 4 are never pruned.
    assert kept(1.0, 1) == {(0, 2), (0, 3), (3, 4), (2, 4)}
    need = (into_3[0] + into_3[1]) / sum(into_3.values())  # 0.962: 0 alone is 0.641
    assert kept(need - 0.01, None) == {(0, 2), (1, 2), (0, 3), (1, 3), (3, 4), (2, 4)}
    assert kept(need + 0.01, None) == set(edges)


def test_graph_edges_are_the_strongest_flows_of_the_candidates() -> None:
    gen = torch.Generator().manual_seed(3)
    t = 30
    valid, prompt, answer = layout([random_layout(gen, t) for _ in range(5)], t)
    att = random_attention(valid, gen, sharpness=2.5)
    cfg = FlowConfig(sink_tokens=2, max_in_degree=4, min_capacity=0.01)
    r = answer_flow(att, valid, prompt, answer, cfg)
    batch = r.graphs
    c = capacities(att, valid, cfg).double()  # [N, T, T] every candidate
    ef = r.flow.double()[:, :, None] * weights_of(r.log_h, c, answer)  # [N, T, T] f(i) w(i, k), written out
    kept = dense_from_graph(batch, t)
    assert torch.equal(kept[kept > 0], c[kept > 0].float())  # edge_attr: the capacity
    assert batch.num_nodes == int(valid.sum())
    i, k = batch.edge_index
    assert bool((i < k).all())  # local ids keep token order
    assert bool(((kept > 0).sum(1)[~answer] <= 4).all())  # the cap, except into answer tokens
    assert not (kept > 0)[ef == 0].any()  # edges without flow are not kept
    for n in range(5):
        # Kept in-edges of each node carry at least as much flow as every dropped candidate.
        dropped = torch.where(kept[n] == 0, ef[n], 0.0).amax(0)  # [T]
        least = torch.where(kept[n] > 0, ef[n], math.inf).amin(0)  # [T]
        assert bool((dropped <= least * (1 + 1e-5)).all())


# ---- flow on hand-built graphs ---------------------------------------------------------------
def small_graph(t: int, edges: dict[tuple[int, int], float], prompt: list[int], answer: list[int]):
    """Attention whose rows carry the given capacities (i, k) -> Ā[k, i], the rest on self."""
    att = torch.zeros(1, t, t)
    for (i, k), c in edges.items():
        att[0, k, i] = c
    att[0].diagonal().copy_(1 - att[0].sum(-1))
    valid = torch.ones(1, t, dtype=torch.bool)
    p, a = torch.zeros_like(valid), torch.zeros_like(valid)
    p[0, prompt], a[0, answer] = True, True
    return att, valid, p, a


NO_PRUNING = FlowConfig(sink_tokens=0, max_in_degree=None, min_capacity=0.0)


def test_chain_carries_all_the_flow() -> None:
    caps = [0.9, 0.3, 0.7, 0.05, 0.6]  # the h-transform makes weak links irrelevant
    att, valid, prompt, answer = small_graph(6, {(i, i + 1): c for i, c in enumerate(caps)}, [0, 1], [5])
    r = answer_flow(att, valid, prompt, answer, FlowConfig(sink_tokens=1))  # token 0 is the sink
    assert r.flow[0].tolist() == pytest.approx([0, 1, 1, 1, 1, 1], abs=TOL)
    assert float(r.absorbed[0]) == pytest.approx(1, abs=TOL)


def test_diamond_splits_evenly_and_every_edge_carries_half() -> None:
    edges = {(0, 1): 0.5, (0, 2): 0.5, (1, 3): 0.4, (2, 3): 0.4}
    att, valid, prompt, answer = small_graph(4, edges, [0], [3])
    r = answer_flow(att, valid, prompt, answer, NO_PRUNING)
    assert r.flow[0].tolist() == pytest.approx([1, 0.5, 0.5, 1], abs=TOL)
    assert r.h[0].tolist() == pytest.approx([0.4, 0.4, 0.4, 1], abs=TOL)  # answer h = 1 is the max
    flows = edge_flow(r.graphs)  # every edge carries half the flow
    assert flows.tolist() == pytest.approx([0.5, 0.5, 0.5, 0.5], abs=TOL)
    assert sorted(map(tuple, r.graphs.edge_index.T.tolist())) == [(0, 1), (0, 2), (1, 3), (2, 3)]


def test_dead_end_and_tokens_after_the_answer_get_nothing() -> None:
    # 1 only feeds 3, which comes after the answer 2: both can never reach the answer.
    edges = {(0, 1): 0.5, (0, 2): 0.1, (1, 3): 0.6, (0, 3): 0.2, (2, 3): 0.1}
    att, valid, prompt, answer = small_graph(4, edges, [0], [2])
    r = answer_flow(att, valid, prompt, answer, NO_PRUNING)
    assert r.h[0].tolist() == pytest.approx([0.1, 0, 1, 0], abs=TOL)
    assert r.flow[0].tolist() == pytest.approx([1, 0, 1, 0], abs=TOL)
    assert r.log_h[0, 1] == -math.inf and r.log_h[0, 3] == -math.inf


# ---- invariants on random batches ------------------------------------------------------------
@pytest.mark.parametrize("block_size", [512, 5])
def test_invariants_on_padded_batches(block_size: int) -> None:
    gen = torch.Generator().manual_seed(11)
    t = 48
    rows = [(0, 9, 30, 20, 3), (9, 6, 20, 19, 1), (4, 10, 25, 2, 4), (3, 3, 12, 5, 2)]  # right, left, both
    rows += [random_layout(gen, t) for _ in range(4)]
    valid, prompt, answer = layout(rows, t)
    att = random_attention(valid, gen)
    cfg = FlowConfig(block_size=block_size, max_in_degree=8)
    r = answer_flow(att, valid, prompt, answer, cfg)
    c = capacities(att, valid, cfg)  # every candidate: the credit is solved on all of them
    assert not r.degenerate.any()
    assert r.absorbed.tolist() == pytest.approx([1.0] * len(rows), abs=TOL)
    assert bool((r.flow >= 0).all() and (r.flow <= 1).all())
    assert r.h.amax(-1).tolist() == pytest.approx([1.0] * len(rows))
    w = weights_of(r.log_h, c, answer)  # [N, T, T]
    passes = ~answer & torch.isfinite(r.log_h)
    assert torch.allclose(w.sum(-1)[passes], torch.ones(()).double(), atol=TOL)
    # Conservation: what enters a node (plus the source) leaves it, or is absorbed at the answer.
    ef = r.flow.double()[:, :, None] * w  # [N, T, T] f(i) w(i, k)
    log_z = torch.logsumexp(torch.where(prompt, r.log_h, -math.inf), -1, keepdim=True)
    mu = torch.where(prompt, (r.log_h - log_z).exp(), 0.0)
    inflow = ef.sum(1) + mu  # [N, T]
    assert torch.allclose(inflow, r.flow.double(), atol=TOL)
    assert torch.allclose(ef.sum(2)[passes], r.flow.double()[passes], atol=TOL)
    # The graphs' edges carry those flows.
    kept = edge_flows(r, t).double()
    assert torch.allclose(kept[kept > 0], ef[kept > 0], atol=1e-6)
    # Nothing after the last answer token.
    last = torch.where(answer, torch.arange(t), -1).amax(-1, keepdim=True)
    after = torch.arange(t) > last
    assert not r.h[after].any() and not r.flow[after].any()
    assert torch.isneginf(r.log_h[after]).all()


def test_padding_side_and_batching_do_not_change_results() -> None:
    gen = torch.Generator().manual_seed(5)
    p, resp, t = 7, 11, 26
    core = random_attention(torch.ones(1, p + resp, dtype=torch.bool), gen)[0]  # [L, L]
    cfg = FlowConfig(block_size=4, max_in_degree=5)
    lefts = [0, t - p - resp, 3]  # right padded, left padded, padded on both sides
    valid, prompt, answer = layout([(left, p, resp, 6, 2) for left in lefts], t)
    att = torch.zeros(len(lefts), t, t)
    for n, left in enumerate(lefts):
        att[n, left : left + p + resp, left : left + p + resp] = core
    batched = answer_flow(att, valid, prompt, answer, cfg)
    weights = credit_weights(batched.flow, valid & ~prompt, 0.4, 1.5, batched.degenerate)
    for n, left in enumerate(lefts):
        alone = answer_flow(att[n : n + 1], valid[n : n + 1], prompt[n : n + 1], answer[n : n + 1], cfg)
        assert torch.allclose(alone.flow[0], batched.flow[n], atol=1e-6)
        assert torch.allclose(alone.h[0], batched.h[n], atol=1e-6)
        span = slice(left, left + p + resp)
        for field in ("h", "flow"):
            got, first = getattr(batched, field), getattr(batched, field)[0, : p + resp]
            assert torch.allclose(got[n, span], first, atol=1e-6)
            assert not got[n, ~valid[n]].any()
        assert torch.equal(weights[n, span], weights[0, : p + resp])
        assert not (weights[n, ~valid[n]] != 1).any()


@pytest.mark.parametrize("block_size", [1, 3, 8])
def test_block_size_does_not_change_results(block_size: int) -> None:
    gen = torch.Generator().manual_seed(7)
    valid, prompt, answer = layout([random_layout(gen, 21) for _ in range(3)], 21)
    att = random_attention(valid, gen)
    full = answer_flow(att, valid, prompt, answer, FlowConfig(block_size=64))
    blocked = answer_flow(att, valid, prompt, answer, FlowConfig(block_size=block_size))
    assert torch.allclose(full.flow, blocked.flow, atol=1e-6)
    assert torch.allclose(full.h, blocked.h, atol=1e-6)


# ---- degenerate cases -------------------------------------------------------------------------
def test_degenerate_cases_fall_back_without_nan() -> None:
    t = 8
    rows = [
        (0, 3, 5, 0, 0),  # no answer token
        (0, 8, 0, 0, 0),  # empty response
        (0, 1, 4, 3, 1),  # the only prompt token is the sink: Σ_P h = 0
        (7, 1, 0, 0, 0),  # one valid token
        (0, 0, 0, 0, 0),  # nothing valid at all
        (1, 3, 4, 2, 1),  # a normal response, to show the batch is not poisoned
    ]
    valid, prompt, answer = layout(rows, t)
    att = random_attention(valid, torch.Generator().manual_seed(0))
    r = answer_flow(att, valid, prompt, answer)
    assert r.degenerate.tolist() == [True] * 5 + [False]
    assert r.absorbed.tolist() == pytest.approx([0] * 5 + [1], abs=TOL)
    for x in (r.h, r.flow, r.absorbed, r.log_h):
        assert not x.isnan().any()
    assert not r.flow[:5].any()
    weights = credit_weights(r.flow, valid & ~prompt, 0.4, 1.5, r.degenerate)
    assert bool((weights[:5] == 1).all()) and bool((weights[5] == 1.5).sum() == 2)
    yes, no = torch.ones(2, 1, dtype=torch.bool), torch.zeros(2, 1, dtype=torch.bool)
    one = answer_flow(torch.ones(2, 1, 1), yes, no, yes)  # T = 1
    assert one.degenerate.tolist() == [True, True] and not one.flow.isnan().any()


def test_a_map_with_nan_or_inf_is_a_degenerate_row_and_leaves_the_others_alone() -> None:
    gen = torch.Generator().manual_seed(4)
    t = 24
    valid, prompt, answer = layout([(0, 6, 18, 10, 2)] * 3, t)
    att = random_attention(valid, gen)
    clean = answer_flow(att[2:], valid[2:], prompt[2:], answer[2:], FlowConfig(block_size=8))
    att[0, 12, 3], att[1, 20, 7] = float("nan"), float("inf")  # an overflowing forward
    r = answer_flow(att, valid, prompt, answer, FlowConfig(block_size=8))
    assert r.degenerate.tolist() == [True, True, False]
    assert not r.flow[:2].any() and torch.isneginf(r.log_h[:2]).all()
    assert torch.equal(r.flow[2], clean.flow[0]) and torch.equal(r.log_h[2], clean.log_h[0])
    g = r.graphs
    for x in (g.f, g.h, g.incoming_flow, g.edge_attr, edge_flow(g)):
        assert torch.isfinite(x).all()
    assert not edge_flow(g)[g.batch[g.edge_index[0]] < 2].any()  # no flow on the degenerate rows' edges
    # without pruning their graphs hold the finite candidates: not the NaN and inf entries
    kept = dense_graph(g, torch.ones(g.num_edges, dtype=torch.bool), t)  # [N, T, T]
    edges = {tuple(e) for e in kept.nonzero().tolist()}
    assert (0, 3, 12) not in edges and (1, 7, 20) not in edges and (0, 4, 12) in edges and (1, 6, 20) in edges
    pruned = answer_flow(att, valid, prompt, answer, FlowConfig(block_size=8, keep_mass=0.99)).graphs
    assert not (pruned.batch[pruned.edge_index[0]] < 2).any()  # pruning keeps edges with flow only


# ---- long responses: no overflow, no underflow --------------------------------------------------
@pytest.mark.parametrize("row_sum", [1.1, 0.97])
def test_8k_tokens_stay_finite_and_conserve_flow(row_sum: float) -> None:
    """Each query attends row_sum / 2 to each of its two predecessors. With 1.1 (rows summing
    above 1, e.g. heads summed instead of averaged) h grows ~1.07x per token backwards, to about
    1e228 at the prompt; with 0.97 (sinks and pruning remove mass) it shrinks to about 1e-70.
    Either way a plain float32 solve breaks, and the blocked solve must not."""
    t, n_prompt = 8192, 100
    att = torch.zeros(1, t, t)
    k = torch.arange(2, t)
    att[0, k, k - 1] = att[0, k, k - 2] = row_sum / 2
    att[0, 1, 0] = 1.0
    valid = torch.ones(1, t, dtype=torch.bool)
    prompt, answer = torch.zeros_like(valid), torch.zeros_like(valid)
    prompt[0, :n_prompt], answer[0, t - 10 : t - 4] = True, True
    c = capacities(att, valid)  # [1, T, T]

    # float64 loops over the two in-edges per token: h unscaled, then f.
    h = [0.0] * t
    for i in range(t - 1, -1, -1):
        h[i] = 1.0 if answer[0, i] else sum(float(c[0, i, j]) * h[j] for j in (i + 1, i + 2) if j < t)
    z = sum(h[:n_prompt])
    f = [0.0] * t
    for j in range(t):
        mu = h[j] / z if j < n_prompt else 0.0
        senders = [i for i in (j - 1, j - 2) if i >= 0 and h[i] > 0 and not answer[0, i]]
        f[j] = mu + sum(f[i] * float(c[0, i, j]) * h[j] / h[i] for i in senders)
    f_ref = torch.tensor(f, dtype=torch.float64)
    log_ref = torch.tensor([math.log(x) if x > 0 else -math.inf for x in h], dtype=torch.float64)
    reach = torch.isfinite(log_ref)

    naive = torch.linalg.solve_triangular(-c[0], answer[0].float()[:, None], upper=True, unitriangular=True)
    if row_sum > 1:
        assert max(h) > torch.finfo(torch.float32).max and not torch.isfinite(naive).all()
    else:  # below float32's smallest normal number: the naive prompt influence is off by > 10x
        naive_z = float(naive[:n_prompt].sum())
        assert z < torch.finfo(torch.float32).tiny and not 0.1 * z < naive_z < 10 * z

    band = torch.stack([c[0, :-2].diagonal(1), c[0, :-2].diagonal(2)], -1).double()  # [T - 2, 2]
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-9)):
        r = answer_flow(att, valid, prompt, answer, FlowConfig(dtype=dtype))
        assert not r.degenerate[0] and torch.isfinite(r.h).all() and torch.isfinite(r.flow).all()
        # float32 rounding accumulates along the ~5000 serial steps of this chain: 1e-4, not 1e-5.
        assert float(r.absorbed[0]) == pytest.approx(1.0, abs=tol)
        assert torch.allclose(r.flow[0].double(), f_ref, atol=tol)
        assert torch.equal(torch.isfinite(r.log_h[0]), reach)
        assert torch.allclose(r.log_h[0, reach], log_ref[reach], atol=1e3 * tol)  # h to 0.1 % in float32
        lh = r.log_h[0]  # Σ_k w(i, k) over the two out-edges of each token
        w_sum = (band * torch.stack([(lh[1:-1] - lh[:-2]).exp(), (lh[2:] - lh[:-2]).exp()], -1)).sum(-1)
        passes = torch.isfinite(lh[:-2]) & ~answer[0, :-2]
        assert torch.allclose(w_sum[passes], torch.ones(()).double(), atol=TOL)


# ---- pruning by kept mass ---------------------------------------------------------------------------
def test_prune_incoming_keeps_the_shortest_strongest_run_reaching_keep_mass() -> None:
    row = torch.tensor([[1.0, 4.0, 0.0, 2.0, 2.0, 1.0]], dtype=torch.float64)  # sum 10: exact sums
    kept = lambda mass, cap=None: prune_incoming(row, mass, cap)[0].tolist()  # noqa: E731
    assert kept(1.0) == row[0].tolist()
    assert kept(0.4) == [0, 4, 0, 0, 0, 0]  # 4 alone reaches 40 %
    assert kept(0.41) == [0, 4, 0, 2, 0, 0]  # then the earlier of the tied 2s
    assert kept(0.8) == [0, 4, 0, 2, 2, 0]
    assert kept(0.81) == [1, 4, 0, 2, 2, 0]  # then the earlier 1
    assert kept(1.0, 2) == [0, 4, 0, 2, 0, 0]  # the cap cuts first
    assert kept(0.3, 2) == [0, 4, 0, 0, 0, 0]
    # no edges stay no edges
    assert prune_incoming(torch.zeros(2, 3), 0.5, 1).tolist() == [
        [0, 0, 0],
        [0, 0, 0],
    ]


def test_the_degree_cap_keeps_what_a_stable_sort_cut_at_the_cap_keeps() -> None:
    """prune_incoming finds the capped edges without sorting whole rows; against a stable descending sort
    cut at the cap, on rows full of ties and zeros."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        columns = int(torch.randint(2, 40, (1,), generator=gen))
        a = torch.randint(0, 5, (3, 4, columns), generator=gen).float() / 4
        cap = int(torch.randint(1, columns, (1,), generator=gen))
        for keep_mass in (1.0, 0.7, 0.3):
            value, index = a.sort(dim=-1, descending=True, stable=True)
            value, index = value[..., :cap], index[..., :cap]
            keep = (value > 0) & (value.cumsum(-1) - value < keep_mass * a.sum(-1, keepdim=True))
            expected = torch.zeros_like(a).scatter_(-1, index, a.gather(-1, index) * keep)
            assert torch.equal(prune_incoming(a, keep_mass, cap), expected)


def float64_dense_flow(att, valid, prompt, answer, sink_tokens: int = 1, min_capacity: float = 1e-6):
    """Unpruned flow, written out as two dense float64 solves per response: (I - C') h = 1_S with
    the answer's out-edges removed, then (I - Wᵀ) f = μ. Returns (f [N, T], log h [N, T], degenerate [N])."""
    n, t = valid.shape
    flows, log_hs, degenerate = (
        torch.zeros(n, t, dtype=torch.float64),
        torch.full((n, t), -math.inf, dtype=torch.float64),
        [],
    )
    for r in range(n):
        idx = valid[r].nonzero().flatten()
        a = att[r][idx][:, idx].double()  # [V, V] query, key
        c = torch.tril(a, -1).T.clone()  # [i, k] c(i, k) = Ā[k, i], i < k
        c[:sink_tokens] = 0
        c[c < min_capacity] = 0
        ans, pr = answer[r][idx], prompt[r][idx]
        c_pass = c * (~ans).double()[:, None]  # answer tokens feed the super-sink only
        h = torch.linalg.solve(torch.eye(len(idx), dtype=torch.float64) - c_pass, ans.double())
        z = (h * pr).sum()
        if not ans.any() or z <= 0:
            degenerate.append(True)
            continue
        mu = h * pr / z
        w = torch.where((h[:, None] > 0) & ~ans[:, None], c * h[None, :] / h[:, None].clamp_min(1e-300), 0.0)
        f = torch.linalg.solve(torch.eye(len(idx), dtype=torch.float64) - w.T, mu)
        flows[r, idx], log_hs[r, idx] = f, h.log()
        degenerate.append(False)
    return flows, log_hs, torch.tensor(degenerate)


@pytest.mark.parametrize("block_size", [512, 6])
def test_unpruned_graph_flow_equals_a_dense_float64_solve_on_padded_batches(block_size: int) -> None:
    gen = torch.Generator().manual_seed(21)
    t = 70
    rows = [(0, 9, 50, 40, 3), (15, 6, 40, 39, 1), (4, 10, 45, 2, 4), (20, 3, 12, 5, 2)] + [
        random_layout(gen, t) for _ in range(4)
    ]
    valid, prompt, answer = layout(rows, t)
    att = random_attention(valid, gen, sharpness=2.0)
    r = answer_flow(att, valid, prompt, answer, FlowConfig(keep_mass=1.0, block_size=block_size))
    f, log_h, degenerate = float64_dense_flow(att, valid, prompt, answer)
    assert torch.equal(r.degenerate, degenerate)
    assert torch.allclose(r.flow.double(), f, atol=TOL)
    ok = ~degenerate
    finite = torch.isfinite(log_h[ok])
    assert torch.equal(torch.isfinite(r.log_h[ok]), finite)
    assert torch.allclose(r.log_h[ok][finite], log_h[ok][finite], atol=1e-9)


@pytest.mark.parametrize("keep_mass, max_in_degree", [(0.9, None), (0.6, None), (0.95, 4), (1.0, 2)])
def test_pruning_changes_the_graphs_never_the_credit(keep_mass: float, max_in_degree: int | None) -> None:
    gen = torch.Generator().manual_seed(12)
    t = 60
    rows = [(0, 9, 40, 30, 3), (9, 6, 40, 39, 1), (4, 10, 40, 2, 4)] + [
        random_layout(gen, t) for _ in range(5)
    ]
    valid, prompt, answer = layout(rows, t)
    att = random_attention(valid, gen, sharpness=3.0)
    cfg = FlowConfig(keep_mass=keep_mass, max_in_degree=max_in_degree, block_size=16)
    r = answer_flow(att, valid, prompt, answer, cfg)
    exact = answer_flow(att, valid, prompt, answer, FlowConfig(block_size=16))  # every edge kept
    assert torch.equal(r.flow, exact.flow) and torch.equal(r.log_h, exact.log_h)
    assert torch.equal(r.graphs.f, exact.graphs.f)
    g = r.graphs
    assert g.num_edges < exact.graphs.num_edges
    # Every node keeps at least keep_mass of its incoming flow, unless the cap cut first; into answer
    # tokens, all of it.
    in_degree = torch.bincount(g.edge_index[1], minlength=g.num_nodes)
    uncut = in_degree < (max_in_degree or t)
    share = kept_flow(g, edge_flow(g))
    assert bool((share[uncut] >= keep_mass - 1e-6).all())
    assert share[g.role == 2].tolist() == pytest.approx([1.0] * int((g.role == 2).sum()), abs=1e-6)
    # incoming flow before pruning: f - μ, by conservation
    log_z = torch.logsumexp(torch.where(prompt, r.log_h, -math.inf), -1, keepdim=True)
    mu = torch.where(prompt, (r.log_h - log_z).exp(), 0.0)[valid]
    assert torch.allclose(g.incoming_flow, g.f.double() - mu, atol=1e-6)
    # the kept edges carry the same flow as in the unpruned graph
    pruned, full = edge_flows(r, t), edge_flows(exact, t)
    assert torch.allclose(pruned[pruned > 0], full[pruned > 0])


# ---- range: h across hundreds of orders of magnitude inside one block --------------------------------
def sink_chain(t: int, n_prompt: int, keep: float, second: float = 0.0):
    """Query k attends `keep` to k - 1, `second` to k - 2 and the rest to the sink (position 0, whose
    edges are dropped): h decays by about (keep + second) per token backwards from the answer."""
    att = torch.zeros(1, t, t, dtype=torch.float64)
    k = torch.arange(2, t)
    att[0, k, k - 1], att[0, k, k - 2], att[0, k, 0] = keep, second, 1 - keep - second
    att[0, 1, 0], att[0, 0, 0] = 1.0, 1.0
    valid = torch.ones(1, t, dtype=torch.bool)
    prompt, answer = torch.zeros_like(valid), torch.zeros_like(valid)
    prompt[0, 1:n_prompt], answer[0, t - 3] = True, True
    return att, valid, prompt, answer


@pytest.mark.parametrize("span", [1e30, 1e100, 1e300])
def test_h_spanning_hundreds_of_orders_in_one_block_gives_the_float64_flow(span: float) -> None:
    t, n_prompt = 400, 20
    ratio = span ** (-1 / (t - n_prompt))  # h(i) = 0.7 r h(i + 1) + 0.3 r² h(i + 2) decays by r per token
    att, valid, prompt, answer = sink_chain(t, n_prompt, 0.7 * ratio, second=0.3 * ratio**2)
    r = answer_flow(att.float(), valid, prompt, answer, FlowConfig(block_size=512, min_capacity=0.0))
    ref = reference(
        att[0].float().tolist(),
        valid[0].tolist(),
        prompt[0].tolist(),
        answer[0].tolist(),
        FlowConfig(min_capacity=0.0),
    )
    h_span = max(ref["h"].values()) / min(v for v in ref["h"].values() if v > 0)
    assert h_span > span / 100  # the map really spans that range inside the one block
    assert not r.degenerate[0] and torch.isfinite(r.flow).all() and not r.flow.isnan().any()
    assert float(r.absorbed[0]) == pytest.approx(1.0, abs=TOL)
    assert r.flow[0].tolist() == pytest.approx([ref["f"][i] for i in range(t)], abs=TOL)


def test_h_beyond_float64_in_one_block_is_a_counted_degenerate_row_not_nan() -> None:
    att, valid, prompt, answer = sink_chain(700, 20, keep=0.2)  # h spans 0.2 ** 680 ≈ 1e-475
    r = answer_flow(att.float(), valid, prompt, answer, FlowConfig(block_size=1024, min_capacity=0.0))
    assert bool(r.degenerate[0]) and not r.flow.isnan().any() and not r.flow.any()
    # The same map in blocks of 512 keeps each block inside float64 and solves it.
    blocked = answer_flow(att.float(), valid, prompt, answer, FlowConfig(block_size=256, min_capacity=0.0))
    assert not blocked.degenerate[0] and float(blocked.absorbed[0]) == pytest.approx(1.0, abs=TOL)


def test_graphs_carry_the_solution_of_the_maps_they_were_pruned_from() -> None:
    att, valid, prompt, answer = hand_attention()
    cfg = FlowConfig(sink_tokens=0, min_capacity=0.0)
    solution = solve_maps(att, valid, prompt, answer, cfg)
    g, _ = solved_graphs(prune_edges(att, valid, answer, cfg, solution), prompt, answer, cfg, solution)
    one = g.get_example(0)
    assert one.f.tolist() == pytest.approx(solution.f[0, 1:].tolist(), abs=1e-7)
    assert one.log_h.tolist() == solution.log_h[0, 1:].tolist()
    assert float(one.h.max()) == pytest.approx(1.0) and not bool(one.degenerate)
    # no pruning: every candidate edge, i.e. every pair of the 5 nodes in order; flow runs out of 1 and 2
    # into later tokens up to the answer 4 and on 3 -> 4 (none out of the answer, none into 5 after it)
    everything = [(i, k) for i in range(5) for k in range(i + 1, 5)]
    assert sorted(map(tuple, one.edge_index.T.tolist())) == everything
    with_flow = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    flows = dict(zip(map(tuple, one.edge_index.T.tolist()), edge_flow(g).tolist()))
    assert sorted(e for e, x in flows.items() if x > 0) == with_flow
    # pruning (a cap that cuts nothing) keeps the edges with flow only
    capped = FlowConfig(sink_tokens=0, min_capacity=0.0, max_in_degree=4)
    g, _ = solved_graphs(prune_edges(att, valid, answer, capped, solution), prompt, answer, capped, solution)
    assert sorted(map(tuple, g.edge_index.T.tolist())) == with_flow


# ---- credit weights and comparison signals ------------------------------------------------------
def test_boosted_count_rounds_half_up() -> None:
    m = torch.tensor([0, 1, 2, 3, 4, 5, 10, 1000])
    assert boosted_count(m, 0.4).tolist() == [0, 0, 1, 1, 2, 2, 4, 400]
    assert boosted_count(torch.tensor([3, 10]), 0.5).tolist() == [2, 5]
    assert boosted_count(torch.tensor([10]), 0.7).tolist() == [7]  # 0.7 * 10 is 7.000000000000001


def test_credit_weights_rank_response_tokens_stably() -> None:
    signal = torch.tensor(
        [
            [9.0, 9.0, 0.5, 0.5, 0.5, 0.1, 0.7, 9.0],
            [0.0, 3.0, 1.0, float("nan"), 2.0, -math.inf, 0.0, 0.0],
        ]
    )
    response = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    w = credit_weights(signal, response, 0.4, 1.5)
    # Row 0: 5 response tokens -> 2 boosted: 0.7 (pos 6), then the earliest 0.5 (pos 2).
    assert w[0].tolist() == [1, 1, 1.5, 1, 1, 1, 1.5, 1]
    # Row 1: 5 tokens -> 2 boosted: 3.0 and 2.0; NaN ranks last, padding signals never count.
    assert w[1].tolist() == [1, 1.5, 1, 1, 1.5, 1, 1, 1]
    # 4 of 5: NaN and -inf tie for last (the earlier wins); all 5: both, and still no padding.
    assert credit_weights(signal, response, 0.8, 1.5)[1].tolist() == [1, 1.5, 1.5, 1.5, 1.5, 1, 1, 1]
    assert credit_weights(signal, response, 1.0, 1.5)[1].tolist() == [1, 1.5, 1.5, 1.5, 1.5, 1.5, 1, 1]
    with pytest.raises(ValueError, match="top_fraction=1.2"):
        credit_weights(signal, response, 1.2, 1.5)
    fallback = credit_weights(signal, response, 0.4, 1.5, fallback=torch.tensor([True, False]))
    assert fallback[0].tolist() == [1.0] * 8 and torch.equal(fallback[1], w[1])


def test_attention_received_and_random_signal() -> None:
    valid = torch.tensor([[False, True, True, True]])
    att = torch.zeros(1, 4, 4)
    att[0, 1, 1] = 1.0
    att[0, 2, 1:3] = torch.tensor([0.25, 0.75])
    att[0, 3, 1:4] = torch.tensor([0.5, 0.2, 0.3])
    assert attention_received(att, valid)[0].tolist() == pytest.approx([0, (0.25 + 0.5) / 2, 0.2, 0])
    a = random_signal(valid, torch.Generator().manual_seed(1))
    b = random_signal(valid, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a[0, 0] == 0 and bool(((a[valid] >= 0) & (a[valid] < 1)).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_input_device() -> None:
    gen = torch.Generator().manual_seed(2)
    valid, prompt, answer = layout([random_layout(gen, 40) for _ in range(3)], 40)
    att = random_attention(valid, gen)
    cpu = answer_flow(att, valid, prompt, answer, FlowConfig(block_size=16))
    gpu = answer_flow(att.cuda(), valid.cuda(), prompt.cuda(), answer.cuda(), FlowConfig(block_size=16))
    assert gpu.flow.is_cuda and torch.allclose(gpu.flow.cpu(), cpu.flow, atol=1e-5)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("keep_mass", 0.0, "keep_mass must be in \\(0, 1\\], got 0.0"),
        ("keep_mass", 1.5, "keep_mass must be in \\(0, 1\\], got 1.5"),
        ("max_in_degree", 0, "max_in_degree must be >= 1 or None, got 0"),
        ("block_size", 0, "block_size must be >= 1, got 0"),
    ],
)
def test_flow_credit_refuses_bad_pruning_options(option, value, message) -> None:
    from lightning_flow.callbacks import FlowCredit

    with pytest.raises(ValueError, match=message):
        FlowCredit(**{option: value})


# ---- prune_before_solve: the flow of the pruned graphs ---------------------------------------------
def pruned_by_capacity(att, valid, answer, cfg: FlowConfig) -> torch.Tensor:
    """The maps with each token's incoming candidates pruned by capacity, written with loops: strongest
    first (ties to the earlier source), until keep_mass of the row's capacity, at most max_in_degree;
    answer rows whole."""
    out = att.clone()
    for n in range(att.shape[0]):
        nodes = [i for i in range(att.shape[1]) if valid[n, i]]
        sources = nodes[cfg.sink_tokens :]
        for k in nodes:
            into = [
                (float(att[n, k, i]), i) for i in sources if i < k and float(att[n, k, i]) >= cfg.min_capacity
            ]
            into = [(c, i) for c, i in into if c > 0]
            into.sort(key=lambda e: (-e[0], e[1]))
            total, chosen = sum(c for c, _ in into), []
            for c, i in into[: cfg.max_in_degree]:
                if sum(x for x, _ in chosen) >= cfg.keep_mass * total:
                    break
                chosen.append((c, i))
            if not answer[n, k]:
                for _, i in set(into) - set(chosen):
                    out[n, k, i] = 0.0
    return out


def test_prune_before_solve_without_pruning_is_the_exact_flow() -> None:
    gen = torch.Generator().manual_seed(21)
    t = 50
    valid, prompt, answer = layout([random_layout(gen, t) for _ in range(6)], t)
    att = random_attention(valid, gen, sharpness=2.5)
    for block_size in (7, 16, 64):
        exact = answer_flow(att, valid, prompt, answer, FlowConfig(block_size=block_size))
        first = answer_flow(
            att, valid, prompt, answer, FlowConfig(block_size=block_size, prune_before_solve=True)
        )
        assert torch.allclose(first.flow, exact.flow, atol=1e-12, rtol=0)
        assert torch.allclose(first.log_h, exact.log_h, atol=1e-12, rtol=0)
        assert torch.equal(first.degenerate, exact.degenerate)
        assert torch.equal(first.graphs.edge_index, exact.graphs.edge_index)


@pytest.mark.parametrize("cfg_id", range(3))
def test_prune_before_solve_is_the_reference_flow_of_the_graph_pruned_by_capacity(cfg_id: int) -> None:
    cfg = [
        FlowConfig(keep_mass=0.8, max_in_degree=None, block_size=6, prune_before_solve=True),
        FlowConfig(keep_mass=0.95, max_in_degree=3, block_size=16, prune_before_solve=True),
        FlowConfig(sink_tokens=2, max_in_degree=2, min_capacity=0.02, block_size=5, prune_before_solve=True),
    ][cfg_id]
    gen = torch.Generator().manual_seed(7 + cfg_id)
    t = 30
    rows = [random_layout(gen, t) for _ in range(5)]
    valid, prompt, answer = layout(rows, t)
    att = random_attention(valid, gen, sharpness=2.5)
    result = answer_flow(att, valid, prompt, answer, cfg)
    pruned = pruned_by_capacity(att, valid, answer & valid & ~prompt, cfg)
    plain = FlowConfig(sink_tokens=cfg.sink_tokens, min_capacity=cfg.min_capacity)
    weights = credit_weights(result.flow, valid & ~prompt, cfg.top_fraction, cfg.boost, result.degenerate)
    kept = dense_graph(result.graphs, torch.ones(result.graphs.num_edges, dtype=torch.bool), t)  # [N, T, T]
    flows = edge_flows(result, t)
    for n in range(len(rows)):
        ref = reference(pruned[n].tolist(), valid[n].tolist(), prompt[n].tolist(), answer[n].tolist(), plain)
        assert bool(result.degenerate[n]) == ref["degenerate"]
        assert {tuple(e) for e in kept[n].nonzero().tolist()} == set(ref["cap"])  # the pruned graph
        if not ref["degenerate"]:
            for i in ref["nodes"]:
                assert float(result.flow[n, i]) == pytest.approx(ref["f"][i], abs=TOL)
            for (i, k), x in ref["flow"].items():
                assert float(flows[n, i, k]) == pytest.approx(x, abs=TOL)
            assert float(result.absorbed[n]) == pytest.approx(1.0, abs=TOL)
        assert weights[n].tolist() == ref["weights"]
    # the graphs carry all of their own flow
    g = result.graphs
    assert torch.allclose(kept_flow(g, edge_flow(g)), torch.ones(g.num_nodes, dtype=torch.float64), atol=1e-6)


def test_prune_before_solve_by_hand() -> None:
    """The graph of test_graph_keeps_the_edges_with_the_most_flow_not_the_most_attention, pruned to one edge
    a token by capacity: into 2 the tie goes to 0, into 3 the strongest attention (from 2) stays, the answer
    4 keeps both. Then h(3) = 0.9, h(2) = 0.6 · 0.9 + 0.05, h(1) = 0, h(0) = 0.01 h(2): all the flow enters
    at 0 and f(3) = 0.6 h(3) / h(2)."""
    edges = {(0, 2): 0.01, (1, 2): 0.01, (0, 3): 0.2, (1, 3): 0.1, (2, 3): 0.6, (3, 4): 0.9, (2, 4): 0.05}
    att, valid, prompt, answer = small_graph(5, edges, [0, 1], [4])
    cfg = FlowConfig(sink_tokens=0, min_capacity=0.0, max_in_degree=1, prune_before_solve=True)
    r = answer_flow(att, valid, prompt, answer, cfg)
    assert {tuple(e) for e in r.graphs.edge_index.T.tolist()} == {(0, 2), (2, 3), (3, 4), (2, 4)}
    h2 = 0.6 * 0.9 + 0.05
    assert r.flow[0].tolist() == pytest.approx([1.0, 0.0, 1.0, 0.6 * 0.9 / h2, 1.0], abs=TOL)
    assert r.h[0].tolist() == pytest.approx([0.01 * h2, 0.0, h2, 0.9, 1.0], abs=TOL)
