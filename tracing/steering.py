"""Activation steering: a concept vector built from examples, read with the lens, added while the model writes.

Activation addition (Turner et al. 2023, "Activation Addition"), representation engineering (Zou
et al. 2023) and contrastive activation addition (Rimsky et al. 2024, "CAA"): run the model on
texts that show a concept ("I love you with all my heart.") and on texts that show its opposite
("I hate you with all my heart."), take the residual stream at each layer, and the difference of
the two is a direction; adding it (times a strength) to the residual stream while the model
generates pushes the text toward the concept, subtracting it pushes away.

**Build** (`build`, `build_with`). Every text is run once and the residual stream is read at its
last token, after every block: `l_out-{L}` on the GGUF (llama.cpp's eval callback, the lens's own
capture) and the block outputs on PyTorch (the hooks lens). The last token, as repeng, the
steering-vectors library and CAA do, not every token as llama.cpp's cvector-generator does: the
texts of a set differ in length and wording, so their positions do not pair up (cvector-generator
pads the shorter text with spaces and subtracts token i from token i), and the last token is the
one that has read the whole text. One vector per layer:
- `mean`: mean(positive) - mean(negative), not normalized: strength 1 moves the residual stream
  by the average difference between the two sets (CAA's and steering-vectors' scale; llama.cpp's
  cvector-generator writes unit vectors instead, so its files want larger strengths).
- `pca`: the first principal component of the paired differences (positive i - negative i, so
  the sets must be the same size), uncentred as in cvector-generator's power iteration (centring,
  as repeng's scikit-learn PCA does, would remove the shared shift that is the concept), its sign
  set to agree with the mean difference (cvector-generator's sign is random), and its length the
  mean difference's projection on it, so strengths mean the same for both methods.
Why not a library: repeng and steering-vectors (PyPI) compute these on PyTorch only, finding the
blocks from tables of module names; the GGUF, Scout included, needs the llama.cpp capture anyway,
and with the capture done on both runtimes the method itself is a mean and an SVD (`_directions`).

**Layers, as llama.cpp counts them.** Layer L is the output of block L counted from 0: llama.cpp's
node `l_out-L`, the tensor `direction.L` of a control-vector file, the lens's row "layer L+1".
llama.cpp adds the vector of layer L to the output of block L (`llama_adapter_cvec::apply_to`,
called at the end of every block before the node is named `l_out`); it has no slot for block 0,
so layers run from 1 to n_blocks - 1, and a layer range A-B is llama.cpp's
`--control-vector-layer-range A B`. A vector is read from and added to the same place (as repeng
does; cvector-generator reads `l_out-L` and writes it as `direction.{L+1}`, one block later).
Tests check the convention independently: the same vector added by llama.cpp on a float32 GGUF
and by a PyTorch hook on block L of the same weights changes the logits alike, and one block off
does not.

**Read** (`read_vector`): each layer's direction through the model's own final norm and
unembedding, as if it were the whole residual stream, minus what they give for zero (a
LayerNorm's bias, which is not the direction's): the tokens it promotes and suppresses. Through
the norm rather than around it, because the norm's per-dimension weights (large in Gemma) decide
which tokens a direction reaches; its division by the RMS only rescales, which leaves the ranking.

**Apply** (`Steering`): on the GGUF, llama.cpp's own control-vector mechanism
(`llama_set_adapter_cvec`) on the shared model's context, for chat (`chat.engine.stream_chat(...,
steering=...)`) and the lens (`tracing.trace(..., steering=...)`); on PyTorch, forward hooks adding
strength x vector to the outputs of the steered blocks, at every position, as llama.cpp does.
`generate` and `sweep` answer on either runtime.

**Save and load**: llama.cpp's control-vector GGUF (`general.architecture = controlvector`,
`controlvector.model_hint`, `controlvector.layer_count`, one float32 tensor `direction.{L}` per
layer L >= 1), which llama.cpp's `--control-vector` reads; files from cvector-generator or repeng
load too.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import BadControlVector, BadPrompt, BadSetting, LensbenchError, ModelNotFound, UnsupportedModel

METHODS = ("mean", "pca")
TOP_K = 5  # tokens shown per layer, promoted and suppressed
EXAMPLES_DIR = Path(__file__).resolve().parent / "data" / "steering"
DEFAULT_EXAMPLE = "love-hate"
# Backends that can build and apply a vector (the technique's two runtimes).
RUNTIMES = ("llama-cpp", "hooks")
_ARCH = "controlvector"  # general.architecture of a control-vector GGUF


class SteeringCancelled(LensbenchError):
    """The person pressed Stop while a vector was being built or a sweep was running."""


# ==================================================================== the result type


@dataclass
class SteeringVector:
    """One direction per layer, in llama.cpp's numbering (see the module's docstring).

    `directions[L]` (float32 [n_blocks, d_model]) is added to the output of block L counted from 0;
    row 0 is always zero (llama.cpp never steers block 0's output).
    """

    model: str  # the model it was built on (or the file's model hint)
    model_hint: str  # the model's architecture ("llama", "gemma3"), as controlvector.model_hint
    n_blocks: int
    d_model: int
    directions: np.ndarray  # [n_blocks, d_model] float32
    method: str  # "mean", "pca", or "file" for a file made elsewhere
    n_positive: int = 0
    n_negative: int = 0
    backend: str | None = None  # the runtime that captured the examples
    separation: np.ndarray | None = None  # [n_blocks]: share of examples on their side (NaN for row 0)
    promoted: list[list[tuple[str, float]]] | None = None  # [n_blocks][k]: (token, logit change)
    suppressed: list[list[tuple[str, float]]] | None = None
    source: str | None = None  # the file it was loaded from
    info: dict = field(default_factory=dict)  # seconds, tokens read, what was read

    @property
    def layers(self) -> range:
        """The layers that carry a direction: 1 .. n_blocks - 1."""
        return range(1, self.n_blocks)

    @property
    def norms(self) -> np.ndarray:
        """Length of each layer's direction [n_blocks] (row 0: 0)."""
        return np.linalg.norm(self.directions.astype(np.float64), axis=1)

    @property
    def key(self) -> str:
        """A fingerprint of the directions: equal for the same numbers (a vector and its saved file)."""
        if "_key" not in self.__dict__:
            self.__dict__["_key"] = hashlib.sha1(np.ascontiguousarray(self.directions).tobytes()).hexdigest()[:16]
        return self.__dict__["_key"]

    def to_dict(self) -> dict:
        """The CLI's `--json`: model, model_hint, method, n_positive, n_negative, n_blocks, d_model,
        layers, norms, separation, promoted and suppressed ([layer][k] of {token, logit}), info.
        The directions themselves are in the saved file, not here."""

        def tokens(rows):
            if rows is None:
                return None
            return [[{"token": t, "logit": round(float(z), 4)} for t, z in rows[layer]] for layer in self.layers]

        return {
            "model": self.model,
            "model_hint": self.model_hint,
            "method": self.method,
            "n_positive": self.n_positive,
            "n_negative": self.n_negative,
            "n_blocks": self.n_blocks,
            "d_model": self.d_model,
            "backend": self.backend,
            "layers": list(self.layers),
            "norms": [round(float(n), 4) for n in self.norms[1:]],
            "separation": None if self.separation is None else [round(float(s), 4) for s in self.separation[1:]],
            "promoted": tokens(self.promoted),
            "suppressed": tokens(self.suppressed),
            "source": self.source,
            "info": {k: v for k, v in self.info.items() if isinstance(v, (str, int, float, bool, type(None)))},
        }

    def table(self, top_k: int = TOP_K) -> str:
        """One line a layer: the direction's length, how well it separates the examples, and the
        tokens it promotes and suppresses through the lens."""
        made = f"{self.method}, {self.n_positive} + {self.n_negative} examples" if self.n_positive else self.method
        lines = [
            f"model: {self.model} ({self.model_hint})   vector: {made}   width {self.d_model}",
            "layer L = output of block L counted from 0 (llama.cpp's l_out-L, direction.L; the lens's 'layer L+1')",
            f"{'layer':>5} {'length':>8} {'separates':>9}  promotes | suppresses",
        ]
        norms = self.norms
        for layer in self.layers:
            sep = "" if self.separation is None else f"{100 * self.separation[layer]:.0f}%"
            row = f"{layer:>5} {norms[layer]:8.2f} {sep:>9}  "
            if self.promoted is not None:
                up = " ".join(repr(t) for t, _ in self.promoted[layer][:top_k])
                down = " ".join(repr(t) for t, _ in self.suppressed[layer][:top_k])
                row += f"{up} | {down}"
            lines.append(row)
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        """Write llama.cpp's control-vector GGUF: `general.architecture = controlvector`,
        `controlvector.model_hint`, `controlvector.layer_count` (as cvector-generator writes them) and
        one float32 tensor `direction.{L}` of d_model numbers per layer L >= 1; what we know beyond
        that under `lensbench.*` (llama.cpp ignores it). Returns the path."""
        import gguf

        path = Path(path)
        if path.suffix.lower() != ".gguf":
            raise BadSetting(f"A control vector is saved as a .gguf file, not '{path.name}'.")
        if path.parent and not path.parent.is_dir():
            raise BadSetting(f"There is no folder '{path.parent}' to save the vector in.")
        writer = gguf.GGUFWriter(str(path), _ARCH)  # writes general.architecture
        writer.add_string(f"{_ARCH}.model_hint", self.model_hint)
        writer.add_int32(f"{_ARCH}.layer_count", len(self.layers))
        writer.add_string("lensbench.model", self.model)
        writer.add_string("lensbench.method", self.method)
        writer.add_uint32("lensbench.block_count", self.n_blocks)
        writer.add_uint32("lensbench.n_positive", self.n_positive)
        writer.add_uint32("lensbench.n_negative", self.n_negative)
        if self.separation is not None:
            writer.add_array("lensbench.separation", [float(x) for x in np.nan_to_num(self.separation[1:], nan=-1.0)])
        for layer in self.layers:
            writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(self.directions[layer], dtype=np.float32))
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        return path

    @classmethod
    def load(cls, path: str | Path, model=None, *, check: bool = True) -> "SteeringVector":
        """A control-vector GGUF (ours, cvector-generator's, repeng's) for `model`; see `load_vector`."""
        return load_vector(path, model, check=check)

    def llama_cvec(self, strength: float) -> np.ndarray:
        """strength x directions for llama.cpp: float32 [n_blocks - 1, d_model], row L - 1 for layer L."""
        return (float(strength) * self.directions[1:]).astype(np.float32)


# ==================================================================== applying: strength and layers


def parse_layers(layers, n_blocks: int) -> tuple[int, int]:
    """(first, last) inclusive from "A-B", "L", (A, B), None or "all" (every layer: 1 .. n_blocks - 1).

    BadSetting when outside 1 .. n_blocks - 1 or reversed, with the reason for a person."""
    top = n_blocks - 1
    if layers is None or (isinstance(layers, str) and layers.strip().lower() in ("", "all")):
        return 1, top
    try:
        if isinstance(layers, str):
            parts = [p.strip() for p in layers.replace("–", "-").split("-")]
            first, last = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (None, None)
        else:
            first, last = (int(layers[0]), int(layers[-1]))
    except (TypeError, ValueError, IndexError):
        first = last = None
    if first is None or not 1 <= first <= last <= top:
        raise BadSetting(
            f"Layers must be a range A-B with 1 <= A <= B <= {top} for this model (got {layers!r}): layer L is the "
            "output of block L counted from 0, as llama.cpp counts them, and block 0's output cannot be steered."
        )
    return first, last


@dataclass(frozen=True)
class Steering:
    """A vector applied at a strength over a layer range (inclusive, llama.cpp's numbering).

    Pass it to `chat.engine.stream_chat(..., steering=)`, `tracing.trace(..., steering=)`,
    `generate`, or use `applied(tracer, steering)`. Build with `Steering.of(vector, strength, layers)`
    to check the strength and parse the layers ("8-20", (8, 20), None for all).
    """

    vector: SteeringVector
    strength: float
    first: int
    last: int

    @classmethod
    def of(cls, vector: SteeringVector, strength: float = 1.0, layers=None) -> "Steering":
        try:
            strength = float(strength)
        except (TypeError, ValueError):
            strength = math.nan
        if not math.isfinite(strength):
            raise BadSetting(f"The strength must be a number (got {strength!r}).")
        first, last = parse_layers(layers, vector.n_blocks)
        return cls(vector, strength, first, last)

    @property
    def layers(self) -> tuple[int, int]:
        return self.first, self.last

    def describe(self) -> str:
        name = Path(self.vector.source).name if self.vector.source else f"{self.vector.method} vector"
        return f"{name} at strength {self.strength:g} on layers {self.first}-{self.last}"

    def check(self, n_blocks: int, d_model: int, model_name: str) -> None:
        """BadControlVector when the vector was made for a model of another width or depth."""
        check_shape(self.vector, n_blocks, d_model, model_name)

    # -- chat on the shared llama.cpp model (called by chat.engine with the model's lock held)

    def check_chat_model(self, shared) -> None:
        import llama_cpp

        model = shared.llama.model
        self.check(int(llama_cpp.llama_model_n_layer(model)), int(llama_cpp.llama_model_n_embd(model)), shared.path.name)

    def apply_to_chat(self, shared) -> None:
        """Set the vector on the chat context and forget its prompt cache (computed without it)."""
        from runtime.llama_cpp import set_control_vector

        set_control_vector(shared.llama.ctx, self.vector.d_model, self.vector.llama_cvec(self.strength), self.first, self.last)
        shared.llama.reset()

    def remove_from_chat(self, shared) -> None:
        """Take the vector off the chat context, and forget the prompt cache computed with it."""
        from runtime.llama_cpp import set_control_vector

        set_control_vector(shared.llama.ctx, self.vector.d_model, None)
        shared.llama.reset()


def as_steering(steering) -> Steering:
    """A `Steering` from a Steering or a tuple (vector, strength[, layers])."""
    if isinstance(steering, Steering):
        return steering
    if isinstance(steering, (tuple, list)) and 2 <= len(steering) <= 3 and isinstance(steering[0], SteeringVector):
        return Steering.of(*steering)
    raise BadSetting("Steering is a Steering, or a tuple (vector, strength) or (vector, strength, layers).")


def check_shape(vector: SteeringVector, n_blocks: int, d_model: int, model_name: str) -> None:
    """BadControlVector, in one sentence, when `vector` cannot go on a model of this depth and width.

    A file made elsewhere does not say how deep its model was: it fits any model with at least as
    many layers as its highest direction, and gets zero rows for the layers it lacks."""
    made = f"'{Path(vector.source).name}'" if vector.source else "This vector"
    if vector.d_model != d_model:
        raise BadControlVector(
            f"{made} was made for a model of width {vector.d_model} ({vector.model_hint}, {vector.model}), and "
            f"'{model_name}' has width {d_model}: a control vector works only on the model it was made for."
        )
    if vector.method == "file" and vector.n_blocks < n_blocks:
        extra = np.zeros((n_blocks - vector.n_blocks, d_model), np.float32)
        vector.directions = np.vstack([vector.directions, extra])
        vector.n_blocks = n_blocks
        vector.__dict__.pop("_key", None)
    if vector.n_blocks != n_blocks:
        layers = f"layers up to {vector.n_blocks - 1}" if vector.method == "file" else f"{vector.n_blocks} layers"
        raise BadControlVector(
            f"{made} was made for a model with {layers} ({vector.model_hint}, {vector.model}), and "
            f"'{model_name}' has {n_blocks}: a control vector works only on the model it was made for."
        )


@contextlib.contextmanager
def applied(tracer, steering) -> Iterator[None]:
    """While active, the tracer's model runs steered: PyTorch forward hooks on the steered blocks
    (hooks backend), or llama.cpp's control vector on the lens's own context (llama-cpp backend)."""
    steering = as_steering(steering)
    n_blocks, d_model = _shape(tracer)
    steering.check(n_blocks, d_model, tracer.model_name)
    if tracer.backend == "llama-cpp":
        tracer.control_vector = (steering.vector.llama_cvec(steering.strength), steering.first, steering.last)
        try:
            yield
        finally:
            tracer.control_vector = None
            graph = getattr(tracer, "_graph", None)
            if graph is not None and graph.alive:
                from runtime.llama_cpp import set_control_vector

                set_control_vector(graph.ctx, d_model, None)
        return
    if tracer.backend != "hooks":
        raise UnsupportedModel(f"Steering runs on the backends {' and '.join(RUNTIMES)}, not '{tracer.backend}'.")
    import torch

    from .sublayers import _first_tensor, _replace_first

    blocks = tracer.lens.parts.blocks
    parameter = next(tracer.lens.model.parameters())
    handles = []
    for layer in range(steering.first, steering.last + 1):
        added = torch.from_numpy(steering.strength * steering.vector.directions[layer]).to(parameter.device, parameter.dtype)

        def add(_module, _args, output, added=added):
            return _replace_first(output, _first_tensor(output) + added)

        handles.append(blocks[layer].register_forward_hook(add))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ==================================================================== building


def example(name: str = DEFAULT_EXAMPLE) -> tuple[list[str], list[str]]:
    """A worked example set shipped with lensbench: (positive texts, negative texts)."""
    folder = EXAMPLES_DIR / name
    if not folder.is_dir():
        known = ", ".join(sorted(p.name for p in EXAMPLES_DIR.iterdir() if p.is_dir()))
        raise BadPrompt(f"There is no example set '{name}'; the sets are: {known}.")
    return read_examples(folder / "positive.txt"), read_examples(folder / "negative.txt")


def read_examples(path: str | Path) -> list[str]:
    """Texts from a file, one a line (blank lines skipped); a written `\\n` is a newline, as in the
    files llama.cpp's cvector-generator reads."""
    path = Path(path)
    if not path.is_file():
        raise BadPrompt(f"There is no file '{path}' of example texts.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadPrompt(f"'{path.name}' is not a text file (UTF-8), one example a line.") from None
    return [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]


def _check_examples(positive: Sequence[str], negative: Sequence[str], method: str) -> tuple[list[str], list[str]]:
    if method not in METHODS:
        raise BadSetting(f"The method is one of {', '.join(METHODS)} (got {method!r}).")
    sets = []
    for name, texts in (("positive", positive), ("negative", negative)):
        texts = [str(t) for t in (texts or []) if t is not None and str(t).strip()]
        if not texts:
            raise BadPrompt(f"The {name} examples are empty: give at least one text (one a line).")
        sets.append(texts)
    if method == "pca" and len(sets[0]) != len(sets[1]):
        raise BadPrompt(
            f"PCA pairs the examples line by line, so both sets need as many texts (positive {len(sets[0])}, "
            f"negative {len(sets[1])}). Even them out, or use --method mean."
        )
    return sets[0], sets[1]


def _shape(tracer) -> tuple[int, int]:
    """(n_blocks, d_model) of an opened hooks or llama-cpp tracer."""
    if tracer.backend == "llama-cpp":
        return tracer.n_blocks, tracer.d_model
    if tracer.backend == "hooks":
        config = tracer.lens.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return tracer.lens.n_blocks, int(getattr(config, "hidden_size", 0) or tracer.lens.parts.unembed.weight.shape[1])
    raise UnsupportedModel(f"Steering runs on the backends {' and '.join(RUNTIMES)}, not '{tracer.backend}'.")


def _model_hint(tracer) -> str:
    if tracer.backend == "llama-cpp":
        return tracer.head.architecture
    config = tracer.lens.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return str(getattr(config, "model_type", "") or type(tracer.lens.model).__name__)


def capture(tracer, texts: Sequence[str], *, progress: Callable[[int], None] | None = None,
            cancel: threading.Event | None = None) -> np.ndarray:
    """The residual stream at the last token of each text, after every block: float32 [texts, n_blocks, d]
    (row L = the output of block L counted from 0, llama.cpp's `l_out-L`). One run a text."""
    n_blocks, d_model = _shape(tracer)
    out = np.empty((len(texts), n_blocks, d_model), np.float32)
    for i, text in enumerate(texts):
        if cancel is not None and cancel.is_set():
            raise SteeringCancelled("Stopped: the vector was not built.")
        ids = tracer.encode(text)
        if not ids:
            raise BadPrompt(f"The example {text[:40]!r} has no tokens.")
        if tracer.context_length and len(ids) > tracer.context_length:
            raise BadPrompt(f"The example {text[:40]!r}… is {len(ids)} tokens, longer than the model's context.")
        hidden, _ = tracer.residuals(ids, True)  # [n_blocks + 1, 1, d]: row 0 the embeddings
        out[i] = hidden[1:, -1].float().cpu().numpy()
        if progress is not None:
            progress(i + 1)
    return out


def _directions(positive: np.ndarray, negative: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(directions [n_blocks, d] float32 with row 0 zero, separation [n_blocks]) from captured
    residuals [texts, n_blocks, d] of each set."""
    pos, neg = positive.astype(np.float64), negative.astype(np.float64)
    mean = pos.mean(0) - neg.mean(0)  # [n_blocks, d]
    if method == "mean":
        directions = mean
    else:
        differences = pos - neg  # paired, [pairs, n_blocks, d]
        directions = np.zeros_like(mean)
        for layer in range(1, mean.shape[0]):
            _, _, vt = np.linalg.svd(differences[:, layer], full_matrices=False)
            component = vt[0]  # unit length; uncentred: the direction the differences share most
            directions[layer] = component * float(component @ mean[layer])  # sign and length from the mean
    directions[0] = 0.0
    separation = np.full(mean.shape[0], np.nan)
    for layer in range(1, mean.shape[0]):
        v = directions[layer]
        if not v.any():
            continue
        p, n = pos[:, layer] @ v, neg[:, layer] @ v
        middle = (p.mean() + n.mean()) / 2
        separation[layer] = (np.sum(p > middle) + np.sum(n < middle)) / (len(p) + len(n))
    return directions.astype(np.float32), separation


def build_with(
    tracer,
    positive: Sequence[str],
    negative: Sequence[str],
    method: str = "mean",
    *,
    top_k: int = TOP_K,
    progress: Callable[[float, str], None] | None = None,
    cancel: threading.Event | None = None,
) -> SteeringVector:
    """A steering vector from example texts with an opened tracer (hooks or llama-cpp,
    `tracing.open_tracer`): each text run once, the residual stream read at its last token.

    method: "mean" (mean difference) or "pca" (first principal component of the paired
    differences; the sets must be the same size). The vector is read through the lens (top_k
    tokens promoted and suppressed per layer). progress(fraction, text) is called after each
    text; setting `cancel` stops (SteeringCancelled). BadPrompt for an empty set.
    """
    positive, negative = _check_examples(positive, negative, method)
    _shape(tracer)  # refuses other backends
    report = progress or (lambda fraction, text: None)
    total = len(positive) + len(negative)
    start = time.perf_counter()
    report(0.0, f"Reading {total} examples…")
    captured = []
    for done_before, texts in ((0, positive), (len(positive), negative)):
        captured.append(capture(
            tracer, texts, cancel=cancel,
            progress=lambda i, base=done_before: report((base + i) / total, f"Read {base + i} of {total} examples…"),
        ))
    capture_seconds = time.perf_counter() - start
    directions, separation = _directions(captured[0], captured[1], method)
    n_blocks, d_model = directions.shape
    vector = SteeringVector(
        model=tracer.model_name,
        model_hint=_model_hint(tracer),
        n_blocks=n_blocks,
        d_model=d_model,
        directions=directions,
        method=method,
        n_positive=len(positive),
        n_negative=len(negative),
        backend=tracer.backend,
        separation=separation,
        info={"read": "last token", "capture_seconds": round(capture_seconds, 3),
              "seconds_per_text": round(capture_seconds / total, 4)},
    )
    read_with(tracer, vector, top_k)
    vector.info["seconds"] = round(time.perf_counter() - start, 3)
    report(1.0, "Done.")
    return vector


def build(
    positive: Sequence[str] | None = None,
    negative: Sequence[str] | None = None,
    model=None,
    backend: str | None = None,
    method: str = "mean",
    *,
    top_k: int = TOP_K,
    progress: Callable[[float, str], None] | None = None,
    cancel: threading.Event | None = None,
    **options,
) -> SteeringVector:
    """A steering vector for `model` from positive and negative texts (None: the worked example,
    love vs hate). backend: "llama-cpp" (default for a GGUF) or "hooks" (default otherwise).
    See `build_with`.

        >>> v = tracing.steering.build(["I love you."], ["I hate you."])
        >>> v.save("love.gguf"); print(v.table())
    """
    if positive is None or negative is None:
        default_positive, default_negative = example()
        positive = default_positive if positive is None else positive
        negative = default_negative if negative is None else negative
    _check_examples(positive, negative, method)  # before a load
    tracer = open_runtime(model, backend, **options)
    return build_with(tracer, positive, negative, method, top_k=top_k, progress=progress, cancel=cancel)


def runtime_name(model=None, backend: str | None = None) -> str:
    """The backend steering runs on: `backend`, else llama-cpp for a GGUF and hooks otherwise."""
    from .api import BACKEND_ALIASES
    from .models import resolve

    if backend is None:
        backend = "llama-cpp" if resolve(model).kind == "gguf" else "hooks"
    name = BACKEND_ALIASES.get(backend, backend)
    if name not in RUNTIMES:
        raise UnsupportedModel(f"Steering runs on the backends {' and '.join(RUNTIMES)}, not '{backend}'.")
    return name


def open_runtime(model=None, backend: str | None = None, **options):
    """The opened tracer steering runs on (see `runtime_name`)."""
    from .api import open_tracer

    name = runtime_name(model, backend)
    if name == "llama-cpp":
        options.pop("device", None)
    return open_tracer(model, name, **options)


# ==================================================================== reading through the lens


def read_with(tracer, vector: SteeringVector, top_k: int = TOP_K) -> SteeringVector:
    """Fill `vector.promoted` / `suppressed`: each layer's direction through the final norm and
    unembedding (as if it were the whole residual stream), minus the same for zero; the top_k
    tokens it raises and lowers most. Returns the vector."""
    import torch

    from .lens import TokenText

    n_blocks, d_model = _shape(tracer)
    check_shape(vector, n_blocks, d_model, tracer.model_name)
    rows = np.vstack([vector.directions[1:], np.zeros((1, d_model), np.float32)])[:, None, :]  # [n_blocks, 1, d]
    hidden = torch.from_numpy(rows)
    if tracer.backend == "hooks":
        parameter = next(tracer.lens.model.parameters())
        hidden = hidden.to(parameter.device, parameter.dtype)
    with tracer.lock(), torch.no_grad():
        logits = tracer.project(hidden)[:, 0].float().cpu()
    change = logits[:-1] - logits[-1:]  # [n_blocks - 1, vocab]
    k = max(1, min(int(top_k), change.shape[-1]))
    up, down = change.topk(k, dim=-1), (-change).topk(k, dim=-1)
    text = TokenText(tracer.decode_one)

    def rows_of(values, ids, sign):
        return [[]] + [[(text(int(i)), sign * float(v)) for v, i in zip(vs, ix)] for vs, ix in zip(values.tolist(), ids.tolist())]

    vector.promoted = rows_of(up.values, up.indices, 1.0)
    vector.suppressed = rows_of(down.values, down.indices, -1.0)
    return vector


def read_vector(vector: SteeringVector, model=None, backend: str | None = None, top_k: int = TOP_K, **options) -> SteeringVector:
    """`read_with` on `model` (opened as `build` opens it): the lens reading of a loaded vector."""
    return read_with(open_runtime(model, backend, **options), vector, top_k)


# ==================================================================== files


def load_vector(path: str | Path, model=None, *, check: bool = True) -> SteeringVector:
    """A control-vector GGUF: ours, llama.cpp's cvector-generator's or repeng's, for `model`
    (None: the bundled SmolLM2-135M-Instruct; read from its header or config, not loaded).

    BadControlVector, in one sentence, for a file that is not a GGUF, a GGUF that is not a control
    vector (e.g. a model), direction tensors llama.cpp would refuse (not float32, not 1-D, layer 0
    or unnumbered, of different lengths), or a vector made for a model of another width or depth
    (unless `check` is False). The lens reading is not computed here (`read_vector`).
    """
    from runtime.ggml import GGUFHeader

    path = Path(path)
    name = path.name
    if not path.is_file():
        raise BadControlVector(f"There is no control-vector file '{path}'.")
    try:
        header = GGUFHeader(path)  # llama.cpp's own parser; milliseconds even for a model file
    except ValueError:
        raise BadControlVector(f"'{name}' is not a GGUF file, so it is not a control vector.") from None
    with header:
        architecture = header.value("general.architecture")
    if architecture != _ARCH:
        what = f"a '{architecture}' model" if architecture else "a GGUF without an architecture"
        raise BadControlVector(
            f"'{name}' is {what}, not a control vector (its general.architecture is not '{_ARCH}'): "
            "pick a file made by `python -m tracing steer-vector` or llama.cpp's cvector-generator."
        )
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # a damaged file: gguf raises ValueError, struct.error, ...
        raise BadControlVector(f"'{name}' is a damaged control-vector file ({exc}).") from None

    def field_value(key):
        part = reader.get_field(key)
        return None if part is None else part.contents()

    directions: dict[int, np.ndarray] = {}
    for tensor in reader.tensors:
        prefix, _, number = tensor.name.partition(".")
        layer = int(number) if prefix == "direction" and number.isdigit() else -1
        problem = None
        if layer < 1:
            problem = f"a tensor '{tensor.name}' that is not direction.L with a layer L >= 1"
        elif tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            problem = f"'{tensor.name}' in {tensor.tensor_type.name}, not float32"
        elif len(tensor.shape) != 1:
            problem = f"'{tensor.name}' of shape {list(tensor.shape)}, not one row of numbers"
        if problem:
            raise BadControlVector(f"'{name}' has {problem}, which llama.cpp would refuse.")
        directions[layer] = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    if not directions:
        raise BadControlVector(f"'{name}' has no direction tensors: it is an empty control vector.")
    widths = {len(v) for v in directions.values()}
    if len(widths) != 1:
        raise BadControlVector(f"'{name}' has directions of different lengths {sorted(widths)}; llama.cpp would refuse it.")
    (d_model,) = widths
    blocks = field_value("lensbench.block_count")
    n_blocks = int(blocks) if blocks else max(directions) + 1
    table = np.zeros((max(n_blocks, max(directions) + 1), d_model), np.float32)
    for layer, values in directions.items():
        table[layer] = values
    method = field_value("lensbench.method") or "file"
    separation = field_value("lensbench.separation")
    if separation is not None and len(separation) == table.shape[0] - 1:
        separation = np.array([np.nan] + [np.nan if x < 0 else x for x in separation])
    else:
        separation = None
    vector = SteeringVector(
        model=str(field_value("lensbench.model") or name),
        model_hint=str(field_value(f"{_ARCH}.model_hint") or "unknown"),
        n_blocks=table.shape[0],
        d_model=d_model,
        directions=table,
        method=str(method) if blocks else "file",
        n_positive=int(field_value("lensbench.n_positive") or 0),
        n_negative=int(field_value("lensbench.n_negative") or 0),
        separation=separation,
        source=str(path),
    )
    if check:
        n_layers, width, model_name = _model_shape(model)
        check_shape(vector, n_layers, width, model_name)  # pads a file made elsewhere to the model's depth
    return vector


def _model_shape(model) -> tuple[int, int, str]:
    """(blocks, width, name) of a model from its GGUF header or config, without loading it."""
    from .models import resolve

    source = resolve(model)
    if source.kind == "gguf":
        from runtime.llama_cpp import gguf_facts

        facts = gguf_facts(source.path)
        return int(facts.n_layers or 0), int(facts.n_embd or 0), source.name
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(source.location))
    except Exception as exc:
        raise ModelNotFound(f"Could not read the configuration of '{source.name}' ({exc}).") from None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.num_hidden_layers), int(config.hidden_size), source.name


# ==================================================================== generating with a vector


@dataclass
class SteeredReply:
    """One answer written with a vector applied."""

    strength: float
    text: str
    finish_reason: str | None  # "stop", "length", "cancelled"
    seed: int
    seconds: float
    layers: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        return {"strength": self.strength, "text": self.text, "finish_reason": self.finish_reason,
                "seed": self.seed, "seconds": round(self.seconds, 3),
                "layers": list(self.layers) if self.layers else None}


def _messages(prompt_or_messages) -> list[dict]:
    if isinstance(prompt_or_messages, str):
        return [{"role": "user", "content": prompt_or_messages}]
    return list(prompt_or_messages or [])


def generate(
    prompt_or_messages,
    steering=None,
    model=None,
    backend: str | None = None,
    *,
    system: str | None = None,
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_tokens: int = 128,
    seed: int = 0,
    cancel: threading.Event | None = None,
    **options,
) -> SteeredReply:
    """One chat answer with `steering` applied (a Steering, (vector, strength[, layers]), or None).

    On a GGUF (llama-cpp): `runtime.chat.stream_chat` with llama.cpp's control vector on the shared
    model's context. On PyTorch (hooks): transformers' `generate` with the chat template, the hooks
    adding the vector, sampling seeded by `seed`. Strength 0 gives exactly the unsteered answer.
    """
    steering = as_steering(steering) if steering is not None else None
    messages = _messages(prompt_or_messages)
    start = time.perf_counter()
    if runtime_name(model, backend) == "llama-cpp":
        from runtime.chat import stream_chat

        options.pop("device", None)  # llama.cpp places the layers itself

        stream = stream_chat(model, messages, system=system, temperature=temperature, top_p=top_p,
                             max_tokens=max_tokens, seed=seed, cancel=cancel, steering=steering, **options)
        text = "".join(stream)
        finish = stream.finish_reason
    else:
        tracer = open_runtime(model, "hooks", **options)
        text, finish = _generate_torch(tracer, messages, system, steering, temperature, top_p, max_tokens, seed, cancel)
    return SteeredReply(steering.strength if steering else 0.0, text, finish, int(seed),
                        time.perf_counter() - start, steering.layers if steering else None)


def _generate_torch(tracer, messages, system, steering, temperature, top_p, max_tokens, seed, cancel):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from runtime.chat import check_settings, normalize_messages

    check_settings(temperature, top_p, max_tokens, seed)
    conversation = ([{"role": "system", "content": system}] if system and system.strip() else []) + normalize_messages(messages)
    loaded = tracer.loaded
    tokenizer, model = loaded.tokenizer, tracer.lens.model
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    else:  # a base model: the text itself
        ids = tracer.encode("\n\n".join(m["content"] for m in conversation))
    input_ids = torch.tensor([list(ids)], device=loaded.device)

    class Stop(StoppingCriteria):
        def __call__(self, *_args, **_kwargs):
            return bool(cancel is not None and cancel.is_set())

    options = dict(max_new_tokens=int(max_tokens), do_sample=temperature > 0, stopping_criteria=StoppingCriteriaList([Stop()]),
                   pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                   attention_mask=torch.ones_like(input_ids))
    if temperature > 0:
        options.update(temperature=float(temperature), top_p=float(top_p))
    steered = applied(tracer, steering) if steering is not None else contextlib.nullcontext()
    with tracer.lock(), steered, torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        out = model.generate(input_ids, **options)[0, input_ids.shape[1]:]
    new = out.tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()
    finished = bool(new) and new[-1] in eos
    text = tokenizer.decode([t for t in new if t not in eos], skip_special_tokens=True)
    if cancel is not None and cancel.is_set():
        return text, "cancelled"
    return text, "stop" if finished or len(new) < max_tokens else "length"


def sweep(
    prompt_or_messages,
    vector: SteeringVector,
    strengths: Sequence[float],
    layers=None,
    model=None,
    backend: str | None = None,
    *,
    seed: int = 0,
    progress: Callable[[float, str], None] | None = None,
    cancel: threading.Event | None = None,
    **options,
) -> list[SteeredReply]:
    """The same prompt and seed answered at each strength, in order: where the concept shows, and
    where the text comes apart. Options as `generate` (system, temperature, top_p, max_tokens)."""
    strengths = parse_strengths(strengths)
    steerings = [Steering.of(vector, s, layers) for s in strengths]  # every setting checked first
    report = progress or (lambda fraction, text: None)
    replies = []
    for i, steering in enumerate(steerings):
        if cancel is not None and cancel.is_set():
            raise SteeringCancelled("Stopped: the sweep was not finished.")
        report(i / len(steerings), f"Answering at strength {steering.strength:g} ({i + 1} of {len(steerings)})…")
        replies.append(generate(prompt_or_messages, steering, model, backend, seed=seed, cancel=cancel, **options))
    report(1.0, "Done.")
    return replies


def parse_strengths(strengths) -> list[float]:
    """[float] from "-0.4,0,0.4" or a sequence; BadSetting when empty or not numbers."""
    if isinstance(strengths, str):
        strengths = [s for s in strengths.replace(";", ",").split(",") if s.strip()]
    try:
        values = [float(s) for s in strengths]
    except (TypeError, ValueError):
        raise BadSetting(f"Strengths are numbers separated by commas, e.g. -0.4,0,0.4 (got {strengths!r}).") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise BadSetting(f"Strengths are numbers separated by commas, e.g. -0.4,0,0.4 (got {strengths!r}).")
    return values


# ==================================================================== command line


def run_steer_vector(argv: list[str]) -> int:
    """`python -m tracing steer-vector [--positive FILE --negative FILE] [--method mean|pca] --out V.gguf`:
    builds, prints the per-layer lens reading (or with --json `SteeringVector.to_dict()`), saves."""
    import argparse
    import sys

    from .__main__ import print_result
    from .models import ignoring_memory_check, print_memory_warnings

    parser = argparse.ArgumentParser(
        prog="python -m tracing steer-vector",
        description="Build a steering (control) vector from positive and negative example texts, show what each "
                    "layer's direction means through the lens, and save it as a llama.cpp control-vector GGUF.",
    )
    parser.add_argument("--model", default=None, help="a file or folder in models/, or a path (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--positive", default=None, help="texts showing the concept, one a line (default: the love-hate example)")
    parser.add_argument("--negative", default=None, help="texts showing its opposite, one a line (default: the love-hate example)")
    parser.add_argument("--method", default="mean", choices=METHODS, help="mean difference, or PCA of the paired differences (default: mean)")
    parser.add_argument("--out", default="control_vector.gguf", help="the control-vector GGUF to write (default: control_vector.gguf)")
    parser.add_argument("--backend", default=None, help="llama-cpp (default for a GGUF) or hooks (PyTorch)")
    parser.add_argument("--top-k", type=int, default=TOP_K, help=f"tokens shown per layer (default: {TOP_K})")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (hooks; default: the best available)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--ignore-memory-check", action="store_true",
                        help="load the model even if it looks bigger than this machine's memory")
    args = parser.parse_args(argv)
    if (args.positive is None) != (args.negative is None):
        raise BadPrompt("Give both --positive and --negative, or neither (the love-hate example).")
    if args.positive is None:
        positive, negative = example()
    else:
        positive, negative = read_examples(args.positive), read_examples(args.negative)
    if not Path(args.out).suffix.lower() == ".gguf":
        raise BadSetting(f"--out names a .gguf file (got '{args.out}').")
    options = {"device": args.device} if args.device else {}
    print_memory_warnings()
    with ignoring_memory_check(args.ignore_memory_check):
        vector = build(positive, negative, model=args.model, backend=args.backend, method=args.method,
                       top_k=args.top_k, **options)
    path = vector.save(args.out)
    vector.source = str(path)
    print_result(vector, args.json)
    print(f"Saved {path} ({len(vector.layers)} layers x {vector.d_model}; built in {vector.info['seconds']:.1f} s). "
          f"Chat with it: python -m chat --control-vector {path} --strength 0.2 --layers "
          f"{max(1, vector.n_blocks // 4)}-{max(1, 2 * vector.n_blocks // 3)}", file=sys.stderr)
    return 0


__all__ = [
    "SteeringVector",
    "Steering",
    "SteeredReply",
    "SteeringCancelled",
    "build",
    "build_with",
    "capture",
    "read_with",
    "read_vector",
    "load_vector",
    "applied",
    "generate",
    "sweep",
    "example",
    "read_examples",
    "parse_layers",
    "parse_strengths",
    "run_steer_vector",
]
