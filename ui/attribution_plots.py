"""Plotly figures of an AttributionResult: what each layer writes into the logit, and which heads.

Reads the numbers `tracing.attribution` computed; computes none itself beyond a running sum.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from tracing.attribution import AttributionResult

ATTENTION_COLOR = "#4C78A8"
MLP_COLOR = "#F58518"
OTHER_COLOR = "#9D9D9D"
TOTAL_COLOR = "#222222"


def _html(text: str) -> str:
    """Plotly reads labels as a little HTML: a token such as "<br>" must show as text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _title(result: AttributionResult, what: str) -> str:
    token = _html(repr(result.tokens[result.position]))
    return f"{what} · {_html(result.metric)} after {result.position}: {token} · {_html(result.model)} · {result.backend}"


def _note(text: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=_html(text), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=13))
    fig.update_layout(height=200, xaxis=dict(visible=False), yaxis=dict(visible=False),
                      margin=dict(l=10, r=10, t=30, b=10))
    return fig


def layer_bars(result: AttributionResult) -> go.Figure:
    """Stacked bars per layer: attention and MLP contributions to the logit (difference), on either
    side of 0; the embeddings and the bias as grey bars of their own at the ends; a line for the
    running total, which ends at the model's own logit (before any soft-cap)."""
    labels = ["embeddings", *result.layers, "bias"]
    n = len(result.layers)
    attention = [None, *result.attention.tolist(), None]
    mlp = [None, *result.mlp.tolist(), None]
    other = [result.embeddings, *([None] * n), result.bias]
    steps = np.r_[result.embeddings, result.attention + result.mlp, result.bias]
    running = np.cumsum(steps)
    x = list(range(n + 2))
    fig = go.Figure()
    fig.add_trace(go.Bar(x=x, y=attention, name="attention", marker_color=ATTENTION_COLOR,
                         hovertemplate="%{customdata} attention: %{y:+.4f}<extra></extra>", customdata=labels))
    fig.add_trace(go.Bar(x=x, y=mlp, name="MLP", marker_color=MLP_COLOR,
                         hovertemplate="%{customdata} MLP: %{y:+.4f}<extra></extra>", customdata=labels))
    fig.add_trace(go.Bar(x=x, y=other, name="embeddings, bias", marker_color=OTHER_COLOR,
                         hovertemplate="%{customdata}: %{y:+.4f}<extra></extra>", customdata=labels))
    fig.add_trace(go.Scatter(x=x, y=running, name="running total", mode="lines+markers",
                             line=dict(color=TOTAL_COLOR, width=1.5), marker=dict(size=4),
                             hovertemplate="up to %{customdata}: %{y:.4f}<extra></extra>", customdata=labels))
    every = max(1, len(labels) // 32)
    ticks = [i for i in x if i % every == 0 or i == x[-1]]
    cap = f" before the soft-cap ({result.output_logit:.3f} after)" if result.softcap else ""
    fig.update_layout(
        barmode="relative",
        title=dict(text=_title(result, "direct logit attribution"), font=dict(size=14)),
        xaxis=dict(tickmode="array", tickvals=ticks, ticktext=[labels[i] for i in ticks], tickangle=-45),
        yaxis=dict(title=dict(text=f"logit contribution (model: {result.final_logit:.3f}{cap})"), zeroline=True),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
        height=420,
        margin=dict(l=10, r=10, t=60, b=10),
    )
    return fig


def heads_heatmap(result: AttributionResult) -> go.Figure:
    """Layers x heads: each head's share of its block's attention contribution, in a diverging scale
    centred on 0. A figure saying why, when the heads were not split."""
    if result.heads is None:
        return _note(f"No per-head shares: {result.heads_note or 'not computed'}.")
    z = result.heads
    n_layers, n_heads = z.shape
    rest = result.head_bias if result.head_bias is not None else np.zeros(n_layers)
    hover = [[f"<b>{result.layers[i]} head {h}</b>: {z[i, h]:+.4f}<br>"
              f"block's attention {result.attention[i]:+.4f} (biases {rest[i]:+.4f})"
              for h in range(n_heads)] for i in range(n_layers)]
    bound = float(np.abs(z).max()) or 1.0
    labelled = n_heads <= 16 and n_layers <= 48
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_heads)), y=list(range(n_layers)),
        text=[[f"{v:.2f}" for v in row] for row in z] if labelled else None,
        texttemplate="%{text}" if labelled else None, textfont=dict(size=9),
        hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
        colorscale="RdBu", zmid=0.0, zmin=-bound, zmax=bound,
        colorbar=dict(title=dict(text="logit", side="right")),
        xgap=1, ygap=1,
    ))
    fig.update_layout(
        title=dict(text=_title(result, "heads"), font=dict(size=14)),
        xaxis=dict(title="head", tickmode="array", tickvals=list(range(n_heads))),
        yaxis=dict(tickmode="array", tickvals=list(range(n_layers)), ticktext=result.layers, title=None,
                   automargin=True),
        height=max(300, min(1400, 120 + 20 * n_layers)),
        margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


__all__ = ["layer_bars", "heads_heatmap"]
