"""`trace`: one prompt in, a LensResult out, whichever backend computes it.

Every backend implements the small `Tracer` protocol below (tokenize, capture residual rows,
project rows to logits). Validation of the prompt and the target, and all the lens math,
happen here and in `lens.py`, once for every backend.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Protocol

import torch

from .errors import BadPrompt, BadTarget, LensbenchError, UnsupportedModel
from .lens import LensResult, build_result

MAX_TOP_K = 100


class Tracer(Protocol):
    """What a backend provides for one loaded model."""

    backend: str
    model_name: str
    context_length: int | None

    def encode(self, text: str) -> list[int]:
        """Prompt token ids, with the special tokens the model expects at the start."""

    def encode_target(self, text: str) -> list[int]:
        """Token ids of a bare string (no special tokens)."""

    def decode_one(self, token_id: int) -> str:
        """The text of one token."""

    def residuals(self, ids: list[int], last_only: bool) -> tuple[torch.Tensor, list[str]]:
        """Residual rows [N+1, positions, d] to project, and which lens made each of the first N rows."""

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Rows [r, positions, d] -> logits [r, positions, vocab].

        A tracer may also have `vocab_size` (the width of those logits): then every row is
        projected in one matmul when the logits fit, instead of the output row on its own first.
        """

    def lock(self):
        """A context manager serializing use of the underlying model."""


# Backend name -> "module:function" opening a Tracer for a model spec. Imported only when
# used, so each backend pulls in its own heavy library only when chosen.
BACKENDS: dict[str, str] = {
    "hooks": "tracing.hooks:open_tracer",
    "transformer-lens": "tracing.transformer_lens_backend:open_tracer",
    "tuned-lens": "tracing.tuned_lens_backend:open_tracer",
    "tuned-lens-tuned": "tracing.tuned_lens_backend:open_tuned_tracer",
    "jacobian-lens": "tracing.jacobian_lens_backend:open_tracer",
    "llama-cpp": "tracing.llama_cpp_backend:open_tracer",
    "nnsight": "tracing.nnsight_backend:open_tracer",
}


def _opener(name: str) -> Callable[..., Tracer]:
    import importlib

    module, function = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), function)


BACKEND_ALIASES = {"pytorch": "hooks", "torch": "hooks"}


def backend_names() -> list[str]:
    return list(BACKENDS)


def open_tracer(model=None, backend: str = "hooks", **options) -> Tracer:
    """Load (or reuse) `model` for `backend`."""
    name = BACKEND_ALIASES.get(backend, backend)
    if name not in BACKENDS:
        raise UnsupportedModel(f"Unknown backend '{backend}'. Choose one of: {', '.join(BACKENDS)}.")
    return _opener(name)(model, **options)


def resolve_target(tracer: Tracer, target: str) -> tuple[str, int]:
    """A target string must be exactly one token; say how it tokenizes when it is not, and offer
    a one-token target instead (`BadTarget.suggestion`)."""
    if target is None or target == "":
        raise BadTarget("The target token is empty.")
    ids = tracer.encode_target(target)
    if len(ids) == 1:
        return target, ids[0]
    if not ids:
        raise BadTarget(f"The target {target!r} is not a token of this model's vocabulary.")
    pieces = " + ".join(repr(tracer.decode_one(i)) for i in ids)
    problem = f"The target {target!r} is {len(ids)} tokens for this model ({pieces}), not one."
    if not target[0].isspace():
        spaced = tracer.encode_target(" " + target)
        if len(spaced) == 1:
            raise BadTarget(f"{problem} With a leading space, {' ' + target!r} is one token: use that.",
                            suggestion=" " + target)
        ids = spaced  # mid-sentence a word comes with its space: its first piece is what the model writes first
    first = tracer.decode_one(ids[0])
    if "\ufffd" in first or not first.strip():  # a piece of a character, or a bare space: no help
        raise BadTarget(f"{problem} Pick one whole word the model might write next.")
    raise BadTarget(f"{problem} The lens follows one token: try the word's first piece, {first!r}, "
                    "which the model writes first.", suggestion=first)


def other_spelling(tracer: Tracer, target: str) -> tuple[str, int] | None:
    """The target with its leading space added or removed ("Paris" <-> " Paris") when that is one
    token too: the result says so when the model finds that spelling likelier."""
    other = target[1:] if target.startswith(" ") else " " + target
    if not other.strip():
        return None
    ids = tracer.encode_target(other)
    return (other, ids[0]) if len(ids) == 1 else None


def _residuals_at(tracer: Tracer, ids: list[int], positions: list[int]) -> tuple[torch.Tensor, list[str]]:
    """Residual rows at `positions` only: the tracer's own selection when it takes one (llama.cpp
    computes no other position), else every position's rows, then those."""
    import inspect

    if "positions" in inspect.signature(tracer.residuals).parameters:
        return tracer.residuals(ids, False, positions=positions)
    hidden, kinds = tracer.residuals(ids, False)
    return hidden[:, list(positions)], kinds


def trace_with(
    tracer: Tracer,
    prompt: str,
    *,
    top_k: int = 5,
    temperature: float = 1.0,
    target: str | None = None,
    last_only: bool = False,
    ids: list[int] | None = None,
    positions: list[int] | None = None,
    info: dict | None = None,
    steering=None,
) -> LensResult:
    """Trace `prompt` (or ready token `ids`) with an opened tracer.

    positions: trace only these positions (e.g. a chat reply's); default all, or the last with
    `last_only`.
    info: facts to keep in `result.info`.
    steering: trace with a steering vector applied (`tracing.steering.Steering`, or (vector,
    strength[, layers])), on the hooks and llama-cpp backends.
    """
    if not 1 <= int(top_k) <= MAX_TOP_K:
        raise BadPrompt(f"top-k must be between 1 and {MAX_TOP_K} (got {top_k}).")
    if not temperature or temperature <= 0:
        raise BadPrompt(f"The temperature must be above 0 (got {temperature}).")
    if ids is None:
        if prompt is None or not prompt.strip():
            raise BadPrompt("The prompt is empty: type some text to trace.")
        ids = tracer.encode(prompt)
    if not ids:
        raise BadPrompt("The prompt has no tokens.")
    if tracer.context_length and len(ids) > tracer.context_length:
        raise BadPrompt(
            f"The prompt is {len(ids)} tokens, longer than this model's context of "
            f"{tracer.context_length} tokens. Shorten it."
        )
    target_pair = resolve_target(tracer, target) if target else None
    alternative = other_spelling(tracer, target_pair[0]) if target_pair else None
    info = {**getattr(tracer, "info", {}), **(info or {})}  # e.g. the weights' dtype and why
    steered = contextlib.nullcontext()
    if steering is not None:
        from .steering import applied, as_steering

        steering = as_steering(steering)
        steered = applied(tracer, steering)
        info["steering"] = steering.describe()
    start = time.perf_counter()
    with tracer.lock(), steered:
        try:
            stats = None
            if hasattr(tracer, "statistics"):  # computed where the model runs (nnsight: maybe on NDIF)
                if positions is None:
                    positions = [len(ids) - 1] if last_only else list(range(len(ids)))
                hidden = None
                stats, kinds = tracer.statistics(
                    ids, list(positions), top_k=int(top_k), temperature=float(temperature),
                    target_id=target_pair[1] if target_pair else None,
                    alternative_id=alternative[1] if alternative else None)
            elif positions is None:
                hidden, kinds = tracer.residuals(ids, last_only)
                positions = [len(ids) - 1] if last_only else list(range(len(ids)))
            else:
                hidden, kinds = _residuals_at(tracer, ids, positions)
            result = build_result(
                hidden,
                tracer.project,
                model=tracer.model_name,
                backend=tracer.backend,
                token_ids=ids,
                positions=positions,
                decode_one=tracer.decode_one,
                lens_kinds=kinds,
                top_k=int(top_k),
                temperature=float(temperature),
                target=target_pair,
                alternative=alternative,
                info=info,
                vocab_size=getattr(tracer, "vocab_size", None),
                stats=stats,
            )
        except torch.OutOfMemoryError:
            from .errors import NotEnoughMemory

            raise NotEnoughMemory(
                f"Ran out of memory tracing {len(ids)} tokens. Shorten the prompt or trace the last position only."
            ) from None
    result.info["seconds"] = round(time.perf_counter() - start, 4)
    return result


def trace(
    prompt: str,
    model=None,
    backend: str = "hooks",
    top_k: int = 5,
    temperature: float = 1.0,
    target: str | None = None,
    last_only: bool = False,
    steering=None,
    **options,
) -> LensResult:
    """Per-layer next-token predictions for `prompt`.

    model: None for the bundled SmolLM2-135M-Instruct, a file or folder in models/, a path, or a hub id.
    backend: "hooks" (PyTorch forward hooks on any transformers decoder); others as installed.
    top_k: tokens kept per cell. temperature: divides the logits before the softmax.
    target: a token (e.g. " Berlin") whose probability and rank are followed through the layers.
    last_only: trace only the last position (for long prompts).
    steering: trace with a steering vector added (`tracing.steering.Steering`, or a tuple
        (vector, strength[, layers])); hooks and llama-cpp backends.
    options: backend options, e.g. device="cpu".
    """
    if prompt is None or not str(prompt).strip():
        raise BadPrompt("The prompt is empty: type some text to trace.")
    tracer = open_tracer(model, backend, **options)
    return trace_with(
        tracer, prompt, top_k=top_k, temperature=temperature, target=target, last_only=last_only, steering=steering
    )


__all__ = ["trace", "trace_with", "open_tracer", "backend_names", "LensbenchError", "Tracer"]
