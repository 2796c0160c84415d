"""Render an :class:`~qmpass.Analysis` as one self-contained HTML page.

The page is meant to be attached to a CI run or mailed around, so it carries everything
inline: a few lines of CSS, no script, and the plots as base64 PNG data URIs. Plots are
drawn on :class:`matplotlib.figure.Figure` objects with an Agg canvas, never through
``pyplot``: pyplot keeps a global registry of figures that is neither thread-safe nor
freed unless closed, and a report renderer runs inside other people's processes.

Every string that comes from the model (node names, op types, reasons) is escaped with
:func:`html.escape` before it reaches the page; in plots, ``$`` is escaped so that a name
is never parsed as mathtext.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence

import networkx as nx
import numpy as np
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from qmpass.analysis import Analysis
from qmpass.extract import Skipped
from qmpass.spectral import fs_distance_matrix

__all__ = ["render_html"]

#: the relative-entropy bound whose rank the table reports (keeps exp(-0.05) ~ 95.1 %)
TABLE_DELTA = 0.05
#: beyond this many operators the heatmap labels only every k-th row and column
MAX_HEATMAP_LABELS = 60
#: beyond this many operators the graph plot drops node labels (they would overlap)
MAX_GRAPH_LABELS = 40
#: up to this many operators (the colours of tab10) each gets its own colour and legend
#: entry; beyond, colour says only the op type
MAX_LEGEND_OPERATORS = 10
#: plot labels are cut to this many characters (full names are in the table)
LABEL_WIDTH = 24
_DPI = 100
_SEED = 0
#: a colour as matplotlib colormaps return it
RGBA = tuple[float, float, float, float]

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d232a;
       max-width: 1200px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h1 code { font-size: .85em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2em; }
.totals { font-size: 1.1em; color: #444; margin-top: 0; }
.muted { color: #666; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: .92em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 3px 8px; border-bottom: 1px solid #e4e8ec; text-align: left;
         vertical-align: top; }
th { background: #f3f5f7; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:hover td { background: #f8fafc; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e8ec; }
figcaption { color: #555; font-size: 13px; max-width: 900px; }
ol { padding-left: 1.6em; }
"""


def render_html(analysis: Analysis) -> str:
    """The report page of ``analysis`` as one HTML string (UTF-8, no external resources)."""
    operators = analysis.operators
    totals = (
        f"{len(operators):,} operators · {sum(op.params for op in operators):,} parameters · "
        f"{sum(op.flops for op in operators):,} FLOPs per sample"
    )
    name = html.escape(analysis.model_name)
    body = [
        f"<h1>qmpass analysis: <code>{name}</code></h1>",
        f'<p class="totals">{html.escape(totals)}</p>',
        _context_line(analysis),
        "<h2>Operators</h2>",
    ]
    if operators:
        labels = _short_labels([op.name for op in operators])
        body += [_operator_table(analysis, labels), *_plots(analysis, labels)]
    else:
        body.append(
            "<p>The model has no weight-bearing operators that qmpass analyses, "
            "so there is nothing to plot.</p>"
        )
    body += _groups_section(analysis)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>qmpass: {name}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _short_labels(names: Sequence[str], width: int = LABEL_WIDTH) -> list[str]:
    """Unique labels of at most ``width`` characters for plot axes and nodes.

    Exporters name nodes by module path (``/layers/layers.0/attn/q_proj/MatMul``): the
    path repeats each parent in its child (``layers/layers.0``) and ends with the op type,
    which the plots show by colour. Dropping both keeps what tells operators apart
    (``layers.0/attn/q_proj``); what is still too long keeps its last path components,
    since the leaf is more telling than the root. Collisions get ``#index``.
    """
    labels = [_abbreviate(name, width) for name in names]
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    return [_with_suffix(label, f"#{i}", width) if seen[label] > 1 else label
            for i, label in enumerate(labels)]


def _with_suffix(label: str, suffix: str, width: int) -> str:
    return label[: max(width - len(suffix), 0)] + suffix


_OP_TYPE_LEAVES = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})


def _abbreviate(name: str, width: int) -> str:
    parts = [p for p in name.split("/") if p] or [name]
    parts = [p for p, nxt in zip(parts, [*parts[1:], ""], strict=True)
             if not nxt.startswith(p + ".")]
    if len(parts) > 1 and parts[-1] in _OP_TYPE_LEAVES and any(
        c.isalpha() for c in "".join(parts[:-1])
    ):
        parts = parts[:-1]
    label = "/".join(parts)
    if len(label) <= width:
        return label
    kept = parts[-1]
    for part in reversed(parts[:-1]):
        if len(part) + len(kept) + 3 > width:
            break
        kept = f"{part}/{kept}"
    return f"…/{kept}" if len(kept) + 2 <= width else "…" + kept[-(width - 1):]


def _context_line(analysis: Analysis) -> str:
    ex = analysis.extraction
    graph = analysis.graph
    threshold = graph.graph.get("threshold")
    bures = sum(1 for _, _, d in graph.edges(data=True) if "d_bures" in d)
    parts = [f"IR version {ex.ir_version}, opset {ex.opset}"]
    if threshold is not None:
        parts.append(
            f"QM-FRG: {graph.number_of_edges()} edges with d_FS ≤ {threshold:g} rad "
            f"({bures} with a Bures angle)"
        )
    parts.append(f"analysed in {sum(analysis.seconds.values()):.2f} s")
    return f'<p class="muted">{html.escape(" · ".join(parts))}</p>'


def _operator_table(analysis: Analysis, labels: Sequence[str]) -> str:
    """One row per operator; the quarter-rank energy and the delta rank say at a glance
    how compressible each one is, the plot label maps plots back to full names."""
    head = (
        "<tr><th class=num>#</th><th>operator</th><th>plot label</th><th>op type</th>"
        "<th class=num>matrix</th><th>weight</th><th>bias</th><th class=num>eff. rank</th>"
        "<th class=num>energy at ¼ rank</th>"
        f"<th class=num>rank for δ={TABLE_DELTA:g}</th>"
        "<th class=num>params</th><th class=num>FLOPs</th></tr>"
    )
    rows = []
    for i, (op, state, label) in enumerate(
        zip(analysis.operators, analysis.states, labels, strict=True)
    ):
        full = state.singular_values.size
        quarter = max(1, round(full / 4))
        cells = [
            _num(str(i)),
            f"<td><code>{html.escape(op.name)}</code></td>",
            f"<td>{html.escape(label)}</td>",
            f"<td>{html.escape(op.op_type)}</td>",
            _num(f"{op.shape[0]} x {op.shape[1]}"),
            f"<td>{html.escape(op.weight_source)}</td>",
            f"<td>{html.escape(op.bias_source or '—')}</td>",
            _num(f"{state.effective_rank:.1f} / {full}"),
            _num(f"{100 * state.energy_kept(quarter):.1f} % (q={quarter})"),
            _num(f"{state.rank_for_delta(TABLE_DELTA)} / {full}"),
            _num(f"{op.params:,}"),
            _num(f"{op.flops:,}"),
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = (
        '<p class="muted">Ranks count the singular values of the bias-augmented matrix '
        "[[W, b], [0, 1]] (min(d_out, d_in) + 1 of them). Energy at ¼ rank: the share of "
        "‖Ŵ‖²<sub>F</sub> kept by the top quarter of them. Rank for δ: the smallest rank "
        f"whose relative entropy -log(kept energy) is at most δ (keeps ≥ "
        f"{100 * math.exp(-TABLE_DELTA):.1f} % of the energy).</p>"
    )
    return (f'<div class="scroll"><table id="operators">\n<thead>{head}</thead>\n<tbody>\n'
            + "\n".join(rows) + "\n</tbody></table></div>\n" + note)


def _num(text: str) -> str:
    return f"<td class=num>{html.escape(text)}</td>"


def _plots(analysis: Analysis, labels: Sequence[str]) -> list[str]:
    """The four figures, each as a ``<figure>`` element with its caption."""
    styles = _line_styles(analysis, labels)
    threshold = analysis.graph.graph.get("threshold")
    return [
        "<h2>Spectra</h2>",
        _figure(
            _spectra_figure(analysis, styles),
            "Normalised spectra ψ = s / ‖s‖₂ (log scale) against position over length, so "
            "operators of different sizes compare. A fast drop means a few directions "
            "carry the operator: it compresses well.",
        ),
        _figure(
            _energy_figure(analysis, styles),
            "Energy profiles: the share of the energy kept by the top fraction of singular "
            "values. The dashed line is the level a relative-entropy bound δ = "
            f"{TABLE_DELTA:g} must reach; the dotted one is the quarter rank of the table.",
        ),
        "<h2>Distances</h2>",
        _figure(
            _heatmap_figure(analysis, labels, threshold),
            "Fubini-Study distance of every pair of spectra (radians, 0 = equal energy "
            "distributions). The line on the colour bar is the QM-FRG threshold. Equal "
            "spectra do not mean equal functions: the distance only rules pairs out.",
        ),
        _figure(
            _graph_figure(analysis, labels),
            "The QM-FRG: operators joined when their spectral distance is under the "
            "threshold, edges coloured by d_FS. Thick edges join operators of equal input "
            "width and also carry a Bures angle (the test that a shared basis could serve "
            "both). Node size follows effective rank.",
        ),
    ]


def _figure(fig: Figure, caption: str) -> str:
    return (f'<figure><img alt="{html.escape(caption)}" src="{_png_data_uri(fig)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _png_data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _text_inches(chars: int, fontsize: float) -> float:
    """Rough width of ``chars`` characters of DejaVu Sans, to size margins up front."""
    return chars * fontsize * 0.56 / 72


def _figure_with_axes(
    width: float, height: float, *, left: float, right: float, bottom: float, top: float
) -> tuple[Figure, Axes]:
    """A figure with one axes placed by margins in inches.

    Margins are computed from label lengths instead of by constrained layout, which
    measures every text several times and was most of the rendering time.
    """
    fig = Figure(figsize=(width, height), dpi=_DPI)
    ax = fig.add_axes((left / width, bottom / height,
                       1 - (left + right) / width, 1 - (bottom + top) / height))
    return fig, ax


def _op_type_colours(op_types: Sequence[str]) -> dict[str, RGBA]:
    palette = colormaps["tab10"]
    return {t: palette(i % 10) for i, t in enumerate(sorted(set(op_types)))}


def _line_styles(
    analysis: Analysis, labels: Sequence[str]
) -> list[tuple[RGBA, str | None]]:
    """Colour and legend label per operator, shared by the spectrum and energy plots.

    A handful of operators each get a colour and a name; more get their op type's colour
    and one legend entry per op type, since ten colours are all the eye tells apart.
    """
    operators = analysis.operators
    if len(operators) <= MAX_LEGEND_OPERATORS:
        palette = colormaps["tab10"]
        return [(palette(i), _mpl_text(label)) for i, label in enumerate(labels)]
    colours = _op_type_colours([op.op_type for op in operators])
    styles: list[tuple[RGBA, str | None]] = []
    named: set[str] = set()
    for op in operators:
        first = op.op_type not in named
        named.add(op.op_type)
        styles.append((colours[op.op_type], _mpl_text(op.op_type) if first else None))
    return styles


def _mpl_text(text: str) -> str:
    """``text`` as matplotlib shows it literally (a ``$`` pair would start mathtext)."""
    return text.replace("$", r"\$")


def _rank_fractions(size: int) -> np.ndarray:
    """``q / n`` for ``q = 1..n``: the x axis on which spectra of any length compare."""
    return np.arange(1, size + 1) / size


def _curve_figure(
    styles: Sequence[tuple[RGBA, str | None]]
) -> tuple[Figure, Axes]:
    """The frame of the spectrum and energy plots, with room for the legend on the right."""
    longest = max((len(label) for _, label in styles if label), default=0)
    fig, ax = _figure_with_axes(
        8.0 + _text_inches(longest, 8), 4.0,
        left=0.8, right=0.6 + _text_inches(longest, 8), bottom=0.55, top=0.35,
    )
    ax.grid(True, alpha=0.3)
    ax.set_xlim(0, 1.0)
    return fig, ax


def _legend(ax: Axes) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _spectra_figure(
    analysis: Analysis, styles: Sequence[tuple[RGBA, str | None]]
) -> Figure:
    fig, ax = _curve_figure(styles)
    alpha = 0.9 if len(styles) <= MAX_LEGEND_OPERATORS else 0.5
    for state, (colour, label) in zip(analysis.states, styles, strict=True):
        x = _rank_fractions(state.psi.size)
        positive = state.psi > 0  # Gram eigenvalues clipped at 0 have no logarithm
        ax.plot(x[positive], state.psi[positive], color=colour, label=label, lw=1.3,
                alpha=alpha, marker="." if state.psi.size <= 20 else None, ms=5)
    ax.set_yscale("log")
    ax.set_xlabel("singular value position / number of singular values")
    ax.set_ylabel("ψ (normalised singular value)")
    ax.set_title("Normalised spectra")
    _legend(ax)
    return fig


def _energy_figure(
    analysis: Analysis, styles: Sequence[tuple[RGBA, str | None]]
) -> Figure:
    fig, ax = _curve_figure(styles)
    alpha = 0.9 if len(styles) <= MAX_LEGEND_OPERATORS else 0.5
    for state, (colour, label) in zip(analysis.states, styles, strict=True):
        profile = state.energy_profile
        x = np.concatenate(([0.0], _rank_fractions(profile.size)))
        ax.step(x, np.concatenate(([0.0], profile)), where="post", color=colour,
                label=label, lw=1.3, alpha=alpha)
    level = math.exp(-TABLE_DELTA)
    ax.axhline(level, color="0.3", ls="--", lw=0.9)
    ax.axvline(0.25, color="0.3", ls=":", lw=0.9)
    ax.annotate(f"δ = {TABLE_DELTA:g}: {100 * level:.1f} % of the energy", (0.0, level),
                xytext=(4, -12), textcoords="offset points", fontsize=8, color="0.25")
    ax.annotate("¼ rank", (0.25, 0.0), xytext=(3, 4), textcoords="offset points",
                fontsize=8, color="0.25")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank kept / number of singular values")
    ax.set_ylabel("energy kept")
    ax.set_title("Energy profiles (cumulative ψ²)")
    _legend(ax)
    return fig


def _heatmap_figure(analysis: Analysis, labels: Sequence[str], threshold: float | None) -> Figure:
    distances = fs_distance_matrix(analysis.states)
    n = len(labels)
    step = math.ceil(n / MAX_HEATMAP_LABELS)
    ticks = list(range(0, n, step))
    shown = min(n, MAX_HEATMAP_LABELS)
    fontsize = float(np.clip(220 / len(ticks), 5.0, 9.0))
    tick_labels = [_mpl_text(labels[i]) for i in ticks]
    margin = 0.3 + _text_inches(max(len(t) for t in tick_labels), fontsize)
    side = float(np.clip(0.34 * shown, 3.5, 10.0))
    width, height = margin + side + 1.4, margin + side + 0.45
    fig, ax = _figure_with_axes(width, height, left=margin, right=1.4, bottom=margin,
                                top=0.45)
    off_diagonal = distances[~np.eye(n, dtype=bool)]
    top = float(off_diagonal.max()) if off_diagonal.size and off_diagonal.max() > 0 else 1.0
    image = ax.imshow(distances, cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest",
                      aspect="auto")
    ax.set_xticks(ticks, tick_labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, tick_labels, fontsize=fontsize)
    ax.set_title("Fubini-Study distance of spectra"
                 + (f" (one label in {step})" if step > 1 else ""))
    cax = fig.add_axes((1 - 1.15 / width, margin / height, 0.18 / width, side / height))
    if threshold is not None and threshold <= top:
        bar = fig.colorbar(image, cax=cax, label="d_FS (rad); red: QM-FRG threshold")
        bar.ax.axhline(threshold, color="crimson", lw=2.5)
    else:
        fig.colorbar(image, cax=cax, label="d_FS (rad)")
    return fig


#: layout units: a component of m operators gets a box of side COMPONENT_SIDE * sqrt(m);
#: operators without neighbours sit ISOLATED_STEP apart
COMPONENT_SIDE = 1.2
ISOLATED_STEP = 1.5
_GAP = 0.6


def _graph_layout(
    graph: nx.Graph, labelled: bool
) -> tuple[dict[str, np.ndarray], float, float]:
    """Node positions and the width and height of the drawing, in layout units.

    One spring layout of the whole graph pushes unconnected parts to the border and
    squeezes each component into a corner, so each component gets its own spring layout
    in a box sized to it, boxes packed in shelves (largest first). Operators without a
    neighbour under the threshold follow in rows below: "nothing is close to me" reads
    better there than at a random place.
    """
    components = sorted((sorted(c) for c in nx.connected_components(graph) if len(c) > 1),
                        key=lambda c: (-len(c), c))
    isolated = [v for v in graph if graph.degree(v) == 0]
    sides = [COMPONENT_SIDE * math.sqrt(len(c)) for c in components]
    width = max([*sides, 2.0 * math.sqrt(sum(side**2 for side in sides))])
    if not labelled:  # without labels, isolated nodes can sit closer together
        width = max(width, math.sqrt(len(isolated)) * ISOLATED_STEP / 2)
    elif isolated and not components:
        width = ISOLATED_STEP * (min(len(isolated), 6) - 1)
    positions: dict[str, np.ndarray] = {}
    x = y = shelf = 0.0
    for members, side in zip(components, sides, strict=True):
        if x > 0 and x + side > width + 1e-9:
            x, y, shelf = 0.0, y - shelf - _GAP, 0.0
        layout = nx.spring_layout(graph.subgraph(members), seed=_SEED, weight=None,
                                  scale=side / 2)
        corner = np.min(list(layout.values()), axis=0)
        extent = np.max(list(layout.values()), axis=0) - corner
        # the layout keeps its aspect, often flat: pack it by its real extent
        positions.update({node: np.asarray(xy) - corner + (x, y - extent[1])
                          for node, xy in layout.items()})
        x, shelf = x + extent[0] + _GAP, max(shelf, extent[1])
    y -= shelf + (_GAP if components else 0.0)
    step = ISOLATED_STEP if labelled else ISOLATED_STEP / 2
    per_row = max(1, int(width // step) + 1)
    for i, node in enumerate(isolated):
        row, col = divmod(i, per_row)
        positions[node] = np.array([col * step, y - row * step * 0.6])
    xs, ys = [p[0] for p in positions.values()], [p[1] for p in positions.values()]
    return positions, max(xs) - min(xs), max(ys) - min(ys)


def _graph_figure(analysis: Analysis, labels: Sequence[str]) -> Figure:
    graph = analysis.graph
    operators = analysis.operators
    n = len(operators)
    labelled = n <= MAX_GRAPH_LABELS
    positions, width, height = _graph_layout(graph, labelled)
    # small drawings stay small; vertically 0.8 of the horizontal scale is enough room
    inches = min(2.2, 8.6 / max(width, ISOLATED_STEP))
    fig, ax = _figure_with_axes(
        float(np.clip(2.2 + inches * width, 6.0, 10.0)),
        float(np.clip(1.2 + 0.8 * inches * height, 2.6, 7.5)),
        left=0.1, right=1.3, bottom=0.1, top=0.4,
    )
    ax.set_axis_off()
    colours = _op_type_colours([op.op_type for op in operators])
    ranks = np.array([graph.nodes[op.name]["effective_rank"] for op in operators])
    sizes = (80 + 520 * ranks / max(float(ranks.max()), 1e-12)) / (1 if labelled else 4)
    nx.draw_networkx_nodes(
        graph, positions, nodelist=[op.name for op in operators], ax=ax, node_size=sizes,
        node_color=[colours[op.op_type] for op in operators], edgecolors="white",
        linewidths=1.0,
    )
    threshold = graph.graph.get("threshold")
    edges = list(graph.edges(data=True))
    # plasma without its pale yellow end, which vanishes on white
    cmap = ListedColormap(colormaps["plasma"](np.linspace(0.0, 0.85, 256)))
    norm = Normalize(vmin=0.0, vmax=threshold or max((d["d_fs"] for _, _, d in edges),
                                                     default=1.0) or 1.0)
    for with_bures, width, style in ((False, 1.2, "dashed"), (True, 3.0, "solid")):
        chosen = [(u, v, d) for u, v, d in edges if ("d_bures" in d) == with_bures]
        if chosen:
            nx.draw_networkx_edges(
                graph, positions, edgelist=[(u, v) for u, v, _ in chosen], ax=ax,
                width=width, style=style, edge_color=[d["d_fs"] for _, _, d in chosen],
                edge_cmap=cmap, edge_vmin=norm.vmin, edge_vmax=norm.vmax, alpha=0.85,
            )
    if labelled:
        for op, label, size in zip(operators, labels, sizes, strict=True):
            x, y = positions[op.name]
            ax.annotate(_mpl_text(label), (float(x), float(y)), ha="center", va="top",
                        xytext=(0, -math.sqrt(size) / 2 - 1), textcoords="offset points",
                        fontsize=7.5 if n <= 20 else 6,
                        bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none",
                              "alpha": 0.75})
    if edges:
        cax = fig.add_axes((1 - 0.95 / fig.get_figwidth(), 0.08, 0.15 / fig.get_figwidth(), 0.55))
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, label="d_FS (rad)")
        title = f"QM-FRG: {len(edges)} edge{'s' if len(edges) > 1 else ''}"
    else:
        under = f" within d_FS ≤ {threshold:g}" if threshold is not None and n > 1 else ""
        title = f"QM-FRG: no edges{under}"
    ax.set_title(title)
    handles: list[Artist] = [Patch(color=c, label=_mpl_text(t)) for t, c in colours.items()]
    if edges:
        handles += [Line2D([], [], color="0.3", lw=3.0, label="FS + Bures"),
                    Line2D([], [], color="0.3", lw=1.2, ls="--", label="FS only")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
              frameon=False)
    ax.margins(0.08, 0.12)
    return fig


def _groups_section(analysis: Analysis) -> list[str]:
    """Fusion groups, clusters and the nodes extraction left out, with its reasons."""
    ex = analysis.extraction
    return [
        "<h2>Groups</h2>",
        "<h3>Fusion groups</h3>",
        '<p class="muted">Operators that read the same tensor with the same geometry: '
        "they could run as one wider operator.</p>",
        _name_groups(ex.fusion_groups),
        "<h3>Clusters</h3>",
        '<p class="muted">Operators the QM-FRG finds close under its threshold, candidates '
        "for a shared basis.</p>",
        _name_groups(analysis.clusters),
        "<h3>Cross-layer shared-basis candidates</h3>",
        '<p class="muted">Units reading different tensors of one width, merged by their '
        "mean Bures angle (average linkage, closest first); <code>compress</code> measures "
        "each on calibration data and keeps a shared basis only where it wins.</p>",
        _name_groups([[*m.operators, f"(Bures {m.bures:.3f})"] for m in analysis.crosslayer]),
        "<h2>Nodes not analysed</h2>",
        "<h3>Skipped</h3>",
        _skipped_table(ex.skipped),
        "<h3>Unsupported</h3>",
        _skipped_table(ex.unsupported),
    ]


def _name_groups(groups: Sequence[Sequence[str]]) -> str:
    if not groups:
        return "<p>None.</p>"
    items = (", ".join(f"<code>{html.escape(n)}</code>" for n in group) for group in groups)
    return "<ol>" + "".join(f"<li>{item}</li>" for item in items) + "</ol>"


def _skipped_table(nodes: Sequence[Skipped]) -> str:
    if not nodes:
        return "<p>None.</p>"
    rows = "".join(
        f"<tr><td><code>{html.escape(s.name)}</code></td><td>{html.escape(s.op_type)}</td>"
        f"<td>{html.escape(s.graph)}</td><td>{html.escape(s.reason)}</td></tr>"
        for s in nodes
    )
    return ('<div class="scroll"><table><thead><tr><th>node</th><th>op type</th>'
            f"<th>graph</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table></div>")
