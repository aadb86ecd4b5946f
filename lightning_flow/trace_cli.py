"""``python -m lightning_flow trace``: trace the flow of a response and write HTML, PNG and JSON.

    python -m lightning_flow trace --model artifacts/demo-policy --prompt $'3+4-2\\n' --gold 5
    python -m lightning_flow trace --model M --prompt "..." --response "... \\boxed{5}"
    python -m lightning_flow trace --model M --adapter runs/demo/version_0/adapter --jsonl rows.jsonl
    python -m lightning_flow trace --config trace.yaml          # the same options from a file
    python -m lightning_flow trace --model M --print_config      # every option, resolved

Without ``--response`` the model writes one (greedy, or sampled with ``--temperature``). A JSONL
has one object per line with ``prompt`` and optional ``response`` and ``gold``. For every
response ``<out_dir>/<name>.html``, ``.png`` and ``.json`` are written (``<name>-<row>`` with a
JSONL). See docs/trace.md.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from lightning_flow.console import OneLineErrors
from lightning_flow.engines.hf import HFEngine
from lightning_flow.policy import PolicyConfig, SamplingConfig, eos_token_ids, load_policy
from lightning_flow.render import RenderConfig, save_png
from lightning_flow.render_html import html_page
from lightning_flow.rewards import correctness_reward
from lightning_flow.tokenizer import load_tokenizer
from lightning_flow.trace import Trace, TraceConfig, trace_ids

log = logging.getLogger(__name__)


@dataclass
class TraceCommand:
    """What to trace and where to write it."""

    model: str
    """Hub id or folder of the causal LM (the base model when an adapter is given)."""
    adapter: str | None = None
    """Folder of a peft LoRA adapter to apply (e.g. runs/<name>/version_<n>/adapter)."""
    prompt: str | None = None
    """Prompt text exactly as the model sees it (use chat_template to wrap a question)."""
    response: str | None = None
    """Response text; None lets the model generate one."""
    gold: str | None = None
    """Gold answer: shown, and the response is scored against it."""
    jsonl: str | None = None
    """A JSONL of {"prompt", "response"?, "gold"?} rows, instead of prompt/response/gold."""
    chat_template: bool = False
    """Wrap the prompt as a user message in the tokenizer's chat template."""
    max_new_tokens: int = 256
    """Longest generated response."""
    temperature: float = 0.0
    """0 generates greedily; above 0 samples at this temperature."""
    seed: int = 0
    """Seed of sampled generation."""
    dtype: str = "float32"
    """Model weight dtype: float32, bfloat16 or float16."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when there is one)."""
    out_dir: str = "traces"
    """Folder the files are written to."""
    name: str = "trace"
    """File stem of the outputs."""
    overwrite: bool = False
    """Replace outputs that already exist (otherwise the command stops before loading the model)."""
    flow: TraceConfig = field(default_factory=TraceConfig)
    """Flow graph and credit options (as FlowCredit takes them)."""
    render: RenderConfig = field(default_factory=RenderConfig)
    """Picture options."""


class TraceParser(OneLineErrors, ArgumentParser):
    pass


def parser(prog: str = "python -m lightning_flow trace") -> ArgumentParser:
    # the option help comes from the docstrings above
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    p = TraceParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--config", action=ActionConfigFile, help="YAML with any of the options below")
    p.add_class_arguments(TraceCommand, as_group=False)
    return p


def load_rows(cmd: TraceCommand) -> list[dict[str, Any]]:
    """The examples to trace: the JSONL's rows, or the one given on the command line."""
    if cmd.jsonl is None:
        if cmd.prompt is None:
            raise ValueError("give --prompt (with an optional --response) or --jsonl")
        return [{"prompt": cmd.prompt, "response": cmd.response, "gold": cmd.gold}]
    rows = []
    for number, line in enumerate(Path(cmd.jsonl).read_text().splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{cmd.jsonl}:{number}: expected an object with a string 'prompt'")
            rows.append(row)
    return rows


def prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """Token ids of the prompt, with special tokens as the DataModules add them."""
    if chat:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(prompt, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def write(trace: Trace, out_dir: Path, stem: str, cfg: RenderConfig) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"{stem}.{kind}" for kind in ("html", "png", "json")}
    paths["html"].write_text(html_page(trace, cfg), encoding="utf-8")
    save_png(trace, paths["png"], cfg)
    paths["json"].write_text(trace.to_json(), encoding="utf-8")
    return paths


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def respond(
    model: torch.nn.Module, tokenizer: Any, ids: list[int], cmd: TraceCommand, eos: list[int], seed: int
) -> list[int]:
    """One response of the model to the prompt ids, up to and including its first EOS."""
    device = next(model.parameters()).device
    sampling = SamplingConfig(max_new_tokens=cmd.max_new_tokens, temperature=cmd.temperature or 1.0)
    prompt = torch.tensor([ids], device=device)  # [1, P]
    seeds = None if cmd.temperature == 0 else torch.tensor([seed])  # the response's own sampling seed
    out = HFEngine(sampling, tokenizer.pad_token_id, eos)(model, prompt, torch.ones_like(prompt), 1, seeds)
    return out.ids[0, : int(out.mask.sum())].tolist()


def output_stems(cmd: TraceCommand, rows: int) -> list[str]:
    return [cmd.name] if cmd.jsonl is None else [f"{cmd.name}-{index:03d}" for index in range(rows)]


def refuse_overwriting(cmd: TraceCommand, rows: int) -> None:
    """Stop before any work when an output exists and ``--overwrite`` was not given."""
    existing = [
        Path(cmd.out_dir) / f"{stem}.{kind}"
        for stem in output_stems(cmd, rows)
        for kind in ("html", "png", "json")
        if (Path(cmd.out_dir) / f"{stem}.{kind}").exists()
    ]
    if existing and not cmd.overwrite:
        raise FileExistsError(
            f"{existing[0]} exists ({len(existing)} output files in all); pass --overwrite, "
            "or another --name or --out_dir"
        )


def run(cmd: TraceCommand) -> list[dict[str, Path]]:
    """Load the model once, trace every row, write its files; returns their paths per row."""
    rows = load_rows(cmd)
    refuse_overwriting(cmd, len(rows))
    tokenizer = load_tokenizer(cmd.model)
    model = (
        load_policy(PolicyConfig(cmd.model, dtype=cmd.dtype, adapter_path=cmd.adapter))
        .to(pick_device(cmd.device))
        .eval()
    )
    eos = eos_token_ids(model, tokenizer)
    title = cmd.model + (f" + {cmd.adapter}" if cmd.adapter else "")
    written = []
    for index, row in enumerate(rows):
        ids = prompt_ids(tokenizer, row["prompt"], cmd.chat_template)
        generated = row.get("response") is None
        if generated:
            response_ids = respond(model, tokenizer, ids, cmd, eos, cmd.seed + index)
        else:
            response_ids = tokenizer(row["response"], add_special_tokens=False).input_ids
        stem = output_stems(cmd, len(rows))[index]
        meta: dict[str, Any] = {
            "title": f"{stem}: {title}",
            "response": "generated" if generated else "given",
        }
        trace = trace_ids(model, tokenizer, ids, response_ids, cmd.flow, eos, meta)
        if row.get("gold") is not None:
            gold = str(row["gold"])
            trace.meta["gold"] = gold
            trace.meta["correct"] = correctness_reward(
                prompts=[row["prompt"]], completions=[trace.response], golds=[gold]
            )[0]
        written.append(write(trace, Path(cmd.out_dir), stem, cmd.render))
        log.info("wrote %s", ", ".join(str(p) for p in written[-1].values()))
    return written


def main(
    argv: list[str] | None = None, prog: str = "python -m lightning_flow trace"
) -> list[dict[str, Path]]:
    p = parser(prog)
    config = p.parse_args(argv)
    init = p.instantiate(config)
    cmd = TraceCommand(**{f.name: init[f.name] for f in fields(TraceCommand)})
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    written = run(cmd)
    for paths in written:
        print(*(str(path) for path in paths.values()))
    return written
