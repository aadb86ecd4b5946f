"""See the reasoning flow in TensorBoard: a completions table, flow pictures and flow histograms.

Listed under ``trainer.callbacks``; it runs after the step's update, so the weights it draws are
the ones the loss used. On logging steps only (``step_scalars.is_logging_step``, the rule of every
scalar) and only with a TensorBoard logger, it writes

* ``flow/completions`` (text): the best and the worst response of a few groups, with prompt,
  extracted and gold answer, each reward function, total reward and advantage;
* ``flow/picture_<j>`` (images): those responses' token strips coloured by throughput, with final
  weights, answer tokens and backbone arcs (``lightning_flow.render``);
* ``flow/values`` and ``flow/token_weights`` (histograms) and ``flow/top_share`` (scalar: share of
  a response's flow carried by its top 10 % of tokens, mean over responses);
* ``perf/flow_pictures_time_s``: what all of this cost on that step.

The flow comes from the graphs ``FlowCredit`` solved this step (``rollouts.flow_graphs``), so the
pictures show exactly what was credited; a drawn response without one (plain GRPO, or a group
whose rewards were all equal) gets one capture pass and its graph here, with this callback's
``trace`` options (after the update). Other steps cost nothing.
"""

from __future__ import annotations

import html
import time
from typing import Any

import torch
from lightning.pytorch import Trainer
from torch import Tensor
from torch_geometric.utils import to_dense_batch

from lightning_flow.capture import capture_attention, default_capture_layers
from lightning_flow.flow import ROLE_PROMPT, answer_flow
from lightning_flow.flow.answer import answer_masks
from lightning_flow.policy import position_ids_from_mask
from lightning_flow.render import RenderConfig, png_array
from lightning_flow.rewards import extract_answer_text
from lightning_flow.rollouts import RolloutCallback, Rollouts, StepModule
from lightning_flow.step_scalars import batch_index, is_logging_step
from lightning_flow.trace import Trace, TraceConfig, flow_concentration, trace_from_graph


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


def completions_table(
    rollouts: Rollouts, rows: list[tuple[int, str]], reward_names: list[str], group: int, limit: int = 600
) -> str:
    """Markdown table (TensorBoard's text plugin renders it) of the given (row, label) pairs."""
    head = [
        "row",
        "group",
        "pick",
        "prompt",
        "response",
        "extracted",
        "gold",
        *reward_names,
        "total",
        "advantage",
    ]
    lines = ["| " + " | ".join(_cell(h, 80) for h in head) + " |", "|" + "---|" * len(head)]
    for row, label in rows:
        completion = rollouts.completions[row]
        cells = [
            str(row),
            str(row // group),
            label,
            _cell(rollouts.prompts[row], 80),
            _cell(completion, limit),
            _cell(extract_answer_text(completion), 80),
            _cell(rollouts.golds[row], 80),
            *(f"{float(v):.3g}" for v in rollouts.rewards[row]),
            f"{float(rollouts.total_rewards[row]):.3g}",
            f"{float(rollouts.advantages[row]):+.3f}",
        ]
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
    ) -> None:
        """
        Args:
            every_n_steps: log every this many training batches, counted as Lightning counts for
                ``self.log`` (default: the trainer's ``log_every_n_steps``); nothing runs on other steps.
            groups: groups shown in the table (best and worst response of each).
            pictures: flow pictures per logging step (the first rows of the table).
            trace: flow graph and answer options for responses FlowCredit did not credit (the
                credited ones are drawn from its graphs), and what a picture shows.
            render: picture options.
            max_response_chars: longer responses are cut in the middle in the table.
        """
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: must be >= 1 or None")
        self.every_n_steps, self.groups, self.pictures = every_n_steps, groups, pictures
        self.trace_config, self.render_config = trace, render
        self.max_response_chars = max_response_chars
        self.last_cost_s: float | None = None  # cost of the latest logging step, for benchmarks

    def on_rollouts_end(self, trainer: Trainer, pl_module: StepModule, rollouts: Rollouts) -> None:
        writer = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if not is_logging_step(trainer, self.every_n_steps) or not all(
            hasattr(writer, f) for f in ("add_text", "add_image", "add_histogram")
        ):
            return
        if not trainer.is_global_zero:
            return
        start, step = time.perf_counter(), batch_index(trainer)  # the axis of every logged scalar
        group = pl_module.group_size
        nonempty = rollouts.completion_mask.sum(1) > 0  # [N]
        rows = pick_rows(rollouts.total_rewards.cpu(), group, self.groups, nonempty.cpu())
        writer.add_text(
            "flow/completions",
            completions_table(rollouts, rows, pl_module.reward_names, group, self.max_response_chars),
            step,
        )

        drawn = [row for row, _ in rows[: self.pictures]]
        graphs = {row: rollouts.flow_graph(row) for row in drawn}  # FlowCredit's, for the rows it credited
        missing = [row for row in drawn if graphs[row] is None]
        solved = [batch for _, batch in rollouts.flow_graphs]
        if missing:
            solved.append(self.solve_rows(rollouts, missing, pl_module))
            graphs.update(zip(missing, solved[-1].to_data_list()))
        for j, (row, label) in enumerate(rows[: self.pictures]):
            meta = {
                "title": f"step {step} · row {row} ({label} of group {row // group})",
                "reward": f"{float(rollouts.total_rewards[row]):.3g}",
                "advantage": f"{float(rollouts.advantages[row]):+.3f}",
                "gold": rollouts.golds[row],
            }
            layers = self.trace_layers(pl_module) if row in missing else pl_module.attention_layers
            trace = self.row_trace(rollouts, row, graphs[row], pl_module, layers, meta)
            writer.add_image(
                f"flow/picture_{j}", png_array(trace, self.render_config), step, dataformats="HWC"
            )

        weights = rollouts.token_weights[rollouts.completion_mask > 0]  # [tokens]
        writer.add_histogram("flow/token_weights", weights.float().cpu(), step)
        values, shares = [], []  # over every response with a solved graph
        for batch in solved:
            flow, _ = to_dense_batch(batch.f, batch.batch)  # [G, V] node layout
            response, _ = to_dense_batch(batch.role != ROLE_PROMPT, batch.batch)  # [G, V]
            ok = ~batch.degenerate  # [G]
            values.append(flow[ok][response[ok]])
            shares.append(
                flow_concentration(flow[ok], response[ok], self.trace_config.concentration_fraction)
            )
        if values and torch.cat(values).numel():
            writer.add_histogram("flow/values", torch.cat(values).float().cpu(), step)
            writer.add_scalar("flow/top_share", float(torch.cat(shares).nanmean()), step)
        self.last_cost_s = time.perf_counter() - start
        writer.add_scalar("perf/flow_pictures_time_s", self.last_cost_s, step)

    def trace_layers(self, pl_module: StepModule) -> list[int]:
        """Layers captured for rows that credit did not record."""
        return (
            self.trace_config.layers
            or pl_module.attention_layers
            or default_capture_layers(pl_module.policy.config.num_hidden_layers)
        )

    def row_trace(
        self,
        rollouts: Rollouts,
        row: int,
        graph,
        pl_module: StepModule,
        layers: list[int] | None,
        meta: dict[str, Any],
    ) -> Trace:
        """The trace of one rollout row's solved graph, padding removed, with the weights that reach the
        loss."""
        keep = rollouts.attention_mask[row].bool()  # [T]
        response = rollouts.completion_mask[row] > 0  # [L]
        weights = rollouts.token_weights[row][response]  # [L']
        return trace_from_graph(
            graph,
            rollouts.input_ids[row][keep],
            pl_module.tokenizer,
            self.trace_config,
            weights=weights,
            eos_token_ids=pl_module.eos_ids,
            layers=layers,
            meta=meta,
        )

    def solve_rows(self, rollouts: Rollouts, rows: list[int], pl_module: StepModule):
        """Solved flow graphs (a Batch) of ``rows``, from one capture pass with this callback's options."""
        mask = rollouts.attention_mask[rows]  # [n, T]
        maps = capture_attention(
            pl_module.policy,
            rollouts.input_ids[rows],
            mask,
            self.trace_layers(pl_module),
            position_ids=position_ids_from_mask(mask),
        )
        valid = mask.bool()
        p = rollouts.prompt_ids.shape[1]
        prompt = valid.clone()
        prompt[:, p:] = False
        answer, _ = answer_masks(
            pl_module.tokenizer,
            rollouts.completion_ids[rows],
            rollouts.completion_mask[rows],
            self.trace_config.answer_fallback,
            pl_module.eos_ids,
        )
        answer_full = torch.zeros_like(valid)
        answer_full[:, p:] = answer.to(valid.device)
        cfg = self.trace_config.flow_config()
        return answer_flow(maps, valid, prompt, answer_full, cfg).graphs
