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
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from runtime.ggml import NAME_OFFSET, TensorView
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
    graph_layout: "GraphLayout | None" = None  # its graph's node names, found by the first GraphContext
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
    """Bytes llama.cpp needs for this model with a context of `n_ctx` tokens: the weights, the
    KV cache and the compute buffers (the figure `shared_llama`'s memory verdict is taken on).

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
    and the memory verdict taken (`tracing.models.check_fits` on `memory_needed`, against Metal's
    limit too, since every layer goes to the GPU): NotEnoughMemory when the model is larger than
    this machine's memory, unless `check_memory` is False or the caller is inside
    `tracing.models.ignoring_memory_check()`; a tight fit loads with a MemoryWarning. An
    architecture the bundled llama.cpp does not know raises UnsupportedModel.
    """
    key = str(Path(path).resolve())
    shared = _LOADED.get(key)
    if shared is not None:
        return shared
    with _LOAD_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        from tracing.models import SMALLER_MODEL_HINT

        facts = gguf_facts(key)
        context = context_for(facts, n_ctx)
        check_fits(
            memory_needed(facts, context),
            f"'{Path(key).name}' ({describe_size(facts)})",
            SMALLER_MODEL_HINT,
            metal=gpu_layers() != 0,  # llama_options: layers on the GPU where there is one
            check_memory=check_memory,
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


def gpu_layers() -> int:
    """Layers llama.cpp puts on the GPU: $LENSBENCH_GPU_LAYERS (0 = none), else all of them (-1).

    Fewer layers on the GPU is the way out when a model exceeds what macOS lets Metal use; the
    CPU build ignores it.
    """
    value = os.environ.get("LENSBENCH_GPU_LAYERS", "").strip()
    return int(value) if value.lstrip("-").isdigit() else -1


def llama_options(n_ctx: int) -> dict:
    """The keyword arguments every `llama_cpp.Llama` here is created with."""
    return dict(n_ctx=n_ctx, n_gpu_layers=gpu_layers(), use_mmap=True, verbose=False)


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


# ---------------------------------------------------------------- graph contexts: read and write nodes
#
# A technique (lens, patching, steering, ...) runs on a small llama.cpp context of its own on the
# shared model, with an eval callback. ggml computes the graph up to each node the callback asks
# for, hands it over, then goes on: a handler can read the node's rows and write rows back, and
# every node computed afterwards sees what was written (FINDINGS: writing a node back unchanged
# leaves the logits bit-identical; writing zeros changes them).

EMBEDDINGS = "embeddings"  # the residual stream entering block 0; see `GraphContext.node_name`
_FIRST_EMBEDDINGS_NODES = (b"embd", b"inp_embd")  # llama-graph.cpp's build_inp_embd names its result so
# What may happen to the embeddings before the first block: scaling (Gemma, Granite), position
# embeddings added (GPT-2), copies. Norms and anything named for a layer end the search.
_EMBEDDINGS_OPS = {"SCALE", "ADD", "MUL", "CONT", "CPY", "DUP"}
_LAYER_SUFFIX = re.compile(rb"-\d+$")

NodeHandler = Callable[["TensorView"], None]


def block_output(i: int) -> str:
    """The graph node holding the residual stream after block `i` (0-based): `l_out-{i}`.

    Every llama.cpp architecture names it so, dense and mixture-of-experts blocks alike (the
    control vector, when one is set, is already added). The last block's node holds only the
    rows whose logits were requested.
    """
    return f"l_out-{i}"


class NodeCallback:
    """llama.cpp's eval callback (`cb_eval`): hands the nodes in `handlers` to them as the graph runs.

    handlers: node name (bytes, e.g. b"l_out-3") -> fn(TensorView), called once ggml has computed
    that node, before the graph goes on; it may read rows (`TensorView.rows`) or write them
    (`TensorView.write_rows`). Asked about every node of the graph (~1,000 a decode), the
    callback reads only the name. An exception in a handler stops the decode and is re-raised by
    `GraphContext.decode` (it must not cross into C).
    """

    def __init__(self) -> None:
        from llama_cpp import llama_cpp as C

        self.handlers: dict[bytes, NodeHandler] = {}
        self.recorder: Callable[[int], None] | None = None  # sees every node's address when asked
        self.error: BaseException | None = None
        self.nodes_asked = 0
        self.c_function = C.ggml_backend_sched_eval_callback(self)  # must outlive the context

    def __call__(self, address: int, ask: bool, _user_data) -> bool:
        try:
            name = ctypes.string_at(address + NAME_OFFSET)
            if ask:
                self.nodes_asked += 1
                if self.recorder is not None:
                    self.recorder(address)
                return name in self.handlers
            handler = self.handlers.get(name)
            if handler is not None:
                handler(TensorView(address))
            return True
        except BaseException as exc:
            self.error = exc
            return False


@dataclass
class GraphLayout:
    """What a model's llama.cpp graph names, found once by watching a one-token decode."""

    embeddings: str  # the node entering block 0: 'embd', or its scaled form ('inp_scaled', 'inpL')
    names: frozenset[str]  # every node name of the graph

    def missing(self, names) -> list[str]:
        return [name for name in names if name not in self.names]


def graph_context_params(
    llama, n_tokens: int, ubatch: int = 128, *, flash_attn: bool | None = None, swa_full: bool = False
):
    """llama.cpp context parameters for a technique's context of at least `n_tokens` (no callback yet).

    Chat's own settings (threads, attention kernels), one sequence, a KV cache sized to the work
    (a power of two, at least 256, at most the model's context), at most `ubatch` tokens a decode.
    flash_attn: None keeps chat's choice; False turns flash attention off, so the graph has the
    attention probabilities as nodes of their own (`kq_soft_max-{i}`). swa_full: sliding-window
    layers keep every position (KV cell i = position i for one sequence decoded from its start).
    """
    size = max(256, 1 << max(0, n_tokens - 1).bit_length())
    size = min(size, max(int(llama.n_ctx()), n_tokens))
    params = type(llama.context_params).from_buffer_copy(llama.context_params)
    params.n_ctx = size
    params.n_batch = params.n_ubatch = min(ubatch, size)
    params.n_seq_max = 1
    params.embeddings = False
    params.swa_full = swa_full  # False: one sequence from its start, the sliding window is enough
    if flash_attn is not None:
        import llama_cpp

        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
    return params


class GraphContext:
    """A llama.cpp context of our own on a shared model, with read/write access to graph nodes.

    Its own KV cache (sized to `n_tokens`), one sequence or `sequences` sharing one buffer,
    `callback.handlers` choosing which nodes to read or write. The weights are the shared model's: nothing is loaded twice. Hold
    `shared.lock` while using it; `close()` frees it (the model stays loaded). `flash_attn` and
    `swa_full`: see `graph_context_params`.
    """

    def __init__(self, shared: SharedLlama, n_tokens: int, ubatch: int = 128, sequences: int = 1, *,
                 flash_attn: bool | None = None, swa_full: bool = False):
        from llama_cpp import llama_cpp as C

        self._C = C
        self.shared = shared
        self.callback = NodeCallback()
        self.model = shared.llama.model
        self.sequences = sequences
        params = graph_context_params(shared.llama, n_tokens, ubatch, flash_attn=flash_attn, swa_full=swa_full)
        if sequences > 1:
            # One KV buffer for all sequences: sharing a prefix (llama_memory_seq_cp) copies nothing.
            params.n_ctx = max(int(params.n_ctx), n_tokens)
            params.n_seq_max = sequences
            params.kv_unified = True
        params.cb_eval = self.callback.c_function
        params.cb_eval_user_data = None
        ctx = C.llama_init_from_model(self.model, params)
        if not ctx:
            raise UnsupportedModel(f"llama.cpp could not create a context of {params.n_ctx} tokens for tracing.")
        self.ctx = ctx
        self.n_ctx = int(C.llama_n_ctx(ctx))
        self.n_ubatch = int(C.llama_n_ubatch(ctx))
        self.n_vocab = int(C.llama_vocab_n_tokens(C.llama_model_get_vocab(self.model)))
        self._batch = C.llama_batch_init(self.n_ubatch, 0, 1)

    @property
    def alive(self) -> bool:
        return self.ctx is not None and not self.shared.closed

    def clear(self) -> None:
        """Forget every position of every sequence (the KV cache); the next decode starts a new text."""
        self._C.llama_memory_clear(self._C.llama_get_memory(self.ctx), True)

    def decode(self, ids, start: int, outputs) -> None:
        """Run `ids` (at most `n_ubatch` tokens) of sequence 0 at positions start, start + 1, ...;
        `outputs[i]`: whether llama.cpp computes logits (and keeps the last block's rows) for token i.

        Raises what a node handler raised, or UnsupportedModel when llama.cpp fails.
        """
        n = len(ids)
        self.decode_batch(ids, range(start, start + n), [0] * n, outputs)

    def decode_batch(self, tokens, positions, sequences, outputs) -> None:
        """One decode of tokens that may belong to several sequences (at most `n_ubatch` tokens):
        token i at position `positions[i]` of sequence `sequences[i]` (< `self.sequences`)."""
        C, batch = self._C, self._batch
        n = len(tokens)
        if not 0 < n <= self.n_ubatch:
            raise ValueError(f"a decode takes 1 to {self.n_ubatch} tokens, not {n}")
        for i in range(n):
            batch.token[i] = int(tokens[i])
            batch.pos[i] = int(positions[i])
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = int(sequences[i])
            batch.logits[i] = bool(outputs[i])
        batch.n_tokens = n
        self.callback.error = None
        status = C.llama_decode(self.ctx, batch)
        if self.callback.error is not None:
            error, self.callback.error = self.callback.error, None
            raise error
        if status != 0:
            raise UnsupportedModel(f"llama.cpp failed to evaluate the text (llama_decode returned {status}).")

    def logits(self, i: int):
        """llama.cpp's logits for output row `i` of the last decode (a view: copy it to keep it)."""
        import numpy as np

        return np.ctypeslib.as_array(self._C.llama_get_logits_ith(self.ctx, int(i)), shape=(self.n_vocab,))

    def layout(self) -> GraphLayout:
        """The graph's node names and its embeddings node (watched once per model file, then remembered)."""
        if self.shared.graph_layout is None:
            self.shared.graph_layout = self._watch_layout()
        return self.shared.graph_layout

    def node_name(self, node: str) -> bytes:
        """The graph's name for `node`: EMBEDDINGS, or a name as llama.cpp writes it (e.g. 'l_out-3')."""
        return (self.layout().embeddings if node == EMBEDDINGS else node).encode()

    def _watch_layout(self) -> GraphLayout:
        from runtime.ggml import GGML_MAX_SRC

        names: set[str] = set()
        chain: set[int] = set()  # addresses: the embeddings and what the graph does to them before block 0
        found: list[str] = []
        closed = [False]

        def record(address: int) -> None:
            view = TensorView(address)
            raw = view.t.name
            names.add(raw.decode("utf-8", "replace"))
            if closed[0]:
                return
            if not chain:
                if raw in _FIRST_EMBEDDINGS_NODES:
                    chain.add(address)
                    found.append(raw.decode())
                return
            if _LAYER_SUFFIX.search(raw):  # the first block has begun
                closed[0] = True
                return
            sources = [ctypes.cast(view.t.src[i], ctypes.c_void_p).value for i in range(GGML_MAX_SRC)]
            if raw and view.op in _EMBEDDINGS_OPS and any(s in chain for s in sources if s):
                chain.add(address)
                found.append(raw.decode())

        callback = self.callback
        saved, callback.handlers = callback.handlers, {}
        callback.recorder = record
        try:
            bos = self._C.llama_vocab_bos(self._C.llama_model_get_vocab(self.model))
            self.clear()
            self.decode([bos if bos >= 0 else 0], 0, [True])
        finally:
            callback.recorder, callback.handlers = None, saved
            self.clear()
        if not found:
            raise UnsupportedModel(
                f"llama.cpp's graph for '{self.shared.path.name}' has no input-embeddings node ('embd'), "
                "so the residual stream entering the first block cannot be read."
            )
        return GraphLayout(embeddings=found[-1], names=frozenset(names))

    def close(self) -> None:
        """Free the context (the model stays with its owner). A context must not outlive its model: if
        the model was already released, the context is leaked rather than freed."""
        if self.ctx is not None:
            self._C.llama_batch_free(self._batch)
            if not self.shared.closed:
                self._C.llama_free(self.ctx)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

# ---------------------------------------------------------------- control vectors (steering)


def set_control_vector(ctx, n_embd: int, data=None, first: int = -1, last: int = -1) -> None:
    """Set llama.cpp's control vector on context `ctx` (any context: chat's, or a GraphContext's `ctx`);
    `data` None removes it.

    data: float32 [n_layer - 1, n_embd]: row L - 1 is added to the output of block L, counted from 0
    (the node `l_out-L` already includes it), for first <= L <= last; block 0 has no row. This is
    llama.cpp's own layout (`llama_adapter_cvec::apply_to` at the end of each block, rows filled
    from `direction.{L}` tensors by common_control_vector_load_one). It applies from the next
    decode on; what the KV cache already holds was computed without it.
    """
    import llama_cpp
    import numpy as np

    if data is None:
        status = llama_cpp.llama_set_adapter_cvec(ctx, None, 0, int(n_embd), -1, -1)
    else:
        flat = np.ascontiguousarray(data, dtype=np.float32).reshape(-1)
        pointer = flat.ctypes.data_as(ctypes.POINTER(ctypes.c_float))  # copied by llama.cpp before returning
        status = llama_cpp.llama_set_adapter_cvec(ctx, pointer, flat.size, int(n_embd), int(first), int(last))
    if status != 0:
        raise UnsupportedModel(f"llama.cpp refused the control vector (width {n_embd}, layers {first}-{last}).")


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
    "EMBEDDINGS",
    "block_output",
    "NodeCallback",
    "GraphLayout",
    "GraphContext",
    "graph_context_params",
    "set_control_vector",
]
