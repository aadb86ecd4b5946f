"""See the reasoning flow in TensorBoard: a completions table, flow pictures and flow histograms.

Listed under ``trainer.callbacks``; it runs after the step's update, so the weights it draws are
the ones the loss used. On logging steps only (``rollouts.step % every_n_steps == 0``) and only with a TensorBoard
logger, it writes

* ``flow/completions`` (text): the best and the worst response of a few groups, with prompt,
  extracted and gold answer, each reward function, total reward and advantage;
* ``flow/picture_<j>`` (images): those responses' token strips coloured by throughput, with final
  weights, answer tokens and backbone arcs (``lightning_flow.render``);
* ``flow/values`` and ``flow/token_weights`` (histograms) and ``flow/top_share`` (scalar: share of
  a response's flow carried by its top 10 % of tokens, mean over responses);
* ``perf/flow_pictures_time_s``: what all of this cost on that step.

The attention comes from ``rollouts.attention`` when a callback requested it (FlowCredit does);
otherwise one capture pass runs over the drawn responses only (with the weights after the
update). Other steps cost nothing.
"""

from __future__ import annotations

import html
import time
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lightning_flow.capture import capture_attention, default_capture_layers
from lightning_flow.flow import answer_flow
from lightning_flow.flow.answer import answer_masks
from lightning_flow.policy import position_ids_from_mask
from lightning_flow.render import RenderConfig, png_array
from lightning_flow.rewards import extract_answer_text
from lightning_flow.rollouts import RolloutCallback, Rollouts
from lightning_flow.trace import Trace, TraceConfig, flow_concentration, trace_from_attention


def pick_rows(total_rewards: Tensor, group: int, groups: int, nonempty: Tensor) -> list[tuple[int, str]]:
    """Best and worst response of up to ``groups`` groups, groups whose rewards differ first.

    total_rewards  # [N] groups are contiguous runs of ``group`` rows
    nonempty       # [N] bool, rows with at least one response token (others are never picked)
    Returns (row, "best" | "worst") pairs. Ties go to the earlier row for the best and the later
    row for the worst, so an all-equal group still shows two different responses.
    """
    rewards = total_rewards.view(-1, group)  # [N / G, G]
    usable = nonempty.view(-1, group)  # [N / G, G]
    spread = (rewards.amax(1) - rewards.amin(1)) > 0  # [N / G]
    order = sorted(range(rewards.shape[0]), key=lambda g: (not bool(spread[g]), g))
    rows: list[tuple[int, str]] = []
    for g in [g for g in order if usable[g].any()][:groups]:
        members = [j for j in range(group) if usable[g, j]]
        best = max(members, key=lambda j: (float(rewards[g, j]), -j))
        worst = min(members, key=lambda j: (float(rewards[g, j]), -j))
        rows += [(g * group + best, "best")] + ([(g * group + worst, "worst")] if worst != best else [])
    return rows


def _cell(text: str | None, limit: int) -> str:
    """Text made safe for one markdown table cell, cut in the middle to ``limit`` characters."""
    if text is None:
        return "—"
    if len(text) > limit:
        text = text[: limit // 2] + " … " + text[-(limit - limit // 2) :]
    text = html.escape(text).replace("\n", "↵ ")
    return "".join("\\" + c if c in "\\`*_{}[]#+!|" else c for c in text)


def completions_table(rollouts: Rollouts, rows: list[tuple[int, str]], reward_names: list[str], group: int, limit: int = 600) -> str:
    """Markdown table (TensorBoard's text plugin renders it) of the given (row, label) pairs."""
    head = ["row", "group", "pick", "prompt", "response", "extracted", "gold", *reward_names, "total", "advantage"]
    lines = ["| " + " | ".join(_cell(h, 80) for h in head) + " |", "|" + "---|" * len(head)]
    for row, label in rows:
        completion = rollouts.completions[row]
        cells = [str(row), str(row // group), label, _cell(rollouts.prompts[row], 80), _cell(completion, limit),
                 _cell(extract_answer_text(completion), 80), _cell(rollouts.golds[row], 80),
                 *(f"{float(v):.3g}" for v in rollouts.rewards[row]), f"{float(rollouts.total_rewards[row]):.3g}",
                 f"{float(rollouts.advantages[row]):+.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class FlowPictures(RolloutCallback):
    def __init__(
        self,
        every_n_steps: int | None = None,
        groups: int = 2,
        pictures: int = 2,
        trace: TraceConfig = TraceConfig(),
        render: RenderConfig = RenderConfig(font_size=8.0, dpi=90),
        max_response_chars: int = 600,
        solver_elements: int = 64 * 2**20,
    ) -> None:
        """
        Args:
            every_n_steps: log on steps where ``rollouts.step % every_n_steps == 0`` (default:
                the trainer's ``log_every_n_steps``); nothing runs on other steps.
            groups: groups shown in the table (best and worst response of each).
            pictures: flow pictures per logging step (the first rows of the table).
            trace: flow graph and answer options; use FlowCredit's so the pictures show its flow
                (``trace.layers`` only matters when no attention was captured for the step).
            render: picture options.
            max_response_chars: longer responses are cut in the middle in the table.
            solver_elements: the step's flow is solved on as many responses at a time as fit
                this many [n, T, T] elements.
        """
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: must be >= 1 or None")
        self.every_n_steps, self.groups, self.pictures = every_n_steps, groups, pictures
        self.trace_config, self.render_config = trace, render
        self.max_response_chars, self.solver_elements = max_response_chars, solver_elements
        self.last_cost_s: float | None = None  # cost of the latest logging step, for benchmarks

    def is_logging_step(self, trainer: Trainer, step: int) -> bool:
        return step % (self.every_n_steps or trainer.log_every_n_steps) == 0

    def on_rollouts_end(self, trainer: Trainer, pl_module: LightningModule, rollouts: Rollouts) -> None:
        writer = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if not self.is_logging_step(trainer, rollouts.step) or not all(hasattr(writer, f) for f in ("add_text", "add_image", "add_histogram")):
            return
        if not trainer.is_global_zero:
            return
        start, step = time.perf_counter(), rollouts.step
        group = pl_module.sampling.num_generations
        nonempty = rollouts.completion_mask.sum(1) > 0  # [N]
        rows = pick_rows(rollouts.total_rewards.cpu(), group, self.groups, nonempty.cpu())
        writer.add_text("flow/completions", completions_table(rollouts, rows, pl_module.reward_suite.names, group, self.max_response_chars), step)

        drawn = [row for row, _ in rows[: self.pictures]]
        # The rows the step recorded (with FlowCredit: those with a nonzero advantage); the drawn
        # rows it did not record are captured here, with the same layers.
        recorded = [] if rollouts.attention is None else rollouts.attention_recorded.nonzero().squeeze(1).tolist()
        if recorded:
            layers = pl_module.attention_layers
        else:
            layers = self.trace_config.layers or pl_module.attention_layers or default_capture_layers(pl_module.policy.config.num_hidden_layers)
        attention = {row: rollouts.attention[row] for row in recorded}
        missing = [row for row in drawn if row not in attention]
        if missing:
            mask = rollouts.attention_mask[missing]  # [n, T]
            captured = capture_attention(pl_module.policy, rollouts.input_ids[missing], mask, layers, position_ids=position_ids_from_mask(mask))
            attention.update(zip(missing, captured))
        stat_rows = sorted(attention)  # stats over every row with a map
        for j, (row, label) in enumerate(rows[: self.pictures]):
            meta = {"title": f"step {step} · row {row} ({label} of group {row // group})",
                    "reward": f"{float(rollouts.total_rewards[row]):.3g}", "advantage": f"{float(rollouts.advantages[row]):+.3f}",
                    "gold": rollouts.golds[row]}
            trace = self.row_trace(rollouts, row, attention[row], pl_module, layers, meta)
            writer.add_image(f"flow/picture_{j}", png_array(trace, self.render_config), step, dataformats="HWC")

        weights = rollouts.token_weights[rollouts.completion_mask > 0]  # [tokens]
        writer.add_histogram("flow/token_weights", weights.float().cpu(), step)
        if stat_rows:
            flow, response, degenerate = self.step_flow(rollouts, stat_rows, attention, pl_module)
            ok = ~degenerate
            if ok.any():
                writer.add_histogram("flow/values", flow[response & ok[:, None]].float().cpu(), step)
                share = flow_concentration(flow[ok], response[ok], self.trace_config.concentration_fraction)
                writer.add_scalar("flow/top_share", float(share.nanmean()), step)
        self.last_cost_s = time.perf_counter() - start
        writer.add_scalar("perf/flow_pictures_time_s", self.last_cost_s, step)

    def row_trace(self, rollouts: Rollouts, row: int, attention: Tensor, pl_module: LightningModule, layers: list[int] | None, meta: dict[str, Any]) -> Trace:
        """The trace of one rollout row, padding removed, with the weights that reach the loss.  attention  # [T, T]"""
        keep = rollouts.attention_mask[row].bool()  # [T]
        response = rollouts.completion_mask[row] > 0  # [L]
        weights = rollouts.token_weights[row][response]  # [L']
        return trace_from_attention(
            attention[keep][:, keep], rollouts.input_ids[row][keep], int(rollouts.prompt_mask[row].sum()), pl_module.tokenizer,
            self.trace_config, weights=weights, eos_token_ids=pl_module.eos_ids, layers=layers, meta=meta,
        )

    def step_flow(self, rollouts: Rollouts, rows: list[int], attention: dict[int, Tensor], pl_module: LightningModule) -> tuple[Tensor, Tensor, Tensor]:
        """Throughput f [n, T], response mask [n, T] and degenerate flags [n] of ``rows``, solved in memory-bounded chunks."""
        valid = rollouts.attention_mask[rows].bool()  # [n, T]
        p = rollouts.prompt_ids.shape[1]
        prompt = valid.clone()
        prompt[:, p:] = False
        answer, _ = answer_masks(pl_module.tokenizer, rollouts.completion_ids[rows], rollouts.completion_mask[rows],
                                 self.trace_config.answer_fallback, pl_module.eos_ids)
        answer_full = torch.zeros_like(valid)
        answer_full[:, p:] = answer.to(valid.device)
        chunk = max(1, self.solver_elements // valid.shape[1] ** 2)
        cfg = self.trace_config.flow_config()
        parts = []
        for i in range(0, len(rows), chunk):
            part = rows[i : i + chunk]
            maps = torch.stack([attention[r] for r in part])  # [n, T, T]
            parts.append(answer_flow(maps, valid[i : i + chunk], prompt[i : i + chunk], answer_full[i : i + chunk], cfg))
        flow, degenerate = torch.cat([r.flow for r in parts]), torch.cat([r.degenerate for r in parts])
        return flow, valid & ~prompt, degenerate
