"""Learned lenses as files, checked against a model and applied to residual rows on any runtime.

Two kinds, each in the format its reference implementation writes, so published lenses load here
and lenses fitted here load there:

- **tuned** (Belrose et al. 2023): one affine translator per row but the output,
  h -> h + W h + b, in tuned-lens's folder format (config.json + params.pt).
- **jacobian** (Gurnee et al. 2026): one d_model x d_model matrix J per block output (block l's
  output -> the last block's output, pre final norm), TransformerLens's `JacobianLens` in the
  reference artifact format (one .pt file; `lens.pt` inside a folder). The logit lens is J = I,
  which is also what the embeddings row and any block without a matrix get.

Both only move residual rows; the final norm and unembedding stay the runtime's own (PyTorch's
modules, or the GGUF's norm and quantized unembedding through ggml). So `translate_rows` is all
a runtime needs, and `LearnedLensTracer` puts it on any tracer (the llama.cpp one).

A lens made for another model is refused with a message naming both: a different width or layer
count, or (J-lens) an unembedding that does not correlate with this model's (`fingerprint`:
a few rows of the unembedding, robust to quantization, that tell two models apart).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import BadModelFile, ModelNotFound, UnsupportedModel

LENS_KINDS = ("logit", "tuned", "jacobian")
JACOBIAN_FILE = "lens.pt"  # the name JacobianLens.from_pretrained looks for in a folder
TUNED_FILES = ("config.json", "params.pt")
# Unembedding rows sampled for the fingerprint, and columns of each (whole Q4/Q8 blocks).
_FINGERPRINT_ROWS, _FINGERPRINT_COLS = 16, 64
# Below this correlation the lens was fitted on another model's unembedding. Quantizing to
# Q4_1 keeps SmolLM2's at 0.99; two unrelated models give ~0.
_FINGERPRINT_MIN_CORRELATION = 0.9


@dataclass(frozen=True)
class ModelShape:
    """What a learned lens must agree with: the model's name (for messages), width, number of
    blocks, and its unembedding's fingerprint (None when unknown)."""

    name: str
    d_model: int
    n_blocks: int
    vocab_size: int | None = None
    fingerprint: list[float] | None = None

    def describe(self) -> str:
        return f"{self.name} ({self.n_blocks} layers of width {self.d_model})"


def fingerprint_rows(vocab_size: int) -> list[int]:
    """The unembedding rows the fingerprint reads (spread over the vocabulary)."""
    return [int(i) for i in np.linspace(0, vocab_size - 1, _FINGERPRINT_ROWS)]


def fingerprint(rows: Callable[[list[int]], np.ndarray], vocab_size: int) -> list[float]:
    """A few values of the unembedding ([rows, d] read by `rows(ids)`), enough to tell models apart."""
    values = np.asarray(rows(fingerprint_rows(vocab_size)), dtype=np.float64)[:, :_FINGERPRINT_COLS]
    return [round(float(v), 5) for v in values.reshape(-1)]


def _correlation(a: Sequence[float], b: Sequence[float]) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


# ---------------------------------------------------------------- files


def jacobian_file(path: str | Path) -> Path:
    """The .pt file of a J-lens given as the file itself or a folder holding `lens.pt`."""
    path = Path(path).expanduser()
    file = path / JACOBIAN_FILE if path.is_dir() else path
    if not file.is_file():
        raise ModelNotFound(
            f"No Jacobian lens at '{path}': a J-lens is a .pt file (TransformerLens's JacobianLens format), "
            f"or a folder holding {JACOBIAN_FILE}. Fit one with 'python -m tracing fit-lens --kind jacobian'."
        )
    return file


def load_jacobian(path: str | Path):
    """TransformerLens's `JacobianLens` from a file or folder; BadModelFile when it is not one."""
    from transformer_lens.tools.analysis import JacobianLens

    file = jacobian_file(path)
    try:
        lens = JacobianLens.load(str(file))
    except Exception as exc:  # unpickling refused, no 'J' key, truncated
        raise BadModelFile(f"Could not read the Jacobian lens '{file}': {type(exc).__name__}: {exc}") from None
    lens.path = file
    return lens


def _jacobian_fitted_for(lens) -> str:
    meta = lens.metadata
    n_blocks = meta.get("lensbench_n_blocks") or (max(lens.source_layers) + 2)
    what = f"{n_blocks} layers" if meta.get("lensbench_n_blocks") else f"at least {n_blocks} layers"
    return f"{meta.get('model_name') or 'another model'} ({what} of width {lens.d_model})"


def check_jacobian(lens, model: ModelShape) -> None:
    """Refuse a J-lens fitted for another model (width, layer count, unembedding), naming both."""
    where = getattr(lens, "path", "this file")
    recorded = lens.metadata.get("lensbench_n_blocks")
    wrong_shape = (
        lens.d_model != model.d_model
        or (recorded is not None and int(recorded) != model.n_blocks)
        or max(lens.source_layers) > model.n_blocks - 2
        or min(lens.source_layers) < 0
    )
    if wrong_shape:
        raise BadModelFile(
            f"The Jacobian lens in '{where}' was fitted for {_jacobian_fitted_for(lens)}; "
            f"{model.describe()} is another shape, so the lens cannot apply to it."
        )
    theirs = lens.metadata.get("lensbench_unembedding_fingerprint")
    if theirs is not None and model.fingerprint is not None:
        correlation = _correlation(theirs, model.fingerprint)
        if correlation < _FINGERPRINT_MIN_CORRELATION:
            raise BadModelFile(
                f"The Jacobian lens in '{where}' was fitted for {lens.metadata.get('model_name') or 'another model'}, "
                f"whose unembedding is not {model.name}'s (correlation {correlation:.2f}): it would read "
                "this model's layers in another model's vocabulary. Fit one for this model."
            )


@dataclass
class Translators:
    """A tuned lens's translators as plain tensors: row i -> h + h W_i^T + b_i."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    config: dict
    path: Path

    def __len__(self) -> int:
        return len(self.weights)

    def apply(self, h: torch.Tensor, i: int) -> torch.Tensor:
        h = h.float()
        return h + h @ self.weights[i].T + self.biases[i]


def load_translators(folder: str | Path, model: ModelShape) -> Translators:
    """A tuned lens folder (tuned-lens's format) for `model`, without any PyTorch model."""
    folder = Path(folder).expanduser()
    missing = [f for f in TUNED_FILES if not (folder / f).is_file()]
    if missing:
        raise ModelNotFound(
            f"No tuned lens in '{folder}': {' and '.join(missing)} missing. A tuned lens is a folder with "
            "config.json and params.pt (tuned-lens's format); train one with "
            "'python -m tracing fit-lens --kind tuned'."
        )
    try:
        config = json.loads((folder / "config.json").read_text())
        shape = (int(config["num_hidden_layers"]), int(config["d_model"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadModelFile(f"'{folder / 'config.json'}' is not a tuned-lens config: {exc}") from None
    if shape != (model.n_blocks, model.d_model):
        raise BadModelFile(
            f"The tuned lens in '{folder}' was trained for "
            f"{config.get('base_model_name_or_path') or 'another model'} ({shape[0]} layers of width {shape[1]}); "
            f"{model.describe()} is another shape, so the lens cannot apply to it."
        )
    try:
        state = torch.load(folder / "params.pt", map_location="cpu", weights_only=True)
        weights = [state[f"{i}.weight"].float() for i in range(shape[0])]
        biases = [state[f"{i}.bias"].float() if f"{i}.bias" in state else torch.zeros(shape[1]) for i in range(shape[0])]
    except Exception as exc:
        raise BadModelFile(f"Could not read the tuned lens in '{folder}': {type(exc).__name__}: {exc}") from None
    if any(w.shape != (shape[1], shape[1]) for w in weights):
        raise BadModelFile(f"The tuned lens in '{folder}' holds translators of the wrong size for width {shape[1]}.")
    return Translators(weights, biases, config, folder)


# ---------------------------------------------------------------- applying


def translate_rows(lens, hidden: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Residual rows [N+1, positions, d] (embeddings, block outputs; the last is the output) moved
    into the output's basis by `lens` (`Translators`, a `JacobianLens`, or None for the logit
    lens), and which lens made each of the first N rows."""
    n = hidden.shape[0] - 1
    if lens is None:
        return hidden, ["logit"] * n
    rows, kinds = [], []
    with torch.no_grad():
        for r in range(n):
            if isinstance(lens, Translators):
                rows.append(lens.apply(hidden[r], r).to(hidden.dtype))
                kinds.append("tuned")
            elif r >= 1 and (r - 1) in lens.jacobians:  # row r is block r - 1's output
                rows.append(lens.transport(hidden[r], r - 1).to(hidden.dtype))
                kinds.append("jacobian")
            else:  # the embeddings, or a block the lens has no matrix for: J = I
                rows.append(hidden[r])
                kinds.append("logit")
    return torch.stack(rows + [hidden[n]]), kinds


def load_lens(kind: str, path: str | Path | None, model: ModelShape):
    """The lens of `kind` at `path`, checked against `model` (None for the logit lens)."""
    if kind not in LENS_KINDS:
        raise UnsupportedModel(f"Unknown lens kind '{kind}'. Choose one of: {', '.join(LENS_KINDS)}.")
    if kind == "logit":
        if path:
            raise UnsupportedModel("A lens file needs a lens kind: --lens-kind tuned or --lens-kind jacobian.")
        return None
    if not path:
        raise ModelNotFound(
            f"There is no {kind} lens for {model.name} yet: fit one with "
            f"'python -m tracing fit-lens --kind {kind}', then give its folder with --lens DIR."
        )
    if kind == "tuned":
        return load_translators(path, model)
    lens = load_jacobian(path)
    check_jacobian(lens, model)
    return lens


class LearnedLensTracer:
    """Any tracer, with its residual rows translated by a learned lens before its own projection
    (how the llama.cpp backend reads tuned and Jacobian lenses)."""

    def __init__(self, inner, lens, kind: str):
        self.inner = inner
        self.lens = lens
        self.kind = kind
        self.info = {**getattr(inner, "info", {}), "lens_file": str(getattr(lens, "path", ""))}

    def __getattr__(self, name):  # encode, decode_one, project, lock, vocab_size, ... are the runtime's
        return getattr(self.inner, name)

    def __setattr__(self, name, value):  # e.g. steering's control_vector: set on the runtime's tracer
        if name in ("inner", "lens", "kind", "info"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def residuals(self, ids: list[int], last_only: bool, positions=None) -> tuple[torch.Tensor, list[str]]:
        hidden, _ = self.inner.residuals(ids, last_only, positions=positions)
        return translate_rows(self.lens, hidden)


# ---------------------------------------------------------------- writing


def written_atomically(out: str | Path):
    """A context manager yielding an empty temporary folder beside `out`; on a clean exit it
    becomes `out` (replacing any earlier one), on any error or interruption it is removed. A
    stopped fit therefore leaves the old lens, or nothing, never half a lens."""
    import contextlib
    import os
    import shutil
    import tempfile

    @contextlib.contextmanager
    def writing():
        target = Path(out).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            yield tmp
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                target.rename(old)
            tmp.rename(target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    return writing()


def stop_if(cancel, what: str) -> None:
    """Raise FitStopped when `cancel` (a threading.Event, or None) is set."""
    if cancel is not None and cancel.is_set():
        from .errors import FitStopped

        raise FitStopped(f"The {what} was stopped; nothing was saved.")


# ---------------------------------------------------------------- on the GGUF


def dequantize_rows(matrix, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a ggml `QuantizedMatrix` as float32 [stop - start, cols] (gguf-py's
    dequantization of the file's own bytes: nothing else of the matrix is touched)."""
    from runtime.ggml import GGML_TYPE_F16, GGML_TYPE_F32

    size = matrix.data.nbytes // matrix.rows
    raw = np.asarray(matrix.data[start * size : stop * size])
    if matrix.type == GGML_TYPE_F32:
        return raw.view(np.float32).reshape(stop - start, -1)
    if matrix.type == GGML_TYPE_F16:
        return raw.view(np.float16).astype(np.float32).reshape(stop - start, -1)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(raw.reshape(stop - start, size), GGMLQuantizationType(matrix.type)).astype(np.float32)


def gguf_shape(tracer) -> ModelShape:
    """The llama.cpp tracer's width, block count and unembedding fingerprint."""
    unembed = tracer.head.unembed
    return ModelShape(
        name=tracer.model_name,
        d_model=tracer.d_model,
        n_blocks=tracer.n_blocks,
        vocab_size=unembed.rows,
        fingerprint=fingerprint(lambda ids: np.stack([dequantize_rows(unembed, i, i + 1)[0] for i in ids]), unembed.rows),
    )


def infer_kind(path: str | Path) -> str:
    """A tuned lens is a folder with params.pt; a J-lens is a .pt file or a folder with lens.pt."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "params.pt").is_file():
        return "tuned"
    return "jacobian"


_ON_GGUF: dict[tuple, LearnedLensTracer] = {}


def on_llama_cpp(tracer, kind: str, path) -> LearnedLensTracer:
    """The llama.cpp `tracer` reading a tuned or Jacobian lens (loaded once per file version)."""
    if kind == "logit" and path:
        kind = infer_kind(path)
    if kind == "logit":
        return tracer
    file = Path(path).expanduser() if path else None
    stamp = max((f.stat().st_mtime_ns for f in ([file] + list(file.glob("*"))) if f.exists()), default=0) if file else 0
    key = (id(tracer), kind, str(file.resolve()) if file else None, stamp)
    wrapped = _ON_GGUF.get(key)
    if wrapped is None:
        lens = load_lens(kind, path, gguf_shape(tracer))
        wrapped = _ON_GGUF[key] = LearnedLensTracer(tracer, lens, kind)
    return wrapped
