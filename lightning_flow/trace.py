"""Per-token flow traces: what the method computes for one response, as plain numbers.

A trace holds, for every token of prompt + response, its text, role, influence ``h``, throughput
``f`` and credit weight, with its strongest incoming and outgoing edge flows ``f(i) · w(i, k)``,
plus the backbone (the strongest edge flows of the whole response). It is computed from one
head- and layer-mean attention map by the flow core (``lightning_flow.flow``), so the numbers are
exactly the ones flow credit uses; ``trace_text`` also runs the model to capture that map.
Pictures and pages are made from a trace by ``lightning_flow.render``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_flow.capture import capture_attention, default_capture_layers
from lightning_flow.flow import FlowConfig, answer_flow, backbone, boosted_count, capacities, credit_weights, edge_flows
from lightning_flow.flow.answer import SOURCE_BOXED, SOURCE_FALLBACK, SOURCE_HASH, answer_masks, token_char_offsets
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
    max_in_degree: int | None = None
    """Keep only this many strongest incoming edges per token (None: all)."""
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
    """The concentration figure is the share of the response's flow carried by this top fraction of its tokens."""

    def flow_config(self) -> FlowConfig:
        return FlowConfig(self.sink_tokens, self.max_in_degree, self.min_capacity, self.top_fraction, self.boost)


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
    concentration: float | None  # share of the response's flow on its top concentration_fraction tokens (None: no flow)
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
    def from_dict(cls, data: dict[str, Any]) -> "Trace":
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


def _strongest_edges(edge: Tensor, k: int) -> tuple[list[list[dict[str, float]]], list[list[dict[str, float]]]]:
    """Per token, its up to k strongest incoming and outgoing edge flows (zero flows are no edges).  edge  # [T, T] f(i) w(i, k)"""
    k = min(k, edge.shape[0])
    in_value, in_index = (x.T.tolist() for x in edge.topk(k, dim=0))  # [T, k] strongest sources of each target
    out_value, out_index = (x.tolist() for x in edge.topk(k, dim=1))  # [T, k] strongest targets of each source
    top_in = [[{"source": i, "flow": v} for v, i in zip(vs, ix) if v > 0] for vs, ix in zip(in_value, in_index)]
    top_out = [[{"target": i, "flow": v} for v, i in zip(vs, ix) if v > 0] for vs, ix in zip(out_value, out_index)]
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
    """The trace of one unpadded prompt + response.

    attention      # [T, T] head- and layer-mean attention (query, key) over these tokens
    token_ids      # [T] prompt ids then response ids
    prompt_length  # p: the first p tokens are the prompt
    weights        # [L] final credit weights of the response tokens (what reached the loss);
                   # None computes them from the flow as FlowCredit's flow signal does
    eos_token_ids  # never marked as answer (default: the tokenizer's EOS)
    """
    t = token_ids.shape[0]
    if attention.shape != (t, t) or not 0 < prompt_length < t:
        raise ValueError(f"need attention [T, T] for T={t} tokens and 0 < prompt_length < T, got {tuple(attention.shape)} and {prompt_length}")
    if weights is not None and weights.shape != (t - prompt_length,):
        raise ValueError(f"weights must be [L] = [{t - prompt_length}], got {tuple(weights.shape)}")
    ids = token_ids.tolist()
    response_ids = token_ids[prompt_length:].cpu()  # [L]
    answer, source = answer_masks(tokenizer, response_ids[None], torch.ones(1, t - prompt_length), cfg.answer_fallback, eos_token_ids)
    device = attention.device
    valid = torch.ones(1, t, dtype=torch.bool, device=device)  # [1, T]
    prompt = torch.arange(t, device=device)[None] < prompt_length  # [1, T]
    response = valid & ~prompt  # [1, T]
    answer_full = torch.cat([torch.zeros(1, prompt_length, dtype=torch.bool), answer], dim=1).to(device)  # [1, T]

    flow_cfg = cfg.flow_config()
    result = answer_flow(attention[None].float(), valid, prompt, answer_full, flow_cfg)
    edge = edge_flows(capacities(attention[None].float(), valid, flow_cfg), result, answer_full)[0].cpu()  # [T, T] f(i) w(i, k)
    degenerate = bool(result.degenerate[0]) or not bool(answer.any())
    if weights is None:
        fallback = torch.tensor([degenerate], device=device)
        weights = credit_weights(result.flow, response, cfg.top_fraction, cfg.boost, fallback)[0, prompt_length:]  # [L]
    all_weights = torch.cat([torch.ones(prompt_length), weights.float().cpu()]).tolist()  # [T]

    prompt_text, prompt_pieces = _token_texts(tokenizer, ids[:prompt_length])
    response_text, response_pieces = _token_texts(tokenizer, ids[prompt_length:])
    vocab = tokenizer.convert_ids_to_tokens(ids)
    roles = (torch.where(answer_full, 2, torch.where(prompt, 0, 1))[0]).tolist()
    h, f = result.h[0].tolist(), result.flow[0].tolist()
    pieces = prompt_pieces + response_pieces
    top_in, top_out = _strongest_edges(edge, cfg.top_edges)
    tokens = [
        TokenTrace(position=j, id=ids[j], text=pieces[j], piece=vocab[j], role=ROLES[roles[j]], h=h[j], f=f[j],
                   weight=all_weights[j], top_in=top_in[j], top_out=top_out[j])
        for j in range(t)
    ]
    index, value = backbone(edge[None], cfg.backbone_edges)  # [1, k, 2], [1, k]
    spine = [{"source": int(i), "target": int(j), "flow": float(v)} for (i, j), v in zip(index[0].tolist(), value[0].tolist()) if v > 0]
    answer_chars = "".join(tok.text for tok in tokens if tok.role == "answer")
    share = flow_concentration(result.flow.cpu(), response.cpu(), cfg.concentration_fraction)[0].item()
    return Trace(
        prompt=prompt_text, response=response_text, tokens=tokens, backbone=spine,
        answer_text=answer_chars if answer.any() else None,
        answer_source=_SOURCES.get(int(source[0]), "none"), degenerate=degenerate,
        absorbed=float(result.absorbed[0]), concentration=None if math.isnan(share) else share,
        layers=list(layers or []), config=asdict(cfg), meta=dict(meta or {}),
    )


def expected_boosted(trace: Trace) -> int:
    """How many response tokens a non-degenerate trace boosts: round(top_fraction · L), halves up."""
    n = sum(tok.role != "prompt" for tok in trace.tokens)
    return int(boosted_count(torch.tensor([n]), trace.config["top_fraction"])[0])


@torch.no_grad()
def trace_ids(
    model: torch.nn.Module, tokenizer: Any, prompt_ids: list[int], response_ids: list[int], cfg: TraceConfig = TraceConfig(),
    eos_token_ids: list[int] | None = None, meta: dict[str, Any] | None = None,
) -> Trace:
    """Capture the model's attention over prompt + response (one no-grad pass) and trace it."""
    num_layers = model.config.get_text_config().num_hidden_layers
    layers = sorted(set(cfg.layers)) if cfg.layers else default_capture_layers(num_layers)
    ids = torch.tensor([prompt_ids + response_ids])  # [1, T]
    mask = torch.ones_like(ids)  # [1, T]
    attention = capture_attention(model, ids, mask, layers, position_ids=position_ids_from_mask(mask))[0]  # [T, T]
    return trace_from_attention(attention, ids[0], len(prompt_ids), tokenizer, cfg, eos_token_ids=eos_token_ids, layers=layers, meta=meta)
