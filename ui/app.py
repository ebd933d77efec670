"""The Gradio app: one model picker above the tabs (Lens, Chat, Compare, Patch, Steer, Attribution),
each tab a view.

`LensApp` holds the shared part (`core.Core`: settings, catalog, checks, model opening) and one
object per tab (`lens_tab`, `chat_tab`, `compare_tab`, `patch_tab`, `steer_tab`, `attribution_tab`;
`views` lists them in the page's order), whose methods are what a click runs (callable in-process
and by the tests). `build_app` lays out the page and lets each
view build and wire its tab; a new tab is one more view class in `LensApp.__init__`.
A mistake a visitor makes is a message in the page beside what caused it; the app stays up.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from .attribution_view import AttributionView
from .chat_view import ChatView, plain_messages
from .compare_view import CompareView, compare_examples_for, default_pair
from .core import Core, Page, Settings, Traced, user_errors
from .lens_view import LENS_EXAMPLES, LensView
from .patch_view import PATCH_EXAMPLES, PUBLIC_PATCH_TOKENS, PatchView
from .steer_view import SteerView

PAGE_JS = Path(__file__).with_name("page.js")

CSS = """
/* A backend the picked model cannot use stays in the switch, greyed out and not clickable; the reason
   is written under it (and the server refuses it too). */
label[data-testid$="unavailable-radio-label"] { opacity: 0.45; pointer-events: none; }
#lens-heatmap, #lens-chart { min-height: 0; }
#title h1 { margin: 0; font-size: 1.6em; }
#title p { margin: 0.2em 0 0; }
#model-facts { font-size: 0.9em; }
/* The top-k table fits its column (widths from tables.table_widths): cells wrap, no sideways scrolling. */
#lens-table .cell-wrap { font-size: 0.85em; white-space: normal; overflow-wrap: anywhere; }
#lens-cell { display: none !important; }  /* carries heatmap clicks (page.js); not for people */
/* While a trace runs (page.js's lensbenchBusy): a still "Tracing…" over the heatmap, not Gradio's animated
   overlay, whose redraws of the whole plot 60 times a second took a CPU core from the trace. (Dimming the
   plot is not free either: without a GPU, repainting it at another opacity slowed the trace too.) */
.lb-busy { position: relative; }
.lb-busy::after { content: "Tracing…"; position: absolute; top: 40%; left: 50%; transform: translate(-50%, -50%);
                  z-index: 10; padding: 0.35em 0.9em; border-radius: 6px; font-weight: 600;
                  background: var(--background-fill-primary); border: 1px solid var(--border-color-primary); }
.range-note { color: var(--body-text-color-subdued); font-size: 0.85em; margin-top: 4px; }
/* A message or note with nothing to say takes no room (not even the column's gap). Gradio wraps every
   Markdown in a block, so the block itself is never :empty; its text span is. */
:is(#lens-message, #lens-backend-note, #lens-kind-note, #compare-message, #patch-message, #chat-status,
    #attribution-message, #steer-message, #steer-answer-message, #train-message):has(.md:empty) { display: none; }
"""

__all__ = ["LensApp", "Settings", "Traced", "build_app", "launch", "plain_messages", "user_errors",
           "LENS_EXAMPLES", "PATCH_EXAMPLES", "PUBLIC_PATCH_TOKENS", "compare_examples_for", "default_pair", "CSS"]


class LensApp(Core):
    """The app's functions: the shared ones here, each tab's on its view."""

    def __init__(self, settings: Settings | None = None):
        super().__init__(settings)
        self.lens_tab = LensView(self)
        self.attribution_tab = AttributionView(self)
        self.chat_tab = ChatView(self, self.lens_tab, self.attribution_tab)
        self.compare_tab = CompareView(self)
        self.patch_tab = PatchView(self)
        self.steer_tab = SteerView(self)
        self.views = [self.lens_tab, self.chat_tab, self.compare_tab, self.patch_tab, self.steer_tab,
                      self.attribution_tab]  # the tabs, in order

    def model_facts(self, model) -> str:
        """What the picked model is: architecture, size, and whether each way to load it fits in memory."""
        return self.catalog.facts(model)

    def refresh_models(self, model):
        """The model picker's list, read again from models/ (the selection kept while still listed, or
        typed on a local launch)."""
        names = self.catalog.names()
        keep = model in names or (self.settings.allow_custom_models and model)
        return gr.update(choices=names, value=model if keep else self.catalog.default_name())


def build_app(settings: Settings | None = None) -> tuple[gr.Blocks, LensApp]:
    """Lay out the page: the title, the one model picker, and the tabs, each built by its view."""
    app = LensApp(settings)
    s, catalog = app.settings, app.catalog
    picker_label = "Model: pick one, or type a path or a Hugging Face id" if s.allow_custom_models else "Model"
    with gr.Blocks(title="lensbench", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(
            "# lensbench\nLook inside an open-weights LLM: what each layer would predict as the next token "
            "(logit lens, tuned lens), on PyTorch or on the GGUF itself, next to a chat with the model."
            + (" *Public link: models are the listed ones; prompts and top-k are bounded.*" if s.public else ""),
            elem_id="title",
        )
        with gr.Row(equal_height=False, elem_id="model-bar"):
            model = gr.Dropdown(catalog.names(), value=catalog.default_name(), label=picker_label, scale=2,
                                allow_custom_value=s.allow_custom_models, elem_id="model", min_width=300)
            facts = gr.Markdown(catalog.facts(catalog.default_name()), elem_id="model-facts")
            # Only a model bigger than this machine's memory is refused; this box loads it anyway. Its
            # value reaches the handlers through a State, which stays out of the API: only a person at
            # the page can skip the check (and never on a public link).
            memory_box = gr.Checkbox(False, label="Skip the memory check", visible=not s.public, scale=1,
                                     info="Load a model even if it looks bigger than this machine's memory "
                                          "(it may be very slow, or fail).", elem_id="ignore-memory")
        ignore_memory = gr.State(False)
        with gr.Tabs(selected=app.views[0].id) as tabs:
            page = Page(demo, model, ignore_memory, tabs, s, {view.id: view for view in app.views})
            for view in app.views:
                with gr.Tab(view.title, id=view.id, elem_id=f"tab-{view.id}"):
                    view.build(page)
        for view in app.views:
            view.connect(page)
        memory_box.change(lambda on: bool(on), memory_box, ignore_memory, api_visibility="private", queue=False)
        model.change(app.model_facts, model, facts, api_visibility="private", concurrency_limit=None)
        # On each page load: the models in models/ now (a file added after start shows up on reload).
        demo.load(app.refresh_models, model, model, api_visibility="private", concurrency_limit=None)
    return demo, app


def launch(settings: Settings | None = None, *, block: bool = True, **launch_options) -> tuple[gr.Blocks, LensApp, str]:
    """Build the app, queue it and start its server: blocking (demo.py), or in the background
    (tests, bench) returning (blocks, app, local url). `launch_options` go to `gr.Blocks.launch`."""
    demo, app = build_app(settings)
    demo.queue(max_size=32 if app.settings.public else None, default_concurrency_limit=app.settings.concurrency)
    # Uploads: only the Steer tab's control-vector file (a Scout vector is about 1 MB), so a small limit;
    # page.js: clicks on heatmap cells, and a word when a typed number is clamped.
    options = dict(max_file_size="16mb", show_error=False, inbrowser=False, css=CSS, js=PAGE_JS.read_text())
    options.update(launch_options)
    _, url, _ = demo.launch(prevent_thread_lock=not block, **options)
    return demo, app, url
