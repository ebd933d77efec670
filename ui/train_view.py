"""The Lens tab's "Train a learned lens" panel: a tuned or Jacobian lens fitted for the picked model
from the page (`tracing.fit_lens.fit`, what `python -m tracing fit-lens` runs), with a progress bar
and Stop, then the held-out KL to the model's output per layer before (the logit lens) and after.

The lens is saved where the backends look for it, so the backend switch (and the lens read on the
GGUF) offers it as soon as the fit ends. Not on a public link: a fit ties up the server for minutes.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import plotly.graph_objects as go

from tracing.errors import FitStopped, LensbenchError

from .choices import LENS_KINDS, TRAIN_PANEL, backend_label
from .core import Core, Page, message_of, problem_markdown

KINDS = {"tuned": "tuned lens", "jacobian": "Jacobian lens"}
WHERE = {"hooks": "PyTorch", "llama-cpp": "from the GGUF alone (llama.cpp)"}
TEXTS = {"sampled": "Text sampled from the model itself", "pasted": "Pasted text", "file": "A .txt file"}
MAX_TEXT_BYTES = 8_000_000  # a training text (a book is ~1 MB); the upload limit is the app's 16 MB
# The backend that reads each kind in PyTorch, for the message when a fit ends.
READ_BY = {"tuned": "tuned-lens-tuned", "jacobian": "jacobian-lens"}

HELP = """A **learned lens** reads the middle layers better than the logit lens: the **tuned lens** learns
a small translator per layer; the **Jacobian lens** maps each layer by its average effect on the
output. Training needs text: by default the model writes its own (sampled through llama.cpp from
the GGUF, offline; what the tuned-lens authors recommend when a model's training data is unknown).
It takes minutes (a tuned lens for the bundled 135M model with the default settings: about 17 on a
busy 2-core machine, less with more cores or a GPU); the bar shows the time left, and traces wait until
it ends. The lens is saved for this model and offered in the
backend switch (and as the **Lens** on llama.cpp) right away."""


READY = "Press **Train**: its progress shows here; when it ends, the held-out KL per layer, before and after."
TRAINING = ("⏳ Training: first the logit lens is measured on held-out text, then each step's progress and the "
            "time left show here. **Stop** ends it within a few seconds (a Jacobian lens: after its current "
            "chunk) and saves nothing.")
STOPPING = "⏳ Stopping… nothing will be saved."


class TimeLeft:
    """ " · about N min left" for a phase of a fit (sampling text, training steps), from the pace of its
    steps so far; a new phase (another message word, or a count that goes back) starts its own clock."""

    def __init__(self):
        self.phase: tuple | None = None
        self.start = 0.0

    def left(self, done: int, total: int, message: str) -> str:
        import time

        phase = (total, message.split(" ")[0])
        now = time.monotonic()
        if phase != self.phase or done == 0:
            self.phase, self.start, self.first = phase, now, done
            return ""
        if done >= total or done <= self.first:
            return ""
        seconds = (now - self.start) / (done - self.first) * (total - done)
        return f" · about {max(1, round(seconds / 60))} min left" if seconds >= 60 else f" · about {seconds:.0f} s left"


class TrainPanel:
    """Train, Stop, and the before/after KL; `train` is what the button runs (callable in-process)."""

    def __init__(self, core: Core, lens):
        self.core = core
        self.lens = lens  # the Lens tab, whose backend switch and lens choice the panel refreshes
        # Extra options for `fit` per kind (tests make a fit small; the page uses fit-lens's defaults).
        self.fit_options: dict[str, dict] = {"tuned": {}, "jacobian": {}}

    # ---------------------------------------------------------------- what a click runs

    def where_problem(self, model, kind: str, where: str) -> str | None:
        """Why a `kind` lens cannot be trained for `model` on `where`, or None when it can."""
        try:
            entry = self.core.catalog.pick(model)
        except LensbenchError as exc:
            return str(exc)
        if where == "llama-cpp":
            if kind != "tuned":
                return ("a Jacobian lens needs gradients through the model, so it is fitted in PyTorch (it then "
                        "reads the GGUF too, as the Lens on llama.cpp).")
            return None if entry.kind == "gguf" else "this model is a PyTorch folder, not a GGUF file."
        if where != "hooks":
            return f"'{where}' is not a place to train; choose PyTorch or the GGUF."
        return self.core.catalog.backend_problem(entry.name, "hooks")

    def where_choices(self, model, kind, where=None):
        """The "Train on" choices for `model` and `kind`, unavailable ones marked; the pick kept if usable."""
        choices, usable, reasons = [], [], []
        for value, label in WHERE.items():
            problem = self.where_problem(model, kind, value)
            if problem:
                reasons.append(f"{label}: unavailable, {problem}")
                label += " — unavailable"
            else:
                usable.append(value)
            choices.append((label, value))
        value = where if where in usable else (usable[0] if usable else "hooks")
        return gr.update(choices=choices, value=value, info="  ".join(reasons) or None)

    @staticmethod
    def texts_shown(source):
        """The paste box or the file picker, whichever the text's source needs."""
        return gr.update(visible=source == "pasted"), gr.update(visible=source == "file")

    def _text(self, source, pasted, upload, entry) -> str | None:
        """The training text (None: sampled from the model by `fit`), checked."""
        if source == "pasted":
            if not (pasted or "").strip():
                raise LensbenchError("The pasted text is empty: paste a few pages of text, or train on text "
                                     "sampled from the model itself.")
            return pasted
        if source == "file":
            return read_text_file(upload)
        if source != "sampled":
            raise LensbenchError(f"'{source}' is not a source of text; choose one of: {', '.join(TEXTS)}.")
        if entry.kind != "gguf":
            raise LensbenchError(f"Text sampled from the model needs the model as a GGUF (llama.cpp samples it); "
                                 f"'{entry.name}' is a PyTorch folder: paste some text or pick a .txt file.")
        return None

    def train(self, kind, where, source, pasted, upload, model, ignore_memory=False, request: gr.Request = None,
              progress=gr.Progress()):
        """Train a `kind` lens ("tuned", "jacobian") for `model` on `where` ("hooks": PyTorch;
        "llama-cpp": a tuned lens from the GGUF alone) on text from `source` ("sampled", "pasted":
        `pasted`, "file": the .txt `upload`). Returns tracing's `FitReport`; a LensbenchError says
        what went wrong (FitStopped after Stop: nothing saved)."""
        from tracing.fit_lens import fit

        if self.core.settings.public:
            raise LensbenchError("Training is not offered on a public link (it ties up the server for minutes).")
        if kind not in KINDS:
            raise LensbenchError(f"'{kind}' is not a learned lens; choose tuned or jacobian.")
        entry = self.core.catalog.pick(model)
        problem = self.where_problem(entry.name, kind, where)
        if problem:
            raise LensbenchError(f"A {KINDS[kind]} cannot be trained {WHERE.get(where, where)} for "
                                 f"'{entry.name}': {problem}")
        text = self._text(source, pasted, upload, entry)
        cancel = self.core.cancel_event(request, "train:")
        clock = TimeLeft()

        def on_step(done, total, message):
            progress(done / max(total, 1), desc=message + clock.left(done, total, message))

        progress(0, desc="starting")
        try:
            with self.core.loading(ignore_memory):
                return fit(kind, entry.name, text, backend=where, on_step=on_step, cancel=cancel,
                           **self.fit_options.get(kind, {}))
        except MemoryError:
            raise LensbenchError(out_of_memory(entry.name, kind)) from None
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if "out of memory" in str(exc).lower():
                raise LensbenchError(out_of_memory(entry.name, kind)) from None
            raise

    def train_steps(self, kind, where, source, pasted, upload, model, backend, lens_kind, ignore_memory=False,
                    request: gr.Request = None, progress=gr.Progress()):
        """What Train runs (`self.outputs`): the result and the refreshed backend switch and lens choice,
        or the reason it did not train, beside the button (the inputs stay as they were). The last
        run's message, summary and chart go as soon as this one starts."""
        yield (TRAINING, "", None) + (gr.update(),) * 4
        try:
            report = self.train(kind, where, source, pasted, upload, model, ignore_memory, request, progress)
        except Exception as exc:
            title = "Stopped." if isinstance(exc, FitStopped) else "Not trained."
            yield (problem_markdown(message_of(exc, "train"), title), "", None) + self._refreshed(model, backend,
                                                                                                 lens_kind)
            return
        yield (self._done(report, kind), report.summary(), kl_figure(report)) + self._refreshed(model, backend,
                                                                                                lens_kind)

    def stop(self, request: gr.Request = None) -> str:
        """Stop this visitor's training (within the current layer's step, or between a Jacobian lens's
        chunks; nothing is saved). Returns the message saying so at once (the run's end replaces it)."""
        self.core.cancel(request, "train:")
        return STOPPING

    def _refreshed(self, model, backend, lens_kind) -> tuple:
        """The Lens tab's backend switch and lens choice, read again (a new lens is usable at once)."""
        return self.lens.model_changed(model, backend) + self.lens.lens_kinds(model, lens_kind)

    @staticmethod
    def _done(report, kind: str) -> str:
        return (f"✅ Saved the {KINDS[kind]} for **{report.model}** in `{report.out}`. Pick "
                f"**{backend_label(READ_BY[kind])}** in the backend switch, or **Lens: {LENS_KINDS[kind]}** with "
                f"llama.cpp, and Trace.")

    # ---------------------------------------------------------------- layout and wiring

    def build(self, page: Page) -> None:
        """The accordion (inside the Lens tab's input column); hidden on a public link."""
        model = self.core.catalog.default_name()
        with gr.Accordion(TRAIN_PANEL, open=False, visible=not page.settings.public,
                          elem_id="train-panel") as self.panel:
            gr.Markdown(HELP, elem_id="train-help")
            with gr.Row():
                self.kind = gr.Radio([(label, value) for value, label in KINDS.items()], value="tuned",
                                     label="Kind", elem_id="train-kind")
                self.where = gr.Radio(label="Train on", elem_id="train-where",
                                      **{k: v for k, v in self.where_choices(model, "tuned").items()
                                         if k in ("choices", "value", "info")})
            self.source = gr.Radio([(label, value) for value, label in TEXTS.items()], value="sampled",
                                   label="Training text", elem_id="train-source")
            self.pasted = gr.Textbox(label="Text to train on", lines=5, max_lines=10, visible=False,
                                     placeholder="A few pages of text like the prompts you will trace.",
                                     elem_id="train-text")
            self.upload = gr.File(label="A plain-text file (.txt)", file_types=[".txt"], type="filepath",
                                  visible=False, elem_id="train-upload")
            with gr.Row():
                self.train_button = gr.Button("Train", elem_id="train-run")
                self.stop_button = gr.Button("Stop", elem_id="train-stop")
            self.message = gr.Markdown(READY, elem_id="train-message")
            self.summary = gr.Markdown(elem_id="train-summary")
            self.chart = gr.Plot(show_label=False, elem_id="train-chart")

    def connect(self, page: Page) -> None:
        lens = self.lens
        inputs = [self.kind, self.where, self.source, self.pasted, self.upload, page.model, lens.backend,
                  lens.lens_kind, page.ignore_memory]
        self.outputs = [self.message, self.summary, self.chart, lens.backend, lens.backend_note, lens.lens_kind,
                        lens.lens_kind_note]
        self.train_button.click(self.train_steps, inputs, self.outputs, api_visibility="private",
                                show_progress_on=[self.message], **page.heavy)
        self.stop_button.click(self.stop, None, self.message, api_name="train_stop", api_visibility="private",
                               queue=False, show_progress="hidden")
        instant = dict(api_visibility="private", queue=False, show_progress="hidden")
        self.source.change(self.texts_shown, self.source, [self.pasted, self.upload], **instant)
        for trigger in (self.kind.change, page.model.change):
            trigger(self.where_choices, [page.model, self.kind, self.where], self.where, **instant)


def read_text_file(upload) -> str:
    """An uploaded training text: plain UTF-8 text, not empty, not too big; else a sentence why."""
    if not upload:
        raise LensbenchError("Pick a .txt file to train on (or paste text, or train on text sampled from the model).")
    path = Path(upload if isinstance(upload, str) else getattr(upload, "name", upload))
    if path.suffix.lower() not in (".txt", ".text", ".md"):
        raise LensbenchError(f"'{path.name}' is not a .txt file: train on plain text.")
    try:
        size = path.stat().st_size
        if size > MAX_TEXT_BYTES:
            raise LensbenchError(f"'{path.name}' is {size / 1e6:.0f} MB; a training text here is at most "
                                 f"{MAX_TEXT_BYTES / 1e6:.0f} MB.")
        data = path.read_bytes()
    except OSError as exc:
        raise LensbenchError(f"Could not read '{path.name}': {exc.strerror or exc}.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise LensbenchError(f"'{path.name}' is not plain text (UTF-8): save it as a .txt file and try again.")
    if not text.strip():
        raise LensbenchError(f"'{path.name}' is empty: it needs a few pages of text.")
    return text


def out_of_memory(model: str, kind: str) -> str:
    hint = (" Train it from the GGUF alone (llama.cpp), which needs much less memory." if kind == "tuned"
            else " Try a smaller model.")
    return f"Training the {KINDS[kind]} for '{model}' ran out of memory.{hint}"


def kl_figure(report) -> go.Figure:
    """The held-out KL to the model's output per layer (nats): the logit lens and the trained lens."""
    rows = ["embeddings"] + [f"layer {i}" for i in range(1, len(report.kl_before))]
    fig = go.Figure()
    fig.add_scatter(x=rows, y=report.kl_before, mode="lines+markers", name="logit lens")
    fig.add_scatter(x=rows, y=report.kl_after, mode="lines+markers", name=KINDS[report.kind])
    fig.update_layout(
        height=280, margin=dict(l=50, r=10, t=40, b=40), legend=dict(orientation="h", y=1.12),
        title=dict(text="Held-out KL to the model's output (nats; lower reads better)", font=dict(size=13)),
        yaxis=dict(title="KL (nats)", rangemode="tozero"), xaxis=dict(title=None),
    )
    return fig


__all__ = ["TrainPanel", "kl_figure", "read_text_file", "KINDS", "WHERE", "TEXTS"]
