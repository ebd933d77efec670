"""Plotly figures of a SteeringVector: what each layer's direction means, and where it is strong.

Reads the numbers `tracing.steering` computed (the lens reading, lengths, separation); computes
none itself.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from tracing.steering import SteeringVector

from .tokens import readable

READING_NOTE = (
    "Rows: the layers a vector can steer (layer L is the output of block L counted from 0, as llama.cpp "
    "counts them; the Lens tab calls that residual 'layer L+1'). Each row is that layer's direction read "
    "through the lens: on the right the tokens it makes likelier, on the left those it makes less likely "
    "(colour: how much, in logits). `␣` is a space."
)
PROFILE_NOTE = (
    "Length: how far apart the two sets of examples sit at each layer. Separates: the share of examples on "
    "their own side of the midpoint along the direction (100% = the layer tells the sets apart perfectly); "
    "layers that separate well are good ones to steer."
)


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _short(text: str, chars: int = 10) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _title(vector: SteeringVector) -> str:
    made = f"{vector.method}, {vector.n_positive} + {vector.n_negative} examples" if vector.n_positive else vector.method
    return f"{_html(vector.model)} · {made}"


def reading_figure(vector: SteeringVector, top_k: int = 5) -> go.Figure:
    """Layers (bottom: layer 1) x tokens: the top_k suppressed tokens (left, blue) and promoted ones
    (right, red) of each layer's direction, coloured by the logit change; hover for the numbers.
    A figure saying so when the vector has not been read through the lens (`read_vector`)."""
    if vector.promoted is None or vector.suppressed is None:
        fig = go.Figure()
        fig.add_annotation(text="This vector has not been read through the lens yet.", showarrow=False,
                           x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=13))
        fig.update_layout(height=160, xaxis=dict(visible=False), yaxis=dict(visible=False),
                          margin=dict(l=10, r=10, t=30, b=10))
        return fig
    layers = list(vector.layers)
    k = max(1, min(top_k, *(len(vector.promoted[L]) for L in layers)))
    columns = [f"−{i}" for i in range(k, 0, -1)] + [f"+{i}" for i in range(1, k + 1)]
    z, text, hover = [], [], []
    for L in layers:
        cells = list(reversed(vector.suppressed[L][:k])) + list(vector.promoted[L][:k])
        z.append([value for _, value in cells])
        text.append([_html(_short(readable(token))) for token, _ in cells])
        hover.append([f"<b>layer {L}</b> · {_html(readable(token))}: {value:+.2f} logits" for token, value in cells])
    z = np.asarray(z, dtype=float)
    bound = float(np.abs(z).max()) or 1.0
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(2 * k)), y=list(range(len(layers))),
        text=text, texttemplate="%{text}", textfont=dict(size=10),
        hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
        colorscale="RdBu_r", zmid=0.0, zmin=-bound, zmax=bound,
        colorbar=dict(title=dict(text="logit change", side="right")), xgap=1, ygap=1,
    ))
    fig.update_layout(
        title=dict(text=f"what each layer's direction means · {_title(vector)}", font=dict(size=14)),
        xaxis=dict(tickmode="array", tickvals=list(range(2 * k)), ticktext=columns,
                   title="← suppressed · promoted →"),
        yaxis=dict(tickmode="array", tickvals=list(range(len(layers))), ticktext=[f"layer {L}" for L in layers],
                   automargin=True),
        height=max(320, min(1400, 100 + 22 * len(layers))),
        margin=dict(l=10, r=10, t=50, b=10),
        hoverlabel=dict(font=dict(family="monospace", size=12), align="left"),
    )
    return fig


def profile_figure(vector: SteeringVector, layers: tuple[int, int] | None = None) -> go.Figure:
    """Per layer: the direction's length (bars) and how well it separates the examples (line, %);
    the steered `layers` (first, last), if given, shaded."""
    xs = list(vector.layers)
    norms = vector.norms[1:]
    fig = go.Figure(go.Bar(x=xs, y=norms, name="length", marker_color="#9ab",
                           hovertemplate="layer %{x}: length %{y:.2f}<extra></extra>"))
    if vector.separation is not None:
        fig.add_trace(go.Scatter(x=xs, y=100 * vector.separation[1:], name="separates", yaxis="y2",
                                 mode="lines+markers", line=dict(color="#c33"),
                                 hovertemplate="layer %{x}: %{y:.0f}% of examples on their side<extra></extra>"))
    if layers is not None:
        fig.add_vrect(x0=layers[0] - 0.5, x1=layers[1] + 0.5, fillcolor="#fc6", opacity=0.25, line_width=0,
                      annotation_text="steered", annotation_position="top left")
    fig.update_layout(
        title=dict(text=f"where the direction is strong · {_title(vector)}", font=dict(size=14)),
        xaxis=dict(title="layer (output of block L, llama.cpp's numbering)", dtick=1 if len(xs) <= 32 else None),
        yaxis=dict(title="length", rangemode="tozero"),
        yaxis2=dict(title="separates (%)", overlaying="y", side="right", range=[0, 105], showgrid=False),
        legend=dict(orientation="h", y=-0.25),
        height=340, margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


__all__ = ["reading_figure", "profile_figure", "READING_NOTE", "PROFILE_NOTE"]
