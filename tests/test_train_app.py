"""Learned lenses in the app's Lens tab: the "Train a learned lens" panel (a tuned and a Jacobian lens
trained from the page, with a moving progress bar, Stop, the before/after KL, and the backend switch
offering the lens at once; mistakes as messages), and the lens read on the GGUF (logit, tuned,
Jacobian) from the lenses saved for the model.

Each test points LENSBENCH_CACHE at its own folder, so no lens is left in the real cache. Fits are
tiny (a 3-layer model, or one 16-token step on SmolLM2's GGUF); SmolLM2's learned lenses are the
ones tests/test_learned_lenses.py fits and keeps in .cache/test-lenses.
"""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest

from tests.test_learned_lenses import CACHE, TEXT, smollm2_jacobian, smollm2_tuned  # noqa: F401 (fixtures)
from tests.test_tuned_lens_backend import random_text, save_tiny_model
from tracing.jacobian_lens_backend import default_jacobian_dir, fitted_lens_dir
from tracing.models import DEFAULT_MODEL_NAME, resolve
from tracing.tuned_lens_backend import default_lens_dir, trained_lens_dir
from ui.app import LensApp, Settings
from ui.core import merged

TRAIN_OUT = ("message", "summary", "chart", "backend", "backend_note", "lens_kind", "lens_kind_note")
LENS_OUT = ("traced", "heatmap", "chart", "position", "table", "summary", "json", "csv", "results", "message")
TINY_PROMPT = "w5 w6 w7 w8"
# A tuned lens trained from SmolLM2's GGUF in seconds: one step of 8 tokens, one held-out row.
GGUF_TINY, GGUF_TEXT = dict(steps=1, tokens_per_step=8, seq_len=8), TEXT[:400]
SMALL = {"tuned": dict(steps=3, tokens_per_step=64, seq_len=32), "jacobian": dict(chunks=2, seq_len=24, skip_first=2)}


@pytest.fixture(scope="module")
def app() -> LensApp:
    app = LensApp(Settings(allow_custom_models=True))  # a local launch: a model folder may be typed
    app.lens_tab.train.fit_options = {kind: dict(options) for kind, options in SMALL.items()}
    return app


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """tests/tiny_models.py's llama with its word tokenizer, as a model folder the picker takes."""
    return str(save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture
def lenses(tmp_path, monkeypatch):
    """An empty lens cache for this test (models already loaded stay loaded)."""
    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "lenses"


class Progress:
    """Records what the page's progress bar was told."""

    def __init__(self, on_call=None):
        self.calls: list[tuple] = []
        self.on_call = on_call

    def __call__(self, fraction=None, desc=None):
        self.calls.append((fraction, desc))
        if self.on_call is not None:
            self.on_call(fraction)


def trained(app, kind, where, source, text, upload, model, backend="hooks", lens_kind="logit", progress=None):
    steps = app.lens_tab.train.train_steps(kind, where, source, text, upload, model, backend, lens_kind,
                                           progress=progress or Progress())
    return dict(zip(TRAIN_OUT, merged(steps)))


def usable(update) -> set[str]:
    return {value for label, value in update["choices"] if not label.endswith("unavailable")}


def assert_chart_is_the_report(out, rows: int, kind_label: str):
    """Two lines of `rows` KL values (nats), whose means are the summary's."""
    before, after = out["chart"].data
    assert (before.name, after.name) == ("logit lens", kind_label)
    assert len(before.y) == len(after.y) == rows and list(before.x)[:2] == ["embeddings", "layer 1"]
    assert "nats" in out["chart"].layout.title.text and "nats" in out["summary"]
    means = re.search(r"logit lens ([\d.]+) nats, \w+ lens ([\d.]+) nats", out["summary"])
    assert means, out["summary"]
    assert float(means[1]) == pytest.approx(np.mean(before.y), abs=0.006)
    assert float(means[2]) == pytest.approx(np.mean(after.y), abs=0.006)
    assert all(np.isfinite(before.y)) and min(before.y) >= 0 and min(after.y) >= 0


# ---------------------------------------------------------------- the Train panel on a tiny model


def test_a_tuned_lens_trained_from_pasted_text_is_offered_at_once(app, tiny, lenses):
    problem = app.catalog.backend_problem(tiny, "tuned-lens-tuned")
    assert "train one below (**Train a learned lens**" in problem and "train-lens" in problem  # the CLI: second
    progress = Progress()
    out = trained(app, "tuned", "hooks", "pasted", random_text(800), None, tiny, progress=progress)
    assert out["message"].startswith("✅ Saved the tuned lens for **tiny-llama**"), out["message"]
    assert "tuned-lens · tuned lens" in out["message"]
    assert_chart_is_the_report(out, 3, "tuned lens")
    fractions = [f for f, _ in progress.calls]
    assert fractions[0] == 0 and fractions[-1] == 1.0 and fractions == sorted(fractions) and len(fractions) == 6
    words = [d for _, d in progress.calls]  # starting, the logit lens measured, 3 steps, the new lens measured
    assert words[1] == "measuring the logit lens on held-out text" and words[2].startswith("training KL per layer")
    assert words[-1] == "measuring the trained lens on held-out text"
    assert trained_lens_dir(tiny) == lenses / "tiny-llama"
    # The backend switch now offers it, and a trace reads it (every row but the output translated).
    assert "tuned-lens-tuned" in usable(out["backend"]) and out["backend"]["value"] == "hooks"
    assert "tuned-lens · tuned lens" not in out["backend_note"]
    traced = app.lens_tab.lens(TINY_PROMPT, tiny, "tuned-lens-tuned", 3, 1.0, "", "entropy")[0]
    assert traced.result.lens == ["tuned"] * 3 + ["output"]


def test_a_jacobian_lens_trained_from_an_uploaded_file(app, tiny, lenses, tmp_path):
    assert "jacobian-lens" not in usable(app.lens_tab.model_changed(tiny, "hooks")[0])
    upload = tmp_path / "notes.txt"
    upload.write_text(random_text(800), encoding="utf-8")
    out = trained(app, "jacobian", "hooks", "file", "", str(upload), tiny)
    assert out["message"].startswith("✅ Saved the Jacobian lens"), out["message"]
    assert_chart_is_the_report(out, 3, "Jacobian lens")
    assert fitted_lens_dir(tiny) == lenses / "tiny-llama.jacobian"
    assert "jacobian-lens" in usable(out["backend"])
    traced = app.lens_tab.lens(TINY_PROMPT, tiny, "jacobian-lens", 3, 1.0, "", "entropy")[0]
    assert traced.result.lens == ["logit", "jacobian", "jacobian", "output"]


def test_stop_ends_training_with_a_message_and_saves_nothing(app, tiny, lenses):
    view = app.lens_tab.train
    progress = Progress(on_call=lambda fraction: fraction and view.stop(None))  # Stop after the first step
    out = trained(app, "tuned", "hooks", "pasted", random_text(800), None, tiny, progress=progress)
    assert out["message"].startswith("⚠️ **Stopped.**") and "nothing was saved" in out["message"]
    assert out["chart"] is None and out["summary"] == ""
    assert trained_lens_dir(tiny) is None
    assert not lenses.exists() or list(lenses.iterdir()) == []
    assert "tuned-lens-tuned" not in usable(out["backend"])
    # The next run is not stopped by the earlier Stop, and a trace works meanwhile.
    assert app.lens_tab.lens(TINY_PROMPT, tiny, "hooks", 3, 1.0, "", "entropy")[0].result.n_rows == 4
    again = trained(app, "tuned", "hooks", "pasted", random_text(800), None, tiny)
    assert again["message"].startswith("✅"), again["message"]


def test_mistakes_are_messages_beside_the_button(app, tiny, lenses, tmp_path):
    def message(*args, **kwargs):
        out = trained(app, *args, **kwargs)
        assert out["message"].startswith("⚠️ **Not trained.**"), out["message"]
        assert out["chart"] is None and out["summary"] == ""
        assert out["backend"]["choices"]  # the switch still refreshed: the inputs stay usable
        return out["message"]

    assert "pasted text is empty" in message("tuned", "hooks", "pasted", "  \n ", None, tiny)
    assert "Pick a .txt file" in message("tuned", "hooks", "file", "", None, tiny)
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"\x00\x01\x02GGUF" * 100)
    assert "'weights.txt' is not plain text (UTF-8)" in message("tuned", "hooks", "file", "", str(binary), tiny)
    pdf = tmp_path / "paper.pdf"
    pdf.write_bytes(b"%PDF-1.4")
    assert "'paper.pdf' is not a .txt file" in message("tuned", "hooks", "file", "", str(pdf), tiny)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "'empty.txt' is empty" in message("tuned", "hooks", "file", "", str(empty), tiny)
    assert "too short" in message("tuned", "hooks", "pasted", "w5 w6 w7", None, tiny)
    assert "needs the model as a GGUF" in message("tuned", "hooks", "sampled", "", None, tiny)
    assert "is fitted in PyTorch" in message("jacobian", "llama-cpp", "sampled", "", None, DEFAULT_MODEL_NAME)
    assert "not a GGUF file" in message("tuned", "llama-cpp", "pasted", random_text(800), None, tiny)
    nowhere = trained(app, "tuned", "hooks", "sampled", "", None, "/nowhere/model.gguf")
    assert nowhere["message"].startswith("⚠️ **Not trained.** No model called '/nowhere/model.gguf'")
    assert trained_lens_dir(tiny) is None and fitted_lens_dir(tiny) is None
    # "Train on" marks what cannot train this kind on this model.
    view = app.lens_tab.train
    assert usable(view.where_choices(tiny, "tuned", "llama-cpp")) == {"hooks"}
    assert view.where_choices(tiny, "tuned", "llama-cpp")["value"] == "hooks"
    assert usable(view.where_choices(DEFAULT_MODEL_NAME, "jacobian")) == {"hooks"}
    assert "needs gradients through the model" in view.where_choices(DEFAULT_MODEL_NAME, "jacobian")["info"]
    assert usable(view.where_choices(DEFAULT_MODEL_NAME, "tuned", "llama-cpp")) == {"hooks", "llama-cpp"}


def test_on_a_public_link_training_is_hidden_and_refused(tiny):
    from ui.app import build_app

    demo, public = build_app(Settings.for_launch(True))
    panel = public.lens_tab.train
    assert panel.panel.visible is False
    problem = public.catalog.backend_problem(DEFAULT_MODEL_NAME, "jacobian-lens")
    if problem:  # no Jacobian lens saved for the bundled model here: the reason does not point to a hidden panel
        assert "below" not in problem and "fit-lens" in problem
    out = dict(zip(TRAIN_OUT, merged(panel.train_steps("tuned", "llama-cpp", "sampled", "", None, DEFAULT_MODEL_NAME,
                                                       "llama-cpp", "logit", progress=Progress()))))
    assert "not offered on a public link" in out["message"]


# ---------------------------------------------------------------- SmolLM2's GGUF: the lens read on it


def test_a_tuned_lens_trained_from_the_gguf_alone_becomes_the_lens_on_llama_cpp(app, lenses):
    kinds, note = app.lens_tab.lens_kinds(DEFAULT_MODEL_NAME, "tuned")
    assert usable(kinds) == {"logit"} and kinds["value"] == "logit" and "Train a learned lens" in note
    app.lens_tab.train.fit_options["tuned"] = dict(GGUF_TINY)
    try:
        out = trained(app, "tuned", "llama-cpp", "pasted", GGUF_TEXT, None, DEFAULT_MODEL_NAME, "llama-cpp", "logit")
    finally:
        app.lens_tab.train.fit_options["tuned"] = dict(SMALL["tuned"])
    assert out["message"].startswith("✅ Saved the tuned lens"), out["message"]
    assert "llama.cpp forward only" in out["summary"]
    assert_chart_is_the_report(out, 30, "tuned lens")
    assert usable(out["lens_kind"]) == {"logit", "tuned"} and "Jacobian" in out["lens_kind_note"]
    assert out["backend"]["value"] == "llama-cpp" and "tuned-lens-tuned" in usable(out["backend"])
    traced = app.lens_tab.lens("The capital of Germany is", DEFAULT_MODEL_NAME, "llama-cpp", 5, 1.0, "", "entropy",
                               lens_kind="tuned")[0]
    assert traced.result.lens == ["tuned"] * 30 + ["output"]


def test_the_default_text_is_sampled_from_the_model_and_stop_ends_it(app, lenses):
    view = app.lens_tab.train
    progress = Progress(on_call=lambda fraction: fraction and view.stop(None))  # Stop after the first completion
    view.fit_options["tuned"] = dict(GGUF_TINY)  # ~30 tokens to sample
    try:
        out = trained(app, "tuned", "llama-cpp", "sampled", "", None, DEFAULT_MODEL_NAME, "llama-cpp",
                      progress=progress)
    finally:
        view.fit_options["tuned"] = dict(SMALL["tuned"])
    assert out["message"].startswith("⚠️ **Stopped.**") and "nothing was saved" in out["message"], out["message"]
    assert [d for f, d in progress.calls if f] == ["sampling text from the model"]  # llama.cpp writes the text
    assert trained_lens_dir(DEFAULT_MODEL_NAME) is None and usable(out["lens_kind"]) == {"logit"}


@pytest.fixture
def smollm2_lenses(lenses, request):
    """SmolLM2's tuned and Jacobian lenses (tests/test_learned_lenses.py's), copied where the app looks."""
    source = resolve(None)
    tuned, jacobian = CACHE / "smollm2-tuned", CACHE / "smollm2-jacobian"
    if not (tuned / "params.pt").is_file():
        tuned = request.getfixturevalue("smollm2_tuned")[0]
    if not (jacobian / "lens.pt").is_file():
        jacobian = request.getfixturevalue("smollm2_jacobian")
    shutil.copytree(tuned, default_lens_dir(source))
    shutil.copytree(jacobian, default_jacobian_dir(source))
    return source


def test_the_lens_on_the_gguf_is_logit_tuned_or_jacobian(app, lenses, request):
    view = app.lens_tab
    prompt = "The capital of Germany is"
    missing = dict(zip(LENS_OUT, merged(view.lens_steps(prompt, DEFAULT_MODEL_NAME, "llama-cpp", 5, 1.0, "", "entropy",
                                                         0, False, None, "jacobian"))))
    assert missing["message"].startswith("⚠️ **Not traced.**") and "Train a learned lens" in missing["message"]
    assert missing["traced"] is None

    request.getfixturevalue("smollm2_lenses")
    kinds, note = view.lens_kinds(DEFAULT_MODEL_NAME, "jacobian")
    assert usable(kinds) == {"logit", "tuned", "jacobian"} and kinds["value"] == "jacobian" and note == ""
    results = {}
    for kind in ("logit", "tuned", "jacobian"):
        out = dict(zip(LENS_OUT, merged(view.lens_steps(prompt, DEFAULT_MODEL_NAME, "llama-cpp", 5, 1.0, "", "entropy",
                                                         0, False, None, kind))))
        assert not (out["message"] or "").startswith("⚠️"), out["message"]
        results[kind] = out["traced"].result
    assert results["logit"].lens[1:-1] == ["logit"] * 29
    assert results["tuned"].lens[1:-1] == ["tuned"] * 29
    assert results["jacobian"].lens[1:-1] == ["jacobian"] * 29  # the last block's row is the output's input
    for kind in ("tuned", "jacobian"):  # the same model output; middle rows read differently
        np.testing.assert_allclose(results[kind].topk_probs[-1], results["logit"].topk_probs[-1], atol=1e-6)
        assert np.abs(results[kind].entropy[15] - results["logit"].entropy[15]).max() > 1e-3
    # Opened once per lens: the bookkeeping tells them apart (no "Loading" note again).
    opened = {key for key in app._opened if key[:2] == (DEFAULT_MODEL_NAME, "llama-cpp")}
    assert {dict(options).get("lens_kind", "logit") for _, _, options in opened} >= {"logit", "tuned", "jacobian"}
    assert app.loading_note(DEFAULT_MODEL_NAME, "llama-cpp", lens_kind="jacobian") is None
    # A choice that does not apply to the backend is ignored (the radio is hidden there).
    assert app.tracer_options(DEFAULT_MODEL_NAME, "hooks", lens_kind="tuned") == {}
    shown = view.options_shown("llama-cpp")
    assert shown[0]["visible"] and not shown[1]["visible"]
    # Chat's "Trace this reply" reads the reply with the lens the Lens tab shows (what Trace would use).
    history = [{"role": "user", "content": "What is the capital of Germany?"},
               {"role": "assistant", "content": "The capital of Germany is Berlin."}]
    step = merged(app.chat_tab.trace_reply_steps(history, DEFAULT_MODEL_NAME, "", 5, 1.0, "entropy", False, "tuned"))
    head, out = step[:6], dict(zip(LENS_OUT, step[6:]))
    assert head[3] == "llama-cpp" and not (out["message"] or "").startswith("⚠️"), out["message"]
    assert out["traced"].result.lens[1:-1] == ["tuned"] * 29


# ---------------------------------------------------------------- one visit in a real browser

CHROMIUM = "/usr/bin/chromium"
SLOW = 180_000


@pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"), reason="Debian's chromium is not installed")
def test_a_visitor_trains_a_lens_on_the_gguf_and_reads_it(smollm2, demo_server, lenses):
    """Open the panel, make a mistake, train a (tiny) tuned lens from the GGUF alone, watch the progress
    bar and the KL chart, and read the new lens on llama.cpp: all without reloading the page."""
    from tests.test_browser import app_page, wait_for_text

    url, app = demo_server
    options = app.lens_tab.train.fit_options
    options["tuned"] = dict(steps=50, tokens_per_step=1024, seq_len=256)  # minutes of text to sample: Stop ends it
    with app_page(url) as page:
        wait_for_text(page, "#lens-summary", "predicts")
        assert not page.locator("#lens-kind").is_visible()  # a llama.cpp option: hidden on hooks
        page.get_by_text("llama.cpp (on the GGUF)", exact=True).click()
        page.locator("#lens-kind").wait_for(state="visible")
        assert "Train a learned lens" in wait_for_text(page, "#lens-kind-note", "tuned|Jacobian")
        page.locator("#train-panel > button, #train-panel .label-wrap").first.click()  # open the accordion
        page.get_by_text("from the GGUF alone (llama.cpp)", exact=True).click()
        page.locator("#train-run").click()  # on text sampled from the model (the default)
        page.locator("#train-message .progress-text:visible, #train-message .meta-text:visible"
                     ).first.wait_for(timeout=SLOW)  # the progress bar moves while it samples
        page.locator("#train-stop").click()
        assert "nothing was saved" in wait_for_text(page, "#train-message", "Stopped")
        options["tuned"] = dict(GGUF_TINY)
        page.get_by_text("Pasted text", exact=True).click()
        page.locator("#train-text textarea").wait_for(state="visible")
        page.locator("#train-run").click()  # nothing pasted yet: a message, and the inputs stay
        assert "pasted text is empty" in wait_for_text(page, "#train-message", "Not trained")
        page.locator("#train-text textarea").fill(GGUF_TEXT)
        page.locator("#train-run").click()
        page.locator("#train-message .progress-text:visible, #train-message .meta-text:visible"
                     ).first.wait_for(timeout=SLOW)  # the progress bar, while it trains
        assert "Saved the tuned lens" in wait_for_text(page, "#train-message", "Saved", timeout=SLOW)
        page.wait_for_function("() => document.querySelectorAll('#train-chart .scatterlayer .trace').length == 2",
                               timeout=SLOW)
        assert "nats" in page.inner_text("#train-summary")
        # The lens choice offers it now; trace with it.
        page.locator("#lens-kind").get_by_text("tuned", exact=True).click()
        page.locator("#lens-trace").click()
        wait_for_text(page, "#lens-summary", "backend llama-cpp")
        page.locator("#lens-heatmap .ytick").first.wait_for(timeout=SLOW)
        page.wait_for_function("() => [...document.querySelectorAll('#lens-heatmap .ytick')]"
                               ".some(t => t.textContent.includes('tuned'))", timeout=SLOW)


def test_the_time_left_comes_from_the_pace_of_the_current_phase(monkeypatch):
    import time as time_module

    from ui.train_view import TimeLeft

    now = [100.0]
    monkeypatch.setattr(time_module, "monotonic", lambda: now[0])
    clock = TimeLeft()
    assert clock.left(0, 8, "measuring the logit lens on held-out text") == ""
    now[0] += 50
    assert clock.left(1, 8, "training KL per layer 9.1") == ""  # a new phase: its own clock starts
    now[0] += 120
    assert clock.left(2, 8, "training KL per layer 8.7") == " · about 12 min left"  # 6 more steps of 120 s
    now[0] += 10
    assert clock.left(3, 8, "training KL per layer 8.2") == " · about 5 min left"  # (130 s / 2 steps) x 5 = 325 s
    assert clock.left(8, 8, "training KL per layer 7.0") == ""  # done
    assert clock.left(1024, 4096, "sampling text from the model") == ""
    now[0] += 20
    assert clock.left(2048, 4096, "sampling text from the model") == " · about 40 s left"
