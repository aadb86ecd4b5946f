"""Answer-conditioned flow: the Doob h-transform and the prompt-to-answer throughput.

Both sweeps are blocked triangular solves over positions, batched over the N responses:
  h:  (I - M) h = 1_S, M = c with the answer rows zeroed (answer tokens absorb), last block first;
  f:  (I - Wᵀ) f = μ,  W(i, k) = c(i, k) h(k) / h(i) on rows i ∉ S with h(i) > 0, first block first.
h can span far more than float32's range on long responses: it decays backwards when attention
rows sum below 1 (sinks and pruning remove mass) and grows when they sum above 1. So every block
keeps its own scale (h = hhat · exp(log_norm), log scales in float64): a block's right-hand side
is combined from the later blocks in log space, normalised to max 1 and solved in the working
dtype. W is bounded (w <= 1), so it is formed from hhat and one scale factor per source.
The limit left: within one block, h may not span more than the dtype's range (float32: about
1e38, i.e. a growth or decay factor per position of at most 1e38 ** (1 / block_size)).
Responses that fit one block (T <= block_size) have no scales to combine and take a direct path
(``_solve_one_block``) with the same limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial

import torch
from torch import Tensor

from .graph import FlowConfig, check_inputs, incoming_capacities

_NEG_INF = float("-inf")


@dataclass
class FlowResult:
    """Answer-conditioned influence and throughput of a batch of responses.

    ``log_h``, ``h`` and ``absorbed`` are derived on first use: the credit reads only ``flow`` and ``degenerate``.
    """

    flow: Tensor  # [N, T] throughput f in [0, 1]; all 0 on degenerate rows
    degenerate: Tensor  # [N] bool: no answer, empty response, < 2 valid tokens or Σ_prompt h = 0
    answer: Tensor  # [N, T] bool: the answer tokens the flow was conditioned on (within the response)
    scaled_h: Tensor  # [N, T] h divided by its row's (or block's) scale, in the working dtype
    log_scale: Tensor  # [N, 1] or [N, T] float64 log of that scale

    @cached_property
    def log_h(self) -> Tensor:
        """[N, T] float64 log of the unscaled h (-inf where h = 0); what edge_flows uses."""
        return self.scaled_h.double().log() + self.log_scale

    @cached_property
    def h(self) -> Tensor:
        """[N, T] influence on the answer, scaled to max 1 per response; 0 where no path."""
        return (self.log_h - _finite_max(self.log_h)).exp().to(self.flow.dtype)

    @cached_property
    def absorbed(self) -> Tensor:
        """[N] flow absorbed by the answer: 1 where not degenerate, 0 where degenerate."""
        return (self.flow * self.answer).sum(-1)


def _pad(x: Tensor, size: int) -> Tensor:
    """Right-pad the last dimension of a [N, T] tensor with zeros / False to `size`."""
    return x if size == x.shape[-1] else torch.nn.functional.pad(x, (0, size - x.shape[-1]))


def vector_matrix(x: Tensor, m: Tensor) -> Tensor:
    """[..., a] x [..., a, b] -> [..., b]: Σ_a x[..., a] m[..., a, b], batched over the leading dims.

    A product with a row vector on the left: on a CPU the BLAS runs it several times faster than
    the matrix-times-column-vector that ``einsum`` makes of these sums, whichever way ``m`` is laid
    out, so a sum over m's last index is written ``vector_matrix(x, m.mT)``."""
    return torch.matmul(x.unsqueeze(-2), m).squeeze(-2)


def _finite_max(x: Tensor) -> Tensor:
    """[N, 1] row max over the finite entries of a [N, B] tensor, 0 for rows with none."""
    top = x.amax(-1, keepdim=True)  # [N, 1]
    return torch.where(torch.isfinite(top), top, torch.zeros_like(top))


def _back_substitute(inner: Tensor, minus_passes_on: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
    """Solve (I - M) x = rhs within one block and scale x to max 1: (hhat [N, b], top [N, 1], 0 where x is all 0).

    inner            # [N, b (k), b (i)] capacities of the block's edges, p[n, k, i] = c(i, k)
    minus_passes_on  # [N, b] -1, 0 on answer tokens (they feed the super-sink only): M's columns
    rhs              # [N, b]
    """
    upper = (inner * minus_passes_on[:, None, :]).transpose(1, 2)  # [N, i, k] -M; unit diagonal implied
    x = torch.linalg.solve_triangular(upper, rhs[..., None], upper=True, unitriangular=True)
    x = x.squeeze(-1).clamp_min(0)  # [N, b]
    top = x.amax(-1, keepdim=True)  # [N, 1]
    return x / torch.where(top > 0, top, 1.0), top


@dataclass
class _Influence:
    """h of a padded batch in blocks of `bs` positions: h = hhat · exp(log_norm of its block)."""

    hhat: Tensor  # [N, S] h divided by its block's normaliser (block max 1, or all 0)
    log_norm: Tensor  # [N, nb] float64 log of each block's normaliser
    log_out: Tensor  # [N, S] float64 log Σ_k c(i, k) h(k): equals log h(i) off the answer


def _solve_h(p: Tensor, answer: Tensor, bs: int) -> _Influence:
    """Back-substitution (I - M) h = 1_S from the last block; p  # [N, S, S] incoming capacities."""
    n, size, _ = p.shape
    nb = size // bs
    hhat = p.new_zeros(n, size)  # [N, S]
    log_norm = torch.zeros(n, nb, dtype=torch.float64, device=p.device)  # [N, nb]
    log_out = torch.full((n, size), _NEG_INF, dtype=torch.float64, device=p.device)  # [N, S]
    minus_passes_on = -(~answer).to(p.dtype)  # [N, S] -1, 0 on answer tokens (they feed the super-sink only)
    for b in reversed(range(nb)):
        s, e = b * bs, (b + 1) * bs
        if e < size:
            # What each later block receives from this one, in that block's own scale, combined in
            # log space so that blocks of very different magnitude neither overflow nor vanish.
            later = p[:, e:, s:e].unflatten(1, (nb - b - 1, bs))  # [N, nl, bs (k), bs (i)]
            part = vector_matrix(hhat[:, e:].view(n, nb - b - 1, bs), later).mT  # [N, bs, nl]
            log_later = torch.logsumexp(part.double().log() + log_norm[:, None, b + 1 :], dim=-1)
            log_rhs = torch.where(answer[:, s:e], 0.0, log_later)  # [N, bs]; h(a) = 1
            ref = _finite_max(log_rhs)  # [N, 1]
            rhs = (log_rhs - ref).exp().to(p.dtype)  # [N, bs] max 1 (or all 0)
        else:  # the last block receives nothing from later ones: its right-hand side is h(a) = 1 on the answer
            log_later, ref = None, torch.zeros(n, 1, dtype=torch.float64, device=p.device)
            rhs = answer[:, s:e].to(p.dtype)  # [N, bs]
        inner = p[:, s:e, s:e]  # [N, bs (k), bs (i)] edges inside the block
        hhat[:, s:e], top = _back_substitute(inner, minus_passes_on[:, s:e], rhs)
        log_norm[:, b] = torch.where(top > 0, ref + top.double().log(), 0.0).squeeze(-1)
        within = vector_matrix(hhat[:, s:e], inner).double().log() + log_norm[:, b, None]
        log_out[:, s:e] = within if log_later is None else torch.logaddexp(log_later, within)  # [N, bs]
    return _Influence(hhat, log_norm, log_out)


def _solve_flow(p: Tensor, infl: _Influence, stops: Tensor, mu: Tensor, bs: int) -> Tensor:
    """f  # [N, S] by forward substitution in blocks; Wᵀ is built one block of targets at a time.

    w(i, k) = c(i, k) h(k) / Σ_k' c(i, k') h(k'): the denominator is h(i) in exact arithmetic, and
    using the computed row sum makes Σ_k w(i, k) = 1 hold to rounding, so no flow leaks on long
    responses. Each factor is bounded (w <= 1), so the products cannot overflow.
    """
    n, size, _ = p.shape
    f = p.new_zeros(n, size)  # [N, S]
    big = torch.finfo(p.dtype).max
    for b, s in enumerate(range(0, size, bs)):
        e = s + bs
        # h(k) / out(i) = hhat(k) · q(i): the block's scale folded into one factor per source
        # (negated here, so that -Wᵀ costs no pass of its own over the block).
        log_q = infl.log_norm[:, b, None] - infl.log_out[:, :e]  # [N, e]
        minus_q = torch.where(stops[:, :e], 0.0, log_q.exp().clamp(max=big).neg()).to(p.dtype)  # [N, e]
        minus_wt = (p[:, s:e, :e] * infl.hhat[:, s:e, None]).mul_(minus_q[:, None, :])  # [N, bs (k), e (i)] = -Wᵀ
        rhs = mu[:, s:e] - vector_matrix(f[:, :s], minus_wt[:, :, :s].mT) if s else mu[:, s:e]  # [N, bs]
        x = torch.linalg.solve_triangular(minus_wt[:, :, s:], rhs[..., None], upper=False, unitriangular=True)
        f[:, s:e] = x.squeeze(-1)
    return f


def _solve_blocks(p: Tensor, answer: Tensor, prompt: Tensor, bs: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(h scaled per block [N, S], its log scale [N, S] float64, f [N, S], has_source [N, 1]) by the
    blocked sweeps, each block in its own scale."""
    infl = _solve_h(p, answer, bs)
    log_scale = infl.log_norm.repeat_interleave(bs, dim=1)  # [N, S]
    log_h = infl.hhat.double().log() + log_scale  # [N, S] float64
    # Super-source over the prompt, conditioned like every other edge: μ(i) ∝ h(i).
    log_src = torch.where(prompt, log_h, _NEG_INF)  # [N, S]
    log_z = torch.logsumexp(log_src, dim=-1, keepdim=True)  # [N, 1] log Σ_P h
    has_source = torch.isfinite(log_z)  # [N, 1]
    mu = (log_src - torch.where(has_source, log_z, 0.0)).exp().to(p.dtype)  # [N, S]
    stops = answer | ~torch.isfinite(infl.log_out)  # [N, S] answer tokens absorb; h = 0 carry nothing
    return infl.hhat, log_scale, _solve_flow(p, infl, stops, mu, bs), has_source


def _solve_one_block(p: Tensor, answer: Tensor, prompt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What ``_solve_blocks`` returns, when all positions are one block: the same two solves with
    one scale per response (h normalised to max 1 once), so no log-space bookkeeping; about half
    the small tensor operations, which dominate on short responses."""
    rhs = answer.to(p.dtype)  # [N, S] h(a) = 1
    hhat, top = _back_substitute(p, rhs - 1, rhs)  # [N, S] h / top, [N, 1]; rhs - 1: -1, 0 on the answer
    out = vector_matrix(hhat, p)  # [N, S] Σ_k c(i, k) hhat(k): hhat(i) off the answer
    source = hhat * prompt  # [N, S] super-source weights μ(i) ∝ h(i) over the prompt
    total = source.sum(-1, keepdim=True)  # [N, 1]
    has_source = total > 0
    mu = source / torch.where(has_source, total, 1.0)  # [N, S]
    # w(i, k) = c(i, k) hhat(k) / out(i), negated through the per-source factor; answer tokens and h = 0 send nothing.
    minus_q = torch.where(answer | (out <= 0), 0.0, torch.div(-1.0, out))  # [N, S]
    minus_wt = (p * hhat[:, :, None]).mul_(minus_q[:, None, :])  # [N, k, i] = -Wᵀ
    f = torch.linalg.solve_triangular(minus_wt, mu[..., None], upper=False, unitriangular=True).squeeze(-1)
    return hhat, top.double().log(), f, has_source


@torch.no_grad()
def answer_flow(
    attention: Tensor, valid: Tensor, prompt: Tensor, answer: Tensor, cfg: FlowConfig | None = None
) -> FlowResult:
    """h-transform and throughput of each response (flow-credit.md), on the input's device."""
    check_inputs(attention, valid, prompt, answer)
    cfg = cfg or FlowConfig()
    n, t = valid.shape
    bs = max(1, min(cfg.block_size, t))
    size = -(-t // bs) * bs  # T rounded up to whole blocks
    prompt = prompt & valid
    response = valid & ~prompt  # [N, T]
    answer = answer & response  # [N, T]
    p = incoming_capacities(attention, valid, cfg, size)  # [N, S, S] p[n, k, i] = c(i, k)
    answer_p, prompt_p = _pad(answer, size), _pad(prompt, size)  # [N, S]
    solve = _solve_one_block if size == bs else partial(_solve_blocks, bs=bs)
    scaled_h, log_scale, flow, has_source = solve(p, answer_p, prompt_p)  # [N, S], [N, 1 or S] float64, [N, S], [N, 1]

    # No answer, an empty response or fewer than two valid tokens all leave Σ_prompt h = 0 (h is
    # exactly 0 without an answer to reach), so the source's existence decides every case.
    degenerate = ~has_source.squeeze(-1)  # [N]
    flow = torch.where(degenerate[:, None], 0.0, flow[:, :t]).clamp(0.0, 1.0)  # [N, T]
    return FlowResult(flow=flow, degenerate=degenerate, answer=answer, scaled_h=scaled_h[:, :t], log_scale=log_scale[:, :t])


@torch.no_grad()
def edge_flows(capacity: Tensor, result: FlowResult, answer: Tensor, block_size: int = 512) -> Tensor:
    """[N, T, T] edge flow f(i) · w(i, k), w(i, k) = c(i, k) h(k) / h(i); rows of answer tokens and
    of h = 0 tokens are zero. `capacity` is the [N, T, T] output of `capacities`."""
    log_h, f = result.log_h, result.flow  # [N, T] each
    stops = answer | ~torch.isfinite(log_h) | (f <= 0)  # [N, T] rows that send nothing
    log_from = torch.where(stops, _NEG_INF, f.double().log() - log_h)  # [N, T] log f(i) / h(i)
    out = torch.zeros_like(capacity)  # [N, T, T]
    for r0 in range(0, capacity.shape[1], block_size):  # blocks of source rows bound the float64 temporaries
        r1 = r0 + block_size
        log_edge = capacity[:, r0:r1].double().log() + log_h[:, None, :] + log_from[:, r0:r1, None]
        out[:, r0:r1] = log_edge.exp().to(capacity.dtype)  # [N, r, T]; -inf (no edge, stops) -> 0
    return out


def backbone(edge_flow: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per response the k strongest edges: (index [N, k, 2] as (i, k) positions, value [N, k])."""
    n, t, _ = edge_flow.shape
    value, flat = edge_flow.reshape(n, t * t).topk(min(k, t * t), dim=-1)  # [N, k] each
    return torch.stack((flat // t, flat % t), dim=-1), value
