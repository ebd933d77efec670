"""What a visitor can pick: the listed models (a typed path or hub id only where the host allows it),
each model's facts, and which lens backends it can use (with the reason when it can't).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from functools import lru_cache

from tracing.api import BACKENDS
from tracing.errors import LensbenchError
from tracing.models import (
    DEFAULT_MODEL_NAME,
    SMALLER_MODEL_HINT,
    ModelEntry,
    discover,
    human_bytes,
    memory_verdict,
    read_gguf,
    resolve,
)

# Backend name (tracing.api.BACKENDS) -> what people read. A backend without a label here is
# still listed, under its own name.
BACKEND_LABELS: dict[str, str] = {
    "hooks": "PyTorch hooks",
    "transformer-lens": "TransformerLens",
    "tuned-lens": "tuned-lens · logit lens",
    "tuned-lens-tuned": "tuned-lens · tuned lens",
    "llama-cpp": "llama.cpp (on the GGUF)",
    "jacobian-lens": "Jacobian lens (TransformerLens)",
    "nnsight": "nnsight",
}
TORCH_BACKENDS = {"hooks", "transformer-lens", "tuned-lens", "tuned-lens-tuned", "jacobian-lens", "nnsight"}
# The lenses llama.cpp reads on the GGUF (--lens-kind): value -> what people read.
LENS_KINDS: dict[str, str] = {"logit": "logit", "tuned": "tuned", "jacobian": "Jacobian"}
TRAIN_PANEL = "Train a learned lens"  # the Lens tab's accordion that trains the missing ones


def backend_label(name: str) -> str:
    return BACKEND_LABELS.get(name, name)


def backend_names() -> list[str]:
    """Every registered backend, in the registry's order."""
    return list(BACKENDS)


@dataclass
class Catalog:
    """The models this app offers, and what it learned about which backends each can use."""

    allow_custom: bool = False  # accept typed paths / hub ids (a local host's choice; never on a public link)
    default: str | None = None  # the host's --model, listed first
    can_train: bool = True  # the page offers the Train panel (not on a public link): reasons point to it

    def __post_init__(self) -> None:
        self._failures: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- models

    def entries(self) -> list[ModelEntry]:
        entries = discover()
        if self.default and all(e.name != self.default for e in entries):
            source = resolve(self.default)  # the host named it on the command line
            entries.insert(0, ModelEntry(self.default, source.kind, source.location, 0))
        return entries

    def names(self, gguf_only: bool = False) -> list[str]:
        return [e.name for e in self.entries() if e.kind == "gguf" or not gguf_only]

    def default_name(self, gguf_only: bool = False) -> str | None:
        names = self.names(gguf_only)
        if self.default in names:
            return self.default
        return DEFAULT_MODEL_NAME if DEFAULT_MODEL_NAME in names else (names[0] if names else None)

    def pick(self, name: str | None, gguf_only: bool = False) -> ModelEntry:
        """The listed model called `name`; a LensbenchError for anything else (paths, hub ids, typos)."""
        name = (name or "").strip() or self.default_name(gguf_only)
        for entry in self.entries():
            if entry.name == name:
                if gguf_only and entry.kind != "gguf":
                    raise LensbenchError(f"'{name}' is a PyTorch model folder; chat needs a GGUF file.")
                return entry
        if self.allow_custom and name:
            source = resolve(name)
            if gguf_only and source.kind != "gguf":
                raise LensbenchError(f"'{name}' is not a GGUF file; chat needs one.")
            return ModelEntry(name, source.kind, source.location, 0)
        raise LensbenchError(
            f"'{name}' is not one of this app's models. Pick one from the list "
            "(the host adds models by putting them in the models/ folder)."
        )

    def facts(self, name: str | None) -> str:
        """Markdown about a model: architecture, size, quantization, and the memory verdict of each
        way to load it (llama.cpp on the GGUF; PyTorch, in the dtype it would get), with any warning."""
        try:
            entry = self.pick(name)
        except LensbenchError as exc:
            return f"⚠️ {exc}"
        from tracing.device import pick_device, pick_dtype

        device = pick_device()
        metal = device.type == "mps"
        if entry.kind == "hub":
            return ("Hugging Face hub model: downloaded on first use (needs the network). Its memory is checked "
                    "from its config before the download starts.")
        if entry.kind != "gguf":
            size = entry.size_bytes or 0
            verdict = memory_verdict(int(size * 1.1), f"'{entry.name}'", metal=metal)
            return _with_warnings(f"PyTorch model folder · {human_bytes(size)} on disk · {verdict.short()}", [verdict])
        try:
            facts = gguf_facts(entry.path)
        except LensbenchError as exc:
            return f"⚠️ {exc}"
        from runtime.llama_cpp import context_for, describe_size, memory_needed

        llama = memory_verdict(memory_needed(facts, context_for(facts)), f"llama.cpp on '{entry.name}' "
                               f"({describe_size(facts)})", metal=True, hint=SMALLER_MODEL_HINT)
        verdicts, memory = [llama], f"Memory: llama.cpp: {llama.short()}"
        if _torch_gguf_problem(entry.path) is None:
            dtype, _reason = pick_dtype(device, facts.float32_bytes)
            dtype_name = str(dtype).removeprefix("torch.")
            torch_bytes = facts.n_params * (4 if dtype_name == "float32" else 2)
            pytorch = memory_verdict(int(torch_bytes * 1.1), f"PyTorch on '{entry.name}' in {dtype_name}", metal=metal)
            verdicts.append(pytorch)
            memory += f" PyTorch ({dtype_name} on {device.type}): {pytorch.short()}"
        moe = f" · MoE, {facts.n_experts} experts" if facts.n_experts else ""
        return _with_warnings(
            f"{facts.architecture}{moe} · {facts.n_params / 1e6:,.0f}M parameters · {facts.n_layers} layers · "
            f"{facts.quantization} · context {facts.context_length} · {human_bytes(facts.file_bytes)}  \n{memory}",
            verdicts,
        )

    # ---------------------------------------------------------------- backends

    def record_failure(self, name: str, backend: str, message: str) -> None:
        """Remember that `backend` cannot open `name` (an UnsupportedModel), so the switch disables it."""
        with self._lock:
            self._failures[(name, backend)] = message

    def backend_problem(self, name: str | None, backend: str) -> str | None:
        """Why `backend` cannot trace model `name`, or None when it (probably) can.

        Known from the model's kind and GGUF header before anything is loaded, or learned from a
        failed open earlier in this process.
        """
        if backend not in BACKENDS:
            return f"The {backend_label(backend)} backend is not installed."
        try:
            entry = self.pick(name)
        except LensbenchError as exc:
            return str(exc)
        with self._lock:
            learned = self._failures.get((entry.name, backend))
        if learned:
            return learned
        if backend == "llama-cpp" and entry.kind != "gguf":
            return "llama.cpp runs GGUF files only; this model is a PyTorch folder."
        if backend in TORCH_BACKENDS and entry.kind == "gguf":
            problem = _torch_gguf_problem(entry.path)
            if problem:
                return problem
        if backend == "tuned-lens-tuned":
            return _tuned_lens_problem(entry.name, self.can_train)
        if backend == "jacobian-lens":
            return _jacobian_lens_problem(entry.name, self.can_train)
        return None

    def lens_kind_problem(self, name: str | None, kind: str) -> str | None:
        """Why llama.cpp cannot read lens `kind` on model `name`'s GGUF, or None when it can (the
        logit lens always can; a tuned or Jacobian lens once one is saved for the model)."""
        if kind not in LENS_KINDS:
            return f"'{kind}' is not a lens kind; choose one of: {', '.join(LENS_KINDS.values())}."
        if kind == "logit":
            return None
        try:
            entry = self.pick(name)
        except LensbenchError as exc:
            return str(exc)
        if kind == "tuned":
            return _tuned_lens_problem(entry.name, self.can_train)
        return _jacobian_lens_problem(entry.name, self.can_train)

    def lens_kind_choices(self, name: str | None) -> tuple[list[tuple[str, str]], dict[str, str]]:
        """Radio choices (label, kind) of the lens read on the GGUF, unavailable ones marked, and the reasons."""
        choices, reasons = [], {}
        for kind, label in LENS_KINDS.items():
            problem = self.lens_kind_problem(name, kind)
            if problem:
                reasons[kind] = problem
                label += " — unavailable"
            choices.append((label, kind))
        return choices, reasons

    def backend_choices(self, name: str | None) -> tuple[list[tuple[str, str]], dict[str, str]]:
        """Radio choices (label, backend) for a model, unavailable ones marked, and the reasons."""
        choices, reasons = [], {}
        for backend in backend_names():
            problem = self.backend_problem(name, backend)
            label = backend_label(backend)
            if problem:
                reasons[backend] = problem
                label += " — unavailable"
            choices.append((label, backend))
        return choices, reasons


def _with_warnings(text: str, verdicts) -> str:
    """`text`, then each verdict that warns or refuses, as a markdown line of its own."""
    return "  \n".join([text] + [f"⚠️ {v.message}" for v in verdicts if not v.fits])


def gguf_facts(path: str):
    """`read_gguf`, remembered per file version (reading a header with a big vocabulary takes seconds)."""
    st = os.stat(path)
    return _gguf_facts(str(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=64)
def _gguf_facts(path: str, _mtime_ns: int, _size: int):
    return read_gguf(path)


def _torch_gguf_problem(path: str) -> str | None:
    """Why transformers cannot dequantize this GGUF into PyTorch (split file, unknown architecture)."""
    from tracing.loading import gguf_architectures_transformers_loads

    try:
        facts = gguf_facts(path)
    except LensbenchError as exc:
        return str(exc)
    if facts.n_files > 1:
        return "transformers cannot load a split GGUF into PyTorch; use llama.cpp."
    if facts.architecture not in gguf_architectures_transformers_loads():
        return f"transformers cannot load '{facts.architecture}' GGUF files into PyTorch; use llama.cpp."
    return None


def _tuned_lens_problem(name: str, can_train: bool = True) -> str | None:
    """A tuned lens is trained per model; say how when there is none."""
    from tracing.tuned_lens_backend import trained_lens_dir

    if trained_lens_dir(name) is not None:
        return None
    model = "" if name == DEFAULT_MODEL_NAME else f" --model '{name}'"
    command = f"`python -m tracing train-lens{model} --text FILE`"
    if can_train:
        return (f"no tuned lens trained for this model yet: train one below (**{TRAIN_PANEL}**; it takes minutes and shows the time left), "
                f"or in a terminal: {command}.")
    return f"no tuned lens trained for this model yet (the host trains one: {command})."


def _jacobian_lens_problem(name: str, can_train: bool = True) -> str | None:
    """A Jacobian lens is fitted per model; say how when there is none."""
    from tracing.jacobian_lens_backend import fitted_lens_dir

    if fitted_lens_dir(name) is not None:
        return None
    model = "" if name == DEFAULT_MODEL_NAME else f" --model '{name}'"
    command = f"`python -m tracing fit-lens --kind jacobian{model}`"
    if can_train:
        return (f"no Jacobian lens fitted for this model yet: fit one below (**{TRAIN_PANEL}**, several minutes), "
                f"or in a terminal: {command}.")
    return f"no Jacobian lens fitted for this model yet (the host fits one: {command})."


def learned_lens_dir(name: str, kind: str):
    """The saved lens of `kind` ("tuned" or "jacobian") for model `name`, where the Train panel and
    `fit-lens` save it (the folder the PyTorch backends read too), or None when there is none."""
    if kind == "tuned":
        from tracing.tuned_lens_backend import trained_lens_dir

        return trained_lens_dir(name)
    from tracing.jacobian_lens_backend import fitted_lens_dir

    return fitted_lens_dir(name)


def reasons_markdown(reasons: dict[str, str], label=backend_label) -> str:
    if not reasons:
        return ""
    return "  \n".join(f"**{label(b)}** unavailable: {why}" for b, why in reasons.items())
