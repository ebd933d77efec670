"""The Patch tab: activation patching (causal tracing). Where in the model is the answer decided?

The corrupted prompt is run again with one vector taken from the clean run, for every layer and
position; a cell shows how much of the clean answer that restores. A lens cell links here: its
prompt becomes the clean prompt, and the message says which token to change.
"""

from __future__ import annotations

import gradio as gr

from tracing.errors import LensbenchError

from . import plots, tables
from .choices import backend_label
from .core import Core, Page, message_of, no_progress, problem_markdown, sub_progress, user_errors
from .tokens import TokenLabels, byte_lookup, shown_token, typed_token

# Clean prompt, corrupted prompt, target (the clean answer), contrast (the corrupted answer). The
# prompts of a pair must be as many tokens: "Berlin is the capital of" is 'Ber' 'lin' ... but
# "Paris is ..." starts with one token, so the reverse direction names the city mid-sentence.
PATCH_EXAMPLES = [
    ["The capital of Germany is", "The capital of France is", "␣Berlin", "␣Paris"],
    ["The city of Berlin is the capital of", "The city of Paris is the capital of", "␣Germany", "␣France"],
    ["The Eiffel Tower is in the city of", "The Brandenburg Gate is in the city of", "␣Paris", "␣Berlin"],
]

PUBLIC_PATCH_TOKENS = 32

HELP = """
**Activation patching** asks *where* the model decides its answer. Two prompts that differ in one
place: the **clean** one ("The capital of **Germany** is" → `␣Berlin`) and the **corrupted** one
("The capital of **France** is" → `␣Paris`). The corrupted prompt is run again and again; each time
one vector (one layer, one position) is replaced by the one from the clean run.

- A **cell** (row = layer, column = position) shows how much of the clean answer that one swap
  restores: **100%** (dark blue) = all of it, **0** (white) = nothing, below 0 (red) = even further away.
- With a **contrast** token the score is the logit difference target − contrast; without one, the
  target's probability.
- The **attention** and **MLP** grids swap only what that block's attention or MLP wrote, which shows
  which part moved the information.
"""


def example_label(example: list[str]) -> str:
    clean, corrupt, target, contrast = example
    return f"{clean} → {target}  ·  {corrupt} → {contrast}"


class PatchView:
    """The Patch tab: the grids, Stop, and what the Lens tab's "Patch this position" sets up."""

    id, title = "patch", "Patch"

    def __init__(self, core: Core):
        self.core = core

    # ---------------------------------------------------------------- what a click runs

    def backend_choices(self, model) -> tuple[list, dict]:
        """The backends activation patching runs on, marked as the Lens tab marks them."""
        from tracing.patching import RUNTIMES

        choices, reasons = self.core.catalog.backend_choices(model)
        return [c for c in choices if c[1] in RUNTIMES], {b: r for b, r in reasons.items() if b in RUNTIMES}

    def model_changed(self, model, backend):
        choices, reasons = self.backend_choices(model)
        usable = [b for _, b in choices if b not in reasons]
        return gr.update(choices=choices, value=backend if backend in usable else (usable[0] if usable else backend))

    @user_errors
    def patch(self, clean, corrupt, target, contrast, model, backend, sublayers=True, ignore_memory=False,
              request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        """Activation patching (the "patch" API): the corrupted prompt run again with one vector of
        the clean run restored, for every layer and position. Returns the answers and metric
        (markdown), the residual-stream heatmap, and the attention and MLP heatmaps."""
        return self._outputs(clean, corrupt, target, contrast, model, backend, sublayers, ignore_memory, request,
                             progress)

    def patch_steps(self, clean, corrupt, target, contrast, model, backend, sublayers=True, ignore_memory=False,
                    request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        """What the Patch button runs: as `patch`, and a mistake as a message beside the inputs."""
        note = self.core.loading_note(model, backend)
        if note:
            yield (gr.update(),) * 5 + (note,)
        try:
            out = self._outputs(clean, corrupt, target, contrast, model, backend, sublayers, ignore_memory, request,
                                progress)
        except Exception as exc:
            yield "", None, None, None, gr.update(visible=False), problem_markdown(message_of(exc, "patch"),
                                                                                "Not patched.")
            return
        yield (*out, gr.update(visible=True), "")

    def _outputs(self, clean, corrupt, target, contrast, model, backend, sublayers=True, ignore_memory=False,
                 request=None, progress=no_progress):
        from tracing.patching import RUNTIMES, patch_with

        core, s = self.core, self.core.settings
        clean, corrupt = core.check_prompt(clean, "clean prompt"), core.check_prompt(corrupt, "corrupted prompt")
        target, contrast = typed_token(target), typed_token(contrast)
        if not target.strip():
            raise LensbenchError("Type the clean answer as the target token, e.g. ␣Berlin (␣ is its leading space).")
        if backend not in RUNTIMES:
            raise LensbenchError(f"Activation patching runs on {' and '.join(map(backend_label, RUNTIMES))}.")
        tracer = core.open(model, backend, ignore_memory)
        # A grid runs up to (layers + 1) x 3 x tokens forwards: on a public link, short prompts only.
        limit = min(s.max_prompt_tokens, PUBLIC_PATCH_TOKENS) if s.public else s.max_prompt_tokens
        core.check_tokens(len(tracer.encode(clean)), limit, "patches")
        cancel = core.cancel_event(request, "patch:")
        result = patch_with(tracer, clean, corrupt, target, contrast or None, sublayers=bool(sublayers),
                            progress=sub_progress(progress, 0.1, 0.9), cancel=cancel)
        labels = TokenLabels(byte_lookup(tracer)).frozen()
        return (tables.patch_summary(result, labels), plots.patch_heatmap(result, "resid", labels),
                plots.patch_heatmap(result, "attn", labels, compact=True),
                plots.patch_heatmap(result, "mlp", labels, compact=True))

    def stop_patch(self, request: gr.Request = None) -> None:
        """Stop this visitor's patching grid (after the batch of cells running now)."""
        self.core.cancel(request, "patch:")

    def from_lens(self, traced, column, prompt, target):
        """The Lens tab's "Patch this position": this tab, with the lens prompt as the clean prompt
        (and, to edit, as the corrupted one), the lens target (or the model's answer) as the clean
        answer, and a message naming the token to change."""
        if traced is None:
            return (gr.update(),) * 5 + (problem_markdown("Trace a prompt in the Lens tab first."),)
        result, labels = traced.result, traced.labels
        col = (int(column) if column is not None else -1) % len(result.positions)
        pos = result.positions[col]
        token = labels(result.tokens[pos], result.token_ids[pos])
        answer = result.target.token if result.target is not None else result.topk_tokens[-1][-1][0]
        message = (f"Set up from the Lens tab. Now, in the **corrupted prompt**, change `{token}` (position {pos}) "
                   "to another word of as many tokens (e.g. another city), and write the answer it leads to as the "
                   "contrast; then press **Patch**. Each cell shows how much putting back the clean run's vector "
                   f"there restores `{labels(answer)}`.")
        return (gr.update(selected=self.id), prompt, prompt, shown_token(answer), "", message)

    def lens_link_outputs(self, page: Page) -> list:
        return [page.tabs, self.clean, self.corrupt, self.target, self.contrast, self.message]

    # ---------------------------------------------------------------- layout and wiring

    def build(self, page: Page) -> None:
        s, catalog = self.core.settings, self.core.catalog
        choices, reasons = self.backend_choices(catalog.default_name())
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=330):
                self.clean = gr.Textbox(label="Clean prompt", value=PATCH_EXAMPLES[0][0], max_length=s.max_prompt_chars,
                                        elem_id="patch-clean")
                self.corrupt = gr.Textbox(label="Corrupted prompt (as many tokens)", value=PATCH_EXAMPLES[0][1],
                                          max_length=s.max_prompt_chars, elem_id="patch-corrupt")
                with gr.Row():
                    self.target = gr.Textbox(label="Target (clean answer)", value=PATCH_EXAMPLES[0][2],
                                             elem_id="patch-target", info="␣ is a space.")
                    self.contrast = gr.Textbox(label="Contrast (optional)", value=PATCH_EXAMPLES[0][3],
                                               elem_id="patch-contrast", info="the corrupted answer")
                with gr.Row():
                    self.button = gr.Button("Patch", variant="primary", elem_id="patch-run")
                    self.stop_button = gr.Button("Stop", elem_id="patch-stop")
                self.message = gr.Markdown("Press **Patch** or click an example: the grids appear on the right.", elem_id="patch-message")
                # One line an example (four columns do not fit this column): clean → answer · corrupted → answer.
                self.examples = gr.Dataset(components=["textbox"], samples=[[example_label(e)] for e in PATCH_EXAMPLES],
                                           label="Examples (click to run)", type="index", layout="table",
                                           headers=["clean prompt → answer · corrupted prompt → answer"],
                                           elem_id="patch-examples")
                self.backend = gr.Radio(choices, value=next((b for _, b in choices if b not in reasons), "hooks"),
                                        label="Runtime", elem_id="patch-backend")
                self.sublayers = gr.Checkbox(True, label="Also attention and MLP outputs (3x the cells)")
            with gr.Column(scale=3):
                with gr.Accordion("What am I looking at?", open=False, elem_id="patch-help"):
                    gr.Markdown(HELP)
                with gr.Column(visible=False, elem_id="patch-results") as self.results:
                    self.summary = gr.Markdown(elem_id="patch-summary")
                    self.resid = gr.Plot(show_label=False, elem_id="patch-heatmap")
                    with gr.Row():
                        self.attn = gr.Plot(show_label=False, elem_id="patch-attn")
                        self.mlp = gr.Plot(show_label=False, elem_id="patch-mlp")
                self.api_only = gr.Button("patch", visible=False)

    def connect(self, page: Page) -> None:
        inputs = [self.clean, self.corrupt, self.target, self.contrast, page.model, self.backend, self.sublayers,
                  page.ignore_memory]
        outputs = [self.summary, self.resid, self.attn, self.mlp]
        ui = dict(api_visibility="private", show_progress_on=[self.resid], **page.heavy)
        self.button.click(self.patch_steps, inputs, outputs + [self.results, self.message], **ui)
        self.examples.click(lambda i: tuple(PATCH_EXAMPLES[i]), self.examples,
                            [self.clean, self.corrupt, self.target, self.contrast], api_visibility="private",
                            queue=False).then(self.patch_steps, inputs, outputs + [self.results, self.message], **ui)
        self.api_only.click(self.patch, inputs, outputs, api_name="patch", **page.heavy)
        self.stop_button.click(self.stop_patch, None, None, api_name="stop_patch", queue=False)
        page.model.change(self.model_changed, [page.model, self.backend], [self.backend], api_visibility="private",
                          concurrency_limit=None)
