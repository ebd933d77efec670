"""Plotly figures of a LensResult: the layers x positions heatmap and the target's trajectory.

Reads the numbers `tracing` computed; computes none itself (a metric here is a choice of
which array to colour by).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from tracing.lens import LensResult

from .tokens import TokenLabels


@dataclass(frozen=True)
class Metric:
    """How one per-cell number is coloured and shown, and what it means (one line for a newcomer)."""

    title: str
    colorscale: str
    reverse: bool  # True when a low value means a confident prediction (shown bright, like a high probability)
    help: str
    needs_target: bool = False
    percent: bool = False


METRICS: dict[str, Metric] = {
    "top-1 probability": Metric("top-1 probability", "Viridis", False,
                                "how sure each layer is of its top guess (100% = certain).", percent=True),
    "entropy": Metric("entropy (nats)", "Viridis", True,
                      "how spread out each layer's guesses are, in nats (a unit of information, natural "
                      "log): 0 = one sure guess, higher = many guesses."),
    "KL to final": Metric("KL(final ‖ layer) (nats)", "Viridis", True,
                          "how far each layer's guesses are from the model's final answer, in nats (natural-log "
                          "units): 0 = the same as the output."),
    "target probability": Metric("target probability", "Viridis", False,
                                 "the probability each layer gives the target token.", needs_target=True,
                                 percent=True),
    "target rank": Metric("target rank (log scale)", "Viridis", True,
                          "where the target sits among each layer's guesses: 1 = its top guess.", needs_target=True),
}
DEFAULT_METRIC = "top-1 probability"

# Every figure the app draws (this module is imported by the app): plotly's default template, but tick
# labels drawn as they are. Plotly's default ("hide past div") measures every tick label's box in the
# page, label by label, to hide those that would leave the figure: a third of a heatmap's drawing time in
# a browser without a GPU (bench/bench_demo.py's example: 99 -> 62 ms a draw). The margins here fit the
# labels, and the axes keep `automargin`, so the default never hid one. Merged once here: a default
# named "plotly+..." is merged again for every figure (a heatmap's build went from 10 to 30 ms).
pio.templates["lensbench"] = pio.templates.merge_templates("plotly", go.layout.Template(
    layout=dict(xaxis=dict(ticklabeloverflow="allow"), yaxis=dict(ticklabeloverflow="allow")),
    data=dict(heatmap=[go.Heatmap(colorbar=dict(ticklabeloverflow="allow"))]),
))
pio.templates.default = "lensbench"

_CELL_CHARS = 8  # longest cell label before it is cut (the hover shows it whole)
_TICK_CHARS = 12  # longest token in an axis label before it is cut
_MAX_LABELLED_COLUMNS = 40  # wider heatmaps drop the cell labels (unreadable there); hovering still shows all
_MAX_TICKS = 40
_FLAT_TICKS = 8  # up to this many positions the axis labels stay horizontal

# What a newcomer needs to read the heatmap, said once under it.
HEATMAP_NOTE = (
    "Rows: the model's layers, from the **embeddings** (bottom: the input token itself read out before any "
    "layer, so its guesses are often odd tokens such as `<filename>`; nothing is wrong) up to the model's "
    "**output** (top). Columns: the prompt's tokens; a cell shows the token that layer would predict next. "
    "Hover a cell for its top guesses; click one to pick its position for the chart and the table. "
    "`␣` is a space. **nats**: the unit of entropy and KL (natural log)."
)


def metric_note(metric: str) -> str:
    """One line under the colour switch: what the colour means."""
    spec = METRICS.get(metric) or METRICS[DEFAULT_METRIC]
    return f"**Colour**: {spec.help}"


def metric_values(result: LensResult, metric: str) -> np.ndarray:
    """The [rows, positions] array `metric` colours by; target metrics fall back to top-1 without a target."""
    if METRICS[metric].needs_target and result.target is None:
        metric = DEFAULT_METRIC
    if metric == "top-1 probability":
        return result.topk_probs[:, :, 0]
    if metric == "entropy":
        return result.entropy
    if metric == "KL to final":
        return result.kl_to_final
    if metric == "target probability":
        return result.target.prob
    return np.log10(result.target.rank.astype(float))  # "target rank": coloured by order of magnitude


def row_labels(result: LensResult) -> list[str]:
    """Row names that say which lens produced the row ("layer 12 · tuned"); the last row is the output."""
    labels = []
    for name, kind in zip(result.layers, result.lens):
        if kind == "output":
            labels.append(f"{name} = output")
        elif kind != "logit":
            labels.append(f"{name} · {kind}")
        else:
            labels.append(name)
    return labels


def column_labels(result: LensResult, labels: TokenLabels) -> list[str]:
    """Each traced position as "index: token" (the cell predicts the token after it)."""
    return [f"{p}: {_html(labels(result.tokens[p], result.token_ids[p]))}" for p in result.positions]


def _x_axis(cols: list[str], title: str, compact: bool = False) -> dict:
    """An x axis of token labels that stays readable: horizontal for a few positions, slanted and
    cut short for more (or in a half-width figure, `compact`), every n-th beyond `_MAX_TICKS`; the
    margin grows to fit them (never cut)."""
    n = len(cols)
    step = -(-n // _MAX_TICKS)
    ticks = list(range(0, n, step))
    flat = n <= (_FLAT_TICKS // 2 if compact else _FLAT_TICKS)
    text = [cols[c] if flat else _short(cols[c], _TICK_CHARS) for c in ticks]
    return dict(tickmode="array", tickvals=ticks, ticktext=text, title=title, automargin=True,
                tickangle=0 if flat else -45, tickfont=dict(size=11 if n <= 24 else 9))


def _margin(axis: dict, rows: list[str], colorbar: dict, tick_chars: int = 4, top: int = 40) -> dict:
    """Margins that already fit the row labels (left), the colour bar (right) and `axis`'s labels
    and title (bottom). `tick_chars`: the colour bar's longest tick label, when plotly picks them.

    The axes keep `automargin` (never a cut label), but plotly grows a margin by drawing the whole
    figure a second time: in a browser without a GPU that doubles a heatmap's drawing time (about
    0.2 s of the Lens tab's click-to-heatmap). A generous estimate here leaves nothing to grow."""
    size = axis["tickfont"]["size"]
    longest = max((len(t) for t in axis["ticktext"]), default=0)
    below = size + 16 if axis["tickangle"] == 0 else int(longest * size * 0.45) + size + 6
    ticks = max((len(t) for t in colorbar.get("ticktext", ())), default=tick_chars)
    title_lines = colorbar["title"]["text"].count("<br>") + 1
    return dict(l=16 + 7 * max((len(r) for r in rows), default=0), r=85 + 7 * ticks + 20 * title_lines, t=top,
                b=below + 30)


def _html(text: str) -> str:
    """Plotly reads labels as a little HTML (<b>, <br>): a token such as "<br>" must show as text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _short(text: str, chars: int = _CELL_CHARS) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def percent(p: float) -> str:
    """A probability for people: 79.6%, 0.35%, and below 0.01% just "<0.01%"."""
    if p >= 0.001:
        return f"{100 * p:.1f}%"
    return f"{100 * p:.2f}%" if p >= 0.0001 else "<0.01%"



def hover_texts(result: LensResult, labels: TokenLabels) -> list[list[str]]:
    """Per cell: where it is, entropy, KL, the target's probability and rank, and the top-k."""
    rows = row_labels(result)
    cols = column_labels(result, labels)
    out = []
    for r in range(result.n_rows):
        line = []
        for c in range(len(result.positions)):
            parts = [
                f"<b>{rows[r]}</b> · after <b>{cols[c]}</b>",
                f"entropy {result.entropy[r, c]:.2f} nats · KL to final {result.kl_to_final[r, c]:.2f} nats",
            ]
            if result.target is not None:
                token = _html(labels(result.target.token))
                parts.append(
                    f"target {token}: {percent(float(result.target.prob[r, c]))}, rank {int(result.target.rank[r, c])}"
                )
            for i, (text, tid, p) in enumerate(
                zip(result.topk_tokens[r][c], result.topk_ids[r, c], result.topk_probs[r, c]), 1
            ):
                parts.append(f"{i}. {_html(labels(text, int(tid)))}  {percent(float(p))}")
            line.append("<br>".join(parts))
        out.append(line)
    return out


def heatmap(result: LensResult, metric: str = DEFAULT_METRIC, labels: TokenLabels | None = None,
            title: str | None = None, compact: bool = False) -> go.Figure:
    """Layers (bottom: embeddings, top: output) x positions; each cell shows its top-1 token.

    The colour scale of entropy and KL fits the layers: the embeddings row, whose KL to the output
    can be ten times any layer's, may go past it (shown at the scale's end, its value in the hover)."""
    labels = labels or TokenLabels()
    if METRICS[metric].needs_target and result.target is None:
        metric = DEFAULT_METRIC
    spec = METRICS[metric]
    z = metric_values(result, metric)
    cell_text = [
        [_html(_short(labels(result.topk_tokens[r][c][0], int(result.topk_ids[r, c, 0])))) for c in range(z.shape[1])]
        for r in range(z.shape[0])
    ]
    colorbar = dict(title=dict(text=spec.title, side="right"))
    if spec.percent:
        zmin, zmax = 0.0, 1.0
        colorbar.update(tickformat=".0%")
    elif metric == "target rank":
        zmin, zmax = 0.0, max(1.0, float(np.nanmax(z)))
        ticks = list(range(0, int(np.ceil(zmax)) + 1))
        colorbar.update(tickvals=ticks, ticktext=[f"{10 ** t:,}" for t in ticks])
    else:
        layers = z[1:] if z.shape[0] > 2 else z
        zmin, zmax = float(np.nanmin(layers)), float(np.nanmax(layers)) or 1.0
        if float(np.nanmax(z)) > zmax * 1.05:
            colorbar["title"]["text"] = f"{spec.title}<br>embeddings row: up to {float(np.nanmax(z)):.0f}"
    n_rows, n_cols = z.shape
    labelled = n_cols <= _MAX_LABELLED_COLUMNS
    target = f" · target {_html(labels(result.target.token))}" if result.target is not None else ""
    title = _html(title) if title else f"{_html(result.model)} · {result.backend}{target} · colour: {spec.title}"
    xaxis = _x_axis(column_labels(result, labels), "input position (each cell: the predicted next token)", compact)
    rows = row_labels(result)
    # The layout given to the constructor, not by update_layout: half the time of building the figure.
    return go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(n_cols)),
            y=list(range(n_rows)),
            text=cell_text if labelled else None,
            texttemplate="%{text}" if labelled else None,
            textfont=dict(size=10 if n_cols <= 24 else 8),
            hovertext=hover_texts(result, labels),
            hovertemplate="%{hovertext}<extra></extra>",
            colorscale=spec.colorscale,
            reversescale=spec.reverse,
            zmin=zmin,
            zmax=zmax,
            colorbar=colorbar,
            xgap=1,
            ygap=1,
        ),
        layout=dict(
            title=dict(text=title, font=dict(size=14)),
            xaxis=xaxis,
            yaxis=dict(tickmode="array", tickvals=list(range(n_rows)), ticktext=rows, title=None, automargin=True),
            height=max(360, min(1400, 140 + 20 * n_rows)),
            margin=_margin(xaxis, rows, colorbar, len(f"{zmax:.0f}") + 2),
            hoverlabel=dict(font=dict(family="monospace", size=12), align="left"),
        ),
    )


def top1_differs(a: LensResult, b: LensResult) -> np.ndarray | None:
    """[rows, positions]: True where two results of the same prompt and depth predict different
    top-1 tokens; None when their cells do not line up (other tokens, other depth)."""
    if a.token_ids != b.token_ids or a.positions != b.positions or a.n_rows != b.n_rows:
        return None
    return a.topk_ids[:, :, 0] != b.topk_ids[:, :, 0]


def mark_differences(fig: go.Figure, a: LensResult, b: LensResult, differs: np.ndarray,
                     labels_a: TokenLabels | None = None, labels_b: TokenLabels | None = None) -> go.Figure:
    """Outline, on a heatmap of A or B, the cells where A and B predict different top-1 tokens
    (`top1_differs`); hovering an outline shows both tokens."""
    labels_a, labels_b = labels_a or TokenLabels(), labels_b or TokenLabels()
    rows, cols = np.nonzero(differs)
    hover = [f"<b>{row_labels(a)[r]}</b> · A and B differ<br>A: {_html(labels_a(a.topk_tokens[r][c][0], int(a.topk_ids[r, c, 0])))}"
             f"  {percent(float(a.topk_probs[r, c, 0]))}<br>B: {_html(labels_b(b.topk_tokens[r][c][0], int(b.topk_ids[r, c, 0])))}"
             f"  {percent(float(b.topk_probs[r, c, 0]))}" for r, c in zip(rows, cols)]
    fig.add_trace(go.Scatter(
        x=cols.tolist(), y=rows.tolist(), mode="markers", showlegend=False, name="A ≠ B",
        marker=dict(symbol="square-open", size=15, color="#ff2d55", line=dict(width=2.5)),
        hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
    ))
    return fig


def _depth(result: LensResult, relative: bool) -> list[float]:
    n = result.n_rows - 1
    return [r / n if relative else r for r in range(result.n_rows)]


def target_chart(results: list[tuple[str, LensResult]], position: int = -1) -> go.Figure:
    """The target token's probability (solid) and rank (dotted, log axis) across the layers.

    Several results (a comparison) share the chart; when their depths differ, the x axis is the
    fraction of the model's depth, so the first and last layers line up.
    """
    fig = go.Figure()
    with_target = [(name, r) for name, r in results if r.target is not None]
    if not with_target:
        fig.add_annotation(text="Set a target token to follow it through the layers.", showarrow=False,
                           x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=14))
        fig.update_layout(height=260, xaxis=dict(visible=False), yaxis=dict(visible=False),
                          margin=dict(l=10, r=10, t=30, b=10))
        return fig
    relative = len({r.n_rows for _, r in with_target}) > 1
    labels = TokenLabels()
    traces = []
    for i, (name, result) in enumerate(with_target):
        col = position % len(result.positions)
        x = _depth(result, relative)
        prob = result.target.prob[:, col]
        rank = result.target.rank[:, col]
        custom = [[layer, int(k), percent(float(p))] for layer, k, p in zip(row_labels(result), rank, prob)]
        token = _html(labels(result.target.token))
        name = _html(name)
        color = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"][i % 4]
        traces.append(go.Scatter(
            x=x, y=prob, mode="lines+markers", name=f"{name}: p({token})", line=dict(color=color),
            customdata=custom, hovertemplate="%{customdata[0]}: p=%{customdata[2]}, rank %{customdata[1]}<extra>" + name + "</extra>",
        ))
        traces.append(go.Scatter(
            x=x, y=rank, mode="lines", name=f"{name}: rank", yaxis="y2",
            line=dict(color=color, dash="dot", width=1), hoverinfo="skip",
        ))
    first = with_target[0][1]
    col = position % len(first.positions)
    after = _html(labels(first.tokens[first.positions[col]], first.token_ids[first.positions[col]]))
    # The layout given to the constructor, not by update_layout: half the time of building the figure.
    return go.Figure(traces, layout=dict(
        title=dict(text=f"target {_html(labels(first.target.token))} after {after}: probability and rank by layer",
                   font=dict(size=14)),
        xaxis=dict(title="fraction of depth (0 = embeddings, 1 = output)" if relative else "layer (0 = embeddings)"),
        yaxis=dict(title="probability", tickformat=".0%", range=[0, 1.02]),
        yaxis2=_rank_axis(max(int(r.target.rank.max()) for _, r in with_target)),
        legend=dict(orientation="h", y=-0.25),
        height=360,
        margin=dict(l=10, r=10, t=50, b=10),
    ))


def _rank_axis(worst: int) -> dict:
    """The rank axis (log, best at the top), labelled at powers of ten only (1, 10, 100, 1k, ...)."""
    decades = range(0, max(1, int(np.ceil(np.log10(max(worst, 1) + 1)))) + 1)
    values = [10 ** d for d in decades]
    text = [f"{v:,}" if v < 1000 else f"{v // 1000:,}k" for v in values]
    return dict(title="rank", type="log", overlaying="y", side="right", autorange="reversed", showgrid=False,
                tickmode="array", tickvals=values, ticktext=text, minor=dict(showgrid=False, ticks=""))


# ---------------------------------------------------------------- activation patching

PATCH_GRIDS = {
    "resid": "residual stream",
    "attn": "attention output",
    "mlp": "MLP output",
}


def _token_pair(result, p: int, labels: TokenLabels) -> str:
    clean = _html(labels(result.clean_tokens[p], result.clean_ids[p]))
    corrupt = _html(labels(result.corrupt_tokens[p], result.corrupt_ids[p]))
    return clean if clean == corrupt else f"{clean} / {corrupt}"


def patch_heatmap(result, grid: str = "resid", labels: TokenLabels | None = None, compact: bool = False) -> go.Figure:
    """A PatchResult's effect grid, rows × positions, in a diverging scale centred on 0 (1 = the
    clean answer restored, 0 = none, below 0 = further from it). `grid`: "resid" (rows: embeddings,
    layer 1..N), "attn" or "mlp" (rows: block 1..N). Hover: the effect, the patched metric and
    the patched run's top-3 tokens. A figure saying why, when the sublayer grids are missing."""
    labels = labels or TokenLabels()
    title = PATCH_GRIDS[grid]
    if grid == "resid":
        z, tops, rows = result.effect, result.patched_topk, list(result.layers)
        values = result.patched_value
    else:
        z = result.attn_effect if grid == "attn" else result.mlp_effect
        tops = result.attn_topk if grid == "attn" else result.mlp_topk
        rows = [f"block {i}" for i in range(1, result.n_rows)]
        values = None
    if z is None:
        fig = go.Figure()
        fig.add_annotation(text=_html(f"No {title} grid: {result.sublayer_note or 'not computed'}."),
                           showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=13))
        fig.update_layout(height=200, xaxis=dict(visible=False), yaxis=dict(visible=False),
                          margin=dict(l=10, r=10, t=30, b=10))
        return fig
    n_rows, n_cols = z.shape
    cols = [f"{p}: {_token_pair(result, p, labels)}" for p in result.positions]
    hover = []
    for r in range(n_rows):
        line = []
        for c in range(n_cols):
            parts = [f"<b>{rows[r]}</b> · {title} at <b>{cols[c]}</b>",
                     f"effect {100 * z[r, c]:.1f}% of the way from corrupted to clean"]
            if values is not None:
                parts.append(f"{_html(result.metric)} = {values[r, c]:.4g}")
            parts.append("patched run: " + "  ".join(f"{_html(labels(t))} {percent(q)}" for t, q in tops[r][c]))
            line.append("<br>".join(parts))
        hover.append(line)
    bound = max(1.0, float(np.nanmax(np.abs(z))))
    colorbar = dict(title=dict(text="effect", side="right"), tickformat=".0%")
    labelled = n_cols <= _MAX_LABELLED_COLUMNS
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_cols)), y=list(range(n_rows)),
        text=[[f"{100 * v:.0f}" for v in row] for row in z] if labelled else None,
        texttemplate="%{text}" if labelled else None, textfont=dict(size=9),
        hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
        colorscale="RdBu", zmid=0.0, zmin=-bound, zmax=bound,
        colorbar=colorbar,
        xgap=1, ygap=1,
    ))
    xaxis = _x_axis(cols, "position (clean / corrupted token)", compact)
    fig.update_layout(
        title=dict(text=f"patching the {title} · {_html(result.metric)} · {_html(result.model)} · {result.backend}",
                   font=dict(size=14)),
        xaxis=xaxis,
        yaxis=dict(tickmode="array", tickvals=list(range(n_rows)), ticktext=rows, title=None, automargin=True),
        height=max(360, min(1400, 120 + 20 * n_rows)),
        margin=_margin(xaxis, rows, colorbar, top=50),
        hoverlabel=dict(font=dict(family="monospace", size=12), align="left"),
    )
    return fig
