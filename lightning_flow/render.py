"""Pictures of a flow trace: the token strip coloured by throughput, with the backbone as arcs.

The strip is laid out on a grid of monospace character cells: a token occupies as many cells as
its label has characters (labels are cut at ``max_token_chars``), tokens fill a line of
``line_chars`` cells left to right and a token that does not fit starts the next line, as does
every token after a newline and the first response token. Labels are drawn centred in their own
cells with a monospace font narrower than a cell, so no two labels can overlap, however long the
response. The PNG is drawn with matplotlib's Agg backend; ``lightning_flow.render_html`` makes the
interactive page from the same layout rules and colours.
"""

from __future__ import annotations

import io
import textwrap
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: pictures are written to files and TensorBoard, never shown
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PatchCollection
from matplotlib.colors import Normalize, PowerNorm, to_hex, to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, PathPatch, Rectangle
from matplotlib.path import Path as CurvePath

from lightning_flow.trace import TokenTrace, Trace

CMAP = "YlOrRd"
ANSWER_COLOUR, BOOST_COLOUR, ARC_COLOUR, DEAD_COLOUR = "#0b7a3e", "#7b2cbf", "#1f4e9c", "#9a9a9a"
_ADVANCE = 0.6021  # DejaVu Sans Mono's advance width, in em
_CELL = 0.66  # cell width in em: wider than the advance, so a label stays inside its cells
_SHOWN = {"\n": "↵", "\t": "⇥", "\r": "␍"}


@dataclass
class RenderConfig:
    """How a trace is drawn."""

    line_chars: int = 100
    """Character cells per line of the token strip."""
    max_token_chars: int = 16
    """Longer token labels are cut, ending in an ellipsis."""
    font_size: float = 8.0
    """Label size in points; every other size scales with it."""
    dpi: int = 100
    """Resolution of the PNG."""
    arcs: int = 20
    """Backbone edges drawn as arcs (the strongest ones)."""
    profile: bool = True
    """Add a chart of f and h over the positions under the strip."""


@dataclass
class Cell:
    """Where a token's label sits on the character grid."""

    position: int
    line: int
    column: int  # first cell
    width: int  # cells (wide East Asian characters take two)
    label: str


def char_cells(ch: str) -> int:
    return 2 if unicodedata.east_asian_width(ch) in "WF" else 1


def token_label(token: TokenTrace, max_chars: int) -> str:
    """What the strip shows for a token: its characters with whitespace made visible, or its piece."""
    text = token.text or token.piece
    label = "".join(_SHOWN.get(c, c if c.isprintable() else "·") for c in text) or "·"
    return label if len(label) <= max_chars else label[: max(1, max_chars - 1)] + "…"


def layout(tokens: list[TokenTrace], line_chars: int, max_token_chars: int) -> list[Cell]:
    """Grid cells of every token; cells of one line never share a column (see the module docstring)."""
    max_token_chars = max(1, min(max_token_chars, line_chars // 2))  # a wide label must fit a line
    cells: list[Cell] = []
    line = column = 0
    for j, token in enumerate(tokens):
        label = token_label(token, max_token_chars)
        width = sum(char_cells(c) for c in label)
        starts_response = j > 0 and token.role != "prompt" and tokens[j - 1].role == "prompt"
        after_newline = j > 0 and "\n" in tokens[j - 1].text
        if column > 0 and (column + width > line_chars or starts_response or after_newline):
            line, column = line + 1, 0
        cells.append(Cell(j, line, column, width, label))
        column += width
    return cells


def flow_norm(trace: Trace) -> Normalize:
    """Colour scale of f: square-root, so the faint middle of a long path still shows."""
    top = max((t.f for t in trace.tokens), default=0.0)
    return PowerNorm(0.5, vmin=0.0, vmax=top if top > 0 else 1.0)


def token_colours(trace: Trace) -> tuple[list[str], list[str]]:
    """(background, text) hex colours per token: background by f, text dark or light to stay legible."""
    cmap, norm = matplotlib.colormaps[CMAP], flow_norm(trace)
    back, fore = [], []
    for token in trace.tokens:
        r, g, b, _ = cmap(float(norm(token.f)))
        back.append(to_hex((r, g, b)))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
        fore.append("#ffffff" if dark else (DEAD_COLOUR if token.h <= 0 else "#111111"))
    return back, fore


def summary(trace: Trace) -> str:
    """One line: the answer, absorbed flow, concentration, layers."""
    answer = (
        f"answer {trace.answer_text!r} ({trace.answer_source})"
        if trace.answer_text is not None
        else "no answer"
    )
    parts = [answer, "degenerate: uniform weights" if trace.degenerate else f"absorbed {trace.absorbed:.4f}"]
    if trace.concentration is not None:
        parts.append(
            f"top {trace.config['concentration_fraction']:.0%} of response tokens carry "
            f"{trace.concentration:.0%} of its flow"
        )
    parts.append(f"layers {trace.layers}")
    return " · ".join(parts)


def _arc(x0: float, y0: float, x1: float, y1: float, rise: float) -> CurvePath:
    """A cubic curve leaving the top of one cell upwards and entering the top of another from above (y grows
    downwards)."""
    if y0 == y1:
        rise = min(rise, 0.35 * rise + 0.25 * abs(x1 - x0))
    return CurvePath(
        [(x0, y0), (x0, y0 - rise), (x1, y1 - rise), (x1, y1)], [CurvePath.MOVETO] + [CurvePath.CURVE4] * 3
    )


class _Grid:
    """Sizes of the strip in points (1/72 inch), all scaled from the label size; y grows downwards."""

    def __init__(self, fs: float) -> None:
        self.fs = fs  # label font size
        self.cell = _CELL * fs  # one character cell
        self.box = 1.5 * fs  # token box height
        self.gap = 1.6 * fs  # free band above each line, where arcs rise
        self.bar = 0.35 * fs  # weight bar under a boosted token
        self.pitch = self.gap + self.box + self.bar + 0.25 * fs  # one line of the strip
        self.margin = 6 * self.cell  # left of the first cell: line-start positions


def _draw_strip(ax, trace: Trace, cells: list[Cell], g: _Grid, arcs: int) -> None:
    """Boxes coloured by f, labels, weight bars, line-start positions, then the backbone arcs.

    Arcs pass over the boxes but under the labels, which stay legible. Boxes, bars and arcs are
    one collection each (gids "boxes", "weights", "arcs"; boxes in position order), which draws a
    1000-token strip several times faster than one patch per box.
    """
    back, fore = token_colours(trace)
    boxes, bars, edge_colours, widths = [], [], [], []
    centre: dict[int, tuple[float, float]] = {}  # top centre of each box, where arcs attach
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs missing from the font are drawn as boxes, in their cells
        for cell in cells:
            token, j = trace.tokens[cell.position], cell.position
            x, y, w = g.margin + cell.column * g.cell, cell.line * g.pitch + g.gap, cell.width * g.cell
            answer = token.role == "answer"
            boxes.append(Rectangle((x + 0.3, y), w - 0.6, g.box))
            edge_colours.append(ANSWER_COLOUR if answer else "#d0d0d0")
            widths.append(1.6 if answer else 0.4)
            if token.weight > 1:
                bars.append(Rectangle((x + 0.3, y + g.box + 0.1 * g.fs), w - 0.6, g.bar))
            ax.text(
                x + w / 2,
                y + g.box / 2,
                cell.label,
                family="DejaVu Sans Mono",
                fontsize=g.fs,
                ha="center",
                va="center",
                color=fore[j],
                style="italic" if token.role == "prompt" else "normal",
                parse_math=False,
                gid=f"token-{j}",
                zorder=2,
            )
            if cell.column == 0:
                ax.text(
                    g.margin - 0.6 * g.cell,
                    y + g.box / 2,
                    str(j),
                    fontsize=0.75 * g.fs,
                    ha="right",
                    va="center",
                    color=DEAD_COLOUR,
                    gid="line-start",
                )
            centre[j] = (x + w / 2, y)
    ax.add_collection(
        PatchCollection(
            boxes, facecolors=back, edgecolors=edge_colours, linewidths=widths, zorder=1, gid="boxes"
        )
    )
    ax.add_collection(PatchCollection(bars, facecolors=BOOST_COLOUR, linewidths=0, zorder=1, gid="weights"))
    edges = trace.backbone[:arcs][::-1]  # strongest drawn last, on top
    strongest = max((e["flow"] for e in edges), default=1.0)
    shares = [e["flow"] / strongest for e in edges]
    curves = [PathPatch(_arc(*centre[e["source"]], *centre[e["target"]], 0.95 * g.gap)) for e in edges]
    # under the labels
    ax.add_collection(
        PatchCollection(
            curves,
            facecolors="none",
            edgecolors=[to_rgba(ARC_COLOUR, 0.35 + 0.5 * s) for s in shares],
            linewidths=[0.5 + 2.5 * s for s in shares],
            zorder=1.5,
            gid="arcs",
        )
    )


def _key_handles(trace: Trace, arcs: int) -> list:
    boost = max((t.weight for t in trace.tokens), default=1.0)
    return [
        Patch(facecolor="white", edgecolor=ANSWER_COLOUR, linewidth=1.6, label="answer token"),
        Patch(
            facecolor=BOOST_COLOUR,
            label=f"boosted: final weight {boost:g}" if boost > 1 else "boosted (none here)",
        ),
        Line2D(
            [],
            [],
            color=ARC_COLOUR,
            linewidth=2,
            label=f"backbone: {min(arcs, len(trace.backbone))} strongest edge flows",
        ),
        Patch(facecolor="white", edgecolor="#d0d0d0", label="prompt: italics; grey: h = 0"),
    ]


def figure(trace: Trace, cfg: RenderConfig = RenderConfig(), title: str | None = None) -> Figure:
    """The trace as a matplotlib figure: title, token strip with arcs, colour bar and key, f/h profile."""
    g, fs = _Grid(cfg.font_size), cfg.font_size
    cells = layout(trace.tokens, cfg.line_chars, cfg.max_token_chars)
    lines = cells[-1].line + 1 if cells else 1
    # short traces get a narrower picture
    columns = max(max((c.column + c.width for c in cells), default=0), min(cfg.line_chars, 72))
    strip_w, strip_h = g.margin + (columns + 1) * g.cell, lines * g.pitch + 0.5 * fs
    info = summary(trace) + "".join(f" · {k} {v}" for k, v in trace.meta.items() if k != "title")
    # sans text is narrower than mono
    info_lines = textwrap.wrap(info, width=max(40, int(strip_w / (_ADVANCE * 0.9 * fs))))
    wide = strip_w >= 60 * fs  # room for the key in one row
    pad, head, foot, prof = (
        0.8 * fs,
        (2.2 + 1.15 * len(info_lines)) * fs,
        (7.0 if wide else 8.2) * fs,
        (9 * fs if cfg.profile else 0.0),
    )
    width, height = strip_w + 2 * pad, head + strip_h + foot + prof + 2 * pad
    fig = Figure(figsize=(width / 72, height / 72), dpi=cfg.dpi)
    FigureCanvasAgg(fig)

    def frac(x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
        """Figure fractions of a box given in points from the top-left corner."""
        return x / width, 1 - (y + h) / height, w / width, h / height

    fig.text(
        pad / width,
        1 - pad / height,
        title or trace.meta.get("title", "flow trace"),
        fontsize=1.2 * fs,
        weight="bold",
        va="top",
        parse_math=False,
    )
    fig.text(
        pad / width,
        1 - (pad + 1.7 * fs) / height,
        "\n".join(info_lines),
        fontsize=0.9 * fs,
        va="top",
        parse_math=False,
        color="#333333",
    )
    ax = fig.add_axes(frac(pad, pad + head, strip_w, strip_h))
    ax.set_xlim(0, strip_w)
    ax.set_ylim(strip_h, 0)  # data units are points, y down
    ax.axis("off")
    _draw_strip(ax, trace, cells, g, cfg.arcs)

    top = pad + head + strip_h
    cax = fig.add_axes(
        frac(pad + g.margin, top + 0.8 * fs, min(strip_w - g.margin - g.cell, 40 * fs), 0.9 * fs)
    )
    colour_bar = fig.colorbar(
        matplotlib.cm.ScalarMappable(norm=flow_norm(trace), cmap=CMAP), cax=cax, orientation="horizontal"
    )
    colour_bar.set_label("throughput f (square-root scale)", fontsize=0.8 * fs)
    cax.tick_params(labelsize=0.7 * fs)
    fig.legend(
        handles=_key_handles(trace, cfg.arcs),
        loc="upper left",
        bbox_to_anchor=((pad + g.margin - 0.5 * fs) / width, 1 - (top + 4.2 * fs) / height),
        ncols=4 if wide else 2,
        fontsize=0.75 * fs,
        frameon=False,
        handlelength=1.6,
    )
    if cfg.profile:
        _profile(
            fig.add_axes(frac(pad + g.margin, top + foot, strip_w - g.margin - g.cell, prof - 2.2 * fs)),
            trace,
            fs,
        )
    return fig


def _profile(ax, trace: Trace, fs: float) -> None:
    """f and h over the positions; prompt shaded, answer positions and boosted tokens marked."""
    pos = np.arange(len(trace.tokens))
    ax.fill_between(
        pos, [t.f for t in trace.tokens], step="mid", color="#f08a3c", alpha=0.6, label="f (throughput)"
    )
    ax.plot(
        pos,
        [t.h for t in trace.tokens],
        drawstyle="steps-mid",
        color="#444444",
        linewidth=0.8,
        label="h (influence, max 1)",
    )
    ax.axvspan(-0.5, trace.prompt_length - 0.5, color="#e8e8e8", zorder=0, label="prompt")
    for t in trace.tokens:
        if t.role == "answer":
            ax.axvline(t.position, color=ANSWER_COLOUR, linewidth=1.0)
    boosted = [t.position for t in trace.tokens if t.weight > 1]
    ax.plot(boosted, [-0.06] * len(boosted), "|", color=BOOST_COLOUR, markersize=0.6 * fs, label="boosted")
    ax.set_xlim(-0.5, len(pos) - 0.5)
    ax.set_ylim(-0.12, 1.05)
    ax.set_xlabel("position", fontsize=0.8 * fs)
    ax.tick_params(labelsize=0.7 * fs)
    ax.legend(fontsize=0.7 * fs, loc="upper left", ncols=4, frameon=False)


def png_bytes(trace: Trace, cfg: RenderConfig = RenderConfig(), title: str | None = None) -> bytes:
    buffer = io.BytesIO()
    figure(trace, cfg, title).savefig(buffer, format="png", dpi=cfg.dpi)
    return buffer.getvalue()


def save_png(
    trace: Trace, path: str | Path, cfg: RenderConfig = RenderConfig(), title: str | None = None
) -> Path:
    path = Path(path)
    path.write_bytes(png_bytes(trace, cfg, title))
    return path


def png_array(trace: Trace, cfg: RenderConfig = RenderConfig(), title: str | None = None) -> np.ndarray:
    """[H, W, 3] uint8 image of the figure (for TensorBoard's add_image)."""
    fig = figure(trace, cfg, title)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
