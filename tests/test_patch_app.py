"""The app's Patch tab, in-process on the bundled SmolLM2 (PyTorch and llama.cpp): what a click
runs, the heatmaps it draws, and the messages a visitor gets."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest

from tracing.models import DEFAULT_MODEL_NAME
from ui.app import PATCH_EXAMPLES, LensApp, Settings, build_app

OUTPUTS = ("summary", "resid", "attn", "mlp")


@pytest.fixture(scope="module")
def app() -> LensApp:
    return LensApp(Settings())


def no_progress(fraction, desc=None):
    pass


def run(app, *example, model=DEFAULT_MODEL_NAME, backend="hooks", sublayers=True, progress=no_progress):
    return dict(zip(OUTPUTS, app.patch_tab.patch(*example, model, backend, sublayers, progress=progress)))


def error_message(call) -> str:
    with pytest.raises(gr.Error) as info:
        call()
    return str(info.value.message)


def test_the_first_example_on_pytorch(app):
    out = run(app, *PATCH_EXAMPLES[0])
    assert "**Clean** answers `␣Berlin` 80%" in out["summary"] and "**corrupted** answers `␣Paris`" in out["summary"]
    assert "logit(' Berlin') - logit(' Paris')" in out["summary"]
    heat = out["resid"].data[0]
    z = np.asarray(heat.z)
    assert z.shape == (31, 5)
    assert z[0, 3] == pytest.approx(1, abs=1e-4) and z[-1, -1] == pytest.approx(1, abs=1e-4)
    assert (z[:, :3] == 0).all()
    assert heat.colorscale[0][1] != heat.colorscale[-1][1] and heat.zmid == 0 and heat.zmin == -heat.zmax
    assert "patched run: ␣Berlin 79.6%  ␣Hamburg 2.7%" in heat.hovertext[-1][-1]
    assert "patched run: ␣Paris 77" in heat.hovertext[10][0]  # nothing restored before ' Germany'
    assert "3: ␣Germany / ␣France" in out["resid"].layout.xaxis.ticktext
    for name in ("attn", "mlp"):
        assert np.asarray(out[name].data[0].z).shape == (30, 5)
    assert out["mlp"].layout.yaxis.ticktext[0] == "block 1"


def test_the_reverse_direction_on_the_gguf_without_sublayers(app):
    out = run(app, *PATCH_EXAMPLES[1], backend="llama-cpp", sublayers=False)
    z = np.asarray(out["resid"].data[0].z)
    assert z[0, 3] == pytest.approx(1, abs=2e-3)  # the embedding of ' Berlin' (vs ' Paris') restores it all
    assert "**Clean** answers `␣Germany`" in out["summary"]
    assert "No attention output grid" in out["attn"].layout.annotations[0].text
    assert "llama-cpp" in out["resid"].layout.title.text


def test_mistakes_are_messages_in_the_page(app):
    message = error_message(lambda: run(app, "The capital of Germany is", "The capital of the UK is", " Berlin", ""))
    assert "same number of tokens" in message and "' UK'" in message
    assert "nothing to restore" in error_message(lambda: run(app, *PATCH_EXAMPLES[0][:1] * 2, " Berlin", ""))
    assert "target token" in error_message(lambda: run(app, *PATCH_EXAMPLES[0][:2], "", ""))
    assert "Runtime" not in error_message(lambda: run(app, *PATCH_EXAMPLES[0], backend="tuned-lens"))


def test_a_public_link_patches_short_prompts_only():
    public = LensApp(Settings.for_launch(public=True))
    long = "The capital of Germany is a city. " * 6 + "The capital of Germany is"
    message = error_message(lambda: run(public, long, long.replace("Germany is a", "France is a", 1), " Berlin", ""))
    assert "this app patches at most 32" in message


def test_stop_ends_the_grid(app):
    def progress(fraction, desc=None):
        if fraction > 0.2:
            app.patch_tab.stop_patch(None)

    assert "Stopped" in error_message(lambda: run(app, *PATCH_EXAMPLES[0], progress=progress))


def test_the_tab_is_laid_out_with_its_examples_and_api():
    demo, app = build_app(Settings())
    config = demo.get_config_file()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"tab-patch", "patch-clean", "patch-corrupt", "patch-heatmap", "patch-stop"} <= ids
    values = {c["props"].get("elem_id"): c["props"].get("value") for c in config["components"]}
    assert values["patch-clean"] == "The capital of Germany is" and values["patch-target"] == "␣Berlin"
    assert values["patch-corrupt"] == "The capital of France is" and values["patch-contrast"] == "␣Paris"
    assert any(d.get("api_name") == "patch" for d in config["dependencies"])
    # each page load reads models/ again, for the one model picker the tabs share
    picker = app.refresh_models("gone.gguf")
    assert DEFAULT_MODEL_NAME in picker["choices"] and picker["value"] == DEFAULT_MODEL_NAME


def test_a_lens_cell_sets_up_patching_at_its_position(app):
    from ui.core import Traced, merged

    traced = Traced(app.lens_tab.lens("The capital of Germany is", DEFAULT_MODEL_NAME, "hooks", 5, 1.0, "␣Berlin",
                                      "top-1 probability")[0].result)
    tabs, clean, corrupt, target, contrast, message = app.patch_tab.from_lens(traced, 3, "The capital of Germany is",
                                                                              "␣Berlin")
    assert tabs["selected"] == "patch" and clean == corrupt == "The capital of Germany is" and target == "␣Berlin"
    assert "change `␣Germany` (position 3)" in message
    summary, *_, results, note = merged(app.patch_tab.patch_steps(clean, corrupt, target, contrast,
                                                                  DEFAULT_MODEL_NAME, "hooks", True))
    assert "nothing to restore" in note and results["visible"] is False  # the message, in the page


def test_patch_over_http(demo_server):
    from gradio_client import Client

    url, _ = demo_server
    client = Client(url, verbose=False)
    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/patch"]
    assert [p["parameter_name"] for p in endpoint["parameters"]] == [
        "clean", "corrupt", "target", "contrast", "model", "backend", "sublayers"]
    summary, resid, attn, mlp = client.predict(*PATCH_EXAMPLES[0], DEFAULT_MODEL_NAME, "llama-cpp", False,
                                               api_name="/patch")
    assert "**Clean** answers `␣Berlin`" in summary and "Sublayers" not in summary
    with pytest.raises(Exception, match="same number of tokens"):
        client.predict("The capital of Germany is", "The capital of the UK is", " Berlin", "", DEFAULT_MODEL_NAME,
                       "hooks", True, api_name="/patch")
