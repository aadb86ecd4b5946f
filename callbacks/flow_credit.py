"""The bridge from the policy's attention to the loss: per-token credit weights for each step.

Listed under ``trainer.callbacks``; without it a run is plain GRPO. Each step it locates the
answer tokens of every response, turns a signal into weights ("top ``top_fraction`` of the
response tokens by signal get ``boost``, the rest 1") and sets ``rollouts.token_weights``, which
the loss multiplies into the advantage (both signs, detached).
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torch.nn.functional import pad

from lightning_flow.flow import FlowConfig, answer_flow, attention_received, credit_weights, random_signal
from lightning_flow.flow.answer import answer_masks, piece_table
from lightning_flow.loggers import write_bucket_histogram
from lightning_flow.rollouts import RolloutCallback, Rollouts
from lightning_flow.step_scalars import batch_index, is_logging_step

Signal = Literal["flow", "uniform", "random", "entropy", "attention_received"]
_NEEDS_ATTENTION = {"flow", "attention_received"}


class FlowCredit(RolloutCallback):
    def __init__(
        self,
        signal: Signal = "flow",
        top_fraction: float = 0.4,
        boost: float = 1.5,
        layers: list[int] | None = None,
        sink_tokens: int = 1,
        max_in_degree: int | None = None,
        min_capacity: float = 1e-6,
        answer_fallback: Literal["last_token", "none"] = "last_token",
        seed: int = 0,
        solver_elements: int = 64 * 2**20,
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
            max_in_degree: keep only this many strongest incoming edges per token (None: all;
                the solver is dense, so pruning saves no time and only moves the flow, see
                ``FlowConfig``).
            min_capacity: drop edges whose attention is below this.
            solver_elements: the solver works on as many responses at a time as fit this many
                [n, T, T] elements (default 64M: 256 MB per float32 copy), bounding its memory.
            answer_fallback: where no ``\\boxed{}`` or ``####`` answer is found, use the last
                response token as the answer (``last_token``) or fall back to uniform (``none``).
            seed: seed of the ``random`` signal.
        """
        if not 0.0 <= top_fraction <= 1.0:
            raise ValueError(f"top_fraction={top_fraction}: expected a value in [0, 1]")
        self.signal, self.top_fraction, self.boost, self.layers = signal, top_fraction, boost, layers
        self.answer_fallback, self.solver_elements = answer_fallback, solver_elements
        self.flow_config = FlowConfig(sink_tokens=sink_tokens, max_in_degree=max_in_degree, min_capacity=min_capacity, top_fraction=top_fraction, boost=boost)
        self.generator = torch.Generator().manual_seed(seed)
        self._row_stats: list[dict[str, Tensor]] = []  # per micro-batch of the current step
        self._seconds = 0.0  # this step's time in on_credit
        self._pieces: tuple[object, list[str] | None] | None = None  # (tokenizer, its piece_table), made on first use

    def state_dict(self) -> dict:
        # The random signal's generator, so a resumed run draws what the uninterrupted one would.
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.generator.set_state(state_dict["generator"])

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.signal in _NEEDS_ATTENTION:
            pl_module.request_attention(self.layers)

    def on_credit(self, trainer: Trainer, pl_module: LightningModule, rollouts: Rollouts, rows: slice) -> None:
        start = time.perf_counter()
        with torch.inference_mode():  # cheaper dispatch than no_grad for these many small ops; outputs are only read
            weights, row_stats = self.compute(rollouts, rows, pl_module.tokenizer)
        rollouts.token_weights[rows] = weights[:, rollouts.prompt_ids.shape[1] :].to(rollouts.token_weights.dtype)
        self._row_stats.append(row_stats)
        self._seconds += time.perf_counter() - start

    def on_rollouts_end(self, trainer: Trainer, pl_module: LightningModule, rollouts: Rollouts) -> None:
        parts, seconds, self._row_stats, self._seconds = self._row_stats, self._seconds, [], 0.0
        stats = parts[0] if len(parts) == 1 else {key: torch.cat([part[key] for part in parts]) for key in parts[0]}  # [k] each, credited rows
        # Every count in one reduction and one read: a sum of a few rows costs as much as a large one.
        sums = dict(zip(stats, torch.stack(list(stats.values())).double().sum(dim=1).tolist()))
        credited, fallback = len(stats["fallback"]), sums["fallback"]
        # Fractions of the credited responses, summed over ranks before dividing (none logged on a step without any).
        pl_module.step_scalars.add_ratios({
            "credit/credited_fraction": (credited, len(rollouts)),
            "credit/answer_found_fraction": (sums["answer_found"], credited),
            "credit/fallback_fraction": (fallback, credited),
            "credit/nonfinite_attention_fraction": (sums["nonfinite"], credited),
            "credit/top_signal_share": (sums["top_share"], credited - fallback),  # 0 on fallback rows
            "credit/copy_fraction": (sums["copy"], credited),
        })
        pl_module.step_scalars.add({"credit/time_s": seconds})
        if credited and is_logging_step(trainer) and trainer.is_global_zero:
            # The weights this callback gave the credited responses' tokens, {weight: tokens}, from
            # the counts compute keeps: no pass over the weights.
            boosted, tokens = int(sums["boosted"]), int(sums["tokens"])
            experiment = getattr(trainer.logger, "experiment", None)
            write_bucket_histogram(experiment, "credit/weights", {1.0: tokens - boosted, self.boost: boosted}, batch_index(trainer))

    def piece_table(self, tokenizer) -> list[str] | None:
        """Each id's text decoded alone, made once per tokenizer (one batch decode of the vocabulary)."""
        if self._pieces is None or self._pieces[0] is not tokenizer:
            self._pieces = (tokenizer, piece_table(tokenizer))
        return self._pieces[1]

    def flow(self, maps: Tensor, valid: Tensor, prompt: Tensor, answer: Tensor) -> tuple[Tensor, Tensor]:
        """Throughput f [k, T] and degenerate flags [k] of the credited responses' ``maps``
        ([k, T, T]; masks [k, T]), solved a memory-bounded chunk of responses at a time."""
        chunk = max(1, self.solver_elements // valid.shape[1] ** 2)
        parts = [
            answer_flow(maps[rows], valid[rows], prompt[rows], answer[rows], self.flow_config)
            for rows in (slice(i, i + chunk) for i in range(0, len(valid), chunk))
        ]
        if len(parts) == 1:  # the usual case: no concatenation copies
            return parts[0].flow, parts[0].degenerate
        return torch.cat([p.flow for p in parts]), torch.cat([p.degenerate for p in parts])

    def compute(self, rollouts: Rollouts, rows: slice, tokenizer) -> tuple[Tensor, dict[str, Tensor]]:
        """Weights over all positions [n, T] of ``rows``, and stats of its credited rows ([k] each:
        ``answer_found``, ``fallback``, ``nonfinite`` attention, ``top_share`` of the signal carried
        by the boosted tokens, counts of ``boosted`` and all response ``tokens``, and ``copy``: the
        row took an earlier identical row's results).

        Only responses with a nonzero advantage are credited: the loss multiplies the weights into
        the advantage, so a zero advantage (a group whose rewards were all equal) cancels any
        weights. Those rows keep weight 1 and skip the answer search and the signal. For the
        signals that read attention, a credited row whose tokens repeat an earlier credited row's
        (``rollouts.first_copy``) takes that row's weights and stats instead of being solved again.
        Reads ``rollouts.attention`` (flow, attention_received) or ``rollouts.entropy`` (entropy) of the credited rows.
        """
        prompt_length = rollouts.prompt_ids.shape[1]
        device = rollouts.completion_ids.device
        # Identical tokens give an identical map, hence identical credit: each is solved once, and a
        # copy (its first copy is a credited row of the same micro-batch) takes that row's results.
        local, picked, copy_of, is_copy = rollouts.credited_rows(rows, follow_copies=self.signal in _NEEDS_ATTENTION)  # [k], [s], [k] or None, [k]
        first, stop, _ = rows.indices(len(rollouts))
        weights = torch.ones(stop - first, prompt_length + rollouts.completion_ids.shape[1], device=device)  # [n, T]
        if not len(local):
            nothing = torch.zeros(0, dtype=torch.bool, device=device)
            count = torch.zeros(0, dtype=torch.long, device=device)
            return weights, {"answer_found": nothing, "fallback": nothing, "nonfinite": nothing, "top_share": torch.zeros(0, device=device), "boosted": count, "tokens": count, "copy": nothing}
        kept = rollouts.completion_mask[picked]  # [k, L]
        in_response = kept != 0  # [k, L]
        fallback = ~in_response.any(dim=1)  # [k] empty responses; flow adds its own degenerate cases
        # The completions were decoded before mask_truncated_completions may have emptied a row.
        texts = [rollouts.completions[i] if not empty else "" for i, empty in zip(picked.tolist(), fallback.tolist())]
        answer, source = answer_masks(tokenizer, rollouts.completion_ids[picked], kept, self.answer_fallback, texts=texts, pieces=self.piece_table(tokenizer))
        # [k, T] masks over prompt + response positions
        prompt = pad(rollouts.prompt_mask[picked] != 0, (0, in_response.shape[1]))
        response = pad(in_response, (prompt_length, 0))
        valid = prompt | response
        answer_full = pad(answer, (prompt_length, 0))
        maps = rollouts.attention[picked] if self.signal in _NEEDS_ATTENTION else None  # [k, T, T]

        if self.signal == "flow":
            signal, degenerate = self.flow(maps, valid, prompt, answer_full)
            fallback = fallback | degenerate  # degenerate: also no answer found
        elif self.signal == "attention_received":
            signal = attention_received(maps, valid)
        elif self.signal == "entropy":
            signal = torch.zeros(valid.shape, device=device)
            signal[:, prompt_length:] = rollouts.entropy[picked]
        elif self.signal == "random":
            signal = random_signal(valid, self.generator).to(device)
        else:  # uniform: every token keeps weight 1, whatever top_fraction says
            signal = torch.ones(valid.shape, device=device)
            fallback = torch.ones_like(fallback)
        if maps is not None:  # [k] maps with a NaN/inf (an overflowing forward): uniform weights
            # One reduction over the maps (a sum is non-finite iff an entry is; the maps sum to at most T).
            nonfinite = ~torch.isfinite(maps.sum(dim=(1, 2)))
            fallback = fallback | nonfinite
        else:
            nonfinite = torch.zeros_like(fallback)
        credited = credit_weights(signal, response, self.top_fraction, self.boost, fallback)  # [k, T]
        if copy_of is not None:  # every credited row, copies included, gets its first copy's results
            signal, response, credited, fallback, nonfinite, source = (
                value[copy_of] for value in (signal, response, credited, fallback, nonfinite, source)
            )
        weights[local] = credited

        top = (credited != 1) & response  # the boosted tokens (a boost below 1 too)
        share = (signal * top).sum(dim=1) / (signal * response).sum(dim=1).clamp(min=1e-12)  # [k]
        share = torch.where(fallback, 0.0, share)  # nothing boosted there (and a non-finite signal stays out of the sum)
        stats = {
            "answer_found": source < 2, "fallback": fallback, "nonfinite": nonfinite, "top_share": share,
            "boosted": top.sum(dim=1), "tokens": response.sum(dim=1),  # for the weight histogram
            "copy": is_copy,  # took an earlier identical row's results
        }
        return weights, stats
