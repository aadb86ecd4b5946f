"""A flow trace as one self-contained HTML page: inline CSS, inline JS, inline SVG, no URLs.

The token strip uses ``render.layout`` (the same lines as the PNG) and ``render.token_colours``.
Hovering a token shows its h, f, weight and strongest incoming and outgoing edge flows, and draws
those edges; the backbone is drawn as arcs over the strip by a few lines of script once the
browser has laid the text out (and again on resize). The trace's numbers are embedded as JSON in
``<script type="application/json" id="trace-data">`` so the page is also a data file.
"""

from __future__ import annotations

import html
import json

import matplotlib
from matplotlib.colors import to_hex

from lightning_flow.render import (
    ANSWER_COLOUR,
    ARC_COLOUR,
    BOOST_COLOUR,
    CMAP,
    DEAD_COLOUR,
    RenderConfig,
    flow_norm,
    layout,
    summary,
    token_colours,
)
from lightning_flow.trace import Trace

_CSS = f"""
body {{ font-family: system-ui, sans-serif; margin: 18px; color: #222; }}
h1 {{ font-size: 18px; margin: 0 0 4px; }}
.summary {{ color: #444; margin-bottom: 8px; }}
.meta td {{ padding: 0 12px 0 0; font-size: 13px; }}
.legend {{ display: flex; gap: 18px; align-items: center; font-size: 12px; margin: 10px 0; flex-wrap: wrap; }}
.bar {{ width: 220px; height: 12px; border: 1px solid #999; }}
.key {{ display: inline-block; width: 22px; height: 12px; vertical-align: middle; margin-right: 4px; }}
#strip {{ position: relative; font-family: "DejaVu Sans Mono", monospace; font-size: 14px; }}
.line {{ white-space: pre; padding-top: 1.7em; padding-bottom: 2px; }}
.ln {{ display: inline-block; width: 6ch; margin-right: 1ch; color: #999; font-size: 11px; text-align: right; }}
.tok {{ border: 1px solid #ddd; border-bottom: 4px solid transparent; cursor: default; }}
.tok.prompt {{ font-style: italic; }}
.tok.answer {{ border: 2px solid {ANSWER_COLOUR}; border-bottom-width: 4px; }}
.tok.boosted {{ border-bottom-color: {BOOST_COLOUR}; }}
.tok.special {{ color: {DEAD_COLOUR}; }}
.tok.hi {{ box-shadow: 0 0 0 2px {ARC_COLOUR}; }}
.tok.cur {{ box-shadow: 0 0 0 3px #d9480f; }}
#arcs {{ position: absolute; left: 0; top: 0; pointer-events: none; overflow: visible; }}
#arcs path {{ fill: none; }}
#arcs path.bb {{ stroke: {ARC_COLOUR}; stroke-opacity: 0.55; }}
#arcs path.in {{ stroke: {ANSWER_COLOUR}; stroke-opacity: 0.9; }}
#arcs path.out {{ stroke: #d9480f; stroke-opacity: 0.9; }}
#tip {{ position: fixed; display: none; background: #fff; border: 1px solid #888; padding: 6px 9px; font-size: 12px;
        max-width: 440px; box-shadow: 2px 2px 6px rgba(0,0,0,.2); pointer-events: none; white-space: pre; font-family: monospace; }}
table.bb td {{ padding: 1px 10px 1px 0; font-family: monospace; font-size: 12px; }}
"""

# Arcs and the tooltip; the SVG is filled through innerHTML so the page names no namespace URL.
_JS = """
const T = JSON.parse(document.getElementById('trace-data').textContent);
const strip = document.getElementById('strip'), svg = document.getElementById('arcs'), tip = document.getElementById('tip');
const span = {};
strip.querySelectorAll('.tok').forEach(s => { span[s.dataset.i] = s; });
const show = t => JSON.stringify(t.text || t.piece);
const fmt = x => x.toPrecision(4);
function anchor(i) {
  const r = span[i].getClientRects()[0], s = strip.getBoundingClientRect();
  return [r.left + r.width / 2 - s.left, r.top - s.top];
}
function arc(e, cls, top) {
  const [x0, y0] = anchor(e.source), [x1, y1] = anchor(e.target);
  const gap = 0.9 * parseFloat(getComputedStyle(strip).fontSize) * 1.7;
  const rise = y0 === y1 ? Math.min(gap, 0.35 * gap + 0.25 * Math.abs(x1 - x0)) : gap;
  const w = (0.8 + 3 * e.flow / top).toFixed(2);
  return `<path class="${cls}" d="M${x0},${y0} C${x0},${y0 - rise} ${x1},${y1 - rise} ${x1},${y1}" stroke-width="${w}"/>`;
}
const bbTop = Math.max(1e-30, ...T.backbone.map(e => e.flow));
function draw(extra) {
  svg.setAttribute('width', strip.scrollWidth);
  svg.setAttribute('height', strip.scrollHeight);
  svg.innerHTML = T.backbone.slice(0, ARCS).reverse().map(e => arc(e, 'bb', bbTop)).join('') + (extra || '');
}
function hover(ev) {
  const s = ev.target.closest('.tok');
  if (!s) return;
  const i = +s.dataset.i, t = T.tokens[i];
  const lines = [`#${i}  ${t.role}  ${show(t)}  (id ${t.id}, piece ${JSON.stringify(t.piece)})`,
                 `h ${fmt(t.h)}   f ${fmt(t.f)}   weight ${t.weight}`, 'strongest incoming edge flows:'];
  t.top_in.forEach(e => lines.push(`  ← #${e.source} ${show(T.tokens[e.source])}  ${fmt(e.flow)}`));
  if (!t.top_in.length) lines.push('  (none)');
  lines.push('strongest outgoing edge flows:');
  t.top_out.forEach(e => lines.push(`  → #${e.target} ${show(T.tokens[e.target])}  ${fmt(e.flow)}`));
  if (!t.top_out.length) lines.push(t.role === 'answer' ? '  (none: the answer absorbs its flow)' : '  (none)');
  tip.textContent = lines.join('\\n');
  tip.style.display = 'block';
  tip.style.left = Math.min(ev.clientX + 14, innerWidth - 460) + 'px';
  tip.style.top = (ev.clientY + 16) + 'px';
  const top = Math.max(1e-30, ...t.top_in.map(e => e.flow), ...t.top_out.map(e => e.flow));
  const ins = t.top_in.map(e => arc({source: e.source, target: i, flow: e.flow}, 'in', top));
  const outs = t.top_out.map(e => arc({source: i, target: e.target, flow: e.flow}, 'out', top));
  strip.querySelectorAll('.hi, .cur').forEach(x => x.classList.remove('hi', 'cur'));
  s.classList.add('cur');
  t.top_in.forEach(e => span[e.source].classList.add('hi'));
  t.top_out.forEach(e => span[e.target].classList.add('hi'));
  draw(ins.join('') + outs.join(''));
}
strip.addEventListener('mouseover', hover);
strip.addEventListener('mouseleave', () => { tip.style.display = 'none'; strip.querySelectorAll('.hi, .cur').forEach(x => x.classList.remove('hi', 'cur')); draw(); });
addEventListener('resize', () => draw());
draw();
// file.html#hover=12 opens with token 12 hovered (for screenshots).
const asked = /hover=(\\d+)/.exec(location.hash);
if (asked && span[asked[1]]) {
  const r = span[asked[1]].getBoundingClientRect();
  span[asked[1]].dispatchEvent(new MouseEvent('mouseover', {bubbles: true, clientX: r.right, clientY: r.bottom}));
}
"""


def _data_json(trace: Trace) -> str:
    """The trace as JSON that cannot end its <script> element (every <, > and & escaped)."""
    text = json.dumps(trace.to_dict(), ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _strip(trace: Trace, cfg: RenderConfig) -> str:
    back, fore = token_colours(trace)
    rows: list[list[str]] = []
    for cell in layout(trace.tokens, cfg.line_chars, cfg.max_token_chars):
        token = trace.tokens[cell.position]
        if cell.line == len(rows):
            rows.append([f'<span class="ln">{cell.position}</span>'])
        classes = ["tok", token.role] + ["boosted"] * (token.weight > 1) + ["special"] * (not token.text)
        rows[-1].append(
            f'<span class="{" ".join(classes)}" data-i="{cell.position}" style="background:{back[cell.position]};'
            f'color:{fore[cell.position]}">{html.escape(cell.label)}</span>'
        )
    lines = "\n".join(f'<div class="line">{"".join(r)}</div>' for r in rows)
    return f'<div id="strip"><svg id="arcs"></svg>\n{lines}\n</div>'


def _legend(trace: Trace) -> str:
    cmap, norm = matplotlib.colormaps[CMAP], flow_norm(trace)
    stops = ", ".join(to_hex(cmap(k / 10)) for k in range(11))
    top = norm.vmax
    boost = max((t.weight for t in trace.tokens), default=1.0)
    return (
        f'<div class="legend"><span>f 0</span><span class="bar" style="background: linear-gradient(to right, {stops})"></span>'
        f"<span>{top:.3g} (square-root scale)</span>"
        f'<span><span class="key" style="border:2px solid {ANSWER_COLOUR}"></span>answer token</span>'
        f'<span><span class="key" style="border-bottom:4px solid {BOOST_COLOUR}"></span>boosted: final weight {boost:g}</span>'
        f'<span><span class="key" style="border-top:3px solid {ARC_COLOUR}"></span>backbone edge flow</span>'
        f"<span><i>italic</i>: prompt; grey text: h = 0</span></div>"
    )


def _backbone_table(trace: Trace, arcs: int) -> str:
    def label(i: int) -> str:
        t = trace.tokens[i]
        return f"#{i} {html.escape(json.dumps(t.text or t.piece))}"

    rows = "".join(
        f"<tr><td>{label(e['source'])}</td><td>→ {label(e['target'])}</td><td>{e['flow']:.4g}</td></tr>"
        for e in trace.backbone[:arcs]
    )
    return f'<h2 style="font-size:15px">Backbone: strongest edge flows f(i)·w(i,k)</h2><table class="bb">{rows}</table>'


def html_page(trace: Trace, cfg: RenderConfig = RenderConfig(), title: str | None = None) -> str:
    """The whole page as a string (UTF-8); it loads nothing from anywhere."""
    title = title or trace.meta.get("title", "flow trace")
    meta = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in trace.meta.items()
        if k != "title"
    )
    js = f"const ARCS = {int(cfg.arcs)};" + _JS
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n<style>{_CSS}</style></head>\n<body>\n'
        f'<h1>{html.escape(title)}</h1>\n<div class="summary">{html.escape(summary(trace))}</div>\n<table class="meta">{meta}</table>\n'
        f'{_legend(trace)}\n{_strip(trace, cfg)}\n<div id="tip"></div>\n{_backbone_table(trace, cfg.arcs)}\n'
        f'<p style="font-size:12px;color:#666">Hover a token for its h, f, weight and strongest edges. Throughput f is the share of the '
        f"prompt-to-answer flow passing through a token; the answer tokens absorb 1 in all.</p>\n"
        f'<script type="application/json" id="trace-data">{_data_json(trace)}</script>\n<script>{js}</script>\n</body></html>\n'
    )
