"""The Lens tab: what each layer of the model would predict next, at every position of a prompt.

`LensView` holds the tab's functions (plain methods: what a click runs, callable in-process) and
lays out and wires the tab. A mistake shows as a message beside the inputs, and the outputs of
the previous trace go away with it: nothing on the page belongs to inputs it does not show.
"""

from __future__ import annotations

import threading

import gradio as gr

from tracing.errors import LensbenchError

from . import plots, tables
from .choices import LENS_KINDS, reasons_markdown
from .core import Core, Page, Traced, merged, message_of, problem_markdown, user_errors
from .tokens import shown_token
from .train_view import TrainPanel

# Targets as the target box shows them: '␣' is the leading space most words have mid-sentence.
LENS_EXAMPLES = [
    ["The capital of Germany is", "␣Berlin"],
    ["Berlin is the capital of", "␣Germany"],
    ["The Eiffel Tower is in the city of", "␣Paris"],
    ["The chemical symbol for gold is", "␣Au"],
    ["The opposite of hot is", "␣cold"],
    ["One, two, three, four,", "␣five"],
]

HELP = """
**The idea.** A language model reads your prompt token by token and, after the last one, predicts the
next token. Inside, each of its layers updates a running summary of the text (the *residual stream*).
The **logit lens** reads that summary after every layer *as if it were the last layer*, and asks what
the model would predict from it. You watch the answer form, layer by layer.

**The heatmap.** A **row** is a layer: the **embeddings** at the bottom (the input token itself, before
any layer has worked on it; its guesses are often odd tokens, which is expected) up to the model's
**output** at the top (what the model really predicts). A **column** is a position in your prompt: the
cell shows the token that layer would predict *after* that position's token. The **colour** is what
"Colour by" says: by default how sure that layer is of its top guess (bright = sure).

**Target.** Type a token you expect (e.g. `␣Berlin`, where `␣` is the space most words start with) to
follow its probability and rank through the layers in the chart. Click a token in the table to follow it.

**Logit lens or tuned lens?** The logit lens reads every layer with the model's own final layer; early
layers "speak" a slightly different language, so their guesses look noisy. A **tuned lens** learns a
small translator per layer first, so early layers read better; the **Jacobian lens** maps each layer
by its average effect on the last one. Train either under **Train a learned lens** (or with
`python -m tracing fit-lens`); then pick it in the backend switch, or as the **Lens** on llama.cpp.

**Units.** Entropy and KL are in **nats** (information measured with the natural logarithm): 0 means
one sure guess (entropy) or the same as the output (KL).
"""


class LensView:
    """The Lens tab: trace a prompt, redraw without retracing, pick a cell or a token to follow."""

    id, title = "lens", "Lens"

    def __init__(self, core: Core):
        self.core = core
        self.train = TrainPanel(core, self)  # the "Train a learned lens" accordion, in this tab
        self._first: tuple[tuple, Traced] | None = None  # the page's first result, for every visitor
        self._first_lock = threading.Lock()

    # ---------------------------------------------------------------- what a click runs

    @user_errors
    def lens(self, prompt, model, backend, top_k, temperature, target, metric, first_position=0,
             ignore_memory=False, progress=gr.Progress(track_tqdm=True), lens_kind="logit", remote=False,
             repo_id=""):
        """Trace `prompt` on `model` with `backend` (the "lens" API): state, heatmap, target chart,
        position picker, top-k table, summary, JSON and CSV downloads. `target`: one token ('␣' is a
        space); `first_position`: trace from this token on (0: all). `ignore_memory`: load even a
        model that looks too big (the "Skip the memory check" box; ignored on a public link).
        In-process only: `lens_kind` (llama-cpp: "logit", "tuned", "jacobian") and `remote`,
        `repo_id` (nnsight on NDIF), as `Core.open` takes them."""
        traced = self.core.trace(model, backend, prompt, target, top_k, temperature, ignore_memory, first_position,
                                 **_choices(lens_kind, remote, repo_id))
        return merged(self._shown(traced, metric, api=True))[:8]

    def lens_steps(self, prompt, model, backend, top_k, temperature, target, metric, first_position=0,
                   ignore_memory=False, progress=gr.Progress(track_tqdm=True), lens_kind="logit", remote=False,
                   repo_id=""):
        """What the Trace button runs: the heatmap and summary as soon as they are ready, then the rest
        (the page's outputs, `self.outputs`). A mistake is a message beside the inputs, with a
        one-click fix when there is one, and the last trace's outputs are cleared."""
        choices = _choices(lens_kind, remote, repo_id)
        try:
            traced = yield from self._traced(progress, model, backend, prompt, target, top_k, temperature,
                                             ignore_memory, first_position, choices=choices)
        except Exception as exc:
            yield self._failed(exc)
            return
        yield from self._shown(traced, metric)

    def _traced(self, progress, model, backend, *args, choices: dict):
        """`Core.trace(model, backend, *args, **choices)` as a generator that returns the result. Before a
        first load, the message beside the inputs says what is happening, with its progress (a download,
        a conversion) and the seconds so far, until the trace is done."""
        note = self.core.loading_note(model, backend, **choices)
        return (yield from self.core.while_loading(
            note, lambda: self.core.trace(model, backend, *args, **choices), progress,
            lambda text: (gr.update(),) * 9 + (text,) + (gr.update(),) * 4))

    def first_view(self, prompt, model, backend, top_k, temperature, target, metric, first_position=0,
                   ignore_memory=False, progress=gr.Progress(track_tqdm=True), lens_kind="logit", remote=False,
                   repo_id=""):
        """On page load: the result of the inputs the page opens with (the first example), traced
        once for every visitor, so a newcomer sees a finished heatmap, not empty frames."""
        choices = _choices(lens_kind, remote, repo_id)
        key = (prompt, model, backend, top_k, temperature, target, first_position, tuple(choices.items()))
        with self._first_lock:
            first = self._first if self._first and self._first[0] == key else None
        if first is None:
            try:
                traced = yield from self._traced(progress, model, backend, prompt, target, top_k, temperature,
                                                 ignore_memory, first_position, choices=choices)
            except Exception as exc:
                yield self._failed(exc)
                return
            with self._first_lock:
                self._first = first = (key, traced)
        yield from self._shown(first[1], metric)

    def redraw(self, traced: Traced | None, metric, column):
        """Recolour the heatmap, or move the chart and table to another position, without retracing."""
        if traced is None:
            return gr.update(), gr.update(), gr.update(), gr.update()
        result, labels = traced.result, traced.labels
        col = (int(column) if column is not None else -1) % len(result.positions)
        return (
            plots.heatmap(result, metric or plots.DEFAULT_METRIC, labels),
            plots.target_chart([(result.backend, result)], col),
            tables.topk_table(result, col, labels),
            tables.summary(result, col, labels),
        )

    def cell_picked(self, traced: Traced | None, cell: str, metric):
        """A click on a heatmap cell ("row,column,..."): that position in the chart and the table, and
        the cell's top token offered as the target."""
        if traced is None or not cell:
            return (gr.update(),) * 6
        result, labels = traced.result, traced.labels
        try:
            row, col = (int(float(v)) for v in cell.split(",")[:2])
        except ValueError:
            return (gr.update(),) * 6
        if not (0 <= row < result.n_rows and 0 <= col < len(result.positions)):
            return (gr.update(),) * 6
        _, chart, table, summary = self.redraw(traced, metric, col)
        token = result.topk_tokens[row][col][0]
        shown = labels(token, int(result.topk_ids[row, col, 0]))
        follow = gr.update(visible=True, value=f"Follow {shown} ({result.layers[row]}'s guess) as the target")
        return gr.update(value=col), chart, table, summary, follow, token

    def follow(self, token, prompt, model, backend, top_k, temperature, metric, first_position=0,
               ignore_memory=False, progress=gr.Progress(track_tqdm=True), lens_kind="logit", remote=False,
               repo_id=""):
        """Trace again with `token` (a suggestion, or a picked cell's guess) as the target."""
        if not token:
            yield (gr.update(),) * len(self.outputs)
            return
        yield from self.lens_steps(prompt, model, backend, top_k, temperature, shown_token(token), metric,
                                   first_position, ignore_memory, progress, lens_kind, remote, repo_id)

    def table_picked(self, traced: Traced | None, column, prompt, model, backend, top_k, temperature, metric,
                     first_position=0, ignore_memory=False, evt: gr.SelectData = None,
                     progress=gr.Progress(track_tqdm=True), lens_kind="logit", remote=False, repo_id=""):
        """A click on a token in the top-k table: follow it as the target (other cells do nothing)."""
        index = getattr(evt, "index", None)
        token = None
        if traced is not None and isinstance(index, (list, tuple)) and len(index) == 2:
            col = int(column) if column is not None else -1
            token = tables.token_at(traced.result, col, int(index[0]), int(index[1]))
        yield from self.follow(token, prompt, model, backend, top_k, temperature, metric, first_position,
                               ignore_memory, progress, lens_kind, remote, repo_id)

    def model_changed(self, model, backend):
        """New model: the backend switch with what it cannot use marked, and why. (A model that is
        not there says so once, above the tabs.)"""
        try:
            self.core.catalog.pick(model)
        except LensbenchError:
            return gr.update(), ""
        choices, reasons = self.core.catalog.backend_choices(model)
        usable = [b for _, b in choices if b not in reasons]
        if backend not in usable:
            backend = usable[0] if usable else backend
        return gr.update(choices=choices, value=backend), reasons_markdown(reasons)

    def backend_changed(self, model, backend):
        """Refuse an unavailable backend with its reason and go back to one that works."""
        problem = self.core.catalog.backend_problem(model, backend)
        if not problem:
            return gr.update(), gr.update()
        choices, reasons = self.core.catalog.backend_choices(model)
        usable = [b for _, b in choices if b not in reasons]
        return gr.update(value=usable[0] if usable else None), problem_markdown(problem)

    def options_shown(self, backend):
        """The options of the picked backend: the lens read on the GGUF (llama.cpp), NDIF (nnsight;
        never on a public link)."""
        return (gr.update(visible=backend == "llama-cpp"),
                gr.update(visible=backend == "nnsight" and not self.core.settings.public))

    def lens_kinds(self, model, lens_kind="logit"):
        """The "Lens" choice on the GGUF for `model`: tuned and Jacobian marked unavailable until a lens
        is saved for it (with the reason: the Train panel below); an unavailable pick goes back to logit."""
        try:
            self.core.catalog.pick(model)
        except LensbenchError:
            return gr.update(), ""
        choices, reasons = self.core.catalog.lens_kind_choices(model)
        value = lens_kind if lens_kind in LENS_KINDS and lens_kind not in reasons else "logit"
        return gr.update(choices=choices, value=value), reasons_markdown(reasons, LENS_KINDS.get)

    def lens_kind_changed(self, model, lens_kind):
        """Refuse an unavailable lens kind with its reason and go back to the logit lens."""
        problem = self.core.catalog.lens_kind_problem(model, lens_kind)
        if not problem:
            return gr.update(), gr.update()
        return gr.update(value="logit"), problem_markdown(problem)

    # ---------------------------------------------------------------- outputs

    def _shown(self, traced: Traced, metric, api: bool = False):
        """The page's outputs (`self.outputs`) for a result, in two steps: the heatmap and summary
        first (what people wait for), then the chart, the position picker, the table, the downloads.
        `api`: the table and the downloads as plain values (for the page: the table with column widths
        that fit it, the downloads shown now that there is something to download)."""
        result, labels = traced.result, traced.labels
        col = len(result.positions) - 1
        heatmap = plots.heatmap(result, metric or plots.DEFAULT_METRIC, labels)
        summary = tables.summary(result, col, labels)
        frozen = Traced(result, labels.frozen())  # the visitor's state keeps labels, not the model
        note, suggestion = self._target_note(result, labels)
        later = gr.update()
        target = gr.update(value=shown_token(result.target.token)) if result.target is not None else later
        yield (frozen, heatmap, later, later, later, summary, later, later,
               gr.update(visible=True), note, gr.update(visible=bool(suggestion), value=_follow_label(suggestion)),
               suggestion, target, gr.update(visible=False))
        chart = plots.target_chart([(result.backend, result)], col)
        choices = tables.position_choices(result, labels)
        table = tables.topk_table(result, col, labels)
        if not api:
            table = gr.update(value=table, column_widths=tables.table_widths(result))
        json_file, csv_file = tables.write_downloads(result)
        if not api:
            json_file, csv_file = gr.update(value=json_file, visible=True), gr.update(value=csv_file, visible=True)
        yield (frozen, later, chart, gr.update(choices=choices, value=col), table, later, json_file, csv_file,
               later, later, later, later, later, later)

    def _failed(self, exc: Exception) -> tuple:
        """The outputs after a failed trace: the message (and a fix to click, when there is one),
        and nothing left over from the previous trace."""
        suggestion = getattr(exc, "suggestion", None)
        hidden = gr.update(value=None, visible=False)
        return (None, None, None, gr.update(choices=[], value=None), None, "", hidden, hidden,
                gr.update(visible=False), problem_markdown(message_of(exc, "lens"), "Not traced."),
                gr.update(visible=bool(suggestion), value=_follow_label(suggestion)), suggestion, gr.update(),
                gr.update(visible=False))

    @staticmethod
    def _target_note(result, labels) -> tuple[str, str | None]:
        """A line beside the target when another spelling of it is likelier (and that spelling)."""
        target = result.target
        if target is None or target.suggestion is None:
            return "", None
        final = float(target.prob[-1, -1])
        return (f"💡 `{labels(target.suggestion)}` is likelier here than `{labels(target.token)}` "
                f"({plots.percent(target.suggestion_prob)} vs {plots.percent(final)} at the output): the model "
                f"writes this word {'with' if target.suggestion.startswith(' ') else 'without'} a leading space "
                "(`␣`).", target.suggestion)

    # ---------------------------------------------------------------- layout and wiring

    def build(self, page: Page) -> None:
        """The tab's components (inside its gr.Tab)."""
        s, catalog = self.core.settings, self.core.catalog
        default_model = catalog.default_name()
        choices, reasons = catalog.backend_choices(default_model)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=330):
                self.prompt = gr.Textbox(label="Prompt", lines=2, max_length=s.max_prompt_chars,
                                         value=LENS_EXAMPLES[0][0], elem_id="lens-prompt",
                                         info=f"Up to {s.max_prompt_tokens:,} tokens ({s.max_prompt_chars:,} "
                                              "characters).")
                self.target = gr.Textbox(label="Target token (optional)", value=LENS_EXAMPLES[0][1],
                                         placeholder="e.g. ␣Berlin", elem_id="lens-target",
                                         info="One token to follow through the layers. ␣ is a space: most words "
                                              "start with one (type ␣ or a plain space).")
                self.suggest = gr.Button("", visible=False, size="sm", elem_id="lens-suggest")
                self.suggested = gr.State(None)
                self.trace_button = gr.Button("Trace", variant="primary", elem_id="lens-trace")
                self.message = gr.Markdown(elem_id="lens-message")
                self.examples = gr.Examples(LENS_EXAMPLES, [self.prompt, self.target], label="Examples (click to run)")
                self.backend = gr.Radio(choices, value=next((b for _, b in choices if b not in reasons), "hooks"),
                                        label="Backend", elem_id="lens-backend")
                self.backend_note = gr.Markdown(reasons_markdown(reasons), elem_id="lens-backend-note")
                backend = self.backend.value
                with gr.Column(visible=backend == "llama-cpp", elem_id="lens-gguf-options") as self.gguf_options:
                    kinds, kind_reasons = catalog.lens_kind_choices(default_model)
                    self.lens_kind = gr.Radio(kinds, value="logit", label="Lens (on the GGUF)", elem_id="lens-kind",
                                              info="tuned and Jacobian read the lens saved for this model")
                    self.lens_kind_note = gr.Markdown(reasons_markdown(kind_reasons, LENS_KINDS.get),
                                                      elem_id="lens-kind-note")
                with gr.Column(visible=backend == "nnsight" and not s.public,
                               elem_id="lens-remote-options") as self.remote_options:
                    self.remote = gr.Checkbox(False, label="Run on NDIF (remote)", elem_id="lens-remote",
                                              info="The trace runs on NDIF's hosted copy of the model (needs an API "
                                                   "key in NDIF_API_KEY on this server); only the lens statistics "
                                                   "come back.")
                    self.repo_id = gr.Textbox(label="NDIF model id", placeholder="e.g. meta-llama/Llama-3.1-70B",
                                              elem_id="lens-repo-id",
                                              info="The Hugging Face id NDIF hosts the picked model under (empty: "
                                                   "the picked model's own id).")
                with gr.Row():
                    self.top_k = gr.Slider(1, s.max_top_k, value=5, step=1, label="Top-k", elem_id="lens-top-k")
                    self.temperature = gr.Slider(0.1, 3.0, value=1.0, step=0.1, label="Temperature",
                                                 elem_id="lens-temperature")
                self.first_position = gr.Number(0, precision=0, minimum=0, label="Trace from token",
                                                info="0 traces every position; Trace this reply (Chat) starts at "
                                                     "the reply.", elem_id="lens-first-position")
                self.api_only = gr.Button("lens", visible=False)
                self.train.build(page)
            with gr.Column(scale=3):
                with gr.Accordion("What am I looking at?", open=False, elem_id="lens-help"):
                    gr.Markdown(HELP)
                with gr.Column(visible=True, elem_id="lens-results") as self.results:
                    self.summary = gr.Markdown(elem_id="lens-summary")
                    self.metric = gr.Radio(list(plots.METRICS), value=plots.DEFAULT_METRIC, label="Colour by",
                                           elem_id="lens-metric")
                    self.metric_note = gr.Markdown(plots.metric_note(plots.DEFAULT_METRIC), elem_id="lens-metric-note")
                    self.heatmap = gr.Plot(show_label=False, elem_id="lens-heatmap")
                    gr.Markdown(plots.HEATMAP_NOTE, elem_id="lens-heatmap-note")
                    # A click on a cell reaches Python through this box (page.js writes "row,column,time").
                    self.cell = gr.Textbox(visible="hidden", elem_id="lens-cell")
                    self.picked = gr.State(None)
                    with gr.Row(equal_height=True):
                        self.position = gr.Dropdown(label="Position for the chart and the table", choices=[],
                                                    type="value", elem_id="lens-position", scale=3)
                        self.follow_button = gr.Button("", visible=False, size="sm", elem_id="lens-follow", scale=2)
                        self.patch_link = gr.Button("Patch this position →", size="sm", elem_id="lens-to-patch",
                                                    scale=1, visible="patch" in page.views)
                    self.chart = gr.Plot(show_label=False, elem_id="lens-chart")
                    self.table = gr.Dataframe(label="Top-k per layer at that position (click a token to follow it "
                                                    "as the target)", wrap=True, elem_id="lens-table",
                                              interactive=False)
                    with gr.Row():
                        self.json_file = gr.File(label="JSON (the whole result)", interactive=False, visible=False,
                                                 elem_id="lens-json")
                        self.csv_file = gr.File(label="CSV (one line per cell and rank)", interactive=False,
                                                visible=False, elem_id="lens-csv")
                self.traced = gr.State(None)
        self.api_inputs = [self.prompt, page.model, self.backend, self.top_k, self.temperature, self.target,
                           self.metric, self.first_position, page.ignore_memory]
        self.choices = [self.lens_kind, self.remote, self.repo_id]  # after the progress parameter
        self.inputs = self.api_inputs + self.choices
        self.api_outputs = [self.traced, self.heatmap, self.chart, self.position, self.table, self.summary,
                            self.json_file, self.csv_file]
        self.outputs = self.api_outputs + [self.results, self.message, self.suggest, self.suggested, self.target,
                                           self.follow_button]

    def traced_event(self, event, fn, inputs, outputs, heavy: dict) -> None:
        """Wire a trace drawn in this tab's heatmap to `event` (a listener such as `button.click`).

        In the page, "Tracing…" stands over the heatmap (ui/page.js) from the trigger until the new one
        is drawn or the event ends, in place of Gradio's progress overlay: that overlay's animation kept
        the page redrawing the whole plot as long as the trace ran, which took a CPU core from the trace
        on a machine without a GPU (bench/bench_demo.py: the click took 1.8x the trace with it). The
        label is its own browser-only event: as a `js` step of the trace itself, Gradio first copied
        every output's value (the figures, the table) to hand them to it before the request left
        (about 15 ms of CPU per click in a profile). A first load says its progress in the message
        beside the inputs (`Core.while_loading`). A trigger while a trace runs is not lost: it traces
        again after (Gradio's default drops it).
        Gradio's progress is tracked on the heatmap alone (`show_progress_on`), not on all 14 outputs: at
        each message from the server (about six a trace) the page copied the value of every component
        that ever had a progress, and each output ran its own timer every frame while the trace ran
        (27 components copied per message, 15 after; the request leaves 25 ms after the click, not 30-58).
        """
        event(**LensView._busy)
        event(fn, inputs, outputs, api_visibility="private", show_progress="hidden", show_progress_on=self.heatmap,
              trigger_mode="always_last", **heavy).then(**LensView._idle)

    _busy = dict(fn=None, js="() => { window.lensbenchBusy && window.lensbenchBusy('lens-heatmap', true); }",
                 api_visibility="private", queue=False)
    _idle = dict(fn=None, js="() => { window.lensbenchBusy && window.lensbenchBusy('lens-heatmap', false); }",
                 api_visibility="private", queue=False)

    def connect(self, page: Page) -> None:
        """Wire the tab: Trace, the examples, redraws, picks, and the link to the Patch tab."""
        def run(event, fn, inputs):
            self.traced_event(event, fn, inputs, self.outputs, page.heavy)

        run(self.trace_button.click, self.lens_steps, self.inputs)
        run(self.prompt.submit, self.lens_steps, self.inputs)
        run(self.target.submit, self.lens_steps, self.inputs)
        run(self.examples.load_input_event.then, self.lens_steps, self.inputs)
        # The same as one call with every output in its answer, for gradio_client and "Use via API".
        self.api_only.click(self.lens, self.api_inputs, self.api_outputs, api_name="lens", **page.heavy)
        run(page.blocks.load, self.first_view, self.inputs)

        quick = dict(api_visibility="private", concurrency_limit=None, show_progress="hidden")
        redraw_outputs = [self.heatmap, self.chart, self.table, self.summary]
        self.metric.input(self.redraw, [self.traced, self.metric, self.position], redraw_outputs, **quick)
        self.metric.input(plots.metric_note, self.metric, self.metric_note, queue=False, api_visibility="private",
                          show_progress="hidden")
        self.position.input(self.redraw, [self.traced, self.metric, self.position], redraw_outputs, **quick)
        self.cell.change(self.cell_picked, [self.traced, self.cell, self.metric],
                        [self.position, self.chart, self.table, self.summary, self.follow_button, self.picked],
                        **quick)
        follow_inputs = self.inputs[:5] + [self.metric, self.first_position, page.ignore_memory] + self.choices
        run(self.suggest.click, self.follow, [self.suggested] + follow_inputs)
        run(self.follow_button.click, self.follow, [self.picked] + follow_inputs)
        run(self.table.select, self.table_picked, [self.traced, self.position] + follow_inputs)

        page.model.change(self.model_changed, [page.model, self.backend], [self.backend, self.backend_note],
                          api_visibility="private", concurrency_limit=None)
        self.backend.input(self.backend_changed, [page.model, self.backend], [self.backend, self.backend_note],
                           api_visibility="private", concurrency_limit=None)
        instant = dict(api_visibility="private", queue=False, show_progress="hidden")
        self.backend.change(self.options_shown, self.backend, [self.gguf_options, self.remote_options], **instant)
        page.model.change(self.lens_kinds, [page.model, self.lens_kind], [self.lens_kind, self.lens_kind_note],
                          api_visibility="private", concurrency_limit=None)
        self.lens_kind.input(self.lens_kind_changed, [page.model, self.lens_kind], [self.lens_kind,
                             self.lens_kind_note], **instant)
        self.train.connect(page)
        patch = page.views.get("patch")
        if patch is not None:
            self.patch_link.click(patch.from_lens, [self.traced, self.position, self.prompt, self.target],
                                  patch.lens_link_outputs(page), api_visibility="private", queue=False)


def _choices(lens_kind, remote, repo_id) -> dict:
    """The visitor's backend options as `Core.open` takes them."""
    return dict(lens_kind=lens_kind or "logit", remote=bool(remote), repo_id=(repo_id or "").strip() or None)


def _follow_label(token: str | None) -> str:
    return f"Follow {shown_token(token)} instead" if token else ""

