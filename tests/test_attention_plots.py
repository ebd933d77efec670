"""The attention and routing figures show the numbers `tracing.attention` computed, on real results."""

from __future__ import annotations

import numpy as np
import pytest

import tracing
from tracing.attention import attention_with
from ui.attention_plots import MEAN, attention_heatmap, head_choices, layer_choices, routing_heatmap

PROMPT = "The capital of Germany is"


@pytest.fixture(scope="module")
def smol(smollm2_llama_cpp):
    return attention_with(smollm2_llama_cpp, PROMPT, layers=[2, 20])


def test_one_head_query_by_key_with_tokens_on_both_axes(smol):
    fig = attention_heatmap(smol, layer=20, head=4)
    heat = fig.data[0]
    z = np.asarray(heat.z, dtype=float)
    np.testing.assert_allclose(z[np.isfinite(z)], smol.pattern[1, 4][np.isfinite(z)])
    assert np.isnan(z[0, 1:]).all() and np.isfinite(np.tril(z)).all()  # the future is blank
    assert "layer 20, full attention" in fig.layout.title.text and "head 4 (KV group 1)" in fig.layout.title.text
    assert list(fig.layout.xaxis.ticktext)[3] == "3: ␣Germany" and list(fig.layout.yaxis.ticktext)[0] == "0: The"
    assert "query 4 <b>␣is</b> → key 3 <b>␣Germany</b>" in heat.hovertext[4][3]


def test_the_mean_over_heads_and_the_pickers(smol):
    fig = attention_heatmap(smol, layer=2)
    z = np.asarray(fig.data[0].z, dtype=float)
    np.testing.assert_allclose(z[-1], smol.pattern[0, :, -1].mean(0), rtol=1e-6)
    assert f"{MEAN} (9)" in fig.layout.title.text
    assert head_choices(smol)[0] == (MEAN, None) and head_choices(smol)[1] == ("head 0 (KV group 0)", 0)
    assert layer_choices(smol) == [("layer 2 · full attention", 2), ("layer 20 · full attention", 20)]
    with pytest.raises(ValueError, match="layer 5 was not fetched"):
        attention_heatmap(smol, layer=5)


def test_routing_layers_by_positions():
    from tests.converted_models import converted

    tracer = tracing.open_tracer(str(converted("qwen3_moe", "f32")), "llama-cpp")
    routing = tracing.routing_with(tracer, PROMPT)
    fig = routing_heatmap(routing)
    heat = fig.data[0]
    np.testing.assert_array_equal(np.asarray(heat.z), routing.experts[:, :, 0])
    assert list(fig.layout.yaxis.ticktext) == ["layer 1", "layer 2", "layer 3", "layer 4"]
    e, w = routing.experts[2, 3], routing.weights[2, 3]
    assert f"expert {e[0]}: weight {w[0]:.3f}<br>expert {e[1]}: weight {w[1]:.3f}" in heat.hovertext[2][3]
    assert heat.text[2][3] == f"{e[0]},{e[1]}" and "4 experts, top 2" in fig.layout.title.text
