"""The app's Steer tab on the bundled SmolLM2 GGUF (llama.cpp): what Build, a file upload, Reply and
Sweep run in-process, the messages a visitor gets, and one visit in a real browser."""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from tracing.models import DEFAULT_MODEL_NAME, resolve
from tracing.steering import SteeringVector, example, generate
from ui.app import LensApp, Settings
from ui.core import merged
from ui.steer_view import SteerView, replies_html, sweep_strengths

POSITIVE, NEGATIVE = ("\n".join(texts[:4]) for texts in example())  # 4 + 4 texts: quick
SHOWN = ("built", "reading", "profile", "summary", "file", "layers")
STEPS = SHOWN + ("results", "answers", "answer_message", "message")
PROMPT = "Tell me about your neighbor."


def no_progress(fraction=None, desc=None):
    pass


@pytest.fixture(scope="module")
def view() -> SteerView:
    app = LensApp(Settings())
    return next((v for v in app.views if v.id == "steer"), None) or SteerView(app)


@pytest.fixture(scope="module")
def built(view):
    return dict(zip(SHOWN, view.build_vector(POSITIVE, NEGATIVE, "mean", DEFAULT_MODEL_NAME, "llama-cpp", "",
                                             progress=no_progress)))


def steps(call) -> dict:
    return dict(zip(STEPS, merged(call)))


def test_build_reads_the_vector_and_its_file_round_trips(built):
    vector = built["built"].vector
    assert (vector.n_positive, vector.n_negative, vector.method) == (4, 4, "mean")
    assert vector.n_blocks == 30 and vector.d_model == 576
    assert built["layers"] == "7-20"  # the suggested range, as steer-vector suggests it
    assert "4 + 4 examples" in built["summary"] and "layers 7-20" in built["summary"]
    assert len(built["reading"].data[0].y) == 29  # one row a steerable layer
    assert built["profile"].layout.shapes  # the steered range shaded
    path = Path(built["file"]["value"])
    assert built["file"]["visible"] and path.suffix == ".gguf" and path.is_file()
    again = SteeringVector.load(path, DEFAULT_MODEL_NAME)
    assert again.key == vector.key and again.method == "mean" and again.n_positive == 4


def test_sweep_at_strength_0_is_the_plain_reply(view, built):
    answers, profile = view.steer_sweep(built["built"], PROMPT, 0.3, "8-20", 7, 0.7, 24, DEFAULT_MODEL_NAME,
                                        progress=no_progress)
    texts = re.findall(r'data-strength="([^"]+)".*?class="steer-reply-text"[^>]*>(.*?)</div>', answers, re.S)
    assert [s for s, _ in texts] == ["-0.6", "-0.3", "0", "0.3", "0.6"]
    plain = generate(PROMPT, None, DEFAULT_MODEL_NAME, "llama-cpp", seed=7, temperature=0.7, max_tokens=24)
    replies = {s: html.unescape(t) for s, t in texts}
    assert replies["0"] == plain.text and plain.text
    assert replies["0.6"] != plain.text  # the vector changes the answer
    assert "layers 8-20" in answers and profile.layout.shapes[0].x0 == 7.5


def test_mistakes_are_messages_beside_the_inputs(view, built):
    empty = steps(view.build_steps("\n  \n", NEGATIVE, "mean", DEFAULT_MODEL_NAME, "llama-cpp", "7-20",
                                   progress=no_progress))
    assert "Not built." in empty["message"] and "positive examples are empty" in empty["message"]
    assert empty["built"] is None and empty["reading"] is None and not empty["file"]["visible"]
    assert empty["layers"] == "7-20"  # what the visitor typed stays
    unequal = steps(view.build_steps(POSITIVE, NEGATIVE + "\nOne more.", "pca", DEFAULT_MODEL_NAME, "llama-cpp", "",
                                     progress=no_progress))
    assert "as many texts" in unequal["message"]

    model_file = str(resolve(DEFAULT_MODEL_NAME).path)  # a model GGUF, not a control vector
    bad = steps(view.load_steps(model_file, DEFAULT_MODEL_NAME, "llama-cpp", ""))
    assert "Not loaded." in bad["message"] and "not a control vector" in bad["message"]
    assert bad["built"] is None and not bad["results"]["visible"]

    answer = dict(zip(("answers", "profile", "answer_message"), merged(view.answer_steps(
        "sweep", built["built"], PROMPT, 0.2, "0-40", 0, 0.7, 16, DEFAULT_MODEL_NAME, progress=no_progress))))
    assert answer["answers"] == "" and "Layers must be a range" in answer["answer_message"]
    none_yet = merged(view.answer_steps("reply", None, PROMPT, 0.2, "", 0, 0.7, 16, DEFAULT_MODEL_NAME))
    assert "Build a vector first" in none_yet[2]
    with pytest.raises(gr.Error, match="not a control vector"):
        view.load(model_file, DEFAULT_MODEL_NAME, "llama-cpp", "")


def test_a_file_made_here_loads_back_with_its_reading(view, built):
    loaded = dict(zip(STEPS, merged(view.load_steps(built["file"]["value"], DEFAULT_MODEL_NAME, "llama-cpp", "8-20"))))
    assert loaded["message"] == "" and loaded["results"]["visible"]
    assert loaded["built"].vector.key == built["built"].vector.key and loaded["built"].vector.promoted
    assert loaded["layers"] == "8-20" and "Loaded **" in loaded["summary"]


def test_the_steered_lens_changes_only_the_rows_above_the_steered_layers(view, built):
    vector = built["built"]
    steered, plain, layers = view._lens_pair(vector, PROMPT, 0.0, "8-20", DEFAULT_MODEL_NAME)
    assert layers == (8, 20) and steered.result.n_rows == plain.result.n_rows == 31
    np.testing.assert_allclose(steered.result.topk_probs, plain.result.topk_probs, atol=1e-6)  # strength 0: nothing
    assert steered.result.topk_ids.tolist() == plain.result.topk_ids.tolist()
    strong, plain, _ = view._lens_pair(vector, PROMPT, 4.0, "8-20", DEFAULT_MODEL_NAME)
    # direction.8 is added at the end of block 8 (from 0) = the lens's row 9: rows 0-8 are the plain model's
    np.testing.assert_allclose(strong.result.topk_probs[:9], plain.result.topk_probs[:9], atol=1e-6)
    assert strong.result.topk_ids[:9].tolist() == plain.result.topk_ids[:9].tolist()
    assert np.abs(strong.result.entropy[9:] - plain.result.entropy[9:]).max() > 1e-3
    assert not np.allclose(strong.result.topk_probs[9], plain.result.topk_probs[9], atol=1e-6)
    figure, note = view.steer_lens(vector, PROMPT, 4.0, "8-20", DEFAULT_MODEL_NAME)
    assert len(figure.data[0].z) == 31 and "unsteered" in note and "layers 8-20" in note
    heatmap, note, message = merged(view.lens_steps(None, PROMPT, 0.2, "", DEFAULT_MODEL_NAME))
    assert heatmap is None and note == "" and "Build a vector first" in message


def test_stop_ends_the_build_with_a_message(view):
    def progress(fraction, desc=None):
        if fraction and fraction > 0.2:
            view.stop(None)

    out = steps(view.build_steps(POSITIVE, NEGATIVE, "mean", DEFAULT_MODEL_NAME, "llama-cpp", "", progress=progress))
    assert "Stopped" in out["message"] and out["built"] is None


def test_sweep_strengths():
    assert sweep_strengths(0.2) == [-0.4, -0.2, 0.0, 0.2, 0.4] and sweep_strengths(-0.1)[0] == -0.2
    assert sweep_strengths(0) == [0.0] and replies_html([], (1, 2)) == ""


# ---------------------------------------------------------------- one visit in a real browser

CHROMIUM = "/usr/bin/chromium"
SLOW = 180_000


@pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"), reason="Debian's chromium is not installed")
def test_a_visitor_builds_sweeps_and_recovers_from_a_mistake(demo_server, tmp_path):
    from tests.test_browser import app_page, wait_for_text

    url, app = demo_server
    assert any(v.id == "steer" for v in app.views)
    with app_page(url) as page:
        page.locator("#tab-steer-button, button[role=tab]:has-text('Steer')").first.click()
        page.locator("#steer-positive textarea").fill(POSITIVE)
        page.locator("#steer-negative textarea").fill("")  # a mistake first: an empty set
        page.locator("#steer-build").click()
        assert "negative examples are empty" in wait_for_text(page, "#steer-message", "Not built")
        page.locator("#steer-negative textarea").fill(NEGATIVE)
        page.locator("#steer-build").click()
        assert "with llama.cpp" in wait_for_text(page, "#steer-summary", "4 \\+ 4 examples")  # the GGUF itself
        page.locator("#steer-reading .nsewdrag").first.wait_for(timeout=SLOW)
        assert page.input_value("#steer-layers textarea, #steer-layers input") == "7-20"
        assert page.locator("#steer-download").is_visible()
        page.locator("#steer-max-tokens input[type=number]").fill("24")
        page.locator("#steer-max-tokens input[type=number]").press("Enter")
        page.locator("#steer-sweep-run").click()
        page.wait_for_function("() => document.querySelectorAll('#steer-answers .steer-reply').length == 5",
                               timeout=SLOW)
        texts = [t.strip() for t in page.locator("#steer-answers .steer-reply-text").all_inner_texts()]
        assert len(texts) == 5 and all(texts) and len(set(texts)) > 1
        assert "unsteered" in page.inner_text("#steer-answers")
        if os.environ.get("LENSBENCH_SCREENSHOT"):
            page.evaluate("() => window.scrollTo(0, 0)")
            page.screenshot(path=str(Path(__file__).resolve().parent.parent / "docs" / "steer-tab.png"))
        page.locator("#steer-layers textarea, #steer-layers input").first.fill("0-99")  # a bad range
        page.locator("#steer-reply").click()
        assert "Layers must be a range" in wait_for_text(page, "#steer-answer-message", "No answer")
        assert page.locator("#steer-answers .steer-reply").count() == 0  # nothing stale
        page.locator("#steer-layers textarea, #steer-layers input").first.fill("8-20")
        page.locator("#steer-reply").click()
        page.wait_for_function("() => document.querySelectorAll('#steer-answers .steer-reply').length == 2",
                               timeout=SLOW)
        assert page.inner_text("#steer-answer-message").strip() == ""
