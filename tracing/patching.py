"""Activation patching: where in the model an answer is decided, on PyTorch and on the GGUF itself.

Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"), with the
metrics and normalization of Zhang & Nanda 2023 ("Towards Best Practices of Activation
Patching"). Two prompts of the same length in tokens: a clean one ("The capital of Germany is")
and a corrupted one ("The capital of France is"). For every row of the residual stream (row 0 =
the embeddings, row i = after block i, the lens's rows) and every position, the corrupted prompt
is run again with that one vector replaced by the clean run's, and the effect on the answer is
normalized: (patched - corrupted) / (clean - corrupted), 1 = the clean answer fully restored,
0 = no effect. The same per block for the attention output and the MLP output (what each adds
to the residual stream), where the runtime can find them.

The technique is written once, here (`patch_with`): validation, which cells to run, the metric,
the result. A runtime only says how to capture the clean run's vectors and how to run cells of
the corrupted prompt with vectors written back:
- `TorchRuntime`: forward hooks on the blocks the hooks backend found (no table of model types);
  many cells batched into one forward (batch dimension = cells), each starting from the
  corrupted run's KV cache at the patched position.
- `LlamaCppRuntime`: llama.cpp's eval callback writing rows of graph nodes (`l_out-{i}`, the
  embeddings, the attention and MLP outputs found from the graph's structure) on the quantized
  GGUF; many cells in one decode as separate sequences sharing the corrupted prefix's KV cache.

Cells whose effect is exactly 0 by construction are not run (skip_identical): positions before
the first differing token (nothing there differs), the embeddings row where the tokens agree,
and the last block's outputs at any position but the last (they only feed that position's own
logits).
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from .errors import BadPrompt, BadTarget, LensbenchError, UnsupportedModel
from .lens import TokenText, row_labels
from runtime.llama_cpp import GraphContext
from .sublayers import _first_tensor, _replace_first, _Site, find_graph_sublayers, find_sublayers

RESID, ATTN, MLP = "resid", "attn", "mlp"
TOP_K = 5  # answers shown for the clean and corrupted runs
PATCHED_K = 3  # answers kept for every patched run (the heatmap's hover)
# Cells in one PyTorch forward / one llama.cpp decode, and tokens per llama.cpp decode.
_TORCH_CELLS_PER_FORWARD = 64
_TORCH_TOKENS_PER_FORWARD = 1024
_LLAMA_SEQUENCES = 64
_LLAMA_TOKENS_PER_DECODE = 512
# A difference between the clean and corrupted metric below this leaves the effect undefined.
_MIN_DIFFERENCE = 1e-6


class PatchCancelled(LensbenchError):
    """The visitor pressed Stop while the grid was running."""


@dataclass(frozen=True)
class Cell:
    """One patched run: the clean vector of `site` ("resid", "attn", "mlp") at `row` and `position`.

    Rows: for "resid", 0 = embeddings and i = after block i; for "attn"/"mlp", i = block i (1-based).
    """

    site: str
    row: int
    position: int


@dataclass
class PatchResult:
    """An activation-patching grid for one clean/corrupted pair of prompts.

    Rows are the lens's rows (row 0 = embeddings, row i = residual stream after block i); columns
    are every prompt position. `effect` is (patched - corrupted) / (clean - corrupted) of `metric`
    at the last position: 1 = restores the clean answer, 0 = no effect.
    """

    model: str
    backend: str
    clean_tokens: list[str]
    corrupt_tokens: list[str]
    clean_ids: list[int]
    corrupt_ids: list[int]
    layers: list[str]  # row labels, as the lens's
    positions: list[int]
    metric: str  # e.g. "p(' Berlin')" or "logit(' Berlin') - logit(' Paris')"
    target: str
    contrast: str | None
    clean_value: float
    corrupt_value: float
    effect: np.ndarray  # [rows, positions]
    patched_value: np.ndarray  # [rows, positions], the metric itself
    patched_top1: list[list[str]]  # [rows][positions], the patched run's top-1 token
    patched_top1_prob: np.ndarray  # [rows, positions]
    patched_topk: list[list[list[tuple[str, float]]]]  # [rows][positions][k]: (token, probability)
    clean_top: list[tuple[str, float]]  # the clean run's top-k answers (token, probability)
    corrupt_top: list[tuple[str, float]]
    attn_effect: np.ndarray | None = None  # [blocks, positions]; None when not computed
    mlp_effect: np.ndarray | None = None
    attn_top1: list[list[str]] | None = None
    mlp_top1: list[list[str]] | None = None
    attn_topk: list[list[list[tuple[str, float]]]] | None = None  # [blocks][positions][k]
    mlp_topk: list[list[list[tuple[str, float]]]] | None = None
    sublayer_note: str | None = None  # why there are no sublayer grids, when there are none
    info: dict = field(default_factory=dict)  # cells run and skipped, seconds

    @property
    def n_rows(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict:
        """The CLI's `--json`: clean_tokens, corrupt_tokens, layers, positions, metric, clean_value,
        corrupt_value, effect [rows][positions], and attn_effect / mlp_effect [blocks][positions]
        when computed."""
        out = {
            "clean_tokens": self.clean_tokens,
            "corrupt_tokens": self.corrupt_tokens,
            "layers": self.layers,
            "positions": [int(p) for p in self.positions],
            "metric": self.metric,
            "clean_value": float(self.clean_value),
            "corrupt_value": float(self.corrupt_value),
            "effect": self.effect.tolist(),
        }
        if self.attn_effect is not None:
            out["attn_effect"] = self.attn_effect.tolist()
            out["mlp_effect"] = self.mlp_effect.tolist()
        return out

    def table(self) -> str:
        """The residual grid as text: one line a row, one column a position (effects in %)."""
        width = max(7, *(min(10, len(repr(t))) for t in self.clean_tokens))
        lines = [
            f"model: {self.model}   backend: {self.backend}   metric: {self.metric}",
            f"clean {self.clean_value:.4f} ({_answers(self.clean_top)})   "
            f"corrupted {self.corrupt_value:.4f} ({_answers(self.corrupt_top)})",
            "effect of restoring one clean vector: 100 = the clean answer, 0 = none",
        ]

        def header(tokens) -> str:
            return f"{'':<12}" + "".join(f"{repr(t)[:width]:>{width + 1}}" for t in tokens)

        lines.append(header(self.clean_tokens))
        if self.corrupt_tokens != self.clean_tokens:
            lines.append(header(self.corrupt_tokens))

        def grid(title: str, labels: list[str], values: np.ndarray) -> None:
            lines.append(title)
            for r in range(len(labels) - 1, -1, -1):
                lines.append(f"{labels[r]:<12}" + "".join(f"{100 * v:>{width + 1}.0f}" for v in values[r]))

        grid("residual stream", self.layers, self.effect)
        blocks = [f"block {i}" for i in range(1, self.n_rows)]
        if self.attn_effect is not None:
            grid("attention output", blocks, self.attn_effect)
            grid("MLP output", blocks, self.mlp_effect)
        elif self.sublayer_note:
            lines.append(f"sublayers: {self.sublayer_note}")
        return "\n".join(lines)


def _answers(top: list[tuple[str, float]]) -> str:
    return ", ".join(f"{t!r} {p:.3f}" for t, p in top[:3])


# ==================================================================== the runtime interface


@dataclass
class CleanRun:
    """What a runtime captured from the clean prompt: per site, vectors [rows, positions, d]
    (NaN where not captured) and the logits at the last position [vocab]."""

    vectors: dict[str, np.ndarray]
    logits: np.ndarray


class PatchRuntime(Protocol):
    """How one runtime reads and writes the residual stream (see `TorchRuntime`, `LlamaCppRuntime`)."""

    backend: str
    n_blocks: int

    def sublayer_problem(self) -> str | None:
        """None when attention and MLP outputs can be patched, else why not (for a person)."""

    def clean(self, ids: list[int], sublayers: bool) -> CleanRun:
        """Run the clean prompt; capture every site's vectors at every position."""

    def corrupted(self, ids: list[int]) -> np.ndarray:
        """Run the corrupted prompt (kept for reuse by `run`); its logits at the last position."""

    def run(self, ids: list[int], cells: Sequence[Cell], clean: CleanRun) -> Iterator[tuple[list[int], np.ndarray]]:
        """Run the corrupted prompt once per cell with that cell's clean vector written in; yields
        (indices into `cells`, logits at the last position [n, vocab]) batch by batch."""


# ==================================================================== the technique


def _metric_fn(target_id: int, contrast_id: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """logits [n, vocab] -> metric [n]: the target's probability, or logit(target) - logit(contrast)."""
    if contrast_id is not None:
        return lambda z: (z[:, target_id] - z[:, contrast_id]).astype(np.float64)

    def prob(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64)
        top = z.max(-1, keepdims=True)
        return np.exp(z[:, target_id] - top[:, 0]) / np.exp(z - top).sum(-1)

    return prob


def _top(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """logits [n, vocab] -> top-k ids and probabilities [n, k]."""
    z = z.astype(np.float64)
    ids = np.argpartition(-z, k - 1, axis=-1)[:, :k]
    ids = np.take_along_axis(ids, np.argsort(-np.take_along_axis(z, ids, -1), axis=-1), -1)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return ids, np.take_along_axis(p, ids, -1)


def _describe(tracer, ids: list[int]) -> str:
    return " ".join(repr(tracer.decode_one(i)) for i in ids)


def check_prompts(tracer, clean: str, corrupt: str) -> tuple[list[int], list[int]]:
    """Token ids of both prompts; BadPrompt when either is empty, they tokenize to different
    lengths (the message shows both tokenizations), or they are the same tokens."""
    for name, text in (("clean", clean), ("corrupted", corrupt)):
        if text is None or not str(text).strip():
            raise BadPrompt(f"The {name} prompt is empty: type the text to patch.")
    clean_ids, corrupt_ids = tracer.encode(clean), tracer.encode(corrupt)
    if len(clean_ids) != len(corrupt_ids):
        raise BadPrompt(
            f"The prompts must have the same number of tokens, position by position. The clean prompt is "
            f"{len(clean_ids)} tokens ({_describe(tracer, clean_ids)}); the corrupted one is {len(corrupt_ids)} "
            f"({_describe(tracer, corrupt_ids)}). Swap a word for one that is as many tokens."
        )
    if clean_ids == corrupt_ids:
        raise BadPrompt(
            "The clean and corrupted prompts are the same tokens, so there is nothing to restore (the effect "
            "is undefined). Change a word in the corrupted prompt, e.g. Germany -> France."
        )
    if tracer.context_length and len(clean_ids) > tracer.context_length:
        raise BadPrompt(f"The prompts are {len(clean_ids)} tokens, longer than the model's context.")
    return clean_ids, corrupt_ids


def plan_cells(
    n_blocks: int, clean_ids: Sequence[int], corrupt_ids: Sequence[int], sublayers: bool, skip_identical: bool
) -> tuple[list[Cell], list[Cell]]:
    """(cells to run, cells whose run is exactly the corrupted run and is skipped).

    Skipped with `skip_identical`: positions before the first differing token; the embeddings
    row where the tokens agree; the last block's outputs (residual, attention, MLP) at every
    position but the last, which feed only their own position's logits.
    """
    n = len(clean_ids)
    first = next(i for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids)) if a != b)
    grids = [(RESID, range(n_blocks + 1))]
    if sublayers:
        grids += [(ATTN, range(1, n_blocks + 1)), (MLP, range(1, n_blocks + 1))]
    run, skipped = [], []
    for site, rows in grids:
        for row in rows:
            for p in range(n):
                cell = Cell(site, row, p)
                same = (
                    p < first
                    or (site == RESID and row == 0 and clean_ids[p] == corrupt_ids[p])
                    or (row == n_blocks and p != n - 1)
                )
                (skipped if skip_identical and same else run).append(cell)
    return run, skipped


def patch_with(
    runtime,
    clean: str,
    corrupt: str,
    target: str,
    contrast: str | None = None,
    *,
    sublayers: bool = True,
    skip_identical: bool = True,
    progress: Callable[[float, str], None] | None = None,
    cancel: threading.Event | None = None,
) -> PatchResult:
    """Activation patching with an opened tracer (hooks or llama-cpp, see `tracing.open_tracer`)
    or a `PatchRuntime`.

    clean, corrupt: prompts of the same number of tokens (BadPrompt otherwise, or when equal).
    target: one token (" Berlin"); contrast: one token (" Paris") or None. The metric at the last
    position is p(target), or logit(target) - logit(contrast) (in logits) with a contrast.
    sublayers: also patch each block's attention and MLP outputs, where the runtime finds them
    (else `sublayer_note` says why).
    skip_identical: do not run cells that are exactly the corrupted run (see `plan_cells`);
    their effect is 0 and their top-1 the corrupted run's.
    progress(fraction, text) is called as the grid runs; setting `cancel` stops it (PatchCancelled).
    Returns a PatchResult: effect [rows, positions] and, with sublayers, attn_effect and
    mlp_effect [blocks, positions]. BadTarget when the two prompts give the same metric (the
    normalized effect is undefined).
    """
    from .api import resolve_target

    runtime = runtime if hasattr(runtime, "run") else patch_runtime(runtime)
    tracer = runtime.tracer
    clean_ids, corrupt_ids = check_prompts(tracer, clean, corrupt)
    target_text, target_id = resolve_target(tracer, target)
    contrast_id = resolve_target(tracer, contrast)[1] if contrast else None
    if contrast_id == target_id:
        raise BadTarget("The target and the contrast are the same token: the logit difference is always 0.")
    problem = runtime.sublayer_problem() if sublayers else None
    sublayers = sublayers and problem is None
    metric = _metric_fn(target_id, contrast_id)
    report = progress or (lambda fraction, text: None)
    start = time.perf_counter()
    with tracer.lock():
        report(0.0, "Running the clean and the corrupted prompts…")
        if hasattr(runtime, "prepare"):  # the whole grid as one job (nnsight: one session, remote-ready)
            runtime.prepare(clean_ids, corrupt_ids,
                            plan_cells(runtime.n_blocks, clean_ids, corrupt_ids, sublayers, skip_identical)[0],
                            sublayers, [target_id, contrast_id])
        captured = runtime.clean(clean_ids, sublayers)
        corrupt_logits = runtime.corrupted(corrupt_ids)
        clean_value = float(metric(captured.logits[None])[0])
        corrupt_value = float(metric(corrupt_logits[None])[0])
        if abs(clean_value - corrupt_value) < _MIN_DIFFERENCE * max(1.0, abs(clean_value)):
            what = f"logit({target_text!r}) - logit({contrast!r})" if contrast_id is not None else f"p({target_text!r})"
            raise BadTarget(
                f"{what} is the same for both prompts ({clean_value:.6g}), so there is nothing to restore. "
                "Pick a target the two prompts disagree on."
            )
        cells, skipped = plan_cells(runtime.n_blocks, clean_ids, corrupt_ids, sublayers, skip_identical)
        n_pos, rows = len(clean_ids), runtime.n_blocks + 1
        values = {site: np.full((rows, n_pos), corrupt_value) for site in (RESID, ATTN, MLP)}
        corrupt_ids_k, corrupt_p_k = (a[0] for a in _top(corrupt_logits[None], PATCHED_K))
        top_ids = {site: np.tile(corrupt_ids_k, (rows, n_pos, 1)) for site in values}  # [rows, positions, k]
        top_p = {site: np.tile(corrupt_p_k, (rows, n_pos, 1)) for site in values}
        done = 0
        for indices, logits in runtime.run(corrupt_ids, cells, captured):
            if cancel is not None and cancel.is_set():
                raise PatchCancelled("Stopped: the grid was not finished.")
            m = metric(logits)
            ids, p = _top(logits, PATCHED_K)
            for j, i in enumerate(indices):
                cell = cells[i]
                values[cell.site][cell.row, cell.position] = m[j]
                top_ids[cell.site][cell.row, cell.position] = ids[j]
                top_p[cell.site][cell.row, cell.position] = p[j]
            done += len(indices)
            report(done / max(1, len(cells)), f"Patched {done} of {len(cells)} cells…")
    seconds = time.perf_counter() - start
    text = TokenText(tracer.decode_one)
    scale = clean_value - corrupt_value

    def effect(site: str) -> np.ndarray:
        return (values[site] - corrupt_value) / scale

    def tokens(site: str) -> list[list[str]]:
        return [[text(cell[0]) for cell in row] for row in top_ids[site].tolist()]

    def topk(site: str) -> list[list[list[tuple[str, float]]]]:
        return [[[(text(i), q) for i, q in zip(ci, cp)] for ci, cp in zip(ri, rp)]
                for ri, rp in zip(top_ids[site].tolist(), top_p[site].tolist())]

    def answers(z: np.ndarray) -> list[tuple[str, float]]:
        ids, p = _top(z[None], TOP_K)
        return [(text(i), float(q)) for i, q in zip(ids[0], p[0])]

    name = (
        f"logit({target_text!r}) - logit({contrast!r})" if contrast_id is not None else f"p({target_text!r})"
    )
    return PatchResult(
        model=tracer.model_name,
        backend=tracer.backend,
        clean_tokens=[text(i) for i in clean_ids],
        corrupt_tokens=[text(i) for i in corrupt_ids],
        clean_ids=list(clean_ids),
        corrupt_ids=list(corrupt_ids),
        layers=row_labels(runtime.n_blocks),
        positions=list(range(n_pos)),
        metric=name,
        target=target_text,
        contrast=contrast if contrast_id is not None else None,
        clean_value=clean_value,
        corrupt_value=corrupt_value,
        effect=effect(RESID),
        patched_value=values[RESID],
        patched_top1=tokens(RESID),
        patched_top1_prob=top_p[RESID][:, :, 0],
        patched_topk=topk(RESID),
        clean_top=answers(captured.logits),
        corrupt_top=answers(corrupt_logits),
        attn_effect=effect(ATTN)[1:] if sublayers else None,
        mlp_effect=effect(MLP)[1:] if sublayers else None,
        attn_top1=tokens(ATTN)[1:] if sublayers else None,
        mlp_top1=tokens(MLP)[1:] if sublayers else None,
        attn_topk=topk(ATTN)[1:] if sublayers else None,
        mlp_topk=topk(MLP)[1:] if sublayers else None,
        sublayer_note=problem,
        info={"cells_run": len(cells), "cells_skipped": len(skipped), "seconds": round(seconds, 3),
              **getattr(runtime, "facts", {})},
    )


def patch(
    clean: str,
    corrupt: str,
    target: str,
    contrast: str | None = None,
    model=None,
    backend: str = "hooks",
    sublayers: bool = True,
    skip_identical: bool = True,
    progress: Callable[[float, str], None] | None = None,
    cancel: threading.Event | None = None,
    **options,
) -> PatchResult:
    """Activation patching (Meng et al. 2022; Zhang & Nanda 2023) of `corrupt` with `clean`'s activations.

    model: None for the bundled SmolLM2-135M-Instruct, a file or folder in models/, a path, or a hub id.
    backend: "hooks" (PyTorch, any decoder the hooks backend traces) or "llama-cpp" (the GGUF itself).
    options: loading options, e.g. device="cpu". See `patch_with` for the rest and the result.

        >>> r = tracing.patch("The capital of Germany is", "The capital of France is", " Berlin", " Paris")
        >>> r.effect[0, 3], r.effect[-1, -1]     # the swapped word's embedding; the last row: 1.0, 1.0
    """
    from .api import BACKEND_ALIASES, open_tracer

    name = BACKEND_ALIASES.get(backend, backend)
    if name not in RUNTIMES:
        raise UnsupportedModel(
            f"Activation patching runs on the backends {' and '.join(RUNTIMES)}, not '{backend}'."
        )
    for text, what in ((clean, "clean"), (corrupt, "corrupted")):
        if text is None or not str(text).strip():
            raise BadPrompt(f"The {what} prompt is empty: type the text to patch.")
    tracer = open_tracer(model, name, **options)
    return patch_with(tracer, clean, corrupt, target, contrast, sublayers=sublayers,
                      skip_identical=skip_identical, progress=progress, cancel=cancel)


# Backend name -> the PatchRuntime class for its tracer (a class in this file, or "module:class").
RUNTIMES = {"hooks": "TorchRuntime", "llama-cpp": "LlamaCppRuntime",
            "nnsight": "tracing.nnsight_backend:NnsightRuntime"}  # or "module:class" elsewhere


def patch_runtime(tracer) -> PatchRuntime:
    """The patching runtime of an opened tracer, built once per tracer."""
    cls = RUNTIMES.get(tracer.backend)
    if cls is None:
        raise UnsupportedModel(
            f"Activation patching runs on the backends {' and '.join(RUNTIMES)}, not '{tracer.backend}'."
        )
    runtime = getattr(tracer, "_patch_runtime", None)
    if runtime is None or not runtime.alive():
        with tracer.lock():
            if ":" in cls:
                import importlib

                module, name = cls.split(":")
                runtime = getattr(importlib.import_module(module), name)(tracer)
            else:
                runtime = globals()[cls](tracer)
        tracer._patch_runtime = runtime
    return runtime


# ==================================================================== PyTorch


class TorchRuntime:
    """Patching on a transformers model with forward hooks on the hooks backend's blocks.

    Cells run in batches (batch dimension = cells) that share a patched position p: each batch
    starts from a copy of the corrupted run's KV cache cut at p and runs only tokens p.. (the
    positions before p are the corrupted run's), with every cell's clean vector written at its
    row by a hook. Models whose cache cannot be cut run the whole prompt per cell instead.
    """

    backend = "hooks"

    def __init__(self, tracer):
        self.tracer = tracer
        self.model = tracer.lens.model
        self.parts = tracer.lens.parts
        self.blocks = self.parts.blocks
        self.n_blocks = len(self.blocks)
        self.device = next(self.model.parameters()).device
        self._sites, self._problem = find_sublayers(self.model, self.blocks, tracer.probe_ids())
        self._cache = None
        self._corrupt_ids: list[int] | None = None
        self.prefix_reuse = True  # False: every cell runs the whole prompt (tests, the benchmark)
        self.facts = {"prefix_reuse": True}

    def alive(self) -> bool:
        return True

    def sublayer_problem(self) -> str | None:
        return self._problem

    def _modules(self, site: str, row: int) -> tuple[nn.Module, bool]:
        """(module, whether its input (pre-hook) rather than its output is the vector)."""
        if site == RESID:
            return (self.blocks[0], True) if row == 0 else (self.blocks[row - 1], False)
        attn, mlp = self._sites[row - 1]
        return (attn if site == ATTN else mlp), False

    def _keep(self) -> dict:
        """Only the last position's logits are needed (when the model's forward allows saying so)."""
        return {"logits_to_keep": 1} if self.tracer.lens._keep_arg else {}

    def clean(self, ids: list[int], sublayers: bool) -> CleanRun:
        sites = [(RESID, r) for r in range(self.n_blocks + 1)]
        if sublayers:
            sites += [(s, r) for s in (ATTN, MLP) for r in range(1, self.n_blocks + 1)]
        kept: dict[tuple[str, int], torch.Tensor] = {}
        handles = []
        for site, row in sites:
            module, is_input = self._modules(site, row)
            if is_input:
                handles.append(module.register_forward_pre_hook(
                    lambda _m, a, k, key=(site, row): kept.__setitem__(key, (a[0] if a else k["hidden_states"])[0]),
                    with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(
                    lambda _m, _a, o, key=(site, row): kept.__setitem__(key, _first_tensor(o)[0])))
        try:
            with torch.no_grad():
                logits = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=False,
                                    **self._keep()).logits
        finally:
            for h in handles:
                h.remove()
        d = kept[(RESID, 0)].shape[-1]
        out = {site: torch.full((self.n_blocks + 1, len(ids), d), float("nan"), device=self.device)
               for site in (RESID, ATTN, MLP) if site == RESID or sublayers}
        for (site, row), value in kept.items():
            out[site][row] = value.float()
        self._clean_tensors = out  # [rows, positions, d] per site; rows of attn/mlp start at 1
        vectors = {site: tensor.cpu().numpy() for site, tensor in out.items()}
        return CleanRun(vectors, logits[0, -1].float().cpu().numpy())

    def corrupted(self, ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            try:
                out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, **self._keep())
                cache = out.past_key_values
                croppable = cache is not None and getattr(cache, "is_croppable", True)
                # A sliding-window layer that has dropped tokens cannot be cut back to an earlier position.
                windows = [getattr(layer, "sliding_window", None) for layer in getattr(cache, "layers", [])
                           if getattr(layer, "is_sliding", False)]
                if any(w is None or len(ids) >= w - 1 for w in windows):
                    croppable = False
                self._cache = cache if croppable and self.prefix_reuse else None
            except (TypeError, ValueError):
                out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=False, **self._keep())
                self._cache = None
        self.facts = {"prefix_reuse": self._cache is not None}
        self._corrupt_ids = list(ids)
        return out.logits[0, -1].float().cpu().numpy()

    def _past(self, p: int, batch: int):
        if self._cache is None or p == 0:
            return None
        past = copy.deepcopy(self._cache)
        past.crop(-(len(self._corrupt_ids) - p))  # transformers 5: a negative count of tokens to remove
        past.batch_repeat_interleave(batch)
        return past

    def run(self, ids, cells, clean):
        clean_t = self._clean_tensors
        by_position: dict[int, list[int]] = {}
        for i, cell in enumerate(cells):
            by_position.setdefault(cell.position, []).append(i)
        full = torch.tensor([ids], device=self.device)
        self.facts["tokens_run"] = 0
        for p in sorted(by_position):
            reuse = self._cache is not None and p > 0
            length = len(ids) - p if reuse else len(ids)
            per_forward = max(1, min(_TORCH_CELLS_PER_FORWARD, _TORCH_TOKENS_PER_FORWARD // length))
            members = by_position[p]
            for b0 in range(0, len(members), per_forward):
                chunk = members[b0 : b0 + per_forward]
                local = 0 if reuse else p
                groups: dict[tuple[str, int], list[int]] = {}
                for j, i in enumerate(chunk):
                    cell = cells[i]
                    groups.setdefault((cell.site, cell.row), []).append(j)
                handles = []
                for (site, row), js in groups.items():
                    module, is_input = self._modules(site, row)
                    index = torch.tensor(js, device=self.device)
                    value = clean_t[site][row, p].to(self._dtype())

                    def write(hidden, index=index, value=value):
                        hidden = hidden.clone()
                        hidden[index, local] = value
                        return hidden

                    if is_input:
                        def pre(_m, args, kwargs, write=write):
                            if args:
                                return (write(args[0]), *args[1:]), kwargs
                            return args, {**kwargs, "hidden_states": write(kwargs["hidden_states"])}
                        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                    else:
                        handles.append(module.register_forward_hook(
                            lambda _m, _a, o, write=write: _replace_first(o, write(_first_tensor(o)))))
                try:
                    with torch.no_grad():
                        tokens = full[:, p:] if reuse else full
                        tokens = tokens.expand(len(chunk), -1)
                        past = self._past(p, len(chunk)) if reuse else None
                        kwargs = {**self._keep(), "use_cache": past is not None}
                        if past is not None:
                            kwargs["past_key_values"] = past
                        logits = self.model(input_ids=tokens, **kwargs).logits[:, -1]
                        self.facts["tokens_run"] += int(tokens.numel())
                finally:
                    for h in handles:
                        h.remove()
                yield chunk, logits.float().cpu().numpy()

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


# ==================================================================== llama.cpp


class LlamaCppRuntime:
    """Patching on the quantized GGUF with llama.cpp's eval callback writing graph rows.

    A context of its own on the shared model, with many sequences in one KV cache: sequence 0
    holds the corrupted run; a cell at position p is a sequence that shares positions 0..p-1 of
    it (`llama_memory_seq_cp`, no copy) and decodes only tokens p..; up to 64 cells go into one
    decode, and the node handlers write each cell's clean row at its token of the batch.
    """

    backend = "llama-cpp"

    def __init__(self, tracer):
        from llama_cpp import llama_cpp as C

        self._C = C
        self.tracer = tracer
        self.shared = tracer.shared
        self.n_blocks = tracer.n_blocks
        self.d_model = tracer.d_model
        self._contexts = MultiSequenceContext(self.shared, _LLAMA_TOKENS_PER_DECODE, _LLAMA_SEQUENCES + 1)
        layout = self.graph.layout()
        self.embeddings = layout.embeddings
        self._sites, self._problem = find_graph_sublayers(
            self.graph, self.n_blocks, self.embeddings, (tracer.encode("The lens") + [0, 0])[:3])
        self._clean: dict[tuple[str, int], np.ndarray] = {}
        self.facts = {"sequences_per_decode": _LLAMA_SEQUENCES}

    @property
    def graph(self) -> GraphContext:
        """The current llama.cpp context (re-made larger by `MultiSequenceContext.ensure`)."""
        return self._contexts.graph

    def alive(self) -> bool:
        return self.graph is not None and self.graph.alive and not self.shared.closed

    def sublayer_problem(self) -> str | None:
        return self._problem

    def _node(self, site: str, row: int) -> _Site:
        if site == RESID:
            return _Site(self.embeddings if row == 0 else f"l_out-{row - 1}", "", "")
        return self._sites[row - 1][0 if site == ATTN else 1]

    def _handlers(self, nodes: dict[tuple[str, int], _Site], on_node) -> dict[bytes, Callable]:
        """name -> handler calling on_node(key, view) for the right node among those sharing the name."""
        by_name: dict[str, list[tuple[tuple[str, int], _Site]]] = {}
        for key, site in nodes.items():
            by_name.setdefault(site.name, []).append((key, site))

        def handler_for(entries):
            def handler(view):
                for key, site in entries:
                    if site.op and (view.op != site.op or (view.src(0).name if view.src(0) else "") != site.src0):
                        continue
                    on_node(key, view)
            return handler

        return {name.encode(): handler_for(entries) for name, entries in by_name.items()}

    def clean(self, ids: list[int], sublayers: bool) -> CleanRun:
        keys = [(RESID, r) for r in range(self.n_blocks + 1)]
        if sublayers:
            keys += [(s, r) for s in (ATTN, MLP) for r in range(1, self.n_blocks + 1)]
        n = len(ids)
        vectors = {s: np.full((self.n_blocks + 1, n, self.d_model), np.nan, np.float32)
                   for s in (RESID, ATTN, MLP) if s == RESID or sublayers}

        def read(key, view):
            rows, width = view.shape
            if rows == n:
                vectors[key[0]][key[1]] = view.rows(0, n)
            elif rows == 1:  # the last block: only the requested output, the last position
                vectors[key[0]][key[1], n - 1] = view.rows(0, 1)[0]

        graph = self._contexts.ensure(n)
        graph.callback.handlers = self._handlers({k: self._node(*k) for k in keys}, read)
        try:
            graph.clear()
            graph.decode(ids, 0, [i == n - 1 for i in range(n)])
            logits = graph.logits(n - 1).copy()
        finally:
            graph.callback.handlers = {}
        self._vectors = vectors
        return CleanRun(vectors, logits)

    def corrupted(self, ids: list[int]) -> np.ndarray:
        graph = self.graph
        graph.clear()
        graph.decode(ids, 0, [i == len(ids) - 1 for i in range(len(ids))])
        return graph.logits(len(ids) - 1).copy()

    def run(self, ids, cells, clean):
        C, graph = self._C, self.graph
        memory = C.llama_get_memory(graph.ctx)
        n = len(ids)
        # Longest suffixes first, so the batches fill evenly.
        order = sorted(range(len(cells)), key=lambda i: cells[i].position)
        self.facts["tokens_run"] = sum(n - cell.position for cell in cells)
        batch: list[int] = []
        tokens = 0
        for i in order + [None]:
            length = n - cells[i].position if i is not None else 0
            if i is None or len(batch) == _LLAMA_SEQUENCES or tokens + length > graph.n_ubatch:
                if batch:
                    yield batch, self._decode_cells(memory, ids, [cells[j] for j in batch])
                batch, tokens = [], 0
            if i is not None:
                batch.append(i)
                tokens += length

    def _decode_cells(self, memory, ids, cells: list[Cell]) -> np.ndarray:
        C, graph = self._C, self.graph
        n = len(ids)
        tokens, positions, sequences, outputs, offsets = [], [], [], [], []
        for s, cell in enumerate(cells, start=1):
            C.llama_memory_seq_rm(memory, s, -1, -1)
            if cell.position > 0:
                C.llama_memory_seq_cp(memory, 0, s, 0, cell.position)
            offsets.append(len(tokens))
            for p in range(cell.position, n):
                tokens.append(ids[p])
                positions.append(p)
                sequences.append(s)
                outputs.append(p == n - 1)
        writes: dict[tuple[str, int], list[int]] = {}
        for c, cell in enumerate(cells):
            writes.setdefault((cell.site, cell.row), []).append(c)
        n_tokens = len(tokens)

        def write(key, view):
            rows, _ = view.shape
            for c in writes[key]:
                cell = cells[c]
                value = self._vectors[cell.site][cell.row, cell.position][None]
                if rows == n_tokens:
                    view.write_rows(offsets[c], value)
                elif rows == len(cells) and cell.position == n - 1:  # only the outputs: one a cell
                    view.write_rows(c, value)
                elif rows != len(cells):
                    raise UnsupportedModel(f"llama.cpp's {view.name} has {rows} rows for {n_tokens} tokens.")

        graph.callback.handlers = self._handlers({k: self._node(*k) for k in writes}, write)
        try:
            graph.decode_batch(tokens, positions, sequences, outputs)
            # A cell's logits are its last token's, at its batch index.
            logits = np.stack([graph.logits(offsets[c] + n - cell.position - 1).copy()
                               for c, cell in enumerate(cells)])
        finally:
            graph.callback.handlers = {}
            for s in range(1, len(cells) + 1):
                C.llama_memory_seq_rm(memory, s, -1, -1)
        return logits


class MultiSequenceContext:
    """The runtime's multi-sequence `GraphContext`, re-made larger when a longer prompt comes:
    room for the prompt plus one full decode of cells, at most `tokens_per_decode` tokens a decode."""

    def __init__(self, shared, tokens_per_decode: int, sequences: int):
        self.shared = shared
        self._sequences = sequences
        self._tokens_per_decode = tokens_per_decode
        self._prompt_tokens = 0
        self.graph: GraphContext | None = None
        self.ensure(64)

    def ensure(self, prompt_tokens: int) -> GraphContext:
        """The context, with room for a prompt of `prompt_tokens` plus a full decode of cells."""
        if prompt_tokens > self._tokens_per_decode:
            raise BadPrompt(f"Patching on llama.cpp takes prompts of at most {self._tokens_per_decode} tokens.")
        if self.graph is None or not self.graph.alive or prompt_tokens > self._prompt_tokens:
            self.close()
            wanted = prompt_tokens + self._tokens_per_decode + 64
            self.graph = GraphContext(self.shared, wanted, self._tokens_per_decode, sequences=self._sequences)
            self._prompt_tokens = prompt_tokens
        return self.graph

    def close(self) -> None:
        if self.graph is not None:
            self.graph.close()
            self.graph = None


# ==================================================================== command line


def run_patch(argv: list[str]) -> int:
    """`python -m tracing patch --clean TEXT --corrupt TEXT --target TOKEN [...]`: the grid as a
    table, or with --json exactly `PatchResult.to_dict()`."""
    import argparse

    from .__main__ import print_result
    from .models import ignoring_memory_check, print_memory_warnings

    parser = argparse.ArgumentParser(
        prog="python -m tracing patch",
        description="Activation patching: restore one vector of the clean run inside the corrupted run, for "
                    "every layer and position, and see how much of the clean answer comes back.",
    )
    parser.add_argument("--clean", required=True, help="the clean prompt, e.g. 'The capital of Germany is'")
    parser.add_argument("--corrupt", required=True, help="the corrupted prompt, as many tokens, e.g. 'The capital of France is'")
    parser.add_argument("--target", required=True, help="the clean answer, one token, e.g. ' Berlin'")
    parser.add_argument("--contrast", default=None, help="the corrupted answer, one token, e.g. ' Paris': "
                        "the metric becomes the logit difference target - contrast")
    parser.add_argument("--model", default=None, help="a file or folder in models/, a path, or a hub id (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--backend", default="hooks", help=f"one of: {', '.join(RUNTIMES)} (default: hooks)")
    parser.add_argument("--no-sublayers", action="store_true", help="only the residual stream, not attention and MLP outputs")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (hooks; default: the best available)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--ignore-memory-check", action="store_true",
                        help="load the model even if it looks bigger than this machine's memory")
    from .__main__ import add_remote_arguments, remote_options

    add_remote_arguments(parser)
    args = parser.parse_args(argv)
    options = {"device": args.device} if args.device and args.backend != "llama-cpp" else {}
    options.update(remote_options(args))
    print_memory_warnings()
    with ignoring_memory_check(args.ignore_memory_check):
        result = patch(args.clean, args.corrupt, args.target, args.contrast, model=args.model,
                       backend=args.backend, sublayers=not args.no_sublayers, **options)
    print_result(result, args.json)
    return 0


__all__ = ["patch", "patch_with", "PatchResult", "PatchCancelled", "Cell", "plan_cells", "check_prompts",
           "TorchRuntime", "LlamaCppRuntime", "find_sublayers", "find_graph_sublayers", "patch_runtime"]
