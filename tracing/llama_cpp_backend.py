"""The llama.cpp backend: a lens on the quantized GGUF itself, while llama.cpp runs it.

No dequantized copy in PyTorch, so it works on models too big for that (Llama 4 Scout on a
64 GB Mac). Two pieces:

- Capture: the runtime's eval callback (`runtime.llama_cpp.GraphContext`) hands over the
  residual stream as llama.cpp computes it: the graph's input-embeddings node (`embd`, or the
  form the architecture gives it before the first block: Gemma's `inp_scaled`, GPT-2's `inpL`
  with position embeddings), found from the graph's own structure once per model, and
  `l_out-{i}`, the output of block i, named so for dense, MoE, pre- and post-norm blocks alike.
  The last block's `l_out` holds only the rows whose logits were requested, so exactly the
  traced positions are requested.
- Projection: the final norm (`output_norm`, with the GGUF's epsilon; Gemma's stored weight
  already includes its +1) and the unembedding (`output.weight`, or `token_embd.weight` when
  tied) multiplied by ggml in its quantized form (`QuantizedMatrix`): no float copy of a
  202k x 5k matrix, and llama.cpp's own rounding, so the last row IS llama.cpp's logits.
  Then any final logit soft-capping or scaling from the metadata.

The weights are the one loaded model per file that chat also uses (`runtime.llama_cpp.shared_llama`):
the lens runs on a second, small llama.cpp context on that model (its own KV cache, sized to
the trace), so weights are never loaded twice. Every call holds the shared lock.

All lens math (softmax, top-k, entropy, KL, target) is `tracing.lens`, as for every backend.
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .api import trace_with
from .errors import BadModelFile, BadPrompt, UnsupportedModel
from .lens import LensResult
from runtime.ggml import GGML_TYPE_F32, GGUFHeader, GGUFTensor, QuantizedMatrix, TensorView
from runtime.llama_cpp import EMBEDDINGS, GraphContext, block_output, set_control_vector, shared_llama
from .models import ModelSource, read_gguf, resolve, split_parts

BACKEND = "llama-cpp"

# Logit post-processing llama.cpp applies after its output matmul. Data, not code paths.
# GGUF key (after the architecture prefix) -> transform, for every architecture that has the key.
LOGIT_TRANSFORMS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "final_logit_softcapping": lambda x, cap: torch.tanh(x / cap) * cap,  # Gemma 2
}
# `{arch}.logit_scale` means different things per architecture.
LOGIT_SCALE: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "command-r": lambda x, s: x * s,
    "cohere2": lambda x, s: x * s,
    "granite": lambda x, s: x / s,
    "granitemoe": lambda x, s: x / s,
    "granitehybrid": lambda x, s: x / s,
}

# The lens on the last block must reproduce llama.cpp's own logits this closely (relative to their
# scale). It matches to the last bit on the CPU; a GPU build's matmul rounds differently.
_PROBE_TOLERANCE = 1e-3
# Tokens per llama.cpp decode, and logits requested per decode. llama.cpp's compute buffers grow
# with tokens per decode, and its logits buffer with (requested outputs x vocabulary) floats; the
# lens keeps both small (a trace is not throughput-bound on them), so a decode takes at most
# 128 tokens and asks for at most ~8 MB of logits (8 positions of Gemma's 262k
# vocabulary, 42 of SmolLM2's 49k); a long trace takes several decodes.
_UBATCH = 128
_OUTPUT_BYTES_PER_DECODE = 8 * 2**20


# ---------------------------------------------------------------- the head: final norm + unembedding


@dataclass
class LensHead:
    """How llama.cpp turns the last residual into logits, read from the GGUF."""

    architecture: str
    norm: str  # "rms" or "layer"
    eps: float
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor | None
    unembed: QuantizedMatrix
    unembed_name: str
    transforms: list[tuple[Callable[[torch.Tensor, float], torch.Tensor], float]]

    @property
    def vocab_size(self) -> int:
        return self.unembed.rows

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm, computed as ggml's CPU kernels do (sums in float64)."""
        x = x.to(torch.float32)
        if self.norm == "rms":
            mean_square = x.double().pow(2).mean(-1, keepdim=True).float()
            x = x * torch.rsqrt(mean_square + self.eps)
        else:
            centred = x - x.double().mean(-1, keepdim=True).float()
            variance = centred.double().pow(2).mean(-1, keepdim=True).float()
            x = centred * torch.rsqrt(variance + self.eps)
        x = x * self.norm_weight
        return x + self.norm_bias if self.norm_bias is not None else x

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Residual rows [..., d] -> logits [..., vocab]."""
        shape = hidden.shape
        normed = self.normalize(hidden).reshape(-1, shape[-1]).contiguous().numpy()
        logits = torch.from_numpy(self.unembed.matmul(normed)).reshape(*shape[:-1], self.vocab_size)
        for transform, value in self.transforms:
            logits = transform(logits, value)
        return logits


def read_head(path: Path, n_threads: int = 1) -> LensHead:
    """The final norm and unembedding of a GGUF (memory-mapped, not copied).

    Raises UnsupportedModel, naming what is missing, when the file lacks either.
    """
    wanted = ("output_norm.weight", "output_norm.bias", "output.weight", "token_embd.weight")
    tensors: dict[str, GGUFTensor] = {}
    meta: dict = {}
    arch = "unknown"
    for index, part in enumerate(split_parts(Path(path))):
        try:
            header = GGUFHeader(part)
        except ValueError:
            read_gguf(path)  # says what is wrong with the file, for a person
            raise BadModelFile(f"'{Path(part).name}' is not a readable GGUF file.") from None
        with header:
            if index == 0:
                arch = str(header.value("general.architecture") or "unknown")
                keys = [f"{arch}.attention.layer_norm_rms_epsilon", f"{arch}.attention.layer_norm_epsilon"]
                keys += [f"{arch}.{key}" for key in LOGIT_TRANSFORMS] + [f"{arch}.logit_scale"]
                meta = {key: header.value(key) for key in keys}
                meta = {key: value for key, value in meta.items() if value is not None}
            for name in wanted:
                tensor = header.tensor(name)
                if tensor is not None:
                    tensors.setdefault(name, tensor)
    name = Path(path).name
    unembed = tensors.get("output.weight") or tensors.get("token_embd.weight")
    missing = [
        what
        for what, present in (
            ("final norm ('output_norm.weight')", "output_norm.weight" in tensors),
            ("output matrix ('output.weight', or a tied 'token_embd.weight')", unembed is not None),
        )
        if not present
    ]
    if missing:
        raise UnsupportedModel(
            f"'{name}' ({arch}) has no {' and no '.join(missing)}, so the llama.cpp lens cannot turn its "
            "layers into predictions. Use the hooks backend with a transformers version of this model."
        )
    if f"{arch}.attention.layer_norm_rms_epsilon" in meta:
        norm, eps = "rms", float(meta[f"{arch}.attention.layer_norm_rms_epsilon"])
    elif f"{arch}.attention.layer_norm_epsilon" in meta:
        norm, eps = "layer", float(meta[f"{arch}.attention.layer_norm_epsilon"])
    else:
        raise UnsupportedModel(
            f"'{name}' ({arch}) does not say which final norm it uses (no '{arch}.attention.layer_norm_rms_epsilon' "
            "or 'layer_norm_epsilon' in its metadata), so the llama.cpp lens cannot reproduce its output."
        )
    transforms = [
        (fn, float(meta[f"{arch}.{key}"])) for key, fn in LOGIT_TRANSFORMS.items() if meta.get(f"{arch}.{key}")
    ]
    if meta.get(f"{arch}.logit_scale") and arch in LOGIT_SCALE:
        transforms.append((LOGIT_SCALE[arch], float(meta[f"{arch}.logit_scale"])))
    cols, rows = (int(n) for n in unembed.shape[:2])  # GGUF shapes are [ne0, ne1] = [d_model, vocab]

    def vector(tensor) -> torch.Tensor:
        if tensor.type != GGML_TYPE_F32:
            raise UnsupportedModel(f"'{name}': {tensor.name} is not float32; the llama.cpp lens expects it to be.")
        return torch.from_numpy(np.frombuffer(tensor.data(), dtype=np.float32).copy())

    bias = tensors.get("output_norm.bias")
    return LensHead(
        architecture=arch,
        norm=norm,
        eps=eps,
        norm_weight=vector(tensors["output_norm.weight"]),
        norm_bias=vector(bias) if bias is not None else None,
        unembed=QuantizedMatrix(unembed.data(), unembed.type, rows, cols, n_threads),
        unembed_name=unembed.name,
        transforms=transforms,
    )


# ---------------------------------------------------------------- capture


class _Capture:
    """Node handlers filling, during one trace, the residual stream rows [n_blocks + 1, positions, d].

    Row 0 is the graph's embeddings node (what enters block 0, scaled where the architecture
    scales it), row i + 1 is `l_out-{i}`. Rows are copied as llama.cpp computes them.
    """

    def __init__(self, n_blocks: int, d_model: int):
        self.n_blocks = n_blocks
        self.d_model = d_model
        self.hidden = np.zeros((0, 0, 0), np.float32)
        self.seen: np.ndarray = np.zeros(0, bool)
        self.local, self.column, self.n_tokens = np.zeros(0, np.int64), 0, 0

    def handlers(self, graph: GraphContext) -> dict[bytes, Callable]:
        """name -> handler for the graph's embeddings node and every block output."""
        nodes = [EMBEDDINGS] + [block_output(i) for i in range(self.n_blocks)]
        return {graph.node_name(node): self._reader(row) for row, node in enumerate(nodes)}

    def _reader(self, row: int) -> Callable:
        return lambda view: self._read(view, row)

    def start(self, n_positions: int) -> None:
        self.hidden = np.empty((self.n_blocks + 1, n_positions, self.d_model), np.float32)
        self.seen = np.zeros((self.n_blocks + 1, n_positions), bool)

    def chunk(self, local: np.ndarray, column: int, n_tokens: int) -> None:
        """The next decode: `local` = indices (within its tokens) of the traced positions, written from `column`."""
        self.local, self.column, self.n_tokens = local, column, n_tokens

    def _read(self, view: TensorView, row: int) -> None:
        count = len(self.local)
        n_rows, width = view.shape
        if width != self.d_model:
            raise UnsupportedModel(f"llama.cpp's {view.name} has width {width}, expected {self.d_model}.")
        if n_rows == self.n_tokens:  # every token of this batch: keep the traced ones
            if count:
                first, last = int(self.local[0]), int(self.local[-1])
                block = view.rows(first, last - first + 1)
                self.hidden[row, self.column : self.column + count] = block[self.local - first]
        elif n_rows == count:  # the last block: llama.cpp kept only the requested outputs
            self.hidden[row, self.column : self.column + count] = view.rows(0, count)
        else:
            raise UnsupportedModel(
                f"llama.cpp's {view.name} has {n_rows} rows for a batch of {self.n_tokens} tokens "
                f"with {count} traced; the lens does not know how to read it."
            )
        self.seen[row, self.column : self.column + count] = True


# ---------------------------------------------------------------- the tracer


class LlamaCppTracer:
    """The `Tracer` of the llama.cpp backend (see tracing.api) for one GGUF."""

    backend = BACKEND

    def __init__(self, source: ModelSource, shared, head: LensHead):
        from llama_cpp import llama_cpp as C

        self._C = C
        self.source = source
        self.shared = shared
        self.llama = shared.llama
        self.head = head
        self.model_name = source.name
        self.context_length = int(self.llama.n_ctx())
        self._model = self.llama.model  # llama_model pointer, owned by the shared Llama
        self._vocab = C.llama_model_get_vocab(self._model)
        self.n_blocks = int(C.llama_model_n_layer(self._model))
        self.d_model = int(C.llama_model_n_embd(self._model))
        self.n_vocab = int(C.llama_vocab_n_tokens(self._vocab))
        self.vocab_size = self.n_vocab  # lets the lens project every row in one go (tracing.api)
        if head.vocab_size != self.n_vocab or head.unembed.cols != self.d_model:
            raise UnsupportedModel(
                f"'{source.name}': its output matrix is [{head.vocab_size}, {head.unembed.cols}] but llama.cpp "
                f"runs a vocabulary of {self.n_vocab} and width {self.d_model}."
            )
        self._capture = _Capture(self.n_blocks, self.d_model)
        self._graph: GraphContext | None = None
        self._max_outputs = max(1, _OUTPUT_BYTES_PER_DECODE // (4 * self.n_vocab))
        self._pieces: dict[int, str] = {}
        self.logits: np.ndarray | None = None  # llama.cpp's own logits at the last traced position
        self.keep_all_logits = False  # tests: keep them at every traced position
        # (strength x directions [n_blocks - 1, d], first, last) while a steered lens runs
        # (tracing.steering.applied): llama.cpp's control vector on this lens's context.
        self.control_vector: tuple | None = None
        self.timings: dict[str, float] = {}
        self.probe_error = self._probe()

    # -- Tracer protocol

    def lock(self):
        return self.shared.lock

    def encode(self, text: str) -> list[int]:
        return self.tokenize(text, add_special=True)

    def encode_target(self, text: str) -> list[int]:
        return self.tokenize(text, add_special=False)

    def decode_one(self, token_id: int) -> str:
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self.piece(token_id).decode("utf-8", "replace")
        return piece

    def residuals(
        self, ids: list[int], last_only: bool, positions: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, list[str]]:
        """Run llama.cpp on `ids`; rows [n_blocks + 1, traced positions, d] as float32.

        Traced positions: `positions` if given, else the last one (`last_only`) or all.
        """
        if positions is None:
            positions = [len(ids) - 1] if last_only else range(len(ids))
        traced = np.asarray(sorted(set(int(p) for p in positions)), dtype=np.int64)
        if len(traced) == 0 or traced[0] < 0 or traced[-1] >= len(ids):
            raise BadPrompt(f"Positions to trace must lie within the {len(ids)} tokens.")
        with self.lock():
            hidden = self._run(list(ids), traced)
        return torch.from_numpy(hidden), ["logit"] * self.n_blocks

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.project(hidden)

    # -- tokens

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """llama.cpp's tokenizer; special tokens written in the text (e.g. "<|im_end|>") are parsed as such."""
        self._check_loaded()
        data = text.encode("utf-8")
        size = len(data) + 8
        for _ in range(2):
            buffer = (self._C.llama_token * size)()
            n = self._C.llama_tokenize(self._vocab, data, len(data), buffer, size, add_special, True)
            if n >= 0:
                return list(buffer[:n])
            size = -n
        raise BadPrompt("llama.cpp could not tokenize this text.")

    def piece(self, token_id: int) -> bytes:
        """The bytes of one token, special tokens written out."""
        self._check_loaded()
        size = 64
        for _ in range(2):
            buffer = ctypes.create_string_buffer(size)
            n = self._C.llama_token_to_piece(self._vocab, int(token_id), buffer, size, 0, True)
            if n >= 0:
                return buffer.raw[:n]
            size = -n
        return b""

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """The token ids chat would feed the model for `messages`, up to the assistant's turn.

        Whatever chat format the shared `Llama` uses (the GGUF's template or llama-cpp-python's
        fallback), its handler renders and tokenizes the prompt, then asks for a completion; we
        stand in for the `Llama` and keep that prompt instead. A template without a system role
        (Gemma) gets the system prompt folded into the first message, as chat.engine does.
        """
        from llama_cpp import llama_chat_format

        self._check_loaded()
        llama = self.llama
        handler = (
            llama.chat_handler
            or llama._chat_handlers.get(llama.chat_format)
            or llama_chat_format.get_chat_completion_handler(llama.chat_format)
        )
        attempts = [messages]
        if len(messages) > 1 and messages[0].get("role") == "system":
            first = dict(messages[1], content=f"{messages[0]['content']}\n\n{messages[1]['content']}")
            attempts.append([first] + messages[2:])
        for attempt in attempts:
            try:
                handler(llama=_PromptCatcher(llama), messages=attempt)
            except _Prompt as prompt:
                return list(prompt.ids)
            except Exception:  # the template's own error, e.g. roles that must alternate
                continue
        raise BadPrompt(
            "This model's chat template rejects the conversation (it may need strictly alternating "
            "user and assistant messages)."
        )

    # -- llama.cpp

    def _context(self, n_tokens: int) -> GraphContext:
        """The lens's own context on the shared model, big enough for `n_tokens` (re-made when too small)."""
        graph = self._graph
        if graph is not None and graph.alive and graph.n_ctx >= n_tokens:
            return graph
        self.close()
        graph = GraphContext(self.shared, n_tokens, _UBATCH)
        layout = graph.layout()
        missing = layout.missing(block_output(i) for i in range(self.n_blocks))
        if missing:
            graph.close()
            raise UnsupportedModel(
                f"llama.cpp's graph for '{self.model_name}' ({self.head.architecture}) has no node "
                f"'{missing[0]}'{f' (and {len(missing) - 1} more block outputs)' if len(missing) > 1 else ''}: "
                "its blocks do not end in a residual stream the lens can read (recurrent or hybrid models)."
            )
        graph.callback.handlers = self._capture.handlers(graph)
        self._graph = graph
        return graph

    def model_loaded(self) -> bool:
        """False once chat has released (freed) the model this lens runs on."""
        return not self.shared.closed and getattr(getattr(self.llama, "_model", None), "model", None) is not None

    def _check_loaded(self) -> None:
        # The vocabulary and the model are freed with chat's Llama: touching them would crash.
        if not self.model_loaded():
            raise UnsupportedModel(f"'{self.model_name}' was unloaded; open the llama.cpp lens again to reload it.")

    def close(self) -> None:
        """Free the lens's context (the model stays with chat)."""
        if self._graph is not None:
            self._graph.close()
            self._graph = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _run(self, ids: list[int], traced: np.ndarray) -> np.ndarray:
        self._check_loaded()
        if len(ids) > self.context_length:
            raise BadPrompt(
                f"The text is {len(ids)} tokens, longer than this model's context of {self.context_length} tokens."
            )
        graph = self._context(len(ids))
        graph.clear()
        if self.control_vector is not None:
            set_control_vector(graph.ctx, self.d_model, *self.control_vector)
        capture = self._capture
        capture.start(len(traced))
        is_traced = np.zeros(len(ids), bool)
        is_traced[traced] = True
        logits = np.empty((len(traced), self.n_vocab), np.float32) if self.keep_all_logits else None
        column = 0
        asked_before = graph.callback.nodes_asked
        started = time.perf_counter()
        for start, end in decode_spans(is_traced, graph.n_ubatch, self._max_outputs):
            local = np.flatnonzero(is_traced[start:end])
            capture.chunk(local, column, end - start)
            graph.decode(ids[start:end], start, is_traced[start:end])
            for j in range(len(local)):
                if logits is not None:
                    logits[column + j] = graph.logits(int(local[j]))
                elif column + j == len(traced) - 1:
                    self.logits = graph.logits(int(local[j])).copy()
            column += len(local)
        if logits is not None:
            self.logits = logits
        self.timings = {
            "decode_seconds": time.perf_counter() - started,
            "nodes_asked": graph.callback.nodes_asked - asked_before,
        }
        if not capture.seen.all():
            missing = sorted({int(r) for r in np.flatnonzero(~capture.seen.all(axis=1))})
            raise UnsupportedModel(
                f"llama.cpp did not report the residual stream of '{self.model_name}' for rows {missing} "
                "(its graph names blocks differently); the llama.cpp lens cannot trace this architecture."
            )
        hidden, capture.hidden = capture.hidden, np.zeros((0, 0, 0), np.float32)
        return hidden

    def _probe(self) -> float:
        """Check once that the lens on the last block reproduces llama.cpp's own logits."""
        ids = self.encode("The lens")[:4] or [0]
        hidden, _ = self.residuals(ids, last_only=True)
        lens = self.project(hidden[-1:, -1:]).reshape(-1).numpy()
        own = self.logits
        scale = max(float(np.abs(own).max()), 1e-6)
        error = float(np.abs(lens - own).max()) / scale
        if not error < _PROBE_TOLERANCE:
            raise UnsupportedModel(
                f"The llama.cpp lens cannot reproduce the output of '{self.model_name}' ({self.head.architecture}; "
                f"relative error {error:.2e} through output_norm -> {self.head.unembed_name}): this architecture "
                "transforms its logits in a way lensbench does not know."
            )
        return error


def decode_spans(is_traced: np.ndarray, ubatch: int, max_outputs: int):
    """Consecutive token spans [start, end) of at most `ubatch` tokens, `max_outputs` of them traced."""
    start, n = 0, len(is_traced)
    while start < n:
        end, outputs = start, 0
        while end < n and end - start < ubatch and outputs + is_traced[end] <= max_outputs:
            outputs += int(is_traced[end])
            end += 1
        yield start, end
        start = end


class _Prompt(Exception):
    def __init__(self, ids):
        super().__init__("prompt")
        self.ids = ids


class _PromptCatcher:
    """Stands in for a `Llama` inside llama-cpp-python's chat handler (see `chat_prompt_ids`)."""

    def __init__(self, llama):
        self._llama = llama

    def create_completion(self, prompt, **_):
        raise _Prompt(prompt)

    def __getattr__(self, name):
        return getattr(self._llama, name)


# ---------------------------------------------------------------- opening


_TRACERS: dict[str, LlamaCppTracer] = {}
_TRACERS_LOCK = threading.Lock()


def open_tracer(model=None, device=None, lens_kind: str = "logit", lens=None, **options) -> LlamaCppTracer:
    """The llama.cpp lens for a GGUF `model` (see tracing.models.resolve), reused on later calls.

    The model is chat's loaded `Llama` for that file (loaded now if chat has not yet).
    `device` is accepted for symmetry with other backends and ignored: llama.cpp places the
    layers itself (all on the GPU where there is one).
    lens_kind: "logit" (default), or "tuned" / "jacobian" with `lens` naming a saved lens: its
    translators or matrices applied in PyTorch to the captured rows (tracing/learned_lens.py).
    """
    if lens_kind != "logit" or lens:
        from .learned_lens import on_llama_cpp

        return on_llama_cpp(open_tracer(model), lens_kind, lens)
    if options:
        raise TypeError(f"unknown options for the llama-cpp backend: {', '.join(options)}")
    source = resolve(model)
    if source.kind != "gguf":
        raise UnsupportedModel(
            f"The llama.cpp backend reads GGUF files; '{source.name}' is a "
            f"{'Hugging Face model folder' if source.kind == 'hf' else 'hub id'}. Use the hooks backend for it."
        )
    key = str(Path(source.location).resolve())
    with _TRACERS_LOCK:
        tracer = _TRACERS.get(key)
        if tracer is not None:
            shared = shared_llama(key)
            if shared is tracer.shared:
                return tracer
            tracer.close()  # chat released and reloaded the model: build on the new one
        # The head first: a GGUF without one gets its message before a long load.
        head = read_head(Path(key))
        shared = shared_llama(key)
        with shared.lock:
            head.unembed.n_threads = max(1, int(shared.llama.context_params.n_threads_batch))
            tracer = LlamaCppTracer(source, shared, head)
        _TRACERS[key] = tracer
        return tracer


def trace_reply(
    model,
    messages: list[dict],
    reply: str | Sequence[int],
    *,
    top_k: int = 5,
    temperature: float = 1.0,
    target: str | None = None,
    predicting_reply: bool = False,
) -> LensResult:
    """The lens over an assistant's reply, as the model read it after the chat-templated conversation.

    messages: the conversation before the reply ([{"role": ..., "content": ...}, ...]), templated
    exactly as chat does it (the GGUF's template, then the opening of the assistant's turn); a
    last assistant message equal to `reply` is taken as the reply itself.
    reply: the reply's text (or its token ids). Only the reply's positions are traced:
    `result.positions` index the reply's tokens in `result.tokens` (which hold the whole
    templated conversation), each column showing what the model predicts after that token.
    predicting_reply: instead trace the positions that predict each reply token (the last
    prompt token, then all reply tokens but the last), so column j shows how reply token j formed.
    """
    messages = list(messages)
    if messages and messages[-1].get("role") == "assistant" and messages[-1].get("content") == reply:
        messages = messages[:-1]  # the conversation was passed with its reply: the reply is what we trace
    if not messages:
        raise BadPrompt("The conversation is empty: there is no reply to trace.")
    tracer = open_tracer(model)
    prompt_ids = tracer.chat_prompt_ids(messages)
    if isinstance(reply, str):
        reply_ids = tracer.tokenize(reply, add_special=False) if reply.strip() else []
    else:
        reply_ids = [int(i) for i in reply]
    if not reply_ids:
        raise BadPrompt("The reply is empty: there is nothing to trace.")
    first = len(prompt_ids) - 1 if predicting_reply else len(prompt_ids)
    return trace_with(
        tracer,
        None,
        ids=prompt_ids + reply_ids,
        positions=list(range(first, first + len(reply_ids))),
        top_k=top_k,
        temperature=temperature,
        target=target,
        info={"prompt_tokens": len(prompt_ids), "reply_tokens": len(reply_ids)},
    )


def reply_as_prompt(model, messages: list[dict], reply: str) -> tuple[str, int]:
    """A chat reply as a prompt any lens can trace: the conversation templated as chat feeds it to
    the model (special tokens written out, e.g. "<|im_start|>"), then the reply; and the index of
    the reply's first token among that text's tokens. Tracing the text from that token on shows
    the reply as the model read it, and the text says exactly what was traced."""
    messages = list(messages)
    if messages and messages[-1].get("role") == "assistant" and messages[-1].get("content") == reply:
        messages = messages[:-1]
    if not messages:
        raise BadPrompt("The conversation is empty: there is no reply to trace.")
    if not reply.strip():
        raise BadPrompt("The reply is empty: there is nothing to trace.")
    tracer = open_tracer(model)
    prompt_ids = tracer.chat_prompt_ids(messages)
    added = tracer.encode("")  # what encoding puts before any text (a BOS), written back by encode
    if added and prompt_ids[: len(added)] == added:
        prompt_ids = prompt_ids[len(added):]
    text = b"".join(tracer.piece(i) for i in prompt_ids).decode("utf-8", "replace")
    return text + reply, len(tracer.encode(text))


__all__ = ["LlamaCppTracer", "LensHead", "open_tracer", "read_head", "trace_reply", "reply_as_prompt", "BACKEND"]
