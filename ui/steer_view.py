"""The Steer tab: build a steering vector from two sets of example texts, read it through the lens,
and watch what it does to the model's answers at several strengths, side by side.

Everything is computed by `tracing.steering` (build, lens reading, file, generation) and drawn by
`ui.steer_plots`; this module lays out the tab, checks what a visitor typed, and turns mistakes
into messages beside the inputs that caused them. The vector is kept per visitor (a gr.State),
its file written to a folder of this visitor's own.
"""

from __future__ import annotations

import html
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from tracing.errors import LensbenchError

from . import plots, steer_plots
from .choices import backend_label
from .core import Core, Page, Traced, message_of, no_progress, problem_markdown, sub_progress, user_errors
from .tokens import TokenLabels, byte_lookup

DEFAULT_STRENGTH = 0.2
MAX_EXAMPLES = 256  # texts per set (a public link: PUBLIC_MAX_EXAMPLES)
PUBLIC_MAX_EXAMPLES = 64
SWEEP_NEW_TOKENS = 64

HELP = """
A **steering vector** is a direction in the model's residual stream (the running sum every layer
reads from and writes to) that stands for a concept. It is built from two sets of example texts:
ones that show the concept (*"I love you with all my heart."*) and ones that show its opposite
(*"I hate you with all my heart."*). Each text is run once; at every layer the vector is the
difference between the two sets' residual streams at the last token (**mean**), or the main
direction of the paired differences (**pca**, the sets paired line by line, so as many lines each).

- **The reading** shows what each layer's direction means: pushed through the model's own output
  layer (the lens), the tokens it makes likelier (right, red) and less likely (left, blue). Early
  layers often read as noise; the concept shows up in the later ones.
- **The profile** shows how long each layer's direction is and how well it tells the two sets
  apart (100% = every example on its own side).
- **Strength** is how much of the vector is added while the model writes, at every token: positive
  pushes toward the first set's concept, negative toward the second's. **Strength 0 adds nothing**,
  so the answer is exactly the plain, unsteered one for the same seed: that is the reference column.
  Too much and the text comes apart (repetition, odd tokens): the sweep shows where.
- **Layers** A-B are where it is added: layer L is the output of block L counted from 0, as llama.cpp
  counts them (the Lens tab calls that residual "layer L+1"); block 0's output cannot be steered.
  The middle layers usually steer best; the same strength on more layers adds up.
- **Lens** traces the prompt with the vector added (the Lens tab's heatmap): the rows below the first
  steered layer are the plain model's; from layer A+1 up you see at which layer the concept takes
  over. The line above it compares the steered next-token guess with the unsteered one.
- **Seed** makes sampling repeatable, so the columns differ only by the vector. The file is llama.cpp's
  control-vector GGUF (`--control-vector`); a file made elsewhere (cvector-generator, repeng) loads too,
  but only on the model it was made for.
"""


def example_sets() -> tuple[str, str]:
    """The worked example (love vs hate), one text a line."""
    from tracing.steering import example

    positive, negative = example()
    return "\n".join(positive), "\n".join(negative)


def suggested_layers(n_blocks: int) -> str:
    """The layer range suggested for a model of `n_blocks` blocks (as `steer-vector` suggests it)."""
    return f"{max(1, n_blocks // 4)}-{max(1, 2 * n_blocks // 3)}"


def sweep_strengths(strength) -> list[float]:
    """The sweep's strengths: -2s, -s, 0, s, 2s for the slider's s (just 0 when s is 0)."""
    s = abs(float(strength or 0.0))
    return [round(k * s, 6) for k in (-2, -1, 0, 1, 2)] if s else [0.0]


@dataclass
class Built:
    """What the tab keeps per visitor: the vector, the file it was saved to, and the model it is on."""

    vector: object  # tracing.steering.SteeringVector
    path: Path | None
    model: str
    backend: str


def _lines(text) -> list[str]:
    return [line for line in str(text or "").splitlines() if line.strip()]


def replies_html(replies, layers) -> str:
    """The sweep's answers side by side: one column a strength (the unsteered one marked)."""
    if not replies:
        return ""
    cards = []
    for reply in replies:
        head = "strength 0 · unsteered" if reply.strength == 0 else f"strength {reply.strength:+g}"
        ending = {"length": " ✂️ cut at the token limit", "cancelled": " ⏹ stopped"}.get(reply.finish_reason, "")
        border = "#c33" if reply.strength > 0 else "#36c" if reply.strength < 0 else "#888"
        cards.append(
            f'<div class="steer-reply" data-strength="{reply.strength:g}" style="flex:1 1 0;min-width:160px;'
            f'border-top:4px solid {border};padding:6px 8px;background:var(--block-background-fill);">'
            f'<div style="font-weight:600;margin-bottom:4px">{head}</div>'
            f'<div class="steer-reply-text" style="white-space:pre-wrap;font-size:0.9em">{html.escape(reply.text)}</div>'
            f'<div style="color:var(--body-text-color-subdued);font-size:0.8em;margin-top:4px">'
            f'{reply.seconds:.1f} s{ending}</div></div>')
    first, last = layers
    note = (f'<div style="color:var(--body-text-color-subdued);font-size:0.85em;margin-bottom:4px">'
            f'The same prompt and seed, the vector added on layers {first}-{last}; red pushes toward the '
            f'first set, blue toward the second.</div>')
    return note + '<div style="display:flex;gap:8px;align-items:stretch">' + "".join(cards) + "</div>"


class SteerView:
    """The Steer tab: Build (and Stop), the reading and profile, Reply / Sweep, the vector's file."""

    id, title = "steer", "Steer"

    def __init__(self, core: Core):
        self.core = core
        self._folder = Path(tempfile.mkdtemp(prefix="lensbench-steer-"))  # one subfolder a visitor

    # ---------------------------------------------------------------- what a click runs

    def backend_choices(self, model) -> tuple[list, dict]:
        """The backends steering runs on (llama.cpp on a GGUF, PyTorch hooks), marked as the Lens tab marks them."""
        from tracing.steering import RUNTIMES

        choices, reasons = self.core.catalog.backend_choices(model)
        return [c for c in choices if c[1] in RUNTIMES], {b: r for b, r in reasons.items() if b in RUNTIMES}

    def model_changed(self, model, backend):
        choices, reasons = self.backend_choices(model)
        return gr.update(choices=choices, value=self._preferred(choices, reasons, backend))

    @staticmethod
    def _preferred(choices, reasons, backend=None) -> str:
        """`backend` when the model can use it, else llama.cpp (the GGUF itself), else PyTorch hooks."""
        usable = [b for _, b in choices if b not in reasons]
        if backend in usable:
            return backend
        return "llama-cpp" if "llama-cpp" in usable else (usable[0] if usable else "llama-cpp")

    def _check_examples(self, positive, negative) -> tuple[list[str], list[str]]:
        limit = PUBLIC_MAX_EXAMPLES if self.core.settings.public else MAX_EXAMPLES
        sets = []
        for name, text in (("positive", positive), ("negative", negative)):
            texts = _lines(text)
            if not texts:
                raise LensbenchError(f"The {name} examples are empty: type at least one text, one a line.")
            if len(texts) > limit:
                raise LensbenchError(f"The {name} set has {len(texts)} texts; this app takes at most {limit} a set.")
            for line in texts:
                self.core.check_prompt(line, f"{name} example")
            sets.append(texts)
        return sets[0], sets[1]

    def _runtime(self, model, backend):
        from tracing.steering import RUNTIMES

        if backend not in RUNTIMES:
            raise LensbenchError(f"Steering runs on {' and '.join(map(backend_label, RUNTIMES))}.")
        return self.core.catalog.pick(model).name

    def _file_for(self, vector, request) -> Path:
        """Where this visitor's vector is saved (their own folder; the previous file replaced)."""
        session = re.sub(r"[^A-Za-z0-9_-]", "", getattr(request, "session_hash", None) or "local") or "local"
        folder = self._folder / session
        folder.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(str(vector.model)).stem).strip("-.") or "model"
        return vector.save(folder / f"{stem}-{vector.method}-steering.gguf")

    def _built(self, positive, negative, method, model, backend, ignore_memory=False, request=None,
               progress=no_progress) -> Built:
        from tracing.steering import build_with

        positive, negative = self._check_examples(positive, negative)
        name = self._runtime(model, backend)
        tracer = self.core.open(name, backend, ignore_memory)
        cancel = self.core.cancel_event(request, "steer:")
        vector = build_with(tracer, positive, negative, method or "mean", progress=sub_progress(progress, 0.05, 0.95),
                            cancel=cancel)
        return Built(vector, self._file_for(vector, request), name, backend)

    def _loaded(self, upload, model, backend, ignore_memory=False, request=None) -> Built:
        from tracing.steering import load_vector, read_with

        if not upload:
            raise LensbenchError("Pick a control-vector file (.gguf) to load.")
        path = Path(upload if isinstance(upload, str) else getattr(upload, "name", upload))
        name = self._runtime(model, backend)
        vector = load_vector(path, name)
        read_with(self.core.open(name, backend, ignore_memory), vector)
        return Built(vector, self._file_for(vector, request), name, backend)

    def _shown(self, built: Built, layers) -> tuple:
        """state, reading, profile, summary, file, layers for a vector."""
        from tracing.steering import parse_layers

        vector = built.vector
        try:
            shaded = parse_layers(layers, vector.n_blocks) if str(layers or "").strip() else None
        except LensbenchError:
            shaded = None
        if shaded is None:  # empty, or out of range for this model: the suggestion
            layers = suggested_layers(vector.n_blocks)
            shaded = parse_layers(layers, vector.n_blocks)
        if vector.source:  # a file
            how = f" (a {vector.method} vector from {vector.n_positive} + {vector.n_negative} examples)" \
                if vector.n_positive else ""
            made = f"Loaded **{Path(vector.source).name}**{how} for **{built.model}**"
        else:
            made = (f"Built a **{vector.method}** vector from {vector.n_positive} + {vector.n_negative} examples on "
                    f"**{built.model}** with {backend_label(built.backend)} in {vector.info.get('seconds', 0):.1f} s")
        summary = (f"{made}: {len(vector.layers)} layers × {vector.d_model} numbers. Now try a strength "
                   f"(e.g. {DEFAULT_STRENGTH:g}) on layers {shaded[0]}-{shaded[1]} with **Reply** or **Sweep**.")
        file = gr.update(value=str(built.path), visible=True) if built.path else gr.update(value=None, visible=False)
        return (built, steer_plots.reading_figure(vector), steer_plots.profile_figure(vector, shaded), summary, file,
                layers)

    @user_errors
    def build_vector(self, positive, negative, method, model, backend, layers="", ignore_memory=False,
              request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        """Build a steering vector (the "steer_build" API) from positive and negative texts (one a
        line). Returns the vector (kept per visitor), the reading and profile figures, a summary, the
        vector's file, and the layer range (the suggested one when `layers` is empty or out of range)."""
        return self._shown(self._built(positive, negative, method, model, backend, ignore_memory, request, progress),
                           layers)

    def build_steps(self, positive, negative, method, model, backend, layers="", ignore_memory=False,
                    request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        """What Build runs: as `build_vector`, the results shown; a mistake is a message beside the inputs,
        and nothing of an earlier vector is left (it belonged to other inputs)."""
        note = self.core.loading_note(model, backend)
        if note:
            yield (gr.update(),) * 9 + (note,)
        try:
            out = self._shown(self._built(positive, negative, method, model, backend, ignore_memory, request,
                                          progress), layers)
        except Exception as exc:
            yield self._cleared(layers) + (problem_markdown(message_of(exc, "steer_build"), "Not built."),)
            return
        yield (*out, gr.update(visible=True), "", "", "")

    @user_errors
    def load(self, upload, model, backend, layers="", ignore_memory=False, request: gr.Request = None):
        """Load a control-vector file made elsewhere (the "steer_load" API) and read it through the lens;
        the same outputs as `build_vector`."""
        return self._shown(self._loaded(upload, model, backend, ignore_memory, request), layers)

    def load_steps(self, upload, model, backend, layers="", ignore_memory=False, request: gr.Request = None):
        """What picking a file runs: as `load`, or the reason the file does not fit, beside the picker."""
        if not upload:  # the picker cleared: nothing to do
            yield (gr.update(),) * 10
            return
        try:
            out = self._shown(self._loaded(upload, model, backend, ignore_memory, request), layers)
        except Exception as exc:
            yield self._cleared(layers) + (problem_markdown(message_of(exc, "steer_load"), "Not loaded."),)
            return
        yield (*out, gr.update(visible=True), "", "", "")

    @staticmethod
    def _cleared(layers) -> tuple:
        return (None, None, None, "", gr.update(value=None, visible=False), layers, gr.update(visible=False), "", "")

    def stop(self, request: gr.Request = None) -> None:
        """Stop this visitor's build or sweep (after the text or answer running now)."""
        self.core.cancel(request, "steer:")

    def _replies(self, built: Built | None, strengths, prompt, layers, seed, temperature, max_tokens, model,
                 ignore_memory=False, request=None, progress=no_progress):
        from tracing.steering import parse_layers, sweep

        s = self.core.settings
        if built is None:
            raise LensbenchError("Build a vector first (or load a file): there is nothing to steer with yet.")
        prompt = self.core.check_prompt(prompt, "prompt")
        max_tokens = int(max_tokens or SWEEP_NEW_TOKENS)
        if not 1 <= max_tokens <= s.max_new_tokens:
            raise LensbenchError(f"Max new tokens must be between 1 and {s.max_new_tokens:,}.")
        seed = int(seed or 0)
        if seed < 0:
            raise LensbenchError("The seed is a whole number from 0 up (the same seed, the same sampling).")
        name = self.core.catalog.pick(model).name
        if name != built.model:
            raise LensbenchError(f"The vector was built on '{built.model}', and the model picked now is '{name}': "
                                 "build it again (or load a file made for this model).")
        first, last = parse_layers(layers, built.vector.n_blocks)
        options = {}
        if built.backend == "hooks":
            self.core.open(name, "hooks", ignore_memory)  # the memory check, the visitor's way; then reused
        else:
            options["check_memory"] = not self.core.memory_check_off(ignore_memory)
        cancel = self.core.cancel_event(request, "steer:")
        with self.core.loading(ignore_memory):
            replies = sweep(prompt, built.vector, strengths, (first, last), name, built.backend, seed=seed,
                            temperature=float(temperature), max_tokens=max_tokens, cancel=cancel,
                            progress=sub_progress(progress, 0.0, 1.0), **options)
        return replies, (first, last)

    def _answer_outputs(self, built, strengths, prompt, layers, seed, temperature, max_tokens, model, ignore_memory,
                        request, progress):
        replies, shaded = self._replies(built, strengths, prompt, layers, seed, temperature, max_tokens, model,
                                        ignore_memory, request, progress)
        return replies_html(replies, shaded), steer_plots.profile_figure(built.vector, shaded)

    @user_errors
    def steer_sweep(self, built, prompt, strength, layers, seed, temperature, max_tokens, model, ignore_memory=False,
                    request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        """The same prompt and seed answered at -2s, -s, 0, s, 2s (the "steer_sweep" API): the answers
        side by side (HTML) and the profile with the steered layers shaded."""
        return self._answer_outputs(built, sweep_strengths(strength), prompt, layers, seed, temperature, max_tokens,
                                    model, ignore_memory, request, progress)

    @user_errors
    def steer_reply(self, built, prompt, strength, layers, seed, temperature, max_tokens, model, ignore_memory=False,
                    request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        """One steered answer next to the plain one (strength 0), same prompt and seed (the "steer_reply" API)."""
        strengths = sorted({0.0, float(strength or 0.0)})
        return self._answer_outputs(built, strengths, prompt, layers, seed, temperature, max_tokens, model,
                                    ignore_memory, request, progress)

    def answer_steps(self, kind, built, prompt, strength, layers, seed, temperature, max_tokens, model,
                     ignore_memory=False, request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        """What Reply and Sweep run: the answers, or a message beside the prompt (no answers left that
        belong to other inputs); the vector stays."""
        strengths = sweep_strengths(strength) if kind == "sweep" else sorted({0.0, float(strength or 0.0)})
        try:
            html_out, profile = self._answer_outputs(built, strengths, prompt, layers, seed, temperature, max_tokens,
                                                     model, ignore_memory, request, progress)
        except Exception as exc:
            yield "", gr.update(), problem_markdown(message_of(exc, f"steer_{kind}"), "No answer.")
            return
        yield html_out, profile, ""

    def _lens_pair(self, built: Built | None, prompt, strength, layers, model, ignore_memory=False
                   ) -> tuple[Traced, Traced, tuple[int, int]]:
        """The lens of `prompt` with the vector added (at `strength` on `layers`) and without it, on the
        runtime the vector was built with: (steered, plain, (first, last))."""
        import tracing
        from tracing.steering import Steering

        if built is None:
            raise LensbenchError("Build a vector first (or load a file): there is nothing to steer with yet.")
        prompt = self.core.check_prompt(prompt, "prompt")
        name = self.core.catalog.pick(model).name
        if name != built.model:
            raise LensbenchError(f"The vector was built on '{built.model}', and the model picked now is '{name}': "
                                 "build it again (or load a file made for this model).")
        steering = Steering.of(built.vector, float(strength or 0.0), layers)
        tracer = self.core.open(name, built.backend, ignore_memory)
        ids = tracer.encode(prompt)
        self.core.check_tokens(len(ids))
        labels = TokenLabels(byte_lookup(tracer))
        steered = tracing.trace_with(tracer, prompt, ids=ids, steering=steering)
        plain = tracing.trace_with(tracer, prompt, ids=ids)
        return Traced(steered, labels), Traced(plain, labels), steering.layers

    @staticmethod
    def lens_note(steered: Traced, plain: Traced, strength, layers) -> str:
        """One line: the steered and the plain next-token guess (top-1 of the last row, last position)."""
        def guess(traced):
            result = traced.result
            token = result.topk_tokens[-1][-1][0]
            shown = traced.labels(token, int(result.topk_ids[-1, -1, 0]))
            return f"**{html.escape(shown)}** ({float(result.topk_probs[-1, -1, 0]):.0%})"

        first, last = layers
        return (f"Steered at strength {float(strength or 0.0):+g} on layers {first}-{last} (the lens's rows "
                f"{first + 1}-{last + 1} and up can change), the next token is {guess(steered)}; unsteered, "
                f"{guess(plain)}.")

    @user_errors
    def steer_lens(self, built, prompt, strength, layers, model, ignore_memory=False):
        """The lens of the prompt with the vector added (the "steer_lens" API): the heatmap, as the Lens
        tab draws it, and a line comparing its next-token guess with the unsteered one's."""
        steered, plain, shaded = self._lens_pair(built, prompt, strength, layers, model, ignore_memory)
        return (plots.heatmap(steered.result, plots.DEFAULT_METRIC, steered.labels),
                self.lens_note(steered, plain, strength, shaded))

    def lens_steps(self, built, prompt, strength, layers, model, ignore_memory=False):
        """What the Lens button runs: the steered lens, or a message beside the prompt (no stale heatmap)."""
        try:
            steered, plain, shaded = self._lens_pair(built, prompt, strength, layers, model, ignore_memory)
        except Exception as exc:
            yield None, "", problem_markdown(message_of(exc, "steer_lens"), "No lens.")
            return
        yield (plots.heatmap(steered.result, plots.DEFAULT_METRIC, steered.labels),
               self.lens_note(steered, plain, strength, shaded), "")

    # ---------------------------------------------------------------- layout and wiring

    def build(self, page: Page) -> None:
        """The tab's components (inside its gr.Tab)."""
        s, catalog = self.core.settings, self.core.catalog
        choices, reasons = self.backend_choices(catalog.default_name())
        positive, negative = example_sets()
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=330):
                with gr.Row():
                    self.positive = gr.Textbox(label="Positive examples (one a line)", value=positive, lines=8,
                                               max_lines=12, elem_id="steer-positive",
                                               info="texts that show the concept")
                    self.negative = gr.Textbox(label="Negative examples (one a line)", value=negative, lines=8,
                                               max_lines=12, elem_id="steer-negative",
                                               info="texts that show its opposite")
                with gr.Row():
                    self.method = gr.Radio(["mean", "pca"], value="mean", label="Method", elem_id="steer-method",
                                           info="pca pairs line i with line i")
                    self.backend = gr.Radio(choices, value=self._preferred(choices, reasons),
                                            label="Runtime", elem_id="steer-backend")
                with gr.Row():
                    self.build_button = gr.Button("Build", variant="primary", elem_id="steer-build")
                    self.stop_button = gr.Button("Stop", elem_id="steer-stop")
                self.message = gr.Markdown("Press **Build**: the vector's lens reading appears on the right.",
                                           elem_id="steer-message")
                self.upload = gr.File(label="…or load a control-vector file (.gguf)", file_types=[".gguf"],
                                      type="filepath", elem_id="steer-upload")
                self.download = gr.File(label="The vector's file (llama.cpp control vector)", interactive=False,
                                        visible=False, elem_id="steer-download")
                self.api_build = gr.Button("steer_build", visible=False)
                self.api_load = gr.Button("steer_load", visible=False)
            with gr.Column(scale=3):
                with gr.Accordion("What am I looking at?", open=False, elem_id="steer-help"):
                    gr.Markdown(HELP)
                with gr.Column(visible=False, elem_id="steer-results") as self.results:
                    self.summary = gr.Markdown(elem_id="steer-summary")
                    with gr.Row(equal_height=False):
                        self.prompt = gr.Textbox(label="Prompt", value="Tell me about your neighbor.", scale=3,
                                                 max_length=s.max_prompt_chars, elem_id="steer-prompt")
                        self.strength = gr.Slider(-1.0, 1.0, value=DEFAULT_STRENGTH, step=0.05, label="Strength",
                                                  scale=2, elem_id="steer-strength",
                                                  info="0 = the plain reply; the sweep adds ±s and ±2s")
                        self.layers = gr.Textbox(label="Layers A-B", value="", scale=1, elem_id="steer-layers",
                                                 info="empty: the suggested range")
                    with gr.Row(equal_height=False):
                        self.seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="steer-seed", scale=1)
                        self.temperature = gr.Slider(0.0, 1.5, value=0.7, step=0.05, label="Temperature", scale=2,
                                                     elem_id="steer-temperature")
                        self.max_tokens = gr.Slider(8, min(256, s.max_new_tokens), value=SWEEP_NEW_TOKENS, step=8,
                                                    label="Max new tokens", scale=2, elem_id="steer-max-tokens")
                        self.reply_button = gr.Button("Reply", scale=1, elem_id="steer-reply")
                        self.sweep_button = gr.Button("Sweep", variant="primary", scale=1, elem_id="steer-sweep-run")
                        self.lens_button = gr.Button("Lens", scale=1, elem_id="steer-lens-run")
                    self.answer_message = gr.Markdown(elem_id="steer-answer-message")
                    self.answers = gr.HTML(elem_id="steer-answers")
                    with gr.Accordion("Lens of the steered prompt", open=True, elem_id="steer-lens"):
                        self.lens_note_md = gr.Markdown("Press **Lens**: the prompt traced with the vector added, "
                                                        "to see at which layer the concept takes over.",
                                                        elem_id="steer-lens-note")
                        self.lens_plot = gr.Plot(show_label=False, elem_id="steer-lens-heatmap")
                    self.reading = gr.Plot(show_label=False, elem_id="steer-reading")
                    gr.Markdown(steer_plots.READING_NOTE)
                    self.profile = gr.Plot(show_label=False, elem_id="steer-profile")
                    gr.Markdown(steer_plots.PROFILE_NOTE)
                self.api_sweep = gr.Button("steer_sweep", visible=False)
                self.api_reply = gr.Button("steer_reply", visible=False)
                self.api_lens = gr.Button("steer_lens", visible=False)
        self.built = gr.State(None)

    def connect(self, page: Page) -> None:
        heavy = page.heavy
        shown = [self.built, self.reading, self.profile, self.summary, self.download, self.layers]
        steps_out = shown + [self.results, self.answers, self.answer_message, self.message]
        build_in = [self.positive, self.negative, self.method, page.model, self.backend, self.layers, page.ignore_memory]
        ui = dict(api_visibility="private", show_progress_on=[self.message], **heavy)
        self.build_button.click(self.build_steps, build_in, steps_out, **ui)
        self.api_build.click(self.build_vector, build_in, shown, api_name="steer_build", **heavy)
        load_in = [self.upload, page.model, self.backend, self.layers, page.ignore_memory]
        self.upload.upload(self.load_steps, load_in, steps_out, **ui)
        self.api_load.click(self.load, load_in, shown, api_name="steer_load", **heavy)
        self.stop_button.click(self.stop, None, None, api_name="steer_stop", queue=False)

        answer_in = [self.built, self.prompt, self.strength, self.layers, self.seed, self.temperature, self.max_tokens,
                     page.model, page.ignore_memory]
        answer_ui = dict(api_visibility="private", show_progress_on=[self.answers], **heavy)
        answer_out = [self.answers, self.profile, self.answer_message]
        self.sweep_button.click(self._sweep_steps, answer_in, answer_out, **answer_ui)
        self.reply_button.click(self._reply_steps, answer_in, answer_out, **answer_ui)
        self.prompt.submit(self._reply_steps, answer_in, answer_out, **answer_ui)
        self.api_sweep.click(self.steer_sweep, answer_in, [self.answers, self.profile], api_name="steer_sweep", **heavy)
        self.api_reply.click(self.steer_reply, answer_in, [self.answers, self.profile], api_name="steer_reply", **heavy)
        lens_in = [self.built, self.prompt, self.strength, self.layers, page.model, page.ignore_memory]
        self.lens_button.click(self.lens_steps, lens_in, [self.lens_plot, self.lens_note_md, self.answer_message],
                               api_visibility="private", show_progress_on=[self.lens_plot], **heavy)
        self.api_lens.click(self.steer_lens, lens_in, [self.lens_plot, self.lens_note_md], api_name="steer_lens",
                            **heavy)
        page.model.change(self.model_changed, [page.model, self.backend], [self.backend], api_visibility="private",
                          concurrency_limit=None)

    def _sweep_steps(self, built, prompt, strength, layers, seed, temperature, max_tokens, model, ignore_memory=False,
                     request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        yield from self.answer_steps("sweep", built, prompt, strength, layers, seed, temperature, max_tokens, model,
                                     ignore_memory, request, progress)

    def _reply_steps(self, built, prompt, strength, layers, seed, temperature, max_tokens, model, ignore_memory=False,
                     request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        yield from self.answer_steps("reply", built, prompt, strength, layers, seed, temperature, max_tokens, model,
                                     ignore_memory, request, progress)


__all__ = ["SteerView", "replies_html", "sweep_strengths", "suggested_layers", "example_sets", "HELP"]
