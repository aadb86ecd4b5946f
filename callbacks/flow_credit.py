"""The bridge from the policy's attention to the loss: per-token credit weights for each step.

Listed under ``trainer.callbacks``; without it a run is plain GRPO. Each step it locates the
answer tokens of every credited response, turns a signal into weights ("top ``top_fraction`` of
the response tokens by signal get ``boost``, the rest 1") and sets ``rollouts.token_weights``,
which the loss multiplies into the advantage (both signs, detached).

With the ``flow`` signal, the flow of each chunk of captured maps is solved exactly on the maps right
away (``solve_maps``), each token's incoming edges carrying the most of that flow are kept
(``prune_edges``: ``keep_mass`` of its incoming flow, at most ``max_in_degree`` edges), the maps are
dropped, and the kept edges with the solved nodes become torch-geometric flow graphs (``flow_graphs``),
kept in ``rollouts.flow_graphs`` until the step ends, where ``FlowPictures`` draws them. Pruning shapes
what the graphs hold, never the credit. With ``prune_before_solve`` the maps are pruned by capacity first
and the flow is solved on the graphs (``solved_graphs``): the credit of the pruned graphs.
"""

from __future__ import annotations

import time
from typing import Literal, NamedTuple

import torch
from lightning.pytorch import Trainer
from torch import Tensor
from torch.nn.functional import pad

from lightning_flow.flow import (
    ROLE_PROMPT,
    FlowConfig,
    FlowSolution,
    KeptEdges,
    attention_received,
    credit_weights,
    edge_flow,
    prune_edges,
    random_signal,
    solve_maps,
    solved_graphs,
)
from lightning_flow.flow.answer import answer_masks, piece_table
from lightning_flow.rollouts import MicroBatch, RolloutCallback, Rollouts, StepModule

Signal = Literal["flow", "uniform", "random", "entropy", "attention_received"]
_NEEDS_ATTENTION = {"flow", "attention_received"}
_STATS = (
    "answer_found",
    "fallback",
    "nonfinite",
    "top_share",
    "boosted",
    "tokens",
    "nodes",
    "edges",
    "kept_flow",
    "incoming_flow",
)


class FlowCredit(RolloutCallback):
    def __init__(
        self,
        signal: Signal = "flow",
        top_fraction: float = 0.4,
        boost: float = 1.5,
        layers: list[int] | None = None,
        sink_tokens: int = 1,
        keep_mass: float = 0.999,
        max_in_degree: int | None = 64,
        min_capacity: float = 1e-6,
        answer_fallback: Literal["last_token", "none"] = "last_token",
        seed: int = 0,
        max_attention_mb: float | None = None,
        block_size: int = 512,
        prune_before_solve: bool = False,
    ) -> None:
        """
        Args:
            signal: what ranks the tokens: ``flow`` (answer-targeted throughput, the method),
                or a comparison: ``uniform`` (all ones: plain GRPO through the same code path),
                ``random``, ``entropy`` (predictive entropy of the sampled token),
                ``attention_received`` (mean attention a token gets from later tokens).
            top_fraction: share of each response's tokens that get the boost.
            boost: weight of the top tokens (the others get 1).
            layers: decoder layers whose attention is captured (default: 5 evenly spaced over
                the middle third).
            sink_tokens: edges out of this many leading tokens are dropped (attention sinks).
            keep_mass: per token, the graphs keep the incoming edges carrying the most flow until
                this share of its incoming flow is kept (1 with no cap: every edge above min_capacity). The
                credit is exact whatever the pruning: it is solved on the maps before.
            max_in_degree: at most this many incoming edges per token in the graphs (None: no cap);
                bounds their memory on long responses (about 20 B an edge).
            min_capacity: drop edges whose attention is below this.
            answer_fallback: where no ``\\boxed{}`` or ``####`` answer is found, use the last
                response token as the answer (``last_token``) or fall back to uniform (``none``).
            seed: seed of the ``random`` signal.
            max_attention_mb: largest dense attention held at once, in MiB (None: the credited rows
                of one micro-batch); fewer rows than a micro-batch's are captured by extra passes.
            block_size: positions per block of the flow solver at most (its tiles: responses × block²
                × 8 B; large maps use blocks of at most T / 20).
            prune_before_solve: prune each token's incoming edges by capacity first (``keep_mass`` of
                its incoming capacity, at most ``max_in_degree``) and solve the flow on those graphs:
                the credit of the pruned graphs, not the exact one (docs/results.md measures the gap).
        """
        if not 0.0 <= top_fraction <= 1.0:
            raise ValueError(f"top_fraction={top_fraction}: expected a value in [0, 1]")
        if max_attention_mb is not None and max_attention_mb <= 0:
            raise ValueError(
                f"max_attention_mb={max_attention_mb}: expected a positive number of MiB or None"
            )
        self.signal, self.top_fraction, self.boost, self.layers = signal, top_fraction, boost, layers
        self.answer_fallback, self.max_attention_mb = answer_fallback, max_attention_mb
        self.flow_config = FlowConfig(
            sink_tokens=sink_tokens,
            keep_mass=keep_mass,
            max_in_degree=max_in_degree,
            min_capacity=min_capacity,
            top_fraction=top_fraction,
            boost=boost,
            block_size=block_size,
            prune_before_solve=prune_before_solve,
        )
        self.generator = torch.Generator().manual_seed(seed)
        self._row_stats: list[dict[str, Tensor]] = []  # per chunk of credited rows of the current step
        self._seconds = 0.0  # this step's time in on_credit
        # (tokenizer, its piece_table), made on first use
        self._pieces: tuple[object, list[str] | None] | None = None

    def state_dict(self) -> dict:
        # The random signal's generator, so a resumed run draws what the uninterrupted one would.
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.generator.set_state(state_dict["generator"])

    def setup(self, trainer: Trainer, pl_module: StepModule, stage: str) -> None:
        if self.signal in _NEEDS_ATTENTION:
            budget = None if self.max_attention_mb is None else int(self.max_attention_mb * 2**20)
            pl_module.request_attention(self.layers, max_bytes=budget)

    def on_credit(
        self, trainer: Trainer, pl_module: StepModule, rollouts: Rollouts, micro_batch: MicroBatch
    ) -> None:
        start = time.perf_counter()
        first, _, _ = micro_batch.rows.indices(len(rollouts))
        is_credited = rollouts.credited[micro_batch.rows].tolist()
        if self.signal in _NEEDS_ATTENTION:
            chunks = micro_batch.attention_maps()
        else:
            chunks = [([first + j for j, yes in enumerate(is_credited) if yes], None)]
        for rows, maps in chunks:
            # another callback may record every row
            keep = [j for j, row in enumerate(rows) if is_credited[row - first]]
            if len(keep) < len(rows):
                rows, maps = [rows[j] for j in keep], (maps[keep] if maps is not None else None)
            if not rows:
                continue
            # cheaper dispatch than no_grad for these many small ops; outputs are only read
            with torch.inference_mode():
                read = self.read(rollouts, rows, maps, pl_module.tokenizer)
            del maps  # the chunk's dense map is freed here: its kept edges hold what the credit needs
            with torch.inference_mode():
                weights, stats = self.weigh(rollouts, read)
            rollouts.token_weights[rows] = weights[:, rollouts.prompt_ids.shape[1] :].to(
                rollouts.token_weights.dtype
            )
            self._row_stats.append(stats)
        self._seconds += time.perf_counter() - start

    def on_rollouts_end(self, trainer: Trainer, pl_module: StepModule, rollouts: Rollouts) -> None:
        parts, seconds, self._row_stats, self._seconds = self._row_stats, self._seconds, [], 0.0
        # Every count in one reduction and one read: a sum of a few rows costs as much as a large one.
        sums = dict.fromkeys(_STATS, 0.0)
        if parts:
            # [stats, credited rows]
            stacked = torch.stack([torch.cat([part[key] for part in parts]).double() for key in _STATS])
            sums = dict(zip(_STATS, stacked.sum(dim=1).tolist()))
        credited, fallback = sum(len(part["fallback"]) for part in parts), sums["fallback"]
        pl_module.step_scalars.add({"credit/time_s": seconds})
        # Fractions of the credited responses, summed over ranks before dividing (every rank adds the
        # same names, whatever it credited: they travel in one collective).
        # flow signal only (no nodes otherwise)
        # pruning: share of the response tokens' incoming flow the graphs' edges carry
        pl_module.step_scalars.add_ratios(
            {
                "credit/credited_fraction": (credited, len(rollouts)),
                "credit/answer_found_fraction": (sums["answer_found"], credited),
                "credit/fallback_fraction": (fallback, credited),
                "credit/nonfinite_attention_fraction": (sums["nonfinite"], credited),
                "credit/top_signal_share": (sums["top_share"], credited - fallback),  # 0 on fallback rows
                "credit/kept_flow": (sums["kept_flow"], sums["incoming_flow"]),
                "credit/edges_per_token": (
                    sums["edges"],
                    sums["nodes"],
                ),
                # share of the credited responses' tokens that got the boost (the others weigh 1)
                "credit/boosted_fraction": (sums["boosted"], sums["tokens"]),
            }
        )

    def piece_table(self, tokenizer) -> list[str] | None:
        """Each id's text decoded alone, made once per tokenizer (one batch decode of the vocabulary)."""
        if self._pieces is None or self._pieces[0] is not tokenizer:
            self._pieces = (tokenizer, piece_table(tokenizer))
        return self._pieces[1]

    def compute(
        self, rollouts: Rollouts, rows: list[int], maps: Tensor | None, tokenizer
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Weights over all positions [k, T] of the credited ``rows`` and their stats ([k] each:
        ``answer_found``, ``fallback``, ``nonfinite`` attention, ``top_share`` of the signal carried
        by the boosted tokens, counts of ``boosted`` and all response ``tokens``, and for the flow
        graphs their response ``nodes``, ``edges`` into them, the flow into them before pruning
        (``incoming_flow``) and what the kept edges carry of it (``kept_flow``)).

        ``maps``  # [k, T, T] the rows' attention (flow, attention_received), else None. With the
        flow signal the rows' solved graphs are added to ``rollouts.flow_graphs``."""
        return self.weigh(rollouts, self.read(rollouts, rows, maps, tokenizer))

    def read(self, rollouts: Rollouts, rows: list[int], maps: Tensor | None, tokenizer) -> _Read:
        """Everything credit takes from the maps (the solved flow and the edges kept, or the signal) and the
        rows' masks and answers."""
        prompt_length = rollouts.prompt_ids.shape[1]
        device = rollouts.completion_ids.device
        kept = rollouts.completion_mask[rows]  # [k, L]
        in_response = kept != 0  # [k, L]
        fallback = ~in_response.any(dim=1)  # [k] empty responses; flow adds its own degenerate cases
        # The completions were decoded before mask_truncated_completions may have emptied a row.
        texts = [rollouts.completions[i] if not empty else "" for i, empty in zip(rows, fallback.tolist())]
        answer, source = answer_masks(
            tokenizer,
            rollouts.completion_ids[rows],
            kept,
            self.answer_fallback,
            texts=texts,
            pieces=self.piece_table(tokenizer),
        )
        # [k, T] masks over prompt + response positions
        prompt = pad(rollouts.prompt_mask[rows] != 0, (0, in_response.shape[1]))
        response = pad(in_response, (prompt_length, 0))
        valid = prompt | response
        edges = signal = solution = None
        answer_full = pad(answer, (prompt_length, 0))
        if self.signal == "flow":
            if not self.flow_config.prune_before_solve:  # else solved on the graphs, in weigh
                solution = solve_maps(maps, valid, prompt, answer_full, self.flow_config)
            edges = prune_edges(maps, valid, answer_full, self.flow_config, solution)
        elif self.signal == "attention_received":
            signal = attention_received(maps, valid)
        elif self.signal == "entropy":
            signal = torch.zeros(valid.shape, device=device)
            signal[:, prompt_length:] = rollouts.entropy[rows]
        elif self.signal == "random":
            signal = random_signal(valid, self.generator).to(device)
        else:  # uniform: every token keeps weight 1, whatever top_fraction says
            signal = torch.ones(valid.shape, device=device)
            fallback = torch.ones_like(fallback)
        # [k] maps with a NaN/inf (an overflowing forward): uniform weights
        if edges is not None:  # the solve or the pruning read every map once for it
            nonfinite = edges.nonfinite
        elif maps is not None:
            # One reduction over the maps (a sum is non-finite iff an entry is; the maps sum to at most T).
            nonfinite = ~torch.isfinite(maps.sum(dim=(1, 2)))
        else:
            nonfinite = torch.zeros_like(fallback)
        return _Read(
            list(rows),
            prompt,
            answer_full,
            response,
            fallback | nonfinite,
            nonfinite,
            source,
            signal,
            edges,
            solution,
        )

    def weigh(self, rollouts: Rollouts, read: _Read) -> tuple[Tensor, dict[str, Tensor]]:
        """Assemble the graphs (flow), rank the signal, and the stats of ``compute``."""
        response, fallback, signal = read.response, read.fallback, read.signal
        k = len(read.rows)
        zeros = torch.zeros(k, dtype=torch.long, device=response.device)
        nodes = edges = zeros
        kept, incoming = zeros.double(), zeros.double()
        if read.edges is not None:
            graphs, solution = solved_graphs(
                read.edges, read.prompt, read.answer, self.flow_config, read.solution
            )
            # [k, T] the credit ranks the graphs' f: what pictures and traces of these graphs show
            signal = torch.zeros(response.shape, dtype=graphs.f.dtype, device=response.device).index_put_(
                (graphs.batch, graphs.position), graphs.f
            )
            fallback = fallback | solution.degenerate  # degenerate: also no answer found
            counted = graphs.role != ROLE_PROMPT  # the response's tokens: what the credit ranks
            into = graphs.edge_index[1]
            nodes = torch.bincount(graphs.batch[counted], minlength=k)
            into_response = counted[into]
            edges = torch.bincount(graphs.batch[into][into_response], minlength=k)
            flows = edge_flow(graphs)[into_response].double()
            kept = kept.index_add(0, graphs.batch[into][into_response], flows)
            incoming = incoming.index_add(0, graphs.batch[counted], graphs.incoming_flow[counted])
            rollouts.flow_graphs.append((read.rows, graphs))
        weights = credit_weights(signal, response, self.top_fraction, self.boost, fallback)  # [k, T]
        top = (weights != 1) & response  # the boosted tokens (a boost below 1 too)
        share = (signal * top).sum(dim=1) / (signal * response).sum(dim=1).clamp(min=1e-12)  # [k]
        # nothing boosted there (and a non-finite signal stays out of the sum)
        share = torch.where(fallback, 0.0, share)
        stats = {
            "answer_found": read.source < 2,
            "fallback": fallback,
            "nonfinite": read.nonfinite,
            "top_share": share,
            "boosted": top.sum(dim=1),
            "tokens": response.sum(dim=1),  # for the weight histogram
            "nodes": nodes,
            "edges": edges,
            "kept_flow": kept,
            "incoming_flow": incoming,
        }
        return weights, stats


class _Read(NamedTuple):
    """What ``FlowCredit.read`` takes from a chunk of credited rows (all [k] or [k, T])."""

    rows: list[int]  # rollout rows
    prompt: Tensor  # [k, T] bool, prompt positions
    answer: Tensor  # [k, T] bool, answer positions
    response: Tensor  # [k, T] bool, response positions
    fallback: Tensor  # [k] bool, uniform weights so far (empty response, non-finite map, uniform signal)
    nonfinite: Tensor  # [k] bool, the map had a NaN or inf
    source: Tensor  # [k] long, where the answer was found (answer.SOURCE_*)
    signal: Tensor | None  # [k, T] the signal, for signals read directly
    edges: KeptEdges | None  # the kept edges of the maps (flow signal)
    solution: FlowSolution | None  # the flow solved on the maps (flow signal, unless pruned before the solve)
