"""The llama.cpp backend: a lens on the quantized GGUF itself, while llama.cpp runs it.

No dequantized copy in PyTorch, so it works on models too big for that (Llama 4 Scout on a
64 GB Mac). Two pieces:

- Capture: llama.cpp calls an eval callback (`cb_eval`, a context parameter the high-level
  `Llama` ignores) for every node of its compute graph. We answer "yes" only for the residual
  stream: the input of the first block (found by walking from the node `attn_norm-0` down to
  its norm's input, so Gemma's scaled embeddings are read as they are) and `l_out-{i}`, the
  output of block i, named so for dense and MoE layers alike. Rows are copied as llama.cpp
  computes them. The last block's `l_out` holds only the rows whose logits were requested, so
  exactly the traced positions are requested.
- Projection: the final norm (`output_norm`, with the GGUF's epsilon; Gemma's stored weight
  already includes its +1) and the unembedding (`output.weight`, or `token_embd.weight` when
  tied) multiplied by ggml in its quantized form (`QuantizedMatrix`): no float copy of a
  202k x 5k matrix, and llama.cpp's own rounding, so the last row IS llama.cpp's logits.
  Then any final logit soft-capping or scaling from the metadata.

The weights are the `Llama` that chat loaded for the same file (`runtime.llama_cpp.shared_llama`):
the lens builds a second, small llama.cpp context on that model (its own KV cache, sized to
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
from runtime.ggml import GGML_TYPE_F32, NAME_OFFSET, GGUFHeader, GGUFTensor, QuantizedMatrix, TensorView
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
    """What the eval callback fills during one trace: rows [n_blocks + 1, positions, d]."""

    def __init__(self, n_blocks: int, d_model: int):
        self.n_blocks = n_blocks
        self.d_model = d_model
        self.first_block_norm = b"attn_norm-0"
        self.wanted = {f"l_out-{i}".encode(): i + 1 for i in range(n_blocks)}
        self.wanted[self.first_block_norm] = 0
        self.hidden = np.zeros((0, 0, 0), np.float32)
        self.error: BaseException | None = None
        self.seen: np.ndarray = np.zeros(0, bool)
        self.nodes_asked = 0

    def start(self, n_positions: int) -> None:
        self.hidden = np.empty((self.n_blocks + 1, n_positions, self.d_model), np.float32)
        self.seen = np.zeros((self.n_blocks + 1, n_positions), bool)
        self.error = None
        self.nodes_asked = 0

    def chunk(self, local: np.ndarray, column: int, n_tokens: int) -> None:
        """The next decode: `local` = indices (within its tokens) of the traced positions, written from `column`."""
        self.local, self.column, self.n_tokens = local, column, n_tokens

    def __call__(self, address: int, ask: bool, _user_data) -> bool:
        try:
            # Asked for every node of the graph (~1000 a decode): read just the name, cheaply.
            row = self.wanted.get(ctypes.string_at(address + NAME_OFFSET))
            if ask:
                self.nodes_asked += 1
                return row is not None
            if row is not None:
                self._read(TensorView(address), row)
            return True
        except BaseException as exc:  # an exception must not cross into C; stop the decode instead
            self.error = exc
            return False

    def _read(self, view: TensorView, row: int) -> None:
        count = len(self.local)
        if row == 0:
            view = _block_input(view)
        if view.t.ne[0] != self.d_model:
            raise UnsupportedModel(f"llama.cpp's {view.name} has width {view.t.ne[0]}, expected {self.d_model}.")
        n_rows = view.t.ne[1]
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


def _block_input(norm_output: TensorView) -> TensorView:
    """The tensor the first block's norm reads: the residual stream entering block 0."""
    node = norm_output
    for _ in range(4):  # attn_norm = [add(] mul( norm(x), w ) [, b)]
        if node.op in ("RMS_NORM", "NORM"):
            source = node.src(0)
            if source is not None:
                return source
        node = node.src(0)
        if node is None:
            break
    raise UnsupportedModel(
        "Could not find the input of llama.cpp's first block (the node 'attn_norm-0' is not a norm of it)."
    )


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
        # ctypes callbacks must outlive the context that calls them.
        self._callback = C.ggml_backend_sched_eval_callback(self._capture)
        self._ctx = None
        self._ctx_tokens = 0
        self._batch = None
        self._max_outputs = max(1, _OUTPUT_BYTES_PER_DECODE // (4 * self.n_vocab))
        self._pieces: dict[int, str] = {}
        self.logits: np.ndarray | None = None  # llama.cpp's own logits at the last traced position
        self.keep_all_logits = False  # tests: keep them at every traced position
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

    def context_params(self, n_tokens: int):
        """llama.cpp context parameters for a lens context of at least `n_tokens` (no callback yet):
        chat's own settings (threads, attention kernels), one sequence, a cache sized to the trace."""
        size = max(256, 1 << max(0, n_tokens - 1).bit_length())
        size = min(size, max(self.context_length, n_tokens))
        params = type(self.llama.context_params).from_buffer_copy(self.llama.context_params)
        params.n_ctx = size
        params.n_batch = params.n_ubatch = min(_UBATCH, size)
        params.n_seq_max = 1
        params.embeddings = False
        params.swa_full = False  # one sequence from its start: the sliding window is enough
        return params

    def _context(self, n_tokens: int):
        """The lens's own context on the shared model, big enough for `n_tokens` (re-made when too small)."""
        C = self._C
        if self._ctx is not None and self._ctx_tokens >= n_tokens:
            return self._ctx
        self.close()
        params = self.context_params(n_tokens)
        params.cb_eval = self._callback
        params.cb_eval_user_data = None
        ctx = C.llama_init_from_model(self._model, params)
        if not ctx:
            raise UnsupportedModel(f"llama.cpp could not create a context of {params.n_ctx} tokens for the lens.")
        self._ctx, self._ctx_tokens = ctx, int(C.llama_n_ctx(ctx))
        self._batch = C.llama_batch_init(params.n_ubatch, 0, 1)
        return ctx

    def model_loaded(self) -> bool:
        """False once chat has released (freed) the model this lens runs on."""
        return getattr(getattr(self.llama, "_model", None), "model", None) is not None

    def _check_loaded(self) -> None:
        # The vocabulary and the model are freed with chat's Llama: touching them would crash.
        if not self.model_loaded():
            raise UnsupportedModel(f"'{self.model_name}' was unloaded; open the llama.cpp lens again to reload it.")

    def close(self) -> None:
        """Free the lens's context (the model stays with chat)."""
        if self._ctx is not None:
            self._C.llama_batch_free(self._batch)
            if self.model_loaded():  # a context must not outlive its model; if it did, leak it
                self._C.llama_free(self._ctx)
            self._ctx, self._batch, self._ctx_tokens = None, None, 0

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _run(self, ids: list[int], traced: np.ndarray) -> np.ndarray:
        C = self._C
        self._check_loaded()
        if len(ids) > self.context_length:
            raise BadPrompt(
                f"The text is {len(ids)} tokens, longer than this model's context of {self.context_length} tokens."
            )
        ctx = self._context(len(ids))
        C.llama_memory_clear(C.llama_get_memory(ctx), True)
        capture = self._capture
        capture.start(len(traced))
        batch = self._batch
        ubatch = int(C.llama_n_ubatch(ctx))
        is_traced = np.zeros(len(ids), bool)
        is_traced[traced] = True
        logits = np.empty((len(traced), self.n_vocab), np.float32) if self.keep_all_logits else None
        column = 0
        started = time.perf_counter()
        for start, end in decode_spans(is_traced, ubatch, self._max_outputs):
            local = np.flatnonzero(is_traced[start:end])
            for i in range(end - start):
                batch.token[i] = ids[start + i]
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = bool(is_traced[start + i])
            batch.n_tokens = end - start
            capture.chunk(local, column, end - start)
            status = C.llama_decode(ctx, batch)
            if capture.error is not None:
                error, capture.error = capture.error, None
                raise error
            if status != 0:
                raise UnsupportedModel(f"llama.cpp failed to evaluate the text (llama_decode returned {status}).")
            for j in range(len(local)):
                if logits is not None or column + j == len(traced) - 1:
                    row = np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, int(local[j])), shape=(self.n_vocab,))
                    if logits is not None:
                        logits[column + j] = row
                    else:
                        self.logits = row.copy()
            column += len(local)
        if logits is not None:
            self.logits = logits
        self.timings = {"decode_seconds": time.perf_counter() - started, "nodes_asked": capture.nodes_asked}
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


def open_tracer(model=None, device=None, **options) -> LlamaCppTracer:
    """The llama.cpp lens for a GGUF `model` (see tracing.models.resolve), reused on later calls.

    The model is chat's loaded `Llama` for that file (loaded now if chat has not yet).
    `device` is accepted for symmetry with other backends and ignored: llama.cpp places the
    layers itself (all on the GPU where there is one).
    """
    if options:
        raise TypeError(f"unknown options for the llama-cpp backend: {', '.join(options)}")
    source = resolve(model)
    if source.kind != "gguf":
        raise UnsupportedModel(
            f"The llama.cpp backend reads GGUF files; '{source.name}' is a "
            f"{'Hugging Face model folder' if source.kind == 'hf' else 'hub id'}. Use the hooks backend for it."
        )
    from runtime.llama_cpp import shared_llama

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


__all__ = ["LlamaCppTracer", "LensHead", "open_tracer", "read_head", "trace_reply", "BACKEND"]
