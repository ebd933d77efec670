"""What every tab shares: the host's settings, the catalog of models, the checks on what a visitor
typed, opening a model with honest progress, errors turned into messages, and the page parts the
views are built from (one model picker, the memory-check choice, the tabs).

A view (`lens_view.LensView`, `chat_view.ChatView`, ...) is a class with the tab's functions as
plain methods, `build(page)` that lays out its tab, and `connect(page)` that wires it (and links
it to the other views on the page). `app.build_app` builds each view the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import threading
import time
from dataclasses import dataclass, field, replace

import gradio as gr

import tracing
from tracing.errors import LensbenchError, UnsupportedModel
from tracing.lens import LensResult
from tracing.models import ignoring_memory_check, memory_notices

from .choices import LENS_KINDS, Catalog, backend_label, learned_lens_dir
from .tokens import TokenLabels, byte_lookup, typed_token

log = logging.getLogger("lensbench.ui")


@dataclass(frozen=True)
class Settings:
    """What the host decides. `public` (a share link, a non-local host, a Space) tightens the bounds
    and keeps visitors to the listed models."""

    public: bool = False
    allow_custom_models: bool = False  # typed paths / hub ids in the model picker (local use only)
    default_model: str | None = None
    max_prompt_chars: int = 8000
    max_prompt_tokens: int = 1024
    max_top_k: int = 20
    max_new_tokens: int = 2048
    concurrency: int = 1  # requests per event group that run at once (models are shared and locked)

    @classmethod
    def for_launch(cls, public: bool, **overrides) -> "Settings":
        """A launch's settings: on a local launch typed paths and hub ids are welcome; a public one
        bounds prompts and answers and offers the listed models only, whatever `overrides` say."""
        if public:
            base = cls(public=True, max_prompt_chars=2000, max_prompt_tokens=256, max_new_tokens=512)
        else:
            base = cls(allow_custom_models=True)
        settings = replace(base, **{k: v for k, v in overrides.items() if v is not None})
        return replace(settings, allow_custom_models=False) if public else settings


@dataclass
class Traced:
    """What the Lens tab keeps per visitor: the result and its readable token labels (no model)."""

    result: LensResult
    labels: TokenLabels = field(default_factory=TokenLabels)


def message_of(exc: Exception, what: str = "") -> str:
    """The sentence a visitor reads for `exc`: a LensbenchError says itself; anything else is a bug,
    logged with its traceback and shown short."""
    if isinstance(exc, gr.Error):
        return str(exc.message)
    if isinstance(exc, LensbenchError):
        return str(exc)
    log.exception("unexpected error%s", f" in {what}" if what else "")
    return f"Something went wrong ({type(exc).__name__}: {exc}). The app is still running."


def problem_markdown(text: str, title: str = "") -> str:
    """A message shown in the page next to what caused it (it stays until the next try)."""
    return f"⚠️ **{title}** {text}" if title else f"⚠️ {text}"


def user_errors(fn):
    """For the API functions: a LensbenchError (something the caller can fix) becomes a gr.Error
    message, anything else a short gr.Error too (logged with its traceback): never a traceback."""

    def convert(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            return exc
        return gr.Error(message_of(exc, fn.__name__), print_exception=False)

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


def merged(steps) -> tuple:
    """The outputs of a function that yields in steps, as one tuple: each output's last value
    (a step leaves an output alone with a bare `gr.update()`)."""
    out: list = []
    for step in steps:
        out = list(step) if not out else [old if unchanged(new) else new for old, new in zip(out, step)]
    return tuple(out)


def unchanged(value) -> bool:
    return type(value) is dict and value == {"__type__": "update"}


def sub_progress(progress, start: float, span: float):
    def update(fraction, desc=None):
        progress(None if fraction is None else start + span * fraction, desc=desc)
    return update


def progress_text(progress) -> str:
    """What the tqdm bars Gradio's `progress` tracks say now, in one line ("Downloading model.safetensors:
    45% (121 of 269 MB)"); "" when there is none (no progress object, or nothing tracked yet)."""
    parts = []
    for bar in list(getattr(progress, "iterables", None) or []):
        desc = (bar.desc or "").strip().rstrip(":") or "Working"
        done, total = bar.index, bar.length
        if total:
            share = f"{min(1.0, (done or 0) / total):.0%}"
            if (bar.unit or "").upper() == "B":
                share += f" ({(done or 0) / 1e6:,.0f} of {total / 1e6:,.0f} MB)"
            elif total > 1:
                share += f" ({done or 0:,.0f} of {total:,.0f})"
            parts.append(f"{desc}: {share}")
        elif bar.progress is not None:
            parts.append(f"{desc}: {bar.progress:.0%}")
        else:
            parts.append(desc)
    return " · ".join(parts)


def no_progress(fraction=None, desc=None) -> None:
    pass


class Core:
    """The shared part of the app: settings, the model catalog, checks, model opening, cancels."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.catalog = Catalog(allow_custom=self.settings.allow_custom_models, default=self.settings.default_model,
                               can_train=not self.settings.public)
        self._cancels: dict[str, threading.Event] = {}
        self._cancels_lock = threading.Lock()
        # (model, backend, options) opened here: no "Loading" message again
        self._opened: set[tuple[str, str, tuple]] = set()

    # ---------------------------------------------------------------- checks on what a visitor typed

    def check_prompt(self, prompt: str | None, what: str = "prompt") -> str:
        if prompt is None or not prompt.strip():
            raise LensbenchError(f"The {what} is empty: type some text to trace.")
        if len(prompt) > self.settings.max_prompt_chars:
            raise LensbenchError(
                f"The {what} is {len(prompt):,} characters; this app takes at most "
                f"{self.settings.max_prompt_chars:,}. Shorten it."
            )
        return prompt

    def check_top_k(self, top_k) -> int:
        k = int(top_k or 0)
        if not 1 <= k <= self.settings.max_top_k:
            raise LensbenchError(f"top-k must be between 1 and {self.settings.max_top_k} (got {top_k}).")
        return k

    def check_tokens(self, n: int, limit: int | None = None, verb: str = "traces") -> None:
        limit = limit or self.settings.max_prompt_tokens
        if n > limit:
            raise LensbenchError(f"The prompt is {n:,} tokens; this app {verb} at most {limit:,}. Shorten it.")

    # ---------------------------------------------------------------- models

    def memory_check_off(self, ignore_memory) -> bool:
        """Whether the visitor's "Skip the memory check" box counts: never on a public link."""
        return bool(ignore_memory) and not self.settings.public

    @contextlib.contextmanager
    def loading(self, ignore_memory):
        """Around anything that may load a model: the visitor's memory-check choice applies, and a
        memory warning from the load is shown to them (not only written to the server's log).
        Must not span a `yield` (Gradio runs each step of a generator in a fresh context)."""
        with ignoring_memory_check(self.memory_check_off(ignore_memory)), memory_notices() as notes:
            yield
        for verdict in notes:
            gr.Warning(verdict.message)

    def tracer_options(self, model: str, backend: str, lens_kind=None, remote=False, repo_id=None) -> dict:
        """What `tracing.open_tracer` gets beside (model, backend) for a visitor's choices: the lens read
        on the GGUF (llama.cpp only: its saved file, see `Catalog.lens_kind_problem`) and an NDIF run
        (nnsight only; never on a public link). A choice that does not apply to `backend` is dropped."""
        options: dict = {}
        kind = lens_kind or "logit"
        if backend == "llama-cpp" and kind != "logit":
            problem = self.catalog.lens_kind_problem(model, kind)
            if problem:
                raise LensbenchError(f"llama.cpp cannot read a {LENS_KINDS.get(kind, kind)} lens on '{model}': {problem}")
            options.update(lens_kind=kind, lens=str(learned_lens_dir(model, kind)))
        if backend == "nnsight" and remote:
            if self.settings.public:
                raise LensbenchError("Running on NDIF is not offered on a public link: trace on this server's backends.")
            options["remote"] = True
            if (repo_id or "").strip():
                options["repo_id"] = repo_id.strip()
            elif self.catalog.pick(model).kind == "gguf":
                raise LensbenchError(f"NDIF runs Hugging Face checkpoints, and '{model}' is a GGUF file here: type the "
                                     "id NDIF hosts it under in NDIF model id (e.g. meta-llama/Llama-3.1-8B).")
        return options

    def loading_note(self, model: str | None, backend: str, **choices) -> str | None:
        """What the page says while (model, backend) loads, the first time it is used here; else None.
        (The conversion's and a download's tqdm bars move Gradio's progress bar meanwhile, or, in the
        Lens tab, whose traces run without it, this note: `while_loading`.) `choices`: as for `open`."""
        try:
            entry = self.catalog.pick(model)
            options = self.tracer_options(entry.name, backend, **choices)
        except LensbenchError:
            return None
        if self._key(entry.name, backend, options) in self._opened or self.catalog.backend_problem(entry.name, backend):
            return None
        if options.get("remote") and entry.kind == "hub":
            return None  # nothing is loaded here: NDIF holds the weights
        how = ("converts the GGUF file for PyTorch (a minute or more; kept for next time)"
               if entry.kind == "gguf" and backend != "llama-cpp"
               else "downloads it from the Hugging Face hub (its size decides how long)" if entry.kind == "hub"
               else "reads the weights")
        return (f"⏳ Loading **{entry.name}** for {backend_label(backend)}. The first load {how}; "
                "later runs reuse it.")

    @staticmethod
    def _key(name: str, backend: str, options: dict) -> tuple:
        return name, backend, tuple(sorted(options.items()))

    def while_loading(self, note: str | None, work, progress=None, shown=lambda text: text, every: float = 0.5):
        """Run `work()` and return what it returns (or raise its error), as a generator (`value =
        yield from core.while_loading(...)`). With a `note` (a first load: `loading_note`), `work` runs in
        a thread while this yields `shown(text)` each `every` s: the note, what the load's tqdm bars say
        (a download, a conversion; read from Gradio's `progress`, which tracks them) and the seconds so
        far. So the page shows progress beside the inputs and Gradio's own overlay (whose animation
        redraws the page all the time a trace runs) can stay off. Without a note: `work()` here."""
        if not note:
            return work()
        box: dict = {}
        context = contextvars.copy_context()  # Gradio's progress and warnings follow the work into the thread

        def run():
            try:
                box["value"] = context.run(work)
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc

        worker = threading.Thread(target=run, name="lensbench-load", daemon=True)
        start = time.monotonic()
        worker.start()
        said = None
        while worker.is_alive():
            bars = progress_text(progress)
            text = f"{note}\n\n{bars + ' · ' if bars else ''}{time.monotonic() - start:.0f} s so far"
            if text != said:
                yield shown(text)
                said = text
            worker.join(every)
        if "error" in box:
            raise box["error"]
        return box["value"]

    def open(self, model: str | None, backend: str, ignore_memory=False, *, lens_kind=None, remote=False,
             repo_id=None):
        """The tracer for (model, backend): loaded once, then reused from tracing's model cache.
        lens_kind: with llama-cpp, "tuned" or "jacobian" reads the model's saved lens on the GGUF
        (default: the logit lens). remote, repo_id: with nnsight, run on NDIF (`repo_id`: the hub id
        NDIF hosts the model under; empty: the model's own)."""
        entry = self.catalog.pick(model)
        problem = self.catalog.backend_problem(entry.name, backend)
        if problem:
            raise LensbenchError(f"{backend_label(backend)} cannot trace '{entry.name}': {problem}")
        options = self.tracer_options(entry.name, backend, lens_kind, remote, repo_id)
        if options.get("remote") and self._key(entry.name, backend, options) not in self._opened:
            from tracing.nnsight_backend import check_available, require_key

            require_key()  # a missing key, or NDIF out of reach, is said before a local copy loads for nothing
            if options.get("repo_id") or entry.kind == "hub":
                check_available(options.get("repo_id") or entry.name)
        try:
            with self.loading(ignore_memory):
                tracer = tracing.open_tracer(entry.name, backend, **options)
        except UnsupportedModel as exc:
            if not options:  # the model itself, not a lens file or NDIF: this backend cannot open it
                self.catalog.record_failure(entry.name, backend, str(exc))
            raise
        self._opened.add(self._key(entry.name, backend, options))
        return tracer

    def trace(self, model, backend, prompt, target, top_k, temperature, ignore_memory=False,
              first_position=0, **choices) -> Traced:
        """The lens on `prompt` (from token `first_position` on), checked against this app's bounds.
        `target` as typed: '␣' stands for a space. `choices`: lens_kind, remote, repo_id (see `open`)."""
        prompt = self.check_prompt(prompt)
        top_k = self.check_top_k(top_k)
        tracer = self.open(model, backend, ignore_memory, **choices)
        ids = tracer.encode(prompt)
        self.check_tokens(len(ids))
        start = int(first_position or 0)
        if not 0 <= start < len(ids):
            raise LensbenchError(f"'Trace from token' must be between 0 and {len(ids) - 1} for this prompt "
                                 f"({len(ids)} tokens); 0 traces every position.")
        result = tracing.trace_with(
            tracer, prompt, ids=ids, top_k=top_k, temperature=1.0 if temperature is None else float(temperature),
            target=typed_token(target) or None, positions=list(range(start, len(ids))) if start else None,
        )
        return Traced(result, TokenLabels(byte_lookup(tracer)))

    # ---------------------------------------------------------------- stopping a visitor's run

    def cancel_event(self, request: gr.Request | None, kind: str = "") -> threading.Event:
        key = kind + (getattr(request, "session_hash", None) or "local")
        with self._cancels_lock:
            event = self._cancels[key] = threading.Event()
            return event

    def cancel(self, request: gr.Request | None, kind: str = "") -> None:
        key = kind + (getattr(request, "session_hash", None) or "local")
        with self._cancels_lock:
            event = self._cancels.get(key)
        if event is not None:
            event.set()


@dataclass
class Page:
    """The parts of the page the views share, and the views themselves (for links between them)."""

    blocks: gr.Blocks
    model: gr.Dropdown  # the one model picker, above the tabs
    ignore_memory: gr.State  # the "Skip the memory check" box's value (never part of the API)
    tabs: gr.Tabs
    settings: Settings
    views: dict = field(default_factory=dict)  # view id -> view

    @property
    def heavy(self) -> dict:
        """Event options for anything that runs a model: one queue for all of them."""
        return dict(concurrency_id="models", concurrency_limit=self.settings.concurrency)
