"""Flow traces of a real model's attention, their pictures and pages, and the trace command.

The numbers of a trace are checked against a plain float64 re-derivation of the method
(docs/method.md) from the same captured attention map, not against the solver that made them.
"""

from __future__ import annotations

import json
import re
import runpy
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from matplotlib.colors import to_rgba

from lightning_flow.capture import capture_attention, default_capture_layers
from lightning_flow.policy import PolicyConfig, load_policy
from lightning_flow.render import ANSWER_COLOUR, RenderConfig, figure, layout, png_bytes
from lightning_flow.render_html import html_page
from lightning_flow.tokenizer import load_tokenizer
from lightning_flow.trace import Trace, TraceConfig, expected_boosted, trace_ids
from lightning_flow.trace_cli import main as trace_main

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time, Lily had 3 apples."
RESPONSE = "She got 2 more. Now she has \\boxed{5} apples."


@pytest.fixture(scope="module")
def stories(stories260k):
    """(trace, attention [T, T], ids [T], prompt length) of a real prompt and response on stories260K."""
    model = load_policy(PolicyConfig(str(stories260k), lora_rank=4))
    tokenizer = load_tokenizer(str(stories260k))
    prompt_ids = tokenizer(PROMPT).input_ids
    response_ids = tokenizer(RESPONSE, add_special_tokens=False).input_ids
    trace = trace_ids(
        model, tokenizer, prompt_ids, response_ids, TraceConfig(), meta={"title": "stories260K"}
    )
    ids = torch.tensor([prompt_ids + response_ids])
    attention = capture_attention(
        model, ids, torch.ones_like(ids), default_capture_layers(model.config.num_hidden_layers)
    )[0]
    return trace, attention.double().numpy(), ids[0].tolist(), len(prompt_ids)


def plain_flow(attention: np.ndarray, p: int, answer: np.ndarray, sink: int = 1, min_capacity: float = 1e-6):
    """h (unscaled), f and edge flows [T, T] by the definitions, one token at a time, in float64."""
    t = len(attention)
    c = np.triu(attention.T, 1)  # c[i, k] = A[k, i] for i < k
    c[:sink] = 0.0
    c[c < min_capacity] = 0.0
    h = np.zeros(t)
    for i in reversed(range(t)):
        h[i] = 1.0 if answer[i] else c[i] @ h
    mu = np.where(np.arange(t) < p, h, 0.0) / h[:p].sum()
    w = np.zeros((t, t))
    sends = (~answer) & (h > 0)
    w[sends] = c[sends] * h[None, :] / h[sends, None]
    f = np.zeros(t)
    for k in range(t):
        f[k] = mu[k] + f[:k] @ w[:k, k]
    return h, f, f[:, None] * w


def test_trace_numbers_follow_the_method(stories):
    trace, attention, ids, p = stories
    t = len(ids)
    assert [tok.id for tok in trace.tokens] == ids and trace.prompt_length == p
    assert "".join(tok.text for tok in trace.tokens[:p]) == PROMPT and trace.response == RESPONSE
    answer = np.array([tok.role == "answer" for tok in trace.tokens])
    assert trace.answer_text == "5" and trace.answer_source == "boxed" and not trace.degenerate
    f = np.array([tok.f for tok in trace.tokens])
    assert abs(f[answer].sum() - 1.0) < 1e-5 and abs(trace.absorbed - 1.0) < 1e-5
    after = np.arange(t) > np.flatnonzero(answer).max()
    assert (
        after.sum() == 6
        and (f[after] == 0).all()
        and all(trace.tokens[j].h == 0 for j in np.flatnonzero(after))
    )

    h_ref, f_ref, edge_ref = plain_flow(attention, p, answer)
    np.testing.assert_allclose([tok.h for tok in trace.tokens], h_ref / h_ref.max(), atol=1e-5, rtol=1e-3)
    np.testing.assert_allclose(f, f_ref, atol=1e-5, rtol=1e-3)
    for tok in trace.tokens:  # strongest in/out edges are the largest entries of the column / row
        assert [e["source"] for e in tok.top_in] == [
            int(i) for i in np.argsort(-edge_ref[:, tok.position])[: len(tok.top_in)]
        ]
        assert [e["target"] for e in tok.top_out] == [
            int(k) for k in np.argsort(-edge_ref[tok.position])[: len(tok.top_out)]
        ]
        np.testing.assert_allclose(
            [e["flow"] for e in tok.top_out],
            np.sort(edge_ref[tok.position])[::-1][: len(tok.top_out)],
            atol=1e-6,
            rtol=1e-3,
        )
        assert len(tok.top_out) == min(3, int((edge_ref[tok.position] > 0).sum()))
    flat = np.sort(edge_ref.ravel())[::-1][:20]
    np.testing.assert_allclose([e["flow"] for e in trace.backbone], flat, atol=1e-6, rtol=1e-3)

    weights = np.array([tok.weight for tok in trace.tokens])
    assert (weights[:p] == 1).all() and set(weights[p:]) == {1.0, 1.5}
    boosted = weights > 1
    assert boosted.sum() == expected_boosted(trace) == round(0.4 * (t - p))
    assert f[boosted].min() >= f[p:][~boosted[p:]].max()  # the boost goes to the top of f
    top = max(1, int(np.ceil(0.1 * (t - p))))
    assert abs(trace.concentration - np.sort(f[p:])[::-1][:top].sum() / f[p:].sum()) < 1e-5


def test_json_round_trip(stories, tmp_path):
    trace = stories[0]
    path = tmp_path / "t.json"
    path.write_text(trace.to_json())
    assert Trace.from_dict(json.loads(path.read_text())) == trace


def overlaps(boxes: list) -> list[tuple[int, int]]:
    """Pairs of display boxes that share area (a sweep over x, boxes as (x0, y0, x1, y1))."""
    order = sorted(range(len(boxes)), key=lambda i: boxes[i][0])
    found, active = [], []
    for i in order:
        x0, y0, x1, y1 = boxes[i]
        active = [j for j in active if boxes[j][2] > x0]
        found += [(j, i) for j in active if boxes[j][1] < y1 and y0 < boxes[j][3]]
        active.append(i)
    return found


def token_boxes(fig) -> dict[int, tuple[float, float, float, float]]:
    renderer = fig.canvas.get_renderer()
    texts = [a for ax in fig.axes for a in ax.texts if (a.get_gid() or "").startswith("token-")]
    return {int(a.get_gid()[6:]): tuple(a.get_window_extent(renderer).extents) for a in texts}


def test_png_marks_the_answer_weights_and_backbone(stories):
    trace = stories[0]
    fig = figure(trace)
    fig.canvas.draw()
    boxes = token_boxes(fig)
    assert sorted(boxes) == list(range(len(trace.tokens)))
    assert not overlaps(list(boxes.values()))
    drawn = {c.get_gid(): c for c in fig.axes[0].collections}
    cells = [p.get_extents() for p in drawn["boxes"].get_paths()]  # one box per token, in position order
    answer_edge = np.isclose(drawn["boxes"].get_edgecolors(), to_rgba(ANSWER_COLOUR)).all(axis=1)
    assert answer_edge.tolist() == [t.role == "answer" for t in trace.tokens]
    bars = [p.get_extents() for p in drawn["weights"].get_paths()]  # under the boosted tokens, in order
    boosted = [t.position for t in trace.tokens if t.weight > 1]
    assert [(b.x0, b.x1) for b in bars] == [(cells[j].x0, cells[j].x1) for j in boosted]
    assert all(b.y0 >= cells[j].y1 for b, j in zip(bars, boosted))
    arcs = drawn["arcs"].get_paths()[::-1]  # strongest first, as in the backbone
    assert len(arcs) == min(20, len(trace.backbone))
    for arc, edge in zip(arcs, trace.backbone):  # each leaves its source's top and lands on its target's top
        for point, j in ((arc.vertices[0], edge["source"]), (arc.vertices[-1], edge["target"])):
            np.testing.assert_allclose(point, [(cells[j].x0 + cells[j].x1) / 2, cells[j].y0])
    assert png_bytes(trace).startswith(b"\x89PNG")


def test_layout_wraps_breaks_and_cuts_by_rule(stories):
    base = stories[0].tokens[1]
    texts = [
        ("ab", "prompt"),
        ("c\n", "response"),
        ("def", "response"),
        ("ghij", "response"),
        ("", "response"),
        ("数", "answer"),
    ]
    tokens = [replace(base, position=j, text=t, role=r, piece="</s>") for j, (t, r) in enumerate(texts)]
    cells = [(c.line, c.column, c.width, c.label) for c in layout(tokens, line_chars=8, max_token_chars=16)]
    # the response starts a line, a newline ends one, a token that does not fit moves down, an empty one shows
    # its
    # piece and a wide character takes two cells
    assert cells == [
        (0, 0, 2, "ab"),
        (1, 0, 2, "c↵"),
        (2, 0, 3, "def"),
        (2, 3, 4, "ghij"),
        (3, 0, 4, "</s>"),
        (3, 4, 2, "数"),
    ]
    long = replace(base, text="abcdefghijklmnopqrstuvwxyz")
    assert layout([long], line_chars=40, max_token_chars=16)[0].label == "abcdefghijklmno…"
    # never wider than half a line
    assert layout([long], line_chars=10, max_token_chars=16)[0].label == "abcd…"


def test_a_1000_token_response_wraps_without_overlapping_labels(stories):
    trace = stories[0]
    rng = np.random.default_rng(0)
    words = ["the", " answer", " is", "\n", " 12345678901234567890", "数", ",", " x", "{", "\t", ""]
    roles = ["prompt"] + ["response"] * 998 + ["answer"]
    tokens = [
        replace(
            trace.tokens[1], position=j, text=str(rng.choice(words)), role=roles[j], f=float(rng.random())
        )
        for j in range(1000)
    ]
    # 110 edges, 20 drawn
    edges = [{"source": int(i), "target": 999, "flow": 1.0 / (i + 1)} for i in range(0, 990, 9)]
    long = replace(trace, tokens=tokens, backbone=edges)
    cfg = RenderConfig(line_chars=100, dpi=40)
    fig = figure(long, cfg)
    fig.canvas.draw()
    boxes = token_boxes(fig)
    assert len(boxes) == 1000 and not overlaps(list(boxes.values()))
    strip = fig.axes[0]
    assert max(b[2] for b in boxes.values()) <= strip.get_window_extent().x1  # nothing runs off the line
    assert len(next(c for c in strip.collections if c.get_gid() == "arcs").get_paths()) == 20


def test_html_is_self_contained_and_carries_the_trace(stories):
    trace = stories[0]
    page = html_page(trace)
    assert not re.search(r"https?:|//[a-z]|\bsrc=|\bhref=|url\(|@import|<link|<iframe|<img", page, re.I)
    data = re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', page, re.S).group(1)
    assert Trace.from_dict(json.loads(data)) == trace
    spans = re.findall(r'<span class="tok ([a-z ]+)" data-i="(\d+)"', page)
    assert [int(i) for _, i in spans] == list(range(len(trace.tokens)))
    assert [int(i) for c, i in spans if "answer" in c.split()] == [
        t.position for t in trace.tokens if t.role == "answer"
    ]
    assert [int(i) for c, i in spans if "boosted" in c.split()] == [
        t.position for t in trace.tokens if t.weight > 1
    ]


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="headless Chromium (Debian package chromium) is not installed"
)
def test_chromium_draws_the_backbone_and_the_hover(stories, tmp_path):
    trace = stories[0]
    page = tmp_path / "trace.html"
    page.write_text(html_page(trace), encoding="utf-8")
    answer = next(t.position for t in trace.tokens if t.role == "answer")
    shot = subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "screenshot_trace.sh"),
            str(page),
            str(tmp_path / "shot.png"),
            "1000",
            "500",
            str(answer),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.returncode == 0, shot.stderr
    assert (tmp_path / "shot.png").read_bytes().startswith(b"\x89PNG")
    dom = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=3000",
            "--dump-dom",
            f"file://{page}#hover={answer}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    # the script drew the backbone
    assert len(re.findall(r'<path class="bb"', dom)) == min(20, len(trace.backbone))
    assert len(re.findall(r'<path class="in"', dom)) == len(trace.tokens[answer].top_in)
    tip = re.search(r'<div id="tip"[^>]*>(.*?)</div>', dom, re.S).group(1)
    assert f"#{answer}  answer" in tip and f"f {trace.tokens[answer].f:.4g}"[:6] in tip


def test_trace_command_on_stories260k_from_a_config_file(stories, stories260k, tmp_path):
    config = tmp_path / "trace.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(stories260k),
                "prompt": PROMPT,
                "response": RESPONSE,
                "gold": "5",
                "out_dir": str(tmp_path / "out"),
                "flow": {"top_edges": 3},
            }
        )
    )
    [paths] = trace_main(["--config", str(config), "--name", "lily"])
    assert sorted(p.name for p in paths.values()) == ["lily.html", "lily.json", "lily.png"]
    written = Trace.from_dict(json.loads(paths["json"].read_text()))
    expected = stories[0]
    assert [t.id for t in written.tokens] == [t.id for t in expected.tokens]
    np.testing.assert_allclose([t.f for t in written.tokens], [t.f for t in expected.tokens], atol=1e-6)
    assert (
        written.meta["gold"] == "5" and written.meta["correct"] == 1.0 and written.meta["response"] == "given"
    )
    assert paths["png"].read_bytes().startswith(b"\x89PNG") and "trace-data" in paths["html"].read_text()


def test_trace_command_generates_and_reads_jsonl(tiny_policy_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"prompt": "3+4-2\\n", "gold": "5"}\n\n{"prompt": "1+1\\n", "response": "1+1=2. \\\\boxed{2}"}\n'
    )
    written = trace_main(
        [
            "--model",
            str(tiny_policy_dir),
            "--jsonl",
            str(rows),
            "--max_new_tokens",
            "12",
            "--out_dir",
            str(tmp_path),
        ]
    )
    assert [p["json"].name for p in written] == ["trace-000.json", "trace-001.json"]
    first, second = (Trace.from_dict(json.loads(p["json"].read_text())) for p in written)
    assert (
        first.meta["response"] == "generated"
        and first.prompt == "3+4-2\n"
        and 0 < len(first.tokens) - first.prompt_length <= 12
    )
    assert (
        second.response == "1+1=2. \\boxed{2}"
        and second.answer_text == "2"
        and abs(second.absorbed - 1) < 1e-5
    )
    # Run again: the outputs exist, so it stops before loading the model and names the first one.
    before = written[0]["json"].read_bytes()
    with pytest.raises(
        FileExistsError, match=r"trace-000.html exists \(6 output files in all\); pass --overwrite"
    ):
        trace_main(["--model", str(tiny_policy_dir), "--jsonl", str(rows), "--out_dir", str(tmp_path)])
    assert written[0]["json"].read_bytes() == before


def test_module_entry_point_dispatches_trace(monkeypatch, capsys):
    """``python -m lightning_flow trace ...`` reaches the trace parser (run in-process: no second interpreter
    start)."""
    monkeypatch.setattr(
        sys,
        "argv",
        ["lightning_flow", "trace", "--model", "some/model", "--flow.boost", "2", "--print_config"],
    )
    with pytest.raises(SystemExit) as done:
        runpy.run_module("lightning_flow", run_name="__main__")
    assert done.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert (
        config["model"] == "some/model" and config["flow"]["boost"] == 2.0 and config["render"]["arcs"] == 20
    )
