"""NDIF from the Lens tab: "Run on NDIF (remote)" with the nnsight backend, off by default and hidden on
public links. This machine has no network to NDIF: without a key, and with a (fake) key but no
network, the visitor reads one sentence beside the inputs (never the key, in the page or the log),
and a local trace right after still works."""

from __future__ import annotations

import logging
import time

import pytest

from tracing.models import DEFAULT_MODEL_NAME
from ui.app import LensApp, Settings
from ui.core import merged

PROMPT = "The capital of Germany is"
REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the id NDIF would host the bundled model under
KEY = "ndif-key-that-must-never-be-shown"
LENS_OUT = ("traced", "heatmap", "chart", "position", "table", "summary", "json", "csv", "results", "message")


@pytest.fixture(scope="module")
def app(smollm2) -> LensApp:
    return LensApp(Settings())  # the bundled model is loaded once (smollm2); nnsight wraps it


def traced(app, remote: bool, repo_id: str = REPO) -> dict:
    steps = app.lens_tab.lens_steps(PROMPT, DEFAULT_MODEL_NAME, "nnsight", 5, 1.0, " Berlin", "entropy", 0, False,
                                    None, "logit", remote, repo_id)
    return dict(zip(LENS_OUT, merged(steps)))


def not_traced(out: dict) -> str:
    """The message of a failed trace, checked: one sentence or two, beside the inputs; nothing stale."""
    message = out["message"]
    assert message.startswith("⚠️ **Not traced.** "), message
    assert out["traced"] is None and out["heatmap"] is None
    assert "Traceback" not in message and message.count("\n") == 0
    return message


def test_the_option_shows_with_nnsight_only_and_is_off_by_default():
    from ui.app import build_app

    demo, app = build_app(Settings())
    view = app.lens_tab
    assert view.remote.value is False and view.repo_id.value in ("", None)
    gguf, remote = view.options_shown("nnsight")
    assert remote["visible"] and not gguf["visible"]
    assert not view.options_shown("hooks")[1]["visible"]
    demo, public = build_app(Settings.for_launch(True))
    assert public.lens_tab.remote_options.visible is False
    assert not public.lens_tab.options_shown("nnsight")[1]["visible"]


def test_without_a_key_one_sentence_says_how_to_get_one(app, monkeypatch):
    import nnsight

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    message = not_traced(traced(app, remote=True))
    assert "needs an API key" in message and "NDIF_API_KEY" in message


def test_without_network_one_sentence_then_a_local_trace_works(app, monkeypatch, caplog):
    monkeypatch.setenv("NDIF_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    start = time.perf_counter()
    message = not_traced(traced(app, remote=True))
    assert time.perf_counter() - start < 60
    assert "NDIF" in message and "could not be reached" in message
    assert KEY not in message and KEY not in caplog.text
    local = traced(app, remote=False)
    assert not (local["message"] or "").startswith("⚠️"), local["message"]
    assert local["traced"].result.backend == "nnsight"
    assert local["traced"].result.top1()[-1][-1] == " Berlin"


def test_a_gguf_needs_the_id_ndif_hosts_it_under(app, monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", KEY)
    message = not_traced(traced(app, remote=True, repo_id="  "))
    assert "type the id NDIF hosts it under in NDIF model id" in message and KEY not in message


def test_on_a_public_link_remote_is_refused(smollm2, monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", KEY)
    public = LensApp(Settings.for_launch(True))
    message = not_traced(traced(public, remote=True))
    assert "not offered on a public link" in message
