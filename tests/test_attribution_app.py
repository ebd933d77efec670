"""The app's Attribution tab, in-process on the bundled SmolLM2 (PyTorch and llama.cpp) and a tiny
MoE model: the figures carry the engine's numbers, the attention viewer fetches one layer per pick,
and a mistake is a message in the page; then once in a real browser, as a person uses it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from tracing.attention import attention_with
from tracing.attribution import attribute_with
from tracing.models import DEFAULT_MODEL_NAME
from ui.app import LensApp, Settings, build_app
from ui.attribution_view import ATTRIBUTION_EXAMPLES, MEAN_HEAD, AttributionView
from ui.core import merged, no_progress
from ui.tokens import typed_token

OUTPUTS = AttributionView.API_OUTPUTS
STEPS = AttributionView.STEP_OUTPUTS
EXAMPLE = ATTRIBUTION_EXAMPLES[0]  # The capital of Germany is -> ␣Berlin vs ␣Paris
DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def app() -> LensApp:
    return LensApp(Settings())


@pytest.fixture(scope="module")
def view(app) -> AttributionView:
    return tab(app)


def tab(app: LensApp) -> AttributionView:
    return next(v for v in app.views if isinstance(v, AttributionView))


def run(view, *inputs, model=DEFAULT_MODEL_NAME, backend="hooks") -> dict:
    return dict(zip(OUTPUTS, view.attribute(*inputs, model, backend, progress=no_progress)))


def steps(view, *inputs, model=DEFAULT_MODEL_NAME, backend="hooks") -> dict:
    return dict(zip(STEPS, merged(view.attribute_steps(*inputs, model, backend, progress=no_progress))))


def bars_of(figure) -> dict:
    """name -> the y values of the bars figure's traces (None where a trace has no bar)."""
    return {trace.name: np.array([np.nan if y is None else y for y in trace.y], float) for trace in figure.data}


def shown_logit(summary: str) -> float:
    return float(re.search(r"is \*\*(-?\d+\.\d+)\*\*", summary)[1])


def check_figures_carry(out: dict, result, tolerance: float) -> None:
    """The bars, heads and summary show the engine's numbers: the bars and the bias add up to the
    logit the summary states, and each layer's heads to its attention bar."""
    bars = bars_of(out["bars"])
    np.testing.assert_allclose(bars["attention"][1:-1], result.attention, atol=1e-9)
    np.testing.assert_allclose(bars["MLP"][1:-1], result.mlp, atol=1e-9)
    grey = bars["embeddings, bias"]
    assert grey[0] == pytest.approx(result.embeddings) and grey[-1] == pytest.approx(result.bias)
    total = np.nansum(bars["attention"]) + np.nansum(bars["MLP"]) + np.nansum(grey)
    logit = shown_logit(out["summary"])
    assert logit == pytest.approx(result.final_logit, abs=5e-4)
    assert total == pytest.approx(logit, abs=tolerance)
    assert bars["running total"][-1] == pytest.approx(total)
    z = np.asarray(out["heads"].data[0].z, float)
    assert z.shape == (30, 9)
    np.testing.assert_allclose(z, result.heads, atol=1e-9)
    np.testing.assert_allclose(z.sum(1) + result.head_bias, result.attention, atol=1e-3 * np.abs(result.attention).max())


def test_the_example_on_pytorch(view, smollm2_hooks):
    out = run(view, *EXAMPLE)
    ids = smollm2_hooks.encode(EXAMPLE[0])
    result = attribute_with(smollm2_hooks, None, " Berlin", " Paris", ids=ids)
    check_figures_carry(out, result, tolerance=1e-3)  # exact on PyTorch, up to float rounding
    summary = out["summary"]
    assert "logit difference** of `␣Berlin` rather than `␣Paris` is **4.783**" in summary
    assert "position 4 (`␣is`)" in summary
    assert "**Writes it most:** layer 24 attention (+2.291), layer 30 attention" in summary
    assert "layer 24 head 4" in summary and "layer 30 head 1" in summary
    # The attention viewer opens on the layer whose attention writes most, at its strongest head.
    pattern = out["pattern"]
    assert "layer 24" in pattern.layout.title.text and "head 4 (KV group 1)" in pattern.layout.title.text
    engine = attention_with(smollm2_hooks, ids=ids, layers=[24], heads=[4])
    shown = np.asarray(pattern.data[0].z, float)
    np.testing.assert_allclose(np.nan_to_num(shown), engine.pattern[0, 0], atol=1e-6)
    assert "1 layer x 9 heads, queries 0-4 over keys 0-4" in out["fetched"]
    assert out["routing"] is None  # a dense model


def test_the_gguf_and_the_attention_viewer(view, app, smollm2_llama_cpp):
    out = steps(view, *EXAMPLE, backend="llama-cpp")
    assert out["results"]["visible"] is True and out["message"] == ""
    ids = smollm2_llama_cpp.encode(EXAMPLE[0])
    result = attribute_with(smollm2_llama_cpp, None, " Berlin", " Paris", ids=ids)
    # llama.cpp's own logit is rounded in its output matmul: the parts miss it by that rounding, and say so.
    check_figures_carry(out, result, tolerance=0.05)
    assert "llama.cpp" in out["summary"] and "8 bits" in out["summary"]
    assert "layer 24 · attention +2.297" in dict(out["layer"]["choices"]).keys()
    assert out["layer"]["value"] == 24 and out["head"]["value"] == 4
    assert out["routing"]["visible"] is False
    state = out["state"]
    assert state.backend == "llama-cpp" and state.attention.layers == [24]

    # Another layer: fetched alone; the head picker offers that layer's heads with their shares, its strongest first.
    heads, figure, fetched, state = view.show_layer(state, 30)
    assert state.attention.layers == [30] and "1 layer x 9 heads" in fetched
    assert heads["value"] == 1 and ("head 1 (KV group 0) · +1.887", 1) in heads["choices"]
    assert "layer 30" in figure.layout.title.text
    # The mean over heads: drawn from what was fetched, the same numbers as the engine's mean.
    heads, figure, fetched, state = view.show_attention(state, 30, MEAN_HEAD)
    engine = attention_with(smollm2_llama_cpp, ids=ids, layers=[30])
    np.testing.assert_allclose(np.nan_to_num(np.asarray(figure.data[0].z, float)), engine.mean_over_heads()[0],
                               atol=1e-6)
    assert "mean over heads (9)" in figure.layout.title.text and heads["value"] == MEAN_HEAD
    # Nothing attributed yet: a word, not a crash.
    assert "Attribute" in view.show_attention(None, 3, 0)[2]


def test_attribute_this_reply_fills_the_tab_and_attributes_its_first_token(app, view):
    chat = app.chat_tab
    *_, (history, _) = chat.chat("What is the capital of Germany?", [], DEFAULT_MODEL_NAME, "", 0.0, 0.95, 12, 1)
    reply = history[-1]["content"]
    out = merged(chat.attribute_reply_steps(history, DEFAULT_MODEL_NAME, "", progress=no_progress))
    tabs, prompt, target, contrast, position, backend, status = out[:7]
    shown = dict(zip(STEPS, out[7:]))
    assert tabs["selected"] == "attribution" and backend == "llama-cpp" and contrast == "" and position == -1
    assert status == "" and shown["message"] == "" and shown["results"]["visible"] is True
    # The conversation as the model read it, up to the reply; the target is the reply's first token.
    assert "<|im_start|>assistant" in prompt and not prompt.endswith(reply) and prompt.rstrip().endswith("assistant")
    tracer = app.open(DEFAULT_MODEL_NAME, "llama-cpp")
    whole = tracer.encode(prompt + reply)
    ids = tracer.encode(prompt)
    assert whole[: len(ids)] == ids and reply.startswith(typed_token(target).lstrip())
    result = shown["state"].attribution
    assert result.target_id == whole[len(ids)] and result.position == len(ids) - 1
    # The tab shows what its inputs give: Attribute with them is the same result.
    again = steps(view, prompt, target, contrast, position, backend="llama-cpp")
    assert again["summary"] == shown["summary"]
    api = chat.attribute_reply(history, DEFAULT_MODEL_NAME, "", progress=no_progress)
    assert api[1:6] == (prompt, target, "", -1, "llama-cpp") and api[6] == shown["summary"]
    # No reply yet: a line under the chat, nothing else touched.
    empty = merged(chat.attribute_reply_steps([], DEFAULT_MODEL_NAME, "", progress=no_progress))
    assert "no reply" in empty[6] and "Not attributed." in empty[6]
    assert all(value == gr.update() for i, value in enumerate(empty) if i != 6)


def test_a_long_prompt_fetches_one_layer_within_the_bound(view):
    from tracing.attention import MAX_PATTERN_BYTES

    prompt = "The capital of Germany is Berlin, and the capital of France is Paris. " * 40
    out = run(view, prompt, "", "", -1)  # no target: the model's own prediction
    assert "logit** of `" in out["summary"]
    fetched = out["fetched"]
    assert re.search(r"1 layer x 9 heads, queries 0-\d+ over keys", fetched)
    size = re.search(r": ([\d.]+) (KB|MB)", fetched)
    assert float(size[1]) * {"KB": 2**10, "MB": 2**20}[size[2]] <= MAX_PATTERN_BYTES


def test_mistakes_are_messages_beside_the_inputs(view):
    out = steps(view, "The capital of Germany is", "␣Berlin city", "␣Paris", -1)
    assert "Not attributed." in out["message"] and "tokens for this model" in out["message"]
    # Nothing of an earlier result stays to pass for this one; the inputs are not outputs, so they stay.
    assert out["results"]["visible"] is False and out["state"] is None and out["summary"] == ""
    assert out["bars"] is None and out["pattern"] is None and out["layer"]["choices"] == []
    assert "outside the prompt" in steps(view, *EXAMPLE[:3], 9)["message"]
    assert "same token" in steps(view, "The capital of Germany is", "␣Berlin", "␣Berlin", -1)["message"]
    assert "empty" in steps(view, " ", "␣Berlin", "", -1)["message"]
    assert "Attribution runs on" in steps(view, *EXAMPLE, backend="tuned-lens")["message"]
    with pytest.raises(gr.Error, match="tokens for this model"):  # the API: a gr.Error, never a traceback
        view.attribute("The capital of Germany is", "␣Berlin city", "", -1, DEFAULT_MODEL_NAME, "hooks",
                       progress=no_progress)


def test_a_moe_model_shows_its_routing():
    from tests.converted_models import model_dir

    app = LensApp(Settings(allow_custom_models=True))
    path = str(model_dir("qwen3_moe"))
    out = steps(tab(app), "The capital of Germany is", "", "", -1, model=path)
    assert out["message"] == "", out["message"]
    assert out["routing"]["visible"] is True
    figure = out["routing"]["value"]
    from tracing import open_tracer
    from tracing.attention import routing_with

    routing = routing_with(open_tracer(path, "hooks"), out["state"].ids)
    np.testing.assert_array_equal(np.asarray(figure.data[0].z), routing.experts[:, :, 0])
    assert "Rows: the mixture-of-experts layers" in out["fetched"]


def test_the_tab_is_laid_out_with_its_examples_and_api():
    demo, app = build_app(Settings())
    config = demo.get_config_file()
    values = {c["props"].get("elem_id"): c["props"].get("value") for c in config["components"]}
    assert {"tab-attribution", "attribution-prompt", "attribution-bars", "attribution-pattern"} <= values.keys()
    assert values["attribution-prompt"] == "The capital of Germany is" and values["attribution-target"] == "␣Berlin"
    assert values["attribution-contrast"] == "␣Paris" and values["attribution-position"] == -1
    assert any(d.get("api_name") == "attribute" for d in config["dependencies"])
    assert [v.id for v in app.views][-1] == "attribution"


def test_attribute_over_http(demo_server):
    import json

    from gradio_client import Client

    client = Client(demo_server[0], verbose=False)
    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/attribute"]
    assert [p["parameter_name"] for p in endpoint["parameters"]] == [
        "prompt", "target", "contrast", "position", "model", "backend"]
    summary, bars, heads, pattern, fetched, routing = client.predict(*EXAMPLE, DEFAULT_MODEL_NAME, "llama-cpp",
                                                                     api_name="/attribute")
    assert "**4.704**" in summary and "1 layer x 9 heads" in fetched and routing is None
    assert [t["name"] for t in json.loads(bars["plot"])["data"]][:2] == ["attention", "MLP"]
    with pytest.raises(Exception, match="tokens for this model"):
        client.predict("The capital of Germany is", "␣Berlin city", "", -1, DEFAULT_MODEL_NAME, "hooks",
                       api_name="/attribute")


# ---------------------------------------------------------------- in a real browser

CHROMIUM = "/usr/bin/chromium"
SLOW = 180_000


@pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"), reason="Debian's chromium is not installed")
def test_in_a_browser_attribute_then_a_mistake_then_again(demo_server, tmp_path):
    from playwright import sync_api

    def wait_for_text(page, selector: str, pattern: str) -> str:
        page.wait_for_function(
            "([s, p]) => { const e = document.querySelector(s); return e && new RegExp(p).test(e.innerText ?? e.textContent); }",
            arg=[selector, pattern], timeout=SLOW)
        return page.evaluate("s => { const e = document.querySelector(s); return e.innerText ?? e.textContent; }", selector)

    url, _ = demo_server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.goto(url)
        page.get_by_role("tab", name="Attribution").click(timeout=SLOW)
        page.locator("#attribution-prompt textarea").fill("The capital of Germany is")
        page.locator("#attribution-target textarea").fill("␣Berlin")
        page.locator("#attribution-contrast textarea").fill("␣Paris")
        page.locator("#attribution-run").click()
        summary = wait_for_text(page, "#attribution-summary", "Writes it most")
        assert "␣Berlin" in summary and "4.783" in summary and "layer 24 attention" in summary
        for plot in ("#attribution-bars", "#attribution-heads", "#attribution-pattern"):
            page.locator(f"{plot} .main-svg").first.wait_for(timeout=30_000)
        assert "1 layer x 9 heads" in page.inner_text("#attribution-fetched")
        assert not page.locator("#attribution-routing").is_visible()  # SmolLM2 has no experts
        # Another layer in the viewer: fetched alone, drawn at its strongest head.
        page.locator("#attribution-layer input").click()
        page.get_by_role("option", name=re.compile(r"^layer 30 ")).click()
        wait_for_text(page, "#attribution-pattern .gtitle", "layer 30.*head 1 ")
        page.evaluate("window.scrollTo(0, 0)")
        shots = DOCS if os.environ.get("LENSBENCH_SCREENSHOT") else tmp_path
        page.screenshot(path=str(shots / "attribution-tab.png"))

        # A target of two tokens: the message beside the inputs, the old result gone, the inputs kept.
        page.locator("#attribution-target textarea").fill("␣Berlin city")
        page.locator("#attribution-run").click()
        message = wait_for_text(page, "#attribution-message", "Not attributed")
        assert "tokens for this model" in message
        assert not page.locator("#attribution-bars").is_visible()
        assert page.input_value("#attribution-prompt textarea") == "The capital of Germany is"
        assert page.locator("#attribution-target textarea").is_editable()

        # Fixed: it works again, and the message is gone.
        page.locator("#attribution-target textarea").fill("␣Berlin")
        page.locator("#attribution-run").click()
        assert "4.783" in wait_for_text(page, "#attribution-summary", "Writes it most")
        assert page.inner_text("#attribution-message").strip() == ""
        browser.close()
    assert errors == []
