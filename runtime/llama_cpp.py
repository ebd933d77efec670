"""One loaded `llama_cpp.Llama` per GGUF path, shared by chat sessions and the llama.cpp lens.

A `Llama` is not thread-safe: every use goes through `SharedLlama.lock`. A second request for
the same file gets the same object, so memory is not doubled. Loading checks the file first
(its header, and whether it fits in memory) and turns llama.cpp's failures into lensbench
errors with one-line messages; a failed load changes nothing that was loaded before.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import platform
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
import time
from dataclasses import dataclass, field
from pathlib import Path

from tracing.errors import BadModelFile, UnsupportedModel
from tracing.models import GGUFFacts, check_fits, human_count, read_gguf

# The context we allocate is the model's own (from its metadata), capped: a KV cache for Llama 4
# Scout's 10M-token context would need terabytes. Override with $LENSBENCH_MAX_CONTEXT.
DEFAULT_MAX_CONTEXT = 4096

_LOADED: dict[str, "SharedLlama"] = {}
_LOAD_LOCK = threading.Lock()


@dataclass
class SharedLlama:
    """A loaded model: hold `lock` for every call into `llama`."""

    path: Path
    llama: object  # llama_cpp.Llama
    lock: threading.RLock = field(default_factory=threading.RLock)
    facts: GGUFFacts | None = None  # what its header says
    load_seconds: float = 0.0
    chat_formatter: object | None = None  # renders messages with the model's chat template
    chat_template: bool = False  # False: the GGUF has none and a generic ChatML format is used
    closed: bool = False  # set by `release` (under the lock): `llama` must not be used any more
    # Chat generates on one long-lived thread per model: llama.cpp's OpenMP threads are set up
    # per calling thread, and a fresh thread per answer doubled the time to the first token.
    worker: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-chat")
    )

    @property
    def n_ctx(self) -> int:
        """The context length this instance was created with (tokens)."""
        return int(self.llama.n_ctx())


def max_context() -> int:
    """The cap on the context we allocate: $LENSBENCH_MAX_CONTEXT, else DEFAULT_MAX_CONTEXT."""
    value = os.environ.get("LENSBENCH_MAX_CONTEXT", "")
    return int(value) if value.strip().isdigit() and int(value) > 0 else DEFAULT_MAX_CONTEXT


def context_for(facts: GGUFFacts, n_ctx: int | None = None) -> int:
    """The context length to allocate: `n_ctx` if given, else the cap; never more than the model was trained for."""
    wanted = n_ctx or max_context()
    return min(wanted, facts.context_length) if facts.context_length else wanted


def memory_needed(facts: GGUFFacts, n_ctx: int) -> int:
    """Bytes llama.cpp needs for this model: the weights, the KV cache and the compute buffers.

    Weights are memory-mapped, but a model only runs at speed when all of them are resident
    (on Apple Silicon, GPU and CPU share that memory), so the whole file counts.
    """
    meta = facts.metadata
    arch = facts.architecture

    def value(key, default=0):
        v = meta.get(f"{arch}.{key}", default)
        return int(max(v) if isinstance(v, list) else v or default)  # some models list a value per layer

    n_head = value("attention.head_count", 1) or 1
    n_head_kv = value("attention.head_count_kv", n_head) or n_head
    head_k = value("attention.key_length", (facts.n_embd or 0) // n_head)
    head_v = value("attention.value_length", head_k)
    kv_cache = (facts.n_layers or 0) * n_ctx * n_head_kv * (head_k + head_v) * 2  # float16 K and V
    compute = (facts.vocab_size or 0) * min(n_ctx, 512) * 4 + (64 << 20)  # a batch of float32 logits + scratch
    return facts.file_bytes + kv_cache + compute


def shared_llama(path: str | Path, n_ctx: int | None = None, *, check_memory: bool = True) -> SharedLlama:
    """The loaded model for `path`, loading it on first use (a second call returns the same object).

    `n_ctx` (tokens) applies to the first load only; by default the model's own context, capped
    by `max_context()`. Before loading, the header is read (BadModelFile if it is not a valid GGUF)
    and, with `check_memory`, NotEnoughMemory is raised when the model would not fit. An
    architecture the bundled llama.cpp does not know raises UnsupportedModel.
    """
    key = str(Path(path).resolve())
    shared = _LOADED.get(key)
    if shared is not None:
        return shared
    with _LOAD_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        facts = gguf_facts(key)
        context = context_for(facts, n_ctx)
        if check_memory:
            check_fits(
                memory_needed(facts, context),
                f"'{Path(key).name}' ({describe_size(facts)})",
                "Pick a smaller quantization or a smaller model, or close other programs.",
            )
        start = time.perf_counter()
        llama = _load(key, facts, context)
        formatter, has_template = _chat_formatter(llama)
        llama.chat_handler = formatter.to_chat_handler()
        _LOADED[key] = SharedLlama(
            Path(key),
            llama,
            facts=facts,
            load_seconds=time.perf_counter() - start,
            chat_formatter=formatter,
            chat_template=has_template,
        )
        return _LOADED[key]


_FACTS_CACHE: dict[tuple, GGUFFacts] = {}


def gguf_facts(path: str | Path) -> GGUFFacts:
    """`tracing.models.read_gguf`, remembered per file version (a large vocabulary takes seconds to parse)."""
    path = Path(path)
    if not path.is_file():
        return read_gguf(path)  # raises ModelNotFound with its message
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FACTS_CACHE:
        _FACTS_CACHE[key] = read_gguf(path)
    return _FACTS_CACHE[key]


def describe_size(facts: GGUFFacts) -> str:
    """E.g. "llama4, mixture of 16 experts, 107.8B parameters, Q4_K"."""
    moe = f", mixture of {facts.n_experts} experts" if facts.n_experts else ""
    return f"{facts.architecture}{moe}, {human_count(facts.n_params)} parameters, {facts.quantization}"


def loaded_model(path: str | Path) -> SharedLlama | None:
    """The loaded model for `path`, or None if it is not loaded (never loads)."""
    return _LOADED.get(str(Path(path).resolve()))


def loaded() -> list[Path]:
    """Paths of the models loaded in this process."""
    return [shared.path for shared in _LOADED.values()]


def release(path: str | Path) -> bool:
    """Forget the loaded model for `path` (its memory is freed once no caller still holds it)."""
    key = str(Path(path).resolve())
    with _LOAD_LOCK:
        shared = _LOADED.pop(key, None)
    if shared is None:
        return False
    with shared.lock:
        shared.closed = True
        shared.llama.close()
    shared.worker.shutdown(wait=False)  # queued answers still run, and see `closed`
    return True


def llama_options(n_ctx: int) -> dict:
    """The keyword arguments every `llama_cpp.Llama` here is created with."""
    # All layers on the GPU where there is one (Metal, CUDA); the CPU build ignores it.
    return dict(n_ctx=n_ctx, n_gpu_layers=-1, use_mmap=True, verbose=False)


def _load(path: str, facts: GGUFFacts, n_ctx: int):
    import llama_cpp

    _capture_llama_log()
    _LOG.clear()
    try:
        with llama_cpp_workarounds():
            llama = llama_cpp.Llama(model_path=path, **llama_options(n_ctx))
    except ValueError as exc:  # llama-cpp-python's only signal; the reason is in llama.cpp's log
        raise _load_error(path, facts, exc) from None
    return llama


def _load_error(path: str, facts: GGUFFacts, exc: Exception) -> Exception:
    name = Path(path).name
    lines = [text.strip() for _, text in _LOG if text.strip()]
    errors = [text for text in lines if "error loading model:" in text]
    errors += [text.strip() for level, text in _LOG if level == _GGML_LOG_ERROR and text.strip()]
    reason = errors[0].split("error loading model:", 1)[-1].strip() if errors else str(exc)
    if "unknown model architecture" in reason:
        import llama_cpp

        return UnsupportedModel(
            f"'{name}' is a '{facts.architecture}' model, an architecture the bundled llama.cpp "
            f"(llama-cpp-python {llama_cpp.__version__}) does not know. Upgrade llama-cpp-python, "
            "or pick another model."
        )
    return BadModelFile(f"llama.cpp could not load '{name}': {reason}.")


def _chat_formatter(llama):
    """The model's own chat template from its GGUF (not llama-cpp-python's guess of a built-in format).

    `create_chat_completion` then renders with exactly this formatter, and chat.engine uses the same
    one to count prompt tokens. A GGUF without a template gets ChatML, the most common format.
    """
    from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE, CHATML_EOS_TOKEN, Jinja2ChatFormatter

    def text(token: int) -> str:
        return llama.detokenize([token], special=True).decode("utf-8", "replace") if token != -1 else ""

    template = llama.metadata.get("tokenizer.chat_template")
    eos, bos = llama.token_eos(), llama.token_bos()
    if template:
        try:
            return Jinja2ChatFormatter(template, eos_token=text(eos), bos_token=text(bos), stop_token_ids=[eos]), True
        except Exception:  # a template this Jinja cannot compile: treat as missing
            pass
    return Jinja2ChatFormatter(CHATML_CHAT_TEMPLATE, CHATML_EOS_TOKEN, bos_token=text(bos), stop_token_ids=[eos]), False


# ---------------------------------------------------------------- llama.cpp's log

# llama-cpp-python raises a bare "Failed to load model from file"; llama.cpp logs why. We keep the
# recent lines, and print them as llama-cpp-python would, except with the level numbering of the
# bundled ggml.h (llama-cpp-python 0.3.36 still uses an older one, so with verbose=False it
# printed llama.cpp's warnings and hid its errors).
_LOG: collections.deque = collections.deque(maxlen=200)
_GGML_LOG_ERROR, _GGML_LOG_CONT = 4, 5
_GGML_TO_LOGGING = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_log_callback = None


def _capture_llama_log() -> None:
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp
    from llama_cpp._logger import logger

    last_level = [logging.DEBUG]

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):
        decoded = (text or b"").decode("utf-8", "replace")
        if level == _GGML_LOG_CONT and _LOG:
            _LOG[-1] = (_LOG[-1][0], _LOG[-1][1] + decoded)
        else:
            _LOG.append((level, decoded))
            last_level[0] = _GGML_TO_LOGGING.get(level, logging.DEBUG)
        if logger.isEnabledFor(last_level[0]):
            print(decoded, end="", flush=True, file=sys.stderr)

    _log_callback = capture  # ctypes callbacks must outlive their registration
    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))


# ---------------------------------------------------------------- workarounds


def amx_advertised() -> bool:
    """Whether this x86 CPU says it has AMX tiles (Intel Sapphire Rapids and later)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_tile" in f.read()
    except OSError:
        return False


@contextlib.contextmanager
def llama_cpp_workarounds():
    """Wrap every `llama_cpp.Llama(...)`: turns off ggml's extra CPU buffer types where AMX is advertised.

    ggml's AMX matmul (used for Q4_0/Q4_1/Q8_0/K-quants) dies with a general protection fault on
    `ldtilecfg` in VMs whose CPU advertises AMX without the hypervisor enabling it (seen on
    Firecracker). `Llama` has no argument for it, so the model defaults are patched while it
    loads. $LENSBENCH_LLAMA_AMX=1 keeps AMX on (bare-metal Sapphire Rapids).
    """
    import llama_cpp.llama_cpp as C

    if not amx_advertised() or os.environ.get("LENSBENCH_LLAMA_AMX") == "1":
        yield
        return
    original = C.llama_model_default_params

    def without_extra_buffers():
        params = original()
        params.use_extra_bufts = False
        return params

    with _PATCH_LOCK:
        C.llama_model_default_params = without_extra_buffers
        try:
            yield
        finally:
            C.llama_model_default_params = original


_PATCH_LOCK = threading.Lock()

__all__ = [
    "SharedLlama",
    "shared_llama",
    "loaded",
    "loaded_model",
    "release",
    "context_for",
    "memory_needed",
    "gguf_facts",
    "max_context",
    "llama_options",
    "llama_cpp_workarounds",
]
