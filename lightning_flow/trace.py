"""Per-token flow traces: what the method computes for one response, as plain numbers.

A trace holds, for every token of prompt + response, its text, role, influence ``h``, throughput
``f`` and credit weight, with its strongest incoming and outgoing edge flows ``f(i) · w(i, k)``,
plus the backbone (the strongest edge flows of the whole response). It is read off one solved
flow graph (``trace_from_graph``: the graph ``FlowCredit`` credited, or one built from a map by
``trace_from_attention``), so the numbers are exactly the ones flow credit uses; ``trace_ids``
also runs the model to capture that map.
Pictures and pages are made from a trace by ``lightning_flow.render``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch_geometric.data import Data

from lightning_flow.capture import capture_attention, default_capture_layers
from lightning_flow.flow import (
    ROLE_ANSWER,
    ROLE_PROMPT,
    FlowConfig,
    answer_flow,
    boosted_count,
    credit_weights,
    edge_flow,
)
from lightning_flow.flow.answer import (
    SOURCE_BOXED,
    SOURCE_FALLBACK,
    SOURCE_HASH,
    answer_masks,
    token_char_offsets,
)
from lightning_flow.policy import position_ids_from_mask

ROLES = ("prompt", "response", "answer")
_SOURCES = {SOURCE_BOXED: "boxed", SOURCE_HASH: "hash", SOURCE_FALLBACK: "fallback"}


@dataclass
class TraceConfig:
    """The flow graph's choices (as FlowCredit takes them) and how much of the graph a trace keeps."""

    layers: list[int] | None = None
    """Decoder layers whose attention is averaged (None: 5 evenly spaced over the middle third)."""
    sink_tokens: int = 1
    """Edges out of this many leading tokens are dropped (attention sinks)."""
    keep_mass: float = 1.0
    """Per token, the graph keeps the incoming edges carrying the most flow until this share of its incoming
    flow is kept (the flow itself is exact whatever the pruning)."""
    max_in_degree: int | None = None
    """Keep at most this many incoming edges per token in the graph (None: all)."""
    min_capacity: float = 1e-6
    """Drop edges whose attention is below this."""
    top_fraction: float = 0.4
    """Share of the response tokens, ranked by throughput, that get the boost."""
    boost: float = 1.5
    """Weight of the boosted tokens (the others get 1)."""
    answer_fallback: Literal["last_token", "none"] = "last_token"
    """No \\boxed{} or ####: mark the last response token as the answer, or nothing."""
    top_edges: int = 3
    """Strongest incoming and outgoing edge flows kept per token."""
    backbone_edges: int = 20
    """Strongest edge flows of the response kept as its backbone."""
    concentration_fraction: float = 0.1
    """The concentration figure is the share of the response's flow carried by this top fraction of its
    tokens."""

    def flow_config(self) -> FlowConfig:
        return FlowConfig(
            self.sink_tokens,
            self.keep_mass,
            self.max_in_degree,
            self.min_capacity,
            self.top_fraction,
            self.boost,
        )


@dataclass
class TokenTrace:
    """One token of a trace."""

    position: int  # index in prompt + response
    id: int
    text: str  # characters it adds to the decoded prompt or response ("" for special tokens)
    piece: str  # vocabulary string, shown when text is empty
    role: str  # "prompt", "response" or "answer"
    h: float  # answer-conditioned influence, scaled to max 1; 0 = no path to the answer
    f: float  # throughput: share of the prompt-to-answer flow passing through the token
    weight: float  # credit weight (1 or boost on response tokens, 1 on the prompt)
    top_in: list[dict[str, float]] = field(default_factory=list)  # [{"source", "flow"}] strongest first
    top_out: list[dict[str, float]] = field(default_factory=list)  # [{"target", "flow"}] strongest first


@dataclass
class Trace:
    """The flow of one response: per-token records, the backbone and summary numbers."""

    prompt: str
    response: str
    tokens: list[TokenTrace]
    backbone: list[dict[str, float]]  # [{"source", "target", "flow"}] strongest first, flow > 0
    answer_text: str | None  # characters of the answer tokens, None when none is marked
    answer_source: str  # "boxed", "hash", "fallback" (last token) or "none"
    degenerate: bool  # no answer / no path from prompt to answer: uniform weights, f = 0
    absorbed: float  # flow absorbed by the answer tokens (1 unless degenerate)
    # share of the response's flow on its top concentration_fraction tokens (None: no flow)
    concentration: float | None
    layers: list[int]
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)  # free labels: model, gold, reward, step...

    @property
    def prompt_length(self) -> int:
        return sum(t.role == "prompt" for t in self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trace:
        tokens = [TokenTrace(**t) for t in data["tokens"]]
        return cls(**{**data, "tokens": tokens})


def flow_concentration(flow: Tensor, response: Tensor, fraction: float = 0.1) -> Tensor:
    """[N] share of Σ f over each row's response tokens carried by its top ceil(fraction · n) tokens
    (at least one); NaN for rows without flow. flow, response  # [N, T]"""
    f = torch.where(response, flow, torch.zeros_like(flow)).float()  # [N, T]
    n = response.sum(-1)  # [N]
    k = torch.clamp(torch.ceil(n.double() * fraction), min=1).long()  # [N]
    ranked = f.sort(dim=-1, descending=True).values  # [N, T]
    top = (ranked * (torch.arange(f.shape[1], device=f.device) < k[:, None])).sum(-1)  # [N]
    total = f.sum(-1)  # [N]
    return torch.where(total > 0, top / total.clamp_min(1e-30), torch.full_like(total, float("nan")))


def _strongest_edges(
    edge_index: Tensor, flow: Tensor, t: int, k: int
) -> tuple[list[list[dict[str, float]]], list[list[dict[str, float]]]]:
    """Per token, its up to k strongest incoming and outgoing edge flows (zero flows are no edges).
    edge_index  # [2, E] (source, target) node ids;  flow  # [E] f(i) w(i, k)"""
    top_in: list[list[dict[str, float]]] = [[] for _ in range(t)]
    top_out: list[list[dict[str, float]]] = [[] for _ in range(t)]
    order = torch.argsort(flow, descending=True, stable=True)
    sources, targets, values = (
        edge_index[0, order].tolist(),
        edge_index[1, order].tolist(),
        flow[order].tolist(),
    )
    for i, j, v in zip(sources, targets, values):
        if v <= 0:
            break
        if len(top_in[j]) < k:
            top_in[j].append({"source": i, "flow": v})
        if len(top_out[i]) < k:
            top_out[i].append({"target": j, "flow": v})
    return top_in, top_out


def _token_texts(tokenizer: Any, ids: list[int]) -> tuple[str, list[str]]:
    """Decoded text and the characters each token adds (split characters go to every holder)."""
    text, offsets = token_char_offsets(tokenizer, ids)
    return text, [text[start:end] for start, end in offsets]


@torch.no_grad()
def trace_from_attention(
    attention: Tensor,
    token_ids: Tensor,
    prompt_length: int,
    tokenizer: Any,
    cfg: TraceConfig = TraceConfig(),
    weights: Tensor | None = None,
    eos_token_ids: list[int] | None = None,
    layers: list[int] | None = None,
    meta: dict[str, Any] | None = None,
) -> Trace:
    """The trace of one unpadded prompt + response from its attention map: the flow graph is
    built and solved as flow credit does, then read by ``trace_from_graph``.

    attention      # [T, T] head- and layer-mean attention (query, key) over these tokens
    token_ids      # [T] prompt ids then response ids
    prompt_length  # p: the first p tokens are the prompt
    """
    t = token_ids.shape[0]
    if attention.shape != (t, t) or not 0 < prompt_length < t:
        raise ValueError(
            f"need attention [T, T] for T={t} tokens and 0 < prompt_length < T, got {tuple(attention.shape)} "
            f"and {prompt_length}"
        )
    answer, _ = answer_masks(
        tokenizer,
        token_ids[None, prompt_length:].cpu(),
        torch.ones(1, t - prompt_length),
        cfg.answer_fallback,
        eos_token_ids,
    )
    device = attention.device
    valid = torch.ones(1, t, dtype=torch.bool, device=device)  # [1, T]
    prompt = torch.arange(t, device=device)[None] < prompt_length  # [1, T]
    # [1, T]
    answer_full = torch.cat([torch.zeros(1, prompt_length, dtype=torch.bool), answer], dim=1).to(device)
    graph = answer_flow(
        attention[None].float(), valid, prompt, answer_full, cfg.flow_config()
    ).graphs.get_example(0)
    return trace_from_graph(graph, token_ids, tokenizer, cfg, weights, eos_token_ids, layers, meta)


@torch.no_grad()
def trace_from_graph(
    graph: Data,
    token_ids: Tensor,
    tokenizer: Any,
    cfg: TraceConfig = TraceConfig(),
    weights: Tensor | None = None,
    eos_token_ids: list[int] | None = None,
    layers: list[int] | None = None,
    meta: dict[str, Any] | None = None,
) -> Trace:
    """The trace of one solved flow graph (``answer_flow(...).graphs``), whose nodes are these
    tokens.

    token_ids      # [T] the graph's tokens: prompt ids then response ids (node j is token j)
    weights        # [L] final credit weights of the response tokens (what reached the loss);
                   # None computes them from the flow as FlowCredit's flow signal does
    eos_token_ids  # never marked as answer when naming the answer's source (default: the tokenizer's EOS)
    """
    t = token_ids.shape[0]
    role = graph.role.cpu()  # [T]
    prompt_length = int((role == ROLE_PROMPT).sum())
    if graph.num_nodes != t or not 0 < prompt_length < t:
        raise ValueError(
            f"the graph has {graph.num_nodes} nodes ({prompt_length} in the prompt) for {t} tokens; need a "
            "prompt and a response"
        )
    if weights is not None and weights.shape != (t - prompt_length,):
        raise ValueError(f"weights must be [L] = [{t - prompt_length}], got {tuple(weights.shape)}")
    ids = token_ids.tolist()
    _, source = answer_masks(
        tokenizer,
        token_ids[None, prompt_length:].cpu(),
        torch.ones(1, t - prompt_length),
        cfg.answer_fallback,
        eos_token_ids,
    )
    answer = role == ROLE_ANSWER  # [T]
    response = role != ROLE_PROMPT  # [T]
    flow = graph.f.float().cpu()  # [T]
    degenerate = bool(graph.degenerate) or not bool(answer.any())
    if weights is None:
        # [L]
        weights = credit_weights(
            flow[None], response[None], cfg.top_fraction, cfg.boost, torch.tensor([degenerate])
        )[0, prompt_length:]
    all_weights = torch.cat([torch.ones(prompt_length), weights.float().cpu()]).tolist()  # [T]

    prompt_text, prompt_pieces = _token_texts(tokenizer, ids[:prompt_length])
    response_text, response_pieces = _token_texts(tokenizer, ids[prompt_length:])
    vocab = tokenizer.convert_ids_to_tokens(ids)
    h, f, roles = graph.h.float().cpu().tolist(), flow.tolist(), role.tolist()
    pieces = prompt_pieces + response_pieces
    edges = edge_flow(graph).float().cpu()  # [E]
    top_in, top_out = _strongest_edges(graph.edge_index.cpu(), edges, t, cfg.top_edges)
    tokens = [
        TokenTrace(
            position=j,
            id=ids[j],
            text=pieces[j],
            piece=vocab[j],
            role=ROLES[roles[j]],
            h=h[j],
            f=f[j],
            weight=all_weights[j],
            top_in=top_in[j],
            top_out=top_out[j],
        )
        for j in range(t)
    ]
    value, index = edges.topk(min(cfg.backbone_edges, len(edges)))
    spine = [
        {"source": int(graph.edge_index[0, e]), "target": int(graph.edge_index[1, e]), "flow": float(v)}
        for e, v in zip(index.tolist(), value.tolist())
        if v > 0
    ]
    answer_chars = "".join(tok.text for tok in tokens if tok.role == "answer")
    share = flow_concentration(flow[None], response[None], cfg.concentration_fraction)[0].item()
    return Trace(
        prompt=prompt_text,
        response=response_text,
        tokens=tokens,
        backbone=spine,
        answer_text=answer_chars if answer.any() else None,
        answer_source=_SOURCES.get(int(source[0]), "none") if answer.any() else "none",
        degenerate=degenerate,
        absorbed=float((flow * answer).sum()),
        concentration=None if math.isnan(share) else share,
        layers=list(layers or []),
        config=asdict(cfg),
        meta=dict(meta or {}),
    )


def expected_boosted(trace: Trace) -> int:
    """How many response tokens a non-degenerate trace boosts: round(top_fraction · L), halves up."""
    n = sum(tok.role != "prompt" for tok in trace.tokens)
    return int(boosted_count(torch.tensor([n]), trace.config["top_fraction"])[0])


@torch.no_grad()
def trace_ids(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: list[int],
    response_ids: list[int],
    cfg: TraceConfig = TraceConfig(),
    eos_token_ids: list[int] | None = None,
    meta: dict[str, Any] | None = None,
) -> Trace:
    """Capture the model's attention over prompt + response (one no-grad pass) and trace it."""
    num_layers = model.config.get_text_config().num_hidden_layers
    layers = sorted(set(cfg.layers)) if cfg.layers else default_capture_layers(num_layers)
    ids = torch.tensor([prompt_ids + response_ids])  # [1, T]
    mask = torch.ones_like(ids)  # [1, T]
    # [T, T]
    attention = capture_attention(model, ids, mask, layers, position_ids=position_ids_from_mask(mask))[0]
    return trace_from_attention(
        attention,
        ids[0],
        len(prompt_ids),
        tokenizer,
        cfg,
        eos_token_ids=eos_token_ids,
        layers=layers,
        meta=meta,
    )
