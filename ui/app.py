"""The Gradio app: Lens, Chat, Compare and Patch tabs, wired to `tracing` and `chat`.

`LensApp` holds the tab functions (plain methods, callable in-process and by the tests);
`build_app` lays out the components and connects them. Every error a visitor can cause
becomes a `gr.Error` message; the app stays up.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
from dataclasses import dataclass, field, replace

import gradio as gr

import tracing
from tracing.errors import LensbenchError, UnsupportedModel
from tracing.lens import LensResult
from tracing.models import ignoring_memory_check, memory_notices

from . import plots, tables
from .choices import Catalog, backend_label, reasons_markdown
from .tokens import TokenLabels, byte_lookup

log = logging.getLogger("lensbench.ui")

LENS_EXAMPLES = [
    ["The capital of Germany is", " Berlin"],
    ["Berlin is the capital of", " Germany"],
    ["The Eiffel Tower is in the city of", " Paris"],
    ["The chemical symbol for gold is", " Au"],
    ["The opposite of hot is", " cold"],
    ["One, two, three, four,", " five"],
]

# Clean prompt, corrupted prompt, target (the clean answer), contrast (the corrupted answer). The
# prompts of a pair must be as many tokens: "Berlin is the capital of" is 'Ber' 'lin' ... but
# "Paris is ..." starts with one token, so the reverse direction names the city mid-sentence.
PATCH_EXAMPLES = [
    ["The capital of Germany is", "The capital of France is", " Berlin", " Paris"],
    ["The city of Berlin is the capital of", "The city of Paris is the capital of", " Germany", " France"],
    ["The Eiffel Tower is in the city of", "The Brandenburg Gate is in the city of", " Paris", " Berlin"],
]

PUBLIC_PATCH_TOKENS = 32

# A backend the selected model cannot use stays in the switch, greyed out and not clickable; the
# reason is written under it (and the server refuses it too).
CSS = """
label[data-testid$="unavailable-radio-label"] { opacity: 0.45; pointer-events: none; }
#lens-heatmap, #lens-chart { min-height: 0; }
"""


@dataclass(frozen=True)
class Settings:
    """What the host decides. `public` (a share link, a non-local host, a Space) tightens the bounds."""

    public: bool = False
    allow_custom_models: bool = False  # typed paths / hub ids in the model pickers (local use only)
    default_model: str | None = None
    max_prompt_chars: int = 8000
    max_prompt_tokens: int = 1024
    max_top_k: int = 20
    max_new_tokens: int = 2048
    concurrency: int = 1  # requests per event group that run at once (models are shared and locked)

    @classmethod
    def for_launch(cls, public: bool, **overrides) -> "Settings":
        base = cls(public=True, max_prompt_chars=2000, max_prompt_tokens=256, max_new_tokens=512) if public else cls()
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class Traced:
    """What the Lens tab keeps per visitor: the result and its readable token labels (no model)."""

    result: LensResult
    labels: TokenLabels = field(default_factory=TokenLabels)


def user_errors(fn):
    """Turn a LensbenchError (something the visitor can fix) into a gr.Error message, and anything
    else into a short gr.Error too (logged with its traceback): never a traceback in the page."""

    def convert(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, LensbenchError):
            return gr.Error(str(exc), print_exception=False)
        log.exception("unexpected error in %s", fn.__name__)
        return gr.Error(f"Something went wrong ({type(exc).__name__}: {exc}). The app is still running.",
                        print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise convert(exc) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise convert(exc) from None
    return wrapper


def _text(content) -> str:
    """A chat message's text, whether Gradio gives a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return ""


def plain_messages(history) -> list[dict]:
    """Gradio chat history -> [{"role", "content": str}] for `chat.engine`."""
    return [{"role": m["role"], "content": _text(m.get("content"))} for m in history or []
            if m.get("role") in ("user", "assistant")]


class LensApp:
    """The tab functions. Each takes what the components hold and returns what they show."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.catalog = Catalog(allow_custom=self.settings.allow_custom_models, default=self.settings.default_model)
        self._cancels: dict[str, threading.Event] = {}
        self._cancels_lock = threading.Lock()

    # ---------------------------------------------------------------- shared checks

    def _check_prompt(self, prompt: str | None) -> str:
        if prompt is None or not prompt.strip():
            raise LensbenchError("The prompt is empty: type some text to trace.")
        if len(prompt) > self.settings.max_prompt_chars:
            raise LensbenchError(
                f"The prompt is {len(prompt):,} characters; this app takes at most "
                f"{self.settings.max_prompt_chars:,}. Shorten it."
            )
        return prompt

    def _check_top_k(self, top_k) -> int:
        k = int(top_k or 0)
        if not 1 <= k <= self.settings.max_top_k:
            raise LensbenchError(f"top-k must be between 1 and {self.settings.max_top_k} (got {top_k}).")
        return k

    def _memory_check_off(self, ignore_memory) -> bool:
        """Whether the visitor's "Skip the memory check" box counts: never on a public link."""
        return bool(ignore_memory) and not self.settings.public

    @contextlib.contextmanager
    def _loading(self, ignore_memory):
        """Around anything that may load a model: the visitor's memory-check choice applies, and a
        memory warning from the load is shown to them (not only written to the server's log).
        Must not span a `yield` (Gradio runs each step of a generator in a fresh context)."""
        with ignoring_memory_check(self._memory_check_off(ignore_memory)), memory_notices() as notes:
            yield
        for verdict in notes:
            gr.Warning(verdict.message)

    def _open(self, model: str | None, backend: str, progress, ignore_memory=False) -> object:
        """The tracer for (model, backend): loaded once, then reused from tracing's model cache."""
        entry = self.catalog.pick(model)
        problem = self.catalog.backend_problem(entry.name, backend)
        if problem:
            raise LensbenchError(f"{backend_label(backend)} cannot trace '{entry.name}': {problem}")
        progress(0.05, desc=f"Loading {entry.name} for {backend_label(backend)} (the first time takes a while)…")
        try:
            with self._loading(ignore_memory):
                return tracing.open_tracer(entry.name, backend)
        except UnsupportedModel as exc:
            self.catalog.record_failure(entry.name, backend, str(exc))
            raise

    def _trace(self, model, backend, prompt, target, top_k, temperature, progress, ignore_memory=False) -> Traced:
        prompt = self._check_prompt(prompt)
        top_k = self._check_top_k(top_k)
        tracer = self._open(model, backend, progress, ignore_memory)
        ids = tracer.encode(prompt)
        if len(ids) > self.settings.max_prompt_tokens:
            raise LensbenchError(
                f"The prompt is {len(ids)} tokens; this app traces at most {self.settings.max_prompt_tokens}. Shorten it."
            )
        progress(0.5, desc=f"Tracing {len(ids)} tokens…")
        result = tracing.trace_with(
            tracer, prompt, ids=ids, top_k=top_k, temperature=1.0 if temperature is None else float(temperature),
            target=(target or None),
        )
        return Traced(result, TokenLabels(byte_lookup(tracer)))

    # ---------------------------------------------------------------- Lens tab

    def _lens_outputs(self, traced: Traced, metric: str, column: int = -1):
        """The Lens tab's outputs in two steps: the heatmap and summary first (what people wait for),
        then the chart, the position picker, the table and the downloads."""
        result, labels = traced.result, traced.labels
        col = column % len(result.positions)
        heatmap = plots.heatmap(result, metric, labels)
        summary = tables.summary(result, col, labels)
        frozen = Traced(result, labels.frozen())  # the visitor's state keeps labels, not the model
        later = gr.update()
        yield (frozen, heatmap, later, later, later, summary, later, later)
        chart = plots.target_chart([(result.backend, result)], col)
        choices = tables.position_choices(result, labels)
        table = tables.topk_table(result, col, labels)
        json_path, csv_path = tables.write_downloads(result)
        yield (frozen, later, chart, gr.update(choices=choices, value=col), table, later, json_path, csv_path)

    @user_errors
    def lens_steps(self, prompt, model, backend, top_k, temperature, target, metric, ignore_memory=False,
                   progress=gr.Progress()):
        """What the Trace button runs: `lens`, showing the heatmap as soon as it is ready."""
        traced = self._trace(model, backend, prompt, target, top_k, temperature, progress, ignore_memory)
        yield from self._lens_outputs(traced, metric or plots.DEFAULT_METRIC)

    def lens(self, prompt, model, backend, top_k, temperature, target, metric, ignore_memory=False,
             progress=gr.Progress()):
        """Trace `prompt` on `model` with `backend`: state, heatmap, target chart, position picker,
        top-k table, summary, JSON and CSV downloads. `ignore_memory`: load even a model that looks
        too big (the "Skip the memory check" box; ignored on a public link)."""
        return _merged(self.lens_steps(prompt, model, backend, top_k, temperature, target, metric, ignore_memory,
                                       progress))

    @user_errors
    def redraw(self, traced: Traced | None, metric, column):
        """Recolour the heatmap, or move the chart and table to another position, without retracing."""
        if traced is None:
            return gr.update(), gr.update(), gr.update(), gr.update()
        col = int(column) if column is not None else -1
        result, labels = traced.result, traced.labels
        col %= len(result.positions)
        return (
            plots.heatmap(result, metric or plots.DEFAULT_METRIC, labels),
            plots.target_chart([(result.backend, result)], col),
            tables.topk_table(result, col, labels),
            tables.summary(result, col, labels),
        )

    def model_changed(self, model, backend):
        """New model: its facts, and the backend switch with what it cannot use marked and explained."""
        choices, reasons = self.catalog.backend_choices(model)
        usable = [b for _, b in choices if b not in reasons]
        if backend not in usable:
            backend = usable[0] if usable else backend
        return gr.update(choices=choices, value=backend), self.catalog.facts(model), reasons_markdown(reasons)

    def backend_changed(self, model, backend):
        """Refuse an unavailable backend with its reason and go back to one that works."""
        problem = self.catalog.backend_problem(model, backend)
        if not problem:
            return gr.update()
        gr.Warning(f"{backend_label(backend)}: {problem}")
        choices, reasons = self.catalog.backend_choices(model)
        usable = [b for _, b in choices if b not in reasons]
        return gr.update(value=usable[0] if usable else None)

    def refresh_models(self, lens_model, chat_model, model_a, model_b, patch_model=None):
        """The model pickers' lists, read again from models/ (selections kept while still listed)."""
        names, gguf = self.catalog.names(), self.catalog.names(gguf_only=True)

        def keep(value, options, gguf_only=False):
            return gr.update(choices=options, value=value if value in options else self.catalog.default_name(gguf_only))

        return (keep(lens_model, names), keep(chat_model, gguf, True), keep(model_a, names), keep(model_b, names),
                keep(patch_model, names))

    # ---------------------------------------------------------------- Compare tab

    @user_errors
    def compare(self, prompt, target, model_a, backend_a, model_b, backend_b, top_k, temperature, metric,
                ignore_memory=False, progress=gr.Progress()):
        """One prompt through two (model, backend) pairs: both heatmaps and both target trajectories."""
        sides = []
        for side, model, backend in (("A", model_a, backend_a), ("B", model_b, backend_b)):
            try:
                traced = self._trace(model, backend, prompt, target, top_k, temperature,
                                     _sub_progress(progress, 0.5 * len(sides), 0.5), ignore_memory)
            except LensbenchError as exc:
                raise LensbenchError(f"Side {side}: {exc}") from None
            sides.append((f"{side}: {traced.result.model} · {traced.result.backend}", traced))
        metric = metric or plots.DEFAULT_METRIC
        chart = plots.target_chart([(name, t.result) for name, t in sides])
        maps = [plots.heatmap(t.result, metric, t.labels, title=name) for name, t in sides]
        text = "\n\n".join(f"**{name}**  \n{tables.summary(t.result, -1, t.labels)}" for name, t in sides)
        return text, chart, maps[0], maps[1]

    # ---------------------------------------------------------------- Patch tab

    def patch_backend_choices(self, model) -> tuple[list, dict]:
        """The backends activation patching runs on, marked as the Lens tab marks them."""
        from tracing.patching import RUNTIMES

        choices, reasons = self.catalog.backend_choices(model)
        return [c for c in choices if c[1] in RUNTIMES], {b: r for b, r in reasons.items() if b in RUNTIMES}

    def patch_model_changed(self, model, backend):
        choices, reasons = self.patch_backend_choices(model)
        usable = [b for _, b in choices if b not in reasons]
        return gr.update(choices=choices, value=backend if backend in usable else (usable[0] if usable else backend))

    @user_errors
    def patch(self, clean, corrupt, target, contrast, model, backend, sublayers=True, ignore_memory=False,
              request: gr.Request = None, progress=gr.Progress()):
        """Activation patching: the corrupted prompt run again with one vector of the clean run
        restored, for every layer and position. Returns the answers and metric (markdown), the
        residual-stream heatmap, and the attention and MLP heatmaps."""
        from tracing.patching import RUNTIMES, patch_with

        clean, corrupt = self._check_prompt(clean), self._check_prompt(corrupt)
        if not (target or "").strip():
            raise LensbenchError("Type the clean answer as the target token, e.g. ' Berlin' (with its leading space).")
        if backend not in RUNTIMES:
            raise LensbenchError(f"Activation patching runs on {' and '.join(map(backend_label, RUNTIMES))}.")
        tracer = self._open(model, backend, progress, ignore_memory)
        n = len(tracer.encode(clean))
        # A grid runs up to (layers + 1) x 3 x tokens forwards: on a public link, short prompts only.
        limit = min(self.settings.max_prompt_tokens, PUBLIC_PATCH_TOKENS) if self.settings.public \
            else self.settings.max_prompt_tokens
        if n > limit:
            raise LensbenchError(f"The prompt is {n} tokens; this app patches at most {limit}. Shorten it.")
        cancel = self._cancel_event(request, "patch:")
        result = patch_with(tracer, clean, corrupt, target, contrast or None, sublayers=bool(sublayers),
                            progress=_sub_progress(progress, 0.1, 0.9), cancel=cancel)
        labels = TokenLabels(byte_lookup(tracer)).frozen()
        return (tables.patch_summary(result, labels), plots.patch_heatmap(result, "resid", labels),
                plots.patch_heatmap(result, "attn", labels), plots.patch_heatmap(result, "mlp", labels))

    def stop_patch(self, request: gr.Request = None) -> None:
        """Stop this visitor's patching grid (after the batch of cells running now)."""
        key = "patch:" + (getattr(request, "session_hash", None) or "local")
        with self._cancels_lock:
            event = self._cancels.get(key)
        if event is not None:
            event.set()

    # ---------------------------------------------------------------- Chat tab

    def _cancel_event(self, request: gr.Request | None, kind: str = "") -> threading.Event:
        key = kind + (getattr(request, "session_hash", None) or "local")
        with self._cancels_lock:
            event = self._cancels[key] = threading.Event()
            return event

    def stop(self, request: gr.Request = None) -> None:
        """Stop this visitor's answer being generated (the model finishes its current token)."""
        key = getattr(request, "session_hash", None) or "local"
        with self._cancels_lock:
            event = self._cancels.get(key)
        if event is not None:
            event.set()

    @user_errors
    def chat(self, message, history, model, system, temperature, top_p, max_tokens, seed, ignore_memory=False,
             request: gr.Request = None):
        """Send `message`; stream the answer into the history (and clear the message box)."""
        from chat.engine import stream_chat

        message = (message or "").strip()
        if not message:
            raise LensbenchError("Type a message first.")
        if len(message) > self.settings.max_prompt_chars:
            raise LensbenchError(f"The message is longer than {self.settings.max_prompt_chars:,} characters.")
        max_tokens = int(max_tokens or 256)
        if not 1 <= max_tokens <= self.settings.max_new_tokens:
            raise LensbenchError(f"Max new tokens must be between 1 and {self.settings.max_new_tokens}.")
        entry = self.catalog.pick(model, gguf_only=True)
        messages = plain_messages(history) + [{"role": "user", "content": message}]
        yield messages + [{"role": "assistant", "content": ""}], ""
        cancel = self._cancel_event(request)
        seed = None if seed is None or int(seed) < 0 else int(seed)
        with self._loading(ignore_memory):  # no yield inside: see `_loading`
            stream = stream_chat(entry.name, messages, system=(system or None), temperature=float(temperature),
                                 top_p=float(top_p), max_tokens=max_tokens, seed=seed, cancel=cancel,
                                 check_memory=not self._memory_check_off(ignore_memory))
        for notice in stream.notices:  # e.g. the oldest turns were dropped to fit the context
            gr.Warning(notice.message)
        try:
            for _delta in stream:
                yield messages + [{"role": "assistant", "content": stream.text}], ""
        finally:
            stream.close()  # a closed stream (visitor left, or Stop) ends generation too

    def chat_model_changed(self, model) -> str:
        try:
            from chat.engine import model_facts

            entry = self.catalog.pick(model, gguf_only=True)
            return _facts_markdown(model_facts(entry.name))
        except ImportError:
            return self.catalog.facts(model)
        except LensbenchError as exc:
            return f"⚠️ {exc}"

    @user_errors
    def trace_reply(self, history, model, system, top_k, temperature, metric, ignore_memory=False,
                    progress=gr.Progress()):
        """Trace the last assistant reply of the chat on the same GGUF through llama.cpp."""
        messages = plain_messages(history)
        if not messages or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise LensbenchError("There is no reply to trace yet: chat first.")
        entry = self.catalog.pick(model, gguf_only=True)
        problem = self.catalog.backend_problem(entry.name, "llama-cpp")
        if problem:
            raise LensbenchError(f"Tracing a reply needs the llama.cpp backend: {problem}")
        from tracing.llama_cpp_backend import trace_reply

        progress(0.1, desc="Tracing the reply through llama.cpp…")
        context = ([{"role": "system", "content": system}] if system else []) + messages[:-1]
        with self._loading(ignore_memory):
            result = trace_reply(entry.name, context, messages[-1]["content"], top_k=self._check_top_k(top_k),
                                 temperature=1.0 if temperature is None else float(temperature))
        lookup = byte_lookup(tracing.open_tracer(entry.name, "llama-cpp"))
        outputs = _merged(self._lens_outputs(Traced(result, TokenLabels(lookup)), metric or plots.DEFAULT_METRIC))
        return (gr.update(selected="lens"), gr.update(value=entry.name), gr.update(value="llama-cpp"), *outputs)


def _merged(steps) -> tuple:
    """The outputs of a function that yields in steps, as one tuple: each output's last value
    (a step leaves an output alone with a bare `gr.update()`)."""
    merged: list = []
    for step in steps:
        merged = list(step) if not merged else [old if _unchanged(new) else new for old, new in zip(merged, step)]
    return tuple(merged)


def _unchanged(value) -> bool:
    return type(value) is dict and value == {"__type__": "update"}


def _facts_markdown(facts) -> str:
    """`chat.engine.ModelFacts` as markdown: its summary (ending with the memory verdict), and the
    verdict's whole message when it warns or refuses."""
    text = getattr(facts, "summary", None)
    text = text() if callable(text) else text
    verdict = getattr(facts, "memory", None)
    if verdict is not None and not verdict.fits:
        return f"⚠️ {text}  \n{verdict.message}"
    if getattr(facts, "fits", True) is False:
        return f"⚠️ {text}"
    return text or str(facts)


def _sub_progress(progress, start: float, span: float):
    def update(fraction, desc=None):
        progress(start + span * fraction, desc=desc)
    return update


# ==================================================================== layout and wiring


def build_app(settings: Settings | None = None) -> tuple[gr.Blocks, LensApp]:
    """Lay out the tabs and connect every control to a `LensApp` method."""
    app = LensApp(settings)
    s = app.settings
    catalog = app.catalog
    model_names = catalog.names()
    default_model = catalog.default_name()
    gguf_names = catalog.names(gguf_only=True)
    choices, reasons = catalog.backend_choices(default_model)
    backend_default = next((b for _, b in choices if b not in reasons), "hooks")
    metrics = list(plots.METRICS)
    heavy = dict(concurrency_id="models", concurrency_limit=s.concurrency)

    with gr.Blocks(title="lensbench", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(
            "# lensbench\nLook inside an open-weights LLM: what each layer would predict as the next token "
            "(logit lens, tuned lens), on PyTorch or on the GGUF itself, next to a chat with the model."
            + (" *Public link: models are the listed ones; prompts and top-k are bounded.*" if s.public else "")
        )
        # Only a model bigger than this machine's memory is refused; this box loads it anyway. Its value
        # reaches the handlers through a State, which stays out of the API: only a person at the page
        # can skip the check (and never on a public link).
        memory_box = gr.Checkbox(False, label="Skip the memory check", visible=not s.public,
                                 info="Load a model even if it looks bigger than this machine's memory "
                                      "(it may be very slow, or fail).", elem_id="ignore-memory")
        ignore_memory = gr.State(False)
        with gr.Tabs(selected="lens") as tabs:
            # ------------------------------------------------------------ Lens
            with gr.Tab("Lens", id="lens", elem_id="tab-lens"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        prompt = gr.Textbox(label="Prompt", lines=3, max_length=s.max_prompt_chars,
                                            value=LENS_EXAMPLES[0][0], elem_id="lens-prompt")
                        target = gr.Textbox(label="Target token (optional)", value=LENS_EXAMPLES[0][1],
                                            info="One token, followed through the layers. A leading space matters.",
                                            elem_id="lens-target")
                        model = gr.Dropdown(model_names, value=default_model, label="Model",
                                            allow_custom_value=s.allow_custom_models, elem_id="lens-model")
                        facts = gr.Markdown(catalog.facts(default_model))
                        backend = gr.Radio(choices, value=backend_default, label="Backend", elem_id="lens-backend")
                        backend_note = gr.Markdown(reasons_markdown(reasons))
                        with gr.Row():
                            top_k = gr.Slider(1, s.max_top_k, value=5, step=1, label="Top-k")
                            temperature = gr.Slider(0.1, 3.0, value=1.0, step=0.1, label="Temperature",
                                                    elem_id="lens-temperature")
                        metric = gr.Radio(metrics, value=plots.DEFAULT_METRIC, label="Colour by")
                        trace_button = gr.Button("Trace", variant="primary", elem_id="lens-trace")
                        api_only = gr.Button("lens", visible=False)
                        examples = gr.Examples(LENS_EXAMPLES, [prompt, target], label="Examples (click to run)")
                    with gr.Column(scale=3):
                        summary = gr.Markdown(label="Summary", elem_id="lens-summary")
                        heatmap = gr.Plot(label="Layers × positions", elem_id="lens-heatmap")
                        with gr.Row():
                            chart = gr.Plot(label="Target across layers", elem_id="lens-chart")
                        position = gr.Dropdown(label="Position for the chart and the table", choices=[],
                                               type="value", elem_id="lens-position")
                        table = gr.Dataframe(label="Top-k per layer at that position", wrap=True,
                                             elem_id="lens-table", interactive=False)
                        with gr.Row():
                            json_file = gr.File(label="JSON", interactive=False)
                            csv_file = gr.File(label="CSV", interactive=False)
                traced = gr.State(None)

            # ------------------------------------------------------------ Chat
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                with gr.Row():
                    with gr.Column(scale=3):
                        chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chat-history")
                        with gr.Row():
                            message = gr.Textbox(placeholder="Message", label="Message", show_label=False, scale=5,
                                                 max_length=s.max_prompt_chars, elem_id="chat-message")
                            send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                            stop = gr.Button("Stop", scale=1, elem_id="chat-stop")
                        with gr.Row():
                            trace_reply = gr.Button("Trace this reply", elem_id="chat-trace")
                            clear = gr.Button("Clear")
                    with gr.Column(scale=1, min_width=280):
                        chat_model = gr.Dropdown(gguf_names, value=catalog.default_name(gguf_only=True),
                                                 label="Model (GGUF)", allow_custom_value=s.allow_custom_models)
                        chat_facts = gr.Markdown()
                        system = gr.Textbox(label="System prompt", lines=2)
                        chat_temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature")
                        top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
                        max_tokens = gr.Slider(1, s.max_new_tokens, value=min(256, s.max_new_tokens), step=1,
                                               label="Max new tokens")
                        seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)")

            # ------------------------------------------------------------ Compare
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                with gr.Row():
                    c_prompt = gr.Textbox(label="Prompt", value=LENS_EXAMPLES[0][0], scale=3,
                                          max_length=s.max_prompt_chars)
                    c_target = gr.Textbox(label="Target token", value=LENS_EXAMPLES[0][1], scale=1)
                with gr.Row():
                    with gr.Column():
                        model_a = gr.Dropdown(model_names, value=default_model, label="Model A",
                                              allow_custom_value=s.allow_custom_models)
                        backend_a = gr.Radio(choices, value=backend_default, label="Backend A")
                    with gr.Column():
                        second = _second_choice(catalog, model_names, default_model, backend_default, reasons)
                        model_b = gr.Dropdown(model_names, value=second[0], label="Model B",
                                              allow_custom_value=s.allow_custom_models)
                        backend_b = gr.Radio(catalog.backend_choices(second[0])[0], value=second[1], label="Backend B")
                with gr.Row():
                    c_top_k = gr.Slider(1, s.max_top_k, value=5, step=1, label="Top-k")
                    c_temperature = gr.Slider(0.1, 3.0, value=1.0, step=0.1, label="Temperature",
                                                    elem_id="compare-temperature")
                    c_metric = gr.Radio(metrics, value=plots.DEFAULT_METRIC, label="Colour by")
                compare_button = gr.Button("Compare", variant="primary", elem_id="compare-run")
                comparisons = compare_examples_for(catalog, default_model)
                compare_examples = gr.Examples(
                    comparisons, [c_prompt, c_target, model_a, backend_a, model_b, backend_b],
                    label="Comparisons (click to run)",
                ) if comparisons else None
                c_summary = gr.Markdown(label="Summary", elem_id="compare-summary")
                c_chart = gr.Plot(label="Target across depth, both sides")
                with gr.Row():
                    c_map_a = gr.Plot(label="A")
                    c_map_b = gr.Plot(label="B")

            # ------------------------------------------------------------ Patch
            with gr.Tab("Patch", id="patch", elem_id="tab-patch"):
                gr.Markdown(
                    "**Activation patching** (causal tracing): where in the model is the answer decided? The "
                    "corrupted prompt is run again with one vector from the clean run put back, for every layer "
                    "and position; a cell shows how much of the clean answer that restores (100% = all of it)."
                )
                patch_choices, patch_reasons = app.patch_backend_choices(default_model)
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        p_clean = gr.Textbox(label="Clean prompt", value=PATCH_EXAMPLES[0][0],
                                             max_length=s.max_prompt_chars, elem_id="patch-clean")
                        p_corrupt = gr.Textbox(label="Corrupted prompt (as many tokens)", value=PATCH_EXAMPLES[0][1],
                                               max_length=s.max_prompt_chars, elem_id="patch-corrupt")
                        with gr.Row():
                            p_target = gr.Textbox(label="Target (clean answer)", value=PATCH_EXAMPLES[0][2],
                                                  elem_id="patch-target")
                            p_contrast = gr.Textbox(label="Contrast (corrupted answer, optional)",
                                                    value=PATCH_EXAMPLES[0][3], elem_id="patch-contrast",
                                                    info="With a contrast: logit difference; without: probability.")
                        p_model = gr.Dropdown(model_names, value=default_model, label="Model",
                                              allow_custom_value=s.allow_custom_models, elem_id="patch-model")
                        p_backend = gr.Radio(patch_choices,
                                             value=next((b for _, b in patch_choices if b not in patch_reasons), "hooks"),
                                             label="Runtime", elem_id="patch-backend")
                        p_sublayers = gr.Checkbox(True, label="Also attention and MLP outputs (3x the cells)")
                        with gr.Row():
                            patch_button = gr.Button("Patch", variant="primary", elem_id="patch-run")
                            patch_stop = gr.Button("Stop", elem_id="patch-stop")
                        patch_examples = gr.Examples(PATCH_EXAMPLES, [p_clean, p_corrupt, p_target, p_contrast],
                                                     label="Examples (click to run)")
                    with gr.Column(scale=3):
                        p_summary = gr.Markdown(elem_id="patch-summary")
                        p_resid = gr.Plot(label="Residual stream: layers × positions", elem_id="patch-heatmap")
                        with gr.Row():
                            p_attn = gr.Plot(label="Attention output", elem_id="patch-attn")
                            p_mlp = gr.Plot(label="MLP output", elem_id="patch-mlp")

        # ---------------------------------------------------------------- wiring
        memory_box.change(lambda on: bool(on), memory_box, ignore_memory, api_visibility="private", queue=False)
        lens_inputs = [prompt, model, backend, top_k, temperature, target, metric, ignore_memory]
        lens_outputs = [traced, heatmap, chart, position, table, summary, json_file, csv_file]
        run_lens = dict(show_progress_on=[heatmap], **heavy)
        trace_button.click(app.lens_steps, lens_inputs, lens_outputs, api_visibility="private", **run_lens)
        # The same as one call with every output in its answer, for gradio_client and "Use via API"
        # (the button streams: heatmap first, the rest just after).
        api_only.click(app.lens, lens_inputs, lens_outputs, api_name="lens", **heavy)
        prompt.submit(app.lens_steps, lens_inputs, lens_outputs, api_visibility="private", **run_lens)
        examples.load_input_event.then(app.lens_steps, lens_inputs, lens_outputs, api_visibility="private",
                                       **run_lens)
        redraw = dict(inputs=[traced, metric, position], outputs=[heatmap, chart, table, summary],
                      api_visibility="private", concurrency_limit=None, show_progress="hidden")
        metric.input(app.redraw, **redraw)
        position.input(app.redraw, **redraw)
        model.change(app.model_changed, [model, backend], [backend, facts, backend_note], api_visibility="private",
                     concurrency_limit=None)
        backend.input(app.backend_changed, [model, backend], [backend], api_visibility="private",
                      concurrency_limit=None)
        for side_model, side_backend in ((model_a, backend_a), (model_b, backend_b)):
            side_model.change(lambda m, b: app.model_changed(m, b)[0], [side_model, side_backend], [side_backend],
                              api_visibility="private", concurrency_limit=None)
            side_backend.input(app.backend_changed, [side_model, side_backend], [side_backend],
                               api_visibility="private", concurrency_limit=None)

        chat_inputs = [message, chatbot, chat_model, system, chat_temperature, top_p, max_tokens, seed, ignore_memory]
        send.click(app.chat, chat_inputs, [chatbot, message], api_name="chat", concurrency_id="chat",
                   concurrency_limit=s.concurrency)
        message.submit(app.chat, chat_inputs, [chatbot, message], api_visibility="private",
                       concurrency_id="chat", concurrency_limit=s.concurrency)
        stop.click(app.stop, None, None, api_name="stop", queue=False)
        clear.click(lambda: [], None, chatbot, api_visibility="private", queue=False)
        chat_model.change(app.chat_model_changed, chat_model, chat_facts, api_visibility="private",
                          concurrency_limit=None)
        trace_reply.click(app.trace_reply, [chatbot, chat_model, system, top_k, temperature, metric, ignore_memory],
                          [tabs, model, backend, *lens_outputs], api_name="trace_reply", **heavy)

        compare_inputs = [c_prompt, c_target, model_a, backend_a, model_b, backend_b, c_top_k, c_temperature, c_metric,
                          ignore_memory]
        compare_outputs = [c_summary, c_chart, c_map_a, c_map_b]
        compare_button.click(app.compare, compare_inputs, compare_outputs, api_name="compare", **heavy)
        if compare_examples is not None:
            compare_examples.load_input_event.then(app.compare, compare_inputs, compare_outputs,
                                                   api_visibility="private", **heavy)
        patch_inputs = [p_clean, p_corrupt, p_target, p_contrast, p_model, p_backend, p_sublayers, ignore_memory]
        patch_outputs = [p_summary, p_resid, p_attn, p_mlp]
        patch_button.click(app.patch, patch_inputs, patch_outputs, api_name="patch",
                           show_progress_on=[p_resid], **heavy)
        patch_examples.load_input_event.then(app.patch, patch_inputs, patch_outputs, api_visibility="private",
                                             show_progress_on=[p_resid], **heavy)
        patch_stop.click(app.stop_patch, None, None, api_name="stop_patch", queue=False)
        p_model.change(app.patch_model_changed, [p_model, p_backend], [p_backend], api_visibility="private",
                       concurrency_limit=None)
        # On each page load: the models in models/ now (a file added after start shows up on reload).
        pickers = [model, chat_model, model_a, model_b, p_model]
        demo.load(app.refresh_models, pickers, pickers,
                  api_visibility="private", concurrency_limit=None)
        demo.load(app.chat_model_changed, chat_model, chat_facts, api_visibility="private", concurrency_limit=None)
    return demo, app


def launch(settings: Settings | None = None, *, block: bool = True, **launch_options) -> tuple[gr.Blocks, LensApp, str]:
    """Build the app, queue it and start its server: blocking (demo.py), or in the background
    (tests, bench) returning (blocks, app, local url). `launch_options` go to `gr.Blocks.launch`."""
    demo, app = build_app(settings)
    demo.queue(max_size=32 if app.settings.public else None, default_concurrency_limit=app.settings.concurrency)
    options = dict(max_file_size=0, show_error=False, inbrowser=False, css=CSS)  # no component takes uploads
    options.update(launch_options)
    _, url, _ = demo.launch(prevent_thread_lock=not block, **options)
    return demo, app, url


def compare_examples_for(catalog: Catalog, default_model: str | None) -> list[list]:
    """Ready comparisons among what this app has: PyTorch vs the GGUF itself, logit vs tuned lens
    (once a lens is trained), and the default model vs each other listed model."""
    if default_model is None:
        return []
    prompt, target = LENS_EXAMPLES[0]
    usable = lambda name, backend: catalog.backend_problem(name, backend) is None  # noqa: E731
    pairs = [(default_model, "hooks", default_model, "llama-cpp"),
             (default_model, "tuned-lens", default_model, "tuned-lens-tuned")]
    pairs += [(default_model, "hooks", name, "hooks") for name in catalog.names() if name != default_model]
    return [[prompt, target, a, ab, b, bb] for a, ab, b, bb in pairs if usable(a, ab) and usable(b, bb)][:6]


def _second_choice(catalog: Catalog, names, default_model, backend_default, reasons) -> tuple[str, str]:
    """Side B of the comparison: another model if there is one, else another backend of the same model."""
    for name in names:
        if name != default_model and not catalog.backend_problem(name, backend_default):
            return name, backend_default
    others = [b for _, b in catalog.backend_choices(default_model)[0] if b not in reasons and b != backend_default]
    return default_model, (others[0] if others else backend_default)
