"""Plotly figures of an AttentionResult: a query x key heatmap per layer and head, and MoE routing.

Reads the numbers `tracing.attention` computed; computes none itself beyond the mean over heads.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from tracing.attention import AttentionResult, RoutingResult

from .tokens import TokenLabels

_TICK_CHARS = 12  # longest token in an axis label before it is cut (the hover shows it whole)
_MAX_TICKS = 48
_MAX_LABELLED = 24  # up to this many keys the cells show their percentage
MEAN = "mean over heads"
# Up to this many experts each gets a colour of its own; more share a continuous scale.
_EXPERT_COLOURS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
]

ATTENTION_NOTE = (
    "Rows: query positions (the token doing the looking); columns: key positions (the tokens it looks at). "
    "A cell is how much of that head's attention the query puts on the key (each row sums to 100%). "
    "Blank cells lie in the future of their query: a causal model cannot look there. "
    "`␣` is a space."
)
ROUTING_NOTE = (
    "Rows: the mixture-of-experts layers; columns: the prompt's tokens. A cell's colour is the expert the "
    "router chose first for that token in that layer; hover for every chosen expert and its weight."
)


def _html(text: str) -> str:
    """Plotly reads labels as a little HTML: a token such as "<br>" must show as text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _short(text: str, chars: int = _TICK_CHARS) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _axis(labels: list[str], positions: list[int], title: str, **extra) -> dict:
    n = len(positions)
    step = -(-n // _MAX_TICKS)
    ticks = list(range(0, n, step))
    return dict(tickmode="array", tickvals=[positions[t] for t in ticks],
                ticktext=[_short(labels[t]) for t in ticks], title=title, automargin=True,
                tickangle=0 if n <= 8 else -45, tickfont=dict(size=11 if n <= 24 else 9), **extra)


def head_choices(result: AttentionResult) -> list[tuple[str, int | None]]:
    """(label, head) pairs for a picker: the mean over the fetched heads first (head None), then each head."""
    return [(MEAN, None)] + [(label, h) for label, h in zip(result.head_labels, result.heads)]


def layer_choices(result: AttentionResult) -> list[tuple[str, int]]:
    """(label, layer) pairs for a picker, e.g. ("layer 4 · full attention, NoPE (no position encoding)", 4)."""
    return [(f"layer {layer} · {label}", layer) for layer, label in zip(result.layers, result.layer_labels)]


def attention_heatmap(result: AttentionResult, layer: int | None = None, head: int | None = None,
                      labels: TokenLabels | None = None) -> go.Figure:
    """Query x key probabilities of one fetched `layer` (1-based; default the first fetched) and `head`
    (0-based), or the mean over the fetched heads when `head` is None; tokens on both axes."""
    labels = labels or TokenLabels()
    layer = result.layers[0] if layer is None else layer
    if layer not in result.layers:
        raise ValueError(f"layer {layer} was not fetched (fetched: {result.layers})")
    li = result.layers.index(layer)
    if head is None:
        z = result.pattern[li].mean(axis=0)
        which = f"{MEAN} ({len(result.heads)})"
    else:
        if head not in result.heads:
            raise ValueError(f"head {head} was not fetched (fetched: {result.heads})")
        z = result.pattern[li, result.heads.index(head)]
        which = result.head_labels[result.heads.index(head)]
    start, stop = result.queries
    queries, keys = list(range(start, stop)), list(range(stop))
    texts = [_html(labels(result.tokens[p], result.token_ids[p])) for p in range(stop)]
    future = np.arange(stop)[None, :] > np.arange(start, stop)[:, None]
    shown = np.where(future, np.nan, z)
    hover = [[f"query {q} <b>{texts[q]}</b> → key {k} <b>{texts[k]}</b><br>{100 * z[i, k]:.2f}%"
              if not future[i, k] else f"key {k} is after query {q}" for k in keys] for i, q in enumerate(queries)]
    labelled = stop <= _MAX_LABELLED
    fig = go.Figure(go.Heatmap(
        z=shown, x=keys, y=queries,
        text=[[f"{100 * v:.0f}" if not f else "" for v, f in zip(row, frow)] for row, frow in zip(z, future)]
        if labelled else None,
        texttemplate="%{text}" if labelled else None, textfont=dict(size=9),
        hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
        colorscale="Blues", zmin=0.0, zmax=1.0,
        colorbar=dict(title=dict(text="attention", side="right"), tickformat=".0%"),
        xgap=1, ygap=1,
    ))
    fig.update_layout(
        title=dict(text=f"{_html(result.model)} · {result.backend} · layer {layer}, "
                        f"{_html(result.layer_labels[li])} · {_html(which)}", font=dict(size=14)),
        xaxis=_axis([f"{k}: {texts[k]}" for k in keys], keys, "key (looked at)"),
        yaxis=_axis([f"{q}: {texts[q]}" for q in queries], queries, "query (looking)", autorange="reversed"),
        height=max(360, min(1200, 160 + 22 * len(queries))),
        margin=dict(l=10, r=10, t=50, b=10),
        hoverlabel=dict(font=dict(family="monospace", size=12), align="left"),
    )
    return fig


def _expert_scale(n_experts: int) -> list | str:
    """A discrete colour per expert (up to 20), else a continuous scale."""
    if n_experts > len(_EXPERT_COLOURS) or n_experts < 2:
        return "Turbo"
    scale = []
    for e in range(n_experts):
        scale += [[e / n_experts, _EXPERT_COLOURS[e]], [(e + 1) / n_experts, _EXPERT_COLOURS[e]]]
    return scale


def routing_heatmap(routing: RoutingResult, labels: TokenLabels | None = None) -> go.Figure:
    """MoE layers x positions: each cell coloured by the expert chosen first (its number written in the
    cell), the hover listing every chosen expert with its weight."""
    labels = labels or TokenLabels()
    n_layers, n_positions, k = routing.experts.shape
    n_experts = routing.n_experts or int(routing.experts.max()) + 1
    ids = routing.token_ids or [None] * n_positions
    texts = [_html(labels(t, i)) for t, i in zip(routing.tokens, ids)]
    z = routing.experts[:, :, 0].astype(float)
    hover = [[f"<b>layer {layer}</b> · {p}: <b>{texts[p]}</b><br>" + "<br>".join(
        f"expert {int(e)}: weight {float(w):.3f}" for e, w in zip(routing.experts[li, p], routing.weights[li, p]))
        for p in range(n_positions)] for li, layer in enumerate(routing.layers)]
    labelled = n_positions <= 40
    positions = list(range(n_positions))
    fig = go.Figure(go.Heatmap(
        z=z, x=positions, y=list(range(n_layers)),
        text=[[",".join(str(int(e)) for e in routing.experts[li, p]) for p in positions] for li in range(n_layers)]
        if labelled else None,
        texttemplate="%{text}" if labelled else None, textfont=dict(size=9),
        hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
        colorscale=_expert_scale(n_experts), zmin=-0.5, zmax=n_experts - 0.5,
        colorbar=dict(title=dict(text="first expert", side="right"),
                      tickvals=list(range(n_experts)) if n_experts <= len(_EXPERT_COLOURS) else None),
        xgap=1, ygap=1,
    ))
    fig.update_layout(
        title=dict(text=f"{_html(routing.model)} · {routing.backend} · routing: {n_experts} experts, top {k}",
                   font=dict(size=14)),
        xaxis=_axis([f"{p}: {texts[p]}" for p in positions], positions, "token"),
        yaxis=dict(tickmode="array", tickvals=list(range(n_layers)), ticktext=[f"layer {x}" for x in routing.layers],
                   title=None, automargin=True),
        height=max(260, min(1200, 140 + 22 * n_layers)),
        margin=dict(l=10, r=10, t=50, b=10),
        hoverlabel=dict(font=dict(family="monospace", size=12), align="left"),
    )
    return fig


__all__ = ["attention_heatmap", "routing_heatmap", "head_choices", "layer_choices", "ATTENTION_NOTE",
           "ROUTING_NOTE", "MEAN"]
