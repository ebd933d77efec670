"""The Compare tab: one prompt through two (model, backend) pairs, side by side.

Side A is the model picked above the tabs; side B is any model (the same one by default) with
another backend. By default the pair can differ: PyTorch (the GGUF converted to float32) against
llama.cpp on the GGUF itself. Where both sides read the same tokens at the same depth, the cells
where their top-1 tokens differ are outlined on both heatmaps.
"""

from __future__ import annotations

import gradio as gr

from tracing.errors import LensbenchError

from . import plots, tables
from .choices import Catalog, backend_label
from .core import Core, Page, message_of, no_progress, problem_markdown, user_errors
from .lens_view import LENS_EXAMPLES

HELP = """
**Two lenses on one prompt.** Side **A** is the model picked above with backend A; side **B** is the
model and backend you pick for it. Both trace the same prompt and follow the same target.

- The **chart** puts both target curves together (solid: probability, dotted: rank). Models of
  different depth share the x axis as the fraction of depth (0 = embeddings, 1 = output).
- The **heatmaps** are as in the Lens tab. When both sides read the same tokens at the same depth,
  each cell where A and B predict a different top-1 token is **outlined in red**; hover it for both.
- Good pairs: **PyTorch vs llama.cpp** (the same weights in float32 vs quantized, run by different
  code), **logit lens vs tuned lens** (once you trained one), or two models.
"""


def default_pair(catalog: Catalog, model: str | None) -> tuple[str, str | None, str]:
    """(backend A, model B, backend B) for a model: a pair that can differ. PyTorch vs the GGUF
    itself, else the logit lens vs a trained tuned lens, else another listed model, else any two
    backends that can run it."""
    usable = [b for _, b in catalog.backend_choices(model)[0] if not catalog.backend_problem(model, b)]
    first = usable[0] if usable else "hooks"
    for a, b in (("hooks", "llama-cpp"), ("tuned-lens", "tuned-lens-tuned")):
        if a in usable and b in usable:
            return a, model, b
    for name in catalog.names():
        if name != model and not catalog.backend_problem(name, first):
            return first, name, first
    return first, model, usable[1] if len(usable) > 1 else first


def compare_examples_for(catalog: Catalog, model: str | None) -> list[list]:
    """Ready comparisons among what this app has, for the model picked above: PyTorch vs the GGUF,
    logit vs tuned lens (once a lens is trained), and the model vs each other listed model.
    Rows: prompt, target, backend A, model B, backend B."""
    if model is None:
        return []
    prompt, target = LENS_EXAMPLES[0]
    usable = lambda name, backend: catalog.backend_problem(name, backend) is None  # noqa: E731
    rows = [("hooks", model, "llama-cpp"), ("tuned-lens", model, "tuned-lens-tuned")]
    rows += [("hooks", name, "hooks") for name in catalog.names() if name != model]
    return [[prompt, target, a, name, b] for a, name, b in rows if usable(model, a) and usable(name, b)][:6]


def example_label(row: list, model: str | None) -> str:
    """A comparison for people: "PyTorch hooks vs llama.cpp (on the GGUF)", naming model B if it differs."""
    _prompt, _target, backend_a, model_b, backend_b = row
    other = f"{model_b} · " if model_b != model else ""
    return f"{backend_label(backend_a)} vs {other}{backend_label(backend_b)}"


class CompareView:
    """The Compare tab: both sides traced, one chart, two heatmaps with their differences outlined."""

    id, title = "compare", "Compare"

    def __init__(self, core: Core):
        self.core = core

    # ---------------------------------------------------------------- what a click runs

    @user_errors
    def compare(self, prompt, target, model_a, backend_a, model_b, backend_b, top_k, temperature, metric,
                ignore_memory=False, progress=gr.Progress(track_tqdm=True)):
        """One prompt through two (model, backend) pairs (the "compare" API): a summary, both
        target trajectories on one chart, and both heatmaps."""
        return self._outputs(prompt, target, model_a, backend_a, model_b, backend_b, top_k, temperature, metric,
                             ignore_memory, progress)

    def compare_steps(self, prompt, target, model_a, backend_a, model_b, backend_b, top_k, temperature, metric,
                      ignore_memory=False, progress=gr.Progress(track_tqdm=True)):
        """What the Compare button runs: as `compare`, and a mistake as a message beside the inputs
        (with nothing left over from the previous comparison)."""
        notes = [self.core.loading_note(model_a, backend_a), self.core.loading_note(model_b, backend_b)]
        if any(notes):
            yield (gr.update(),) * 5 + ("  \n".join(dict.fromkeys(n for n in notes if n)),)
        try:
            out = self._outputs(prompt, target, model_a, backend_a, model_b, backend_b, top_k, temperature, metric,
                                ignore_memory, progress)
        except Exception as exc:
            yield "", None, None, None, gr.update(visible=False), problem_markdown(message_of(exc, "compare"),
                                                                                "Not compared.")
            return
        yield (*out, gr.update(visible=True), "")

    def _outputs(self, prompt, target, model_a, backend_a, model_b, backend_b, top_k, temperature, metric,
                 ignore_memory=False, progress=no_progress):
        sides = []
        for side, model, backend in (("A", model_a, backend_a), ("B", model_b, backend_b)):
            try:
                traced = self.core.trace(model, backend, prompt, target, top_k, temperature, ignore_memory)
            except LensbenchError as exc:
                raise LensbenchError(f"Side {side}: {exc}") from None
            sides.append((f"{side}: {traced.result.model} · {traced.result.backend}", traced))
        metric = metric or plots.DEFAULT_METRIC
        (name_a, a), (name_b, b) = sides
        chart = plots.target_chart([(name, t.result) for name, t in sides])
        maps = [plots.heatmap(t.result, metric, t.labels, title=name, compact=True) for name, t in sides]
        differs = plots.top1_differs(a.result, b.result)
        if differs is None:
            verdict = ("A and B read the prompt as different tokens, or have different depths: their cells are not "
                       "compared one by one (the chart lines up their depths).")
        else:
            n, total = int(differs.sum()), differs.size
            verdict = (f"A and B predict the same top-1 token in **{total - n} of {total}** cells"
                       + (f"; the {n} where they differ are outlined in red on both heatmaps." if n else "."))
            for fig in maps:
                plots.mark_differences(fig, a.result, b.result, differs, a.labels, b.labels)
        text = "\n\n".join([verdict] + [f"**{name}**  \n{tables.summary(t.result, -1, t.labels)}" for name, t in sides])
        return text, chart, maps[0], maps[1]

    def model_changed(self, model):
        """A new model above: side A's backends, and side B reset to a pair that can differ."""
        catalog = self.core.catalog
        backend_a, model_b, backend_b = default_pair(catalog, model)
        return (gr.update(choices=catalog.backend_choices(model)[0], value=backend_a),
                gr.update(value=model_b), gr.update(choices=catalog.backend_choices(model_b)[0], value=backend_b))

    def side_changed(self, model, backend):
        """A side's backend switch for its model, unavailable ones marked."""
        choices, reasons = self.core.catalog.backend_choices(model)
        usable = [b for _, b in choices if b not in reasons]
        return gr.update(choices=choices, value=backend if backend in usable else (usable[0] if usable else backend))

    def refresh_models(self, model_b):
        """Side B's list, read again from models/ (its selection kept while still listed)."""
        names = self.core.catalog.names()
        return gr.update(choices=names, value=model_b if model_b in names else self.core.catalog.default_name())

    # ---------------------------------------------------------------- layout and wiring

    def build(self, page: Page) -> None:
        s, catalog = self.core.settings, self.core.catalog
        model = catalog.default_name()
        backend_a, model_b, backend_b = default_pair(catalog, model)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=330):
                self.prompt = gr.Textbox(label="Prompt", lines=2, value=LENS_EXAMPLES[0][0],
                                         max_length=s.max_prompt_chars, elem_id="compare-prompt",
                                         info=f"Up to {s.max_prompt_tokens:,} tokens.")
                self.target = gr.Textbox(label="Target token", value=LENS_EXAMPLES[0][1], elem_id="compare-target",
                                         info="␣ is a space (type ␣ or a plain space).")
                self.button = gr.Button("Compare", variant="primary", elem_id="compare-run")
                self.message = gr.Markdown("Press **Compare** or click a comparison: both sides appear on the right.", elem_id="compare-message")
                gr.Markdown("**A**: the model picked above, with", elem_classes=["side-label"])
                self.backend_a = gr.Radio(catalog.backend_choices(model)[0], value=backend_a, label="Backend A",
                                          elem_id="compare-backend-a")
                self.model_b = gr.Dropdown(catalog.names(), value=model_b, label="Model B",
                                           allow_custom_value=s.allow_custom_models, elem_id="compare-model-b")
                self.backend_b = gr.Radio(catalog.backend_choices(model_b)[0], value=backend_b, label="Backend B",
                                          elem_id="compare-backend-b")
                with gr.Row():
                    self.top_k = gr.Slider(1, s.max_top_k, value=5, step=1, label="Top-k")
                    self.temperature = gr.Slider(0.1, 3.0, value=1.0, step=0.1, label="Temperature",
                                                 elem_id="compare-temperature")
                self.rows = compare_examples_for(catalog, model)
                self.examples = gr.Dataset(
                    components=["textbox"], samples=[[example_label(r, model)] for r in self.rows], type="index",
                    label="Comparisons (click to run)", layout="table", headers=["A vs B on the first example"],
                    elem_id="compare-examples") if self.rows else None
            with gr.Column(scale=3):
                with gr.Accordion("What am I looking at?", open=False, elem_id="compare-help"):
                    gr.Markdown(HELP)
                with gr.Column(visible=False, elem_id="compare-results") as self.results:
                    self.summary = gr.Markdown(elem_id="compare-summary")
                    self.metric = gr.Radio(list(plots.METRICS), value=plots.DEFAULT_METRIC, label="Colour by")
                    self.chart = gr.Plot(show_label=False, elem_id="compare-chart")
                    with gr.Row():
                        self.map_a = gr.Plot(show_label=False, elem_id="compare-map-a")
                        self.map_b = gr.Plot(show_label=False, elem_id="compare-map-b")
                self.api_only = gr.Button("compare", visible=False)

    def connect(self, page: Page) -> None:
        inputs = [self.prompt, self.target, page.model, self.backend_a, self.model_b, self.backend_b, self.top_k,
                  self.temperature, self.metric, page.ignore_memory]
        outputs = [self.summary, self.chart, self.map_a, self.map_b]
        ui = dict(api_visibility="private", show_progress_on=[self.chart], **page.heavy)
        self.button.click(self.compare_steps, inputs, outputs + [self.results, self.message], **ui)
        self.api_only.click(self.compare, inputs, outputs, api_name="compare", **page.heavy)
        if self.examples is not None:
            self.examples.click(lambda i: tuple(self.rows[i]), self.examples,
                                [self.prompt, self.target, self.backend_a, self.model_b, self.backend_b],
                                api_visibility="private", queue=False).then(
                self.compare_steps, inputs, outputs + [self.results, self.message], **ui)
        quick = dict(api_visibility="private", concurrency_limit=None)
        page.model.change(self.model_changed, page.model, [self.backend_a, self.model_b, self.backend_b], **quick)
        self.model_b.change(self.side_changed, [self.model_b, self.backend_b], self.backend_b, **quick)
        self.backend_a.input(self.side_changed, [page.model, self.backend_a], self.backend_a, **quick)
        self.backend_b.input(self.side_changed, [self.model_b, self.backend_b], self.backend_b, **quick)
        page.blocks.load(self.refresh_models, self.model_b, self.model_b, **quick)
