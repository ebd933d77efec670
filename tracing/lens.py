"""The lens math and the one result type every backend returns.

A backend's only job is to capture the residual stream (for each row: the embeddings, then
after each decoder block; for each traced position) and to say how the model projects a
residual to logits (its final norm and unembedding). `summarize` does the projection and turns
the logits into what people look at (top-k,
entropy, KL to the model's own output, a target token's probability and rank), so every
backend is measured with the same ruler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

# Bound the float32 working set of one chunk of rows (rows x positions x vocab).
_CHUNK_BYTES = 256 * 2**20
# Cells (row x position) whose statistics are computed together: small enough that their
# logits stay in the CPU cache across the half-dozen passes the statistics make.
_CELLS_AT_ONCE = 8


@dataclass
class TargetTrace:
    """One token followed through every row and position."""

    token: str
    id: int
    prob: np.ndarray  # [rows, positions]
    rank: np.ndarray  # [rows, positions]; 1 = the top prediction
    # The same word with its leading space added or removed (" Paris" for "Paris"), when that is one
    # token and the model's output at the last traced position finds it likelier; its probability there.
    suggestion: str | None = None
    suggestion_prob: float | None = None

    def to_dict(self) -> dict:
        return {
            "token": self.token,
            "id": self.id,
            "prob": self.prob.tolist(),
            "rank": self.rank.tolist(),
            "suggestion": self.suggestion,
            "suggestion_prob": self.suggestion_prob,
        }

    def note(self) -> str | None:
        """One sentence for a person when another spelling of the target is likelier, else None."""
        if self.suggestion is None:
            return None
        def pct(p: float) -> str:
            return f"{p:.1%}" if p >= 0.001 else "<0.1%"

        return (f"{self.suggestion!r} is likelier than {self.token!r} at the output "
                f"({pct(self.suggestion_prob)} vs {pct(float(self.prob[-1, -1]))}): the model may "
                f"write this word {'with' if self.suggestion.startswith(' ') else 'without'} a leading space. "
                f"Try the target {self.suggestion!r}.")


@dataclass
class LensResult:
    """Per-layer next-token predictions for one prompt.

    Rows: row 0 is the embeddings, row i the residual stream after decoder block i; the last
    row is the model's own output distribution. Columns are the traced positions of the prompt
    (`positions` indexes `tokens`; all of them, or only the last).
    """

    model: str
    backend: str
    tokens: list[str]
    token_ids: list[int]
    positions: list[int]
    layers: list[str]
    lens: list[str]  # per row: which lens produced it ("logit", "tuned"), "output" for the last row
    topk_ids: np.ndarray  # [rows, positions, k]
    topk_probs: np.ndarray  # [rows, positions, k]
    topk_tokens: list[list[list[str]]]  # [rows][positions][k], decoded text
    entropy: np.ndarray  # [rows, positions], nats
    kl_to_final: np.ndarray  # [rows, positions], KL(final || row), nats
    target: TargetTrace | None = None
    temperature: float = 1.0
    info: dict = field(default_factory=dict)  # backend facts (device, dtype, timings)

    @property
    def n_rows(self) -> int:
        return len(self.layers)

    def top1(self) -> list[list[str]]:
        """The top-1 token text of every cell, [rows][positions]."""
        return [[cell[0] for cell in row] for row in self.topk_tokens]

    def to_dict(self) -> dict:
        """A JSON-ready dict: the CLI's `--json` output and the UI's download."""
        topk = [
            [
                [
                    {"token": tok, "id": int(i), "prob": float(p)}
                    for tok, i, p in zip(toks, ids, probs)
                ]
                for toks, ids, probs in zip(row_toks, row_ids, row_probs)
            ]
            for row_toks, row_ids, row_probs in zip(self.topk_tokens, self.topk_ids, self.topk_probs)
        ]
        return {
            "model": self.model,
            "backend": self.backend,
            "tokens": self.tokens,
            "token_ids": [int(i) for i in self.token_ids],
            "positions": [int(p) for p in self.positions],
            "layers": self.layers,
            "lens": self.lens,
            "temperature": self.temperature,
            "topk": topk,
            "entropy": self.entropy.tolist(),
            "kl_to_final": self.kl_to_final.tolist(),
            "target": self.target.to_dict() if self.target else None,
            # backend facts: the weights' dtype and why, device, seconds; plain values only
            "info": {k: v for k, v in self.info.items() if isinstance(v, (str, int, float, bool, type(None)))},
        }

    def table(self, position: int = -1) -> str:
        """A readable per-layer table at one traced position (default: the last)."""
        col = position % len(self.positions)
        lines = [
            f"model: {self.model}   backend: {self.backend}   temperature: {self.temperature:g}",
            f"position {self.positions[col]}: {self.tokens[self.positions[col]]!r} -> next token",
        ]
        header = f"{'layer':<16} {'entropy':>7}  top-{self.topk_ids.shape[-1]}"
        if self.target:
            header += f"   | p({self.target.token!r})  rank"
            if self.target.note():
                lines.append(f"note: {self.target.note()}")
        lines.append(header)
        for r, label in enumerate(self.layers):
            cells = "  ".join(
                f"{tok!r} {p:.3f}"
                for tok, p in zip(self.topk_tokens[r][col], self.topk_probs[r, col])
            )
            line = f"{label:<16} {self.entropy[r, col]:7.2f}  {cells}"
            if self.target:
                line += f"   | {self.target.prob[r, col]:.4f}  {int(self.target.rank[r, col])}"
            lines.append(line)
        return "\n".join(lines)


def row_labels(n_blocks: int) -> list[str]:
    """Row names: the embeddings, then the residual after each block (the last is the output)."""
    return ["embeddings"] + [f"layer {i}" for i in range(1, n_blocks + 1)]


class TokenText:
    """Decodes token ids one at a time, each id once (vocabularies repeat across cells)."""

    def __init__(self, decode_one: Callable[[int], str]):
        self._decode_one = decode_one
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._decode_one(int(token_id))
        return text


_GROUP = 64  # vocabulary entries per group in the top-k search


def _topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of z [cells, vocab], several times faster than torch.topk on a large vocabulary.

    Split the vocabulary into groups; the k largest values lie in the k groups with the largest
    maxima (any group holding a value above the k-th largest has its maximum above it too, and
    fewer than k such values exist). So: one cheap max per group, then an exact top-k among the
    members of k groups (plus the ragged tail of the vocabulary). Group g is {g, g + G, g + 2G, ...}
    with G = vocab // 64, so the group maxima are an elementwise max of 64 contiguous slices.
    """
    cells, vocab = z.shape
    n_groups = vocab // _GROUP
    if n_groups <= k:
        return z.topk(k, dim=-1)
    full = n_groups * _GROUP
    group_max = z[:, :full].reshape(cells, _GROUP, n_groups).amax(1)
    groups = group_max.topk(k, dim=-1).indices  # [cells, k]
    candidates = (groups.unsqueeze(-1) + n_groups * torch.arange(_GROUP, device=z.device)).reshape(cells, -1)
    if full < vocab:
        tail = torch.arange(full, vocab, device=z.device).expand(cells, -1)
        candidates = torch.cat([candidates, tail], dim=-1)
    values, where = z.gather(1, candidates).topk(k, dim=-1)
    return values, candidates.gather(1, where)


class _CellStats:
    """Statistics of a few cells' logits z [cells, vocab] (already divided by the temperature).

    One exp pass, and log-probabilities are never materialized (log p = z - logsumexp(z)). Every
    temporary lives in one preallocated scratch buffer: fresh megabyte-sized tensors per chunk cost
    more in page faults than the arithmetic itself.
    """

    def __init__(self, vocab: int, top_k: int, target_id: int | None, device: torch.device | None = None):
        self.top_k = top_k
        self.target_id = target_id
        self.scratch = torch.empty(_CELLS_AT_ONCE, vocab, device=device)  # where the logits are (cpu, cuda, mps)

    def __call__(self, z: torch.Tensor, final_p: torch.Tensor | None, final_neg_entropy: torch.Tensor | None):
        """Returns (top ids, top probs, entropy, KL(final || cell) or None, target prob, target rank,
        softmax(z)); the last is a view of the scratch buffer, valid until the next call."""
        buf = self.scratch[: z.shape[0]]
        top_z, top_ids = _topk(z, self.top_k)
        torch.sub(z, top_z[:, :1], out=buf).exp_()  # top_z[:, 0] is the max: numerically safe
        total = buf.sum(-1)
        lse = top_z[:, 0] + total.log()
        entropy = lse - torch.linalg.vecdot(buf, z) / total
        kl = None
        if final_p is not None:  # sum p_f (log p_f - log p) = -H_f - (p_f . z - lse)
            kl = (final_neg_entropy - (torch.linalg.vecdot(final_p, z) - lse)).clamp_min(0.0)
        softmax = buf.div_(total.unsqueeze(-1)) if final_p is None else None
        prob = rank = None
        if self.target_id is not None:
            z_t = z[:, self.target_id]
            prob = torch.exp(z_t - lse)
            if softmax is not None:
                softmax = softmax.clone()
            # rank - 1 = #{z > z_t}, counted as sum(sign(relu(z - z_t))): 2x faster than a bool sum.
            rank = torch.sub(z, z_t.unsqueeze(-1), out=buf).relu_().sign_().sum(-1).int() + 1
        return top_ids, torch.exp(top_z - lse.unsqueeze(-1)), entropy, kl, prob, rank, softmax


def summarize(
    hidden: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
    *,
    top_k: int = 5,
    temperature: float = 1.0,
    target_id: int | None = None,
    vocab_size: int | None = None,
) -> dict:
    """Project residual rows to logits and turn them into per-cell statistics.

    `hidden` is [rows, positions, d_model]: what enters the final norm at each row (for a tuned
    lens, already translated). `project` maps [r, positions, d_model] to logits
    [r, positions, vocab] (final norm, unembedding, any logit soft-capping). The last row is the
    model's own output: KL(final || row) is measured against it. Logits are divided by
    `temperature` before the softmax.

    Rows go through `project` in as few batched matmuls as fit in ~256 MB of logits (given
    `vocab_size`, usually one; without it the output row goes first, on its own); the statistics
    then run over a few cells at a time so each cell's logits are read from memory once and stay
    in cache for every statistic.

    Returns numpy arrays: topk_ids, topk_probs [R, P, k]; entropy, kl_to_final [R, P]; and,
    when `target_id` is given, target_prob and target_rank [R, P].
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    n_rows, n_pos, _ = hidden.shape
    keys = ("ids", "probs", "ent", "kl", "tp", "tr")
    out: dict[str, list[torch.Tensor]] = {k: [] for k in keys}

    def logits_of(rows: torch.Tensor) -> torch.Tensor:  # [rows, positions, vocab]
        z = project(rows).float()
        return z / temperature if temperature != 1.0 else z

    def add(values) -> None:
        for key, value in zip(keys, values):
            out[key].append(value)

    def rows_fitting(vocab: int) -> int:
        return max(1, _CHUNK_BYTES // max(1, n_pos * vocab * 4))

    with torch.no_grad():
        # The model's own output row is needed by every KL, so it comes first. Projecting it in the
        # same matmul as the other rows saves streaming the unembedding once more (~40 ms on SmolLM2).
        first = None
        if vocab_size and rows_fitting(vocab_size) >= n_rows:
            first = logits_of(hidden)
            final_z = first[-1]
        else:
            final_z = logits_of(hidden[-1:])[0]
        vocab = final_z.shape[-1]
        stats_of = _CellStats(vocab, max(1, min(top_k, vocab)), target_id, final_z.device)
        final_p = torch.empty(n_pos, vocab, device=final_z.device)
        final = []
        for p0 in range(0, n_pos, _CELLS_AT_ONCE):
            *values, softmax = stats_of(final_z[p0 : p0 + _CELLS_AT_ONCE], None, None)
            final_p[p0 : p0 + _CELLS_AT_ONCE] = softmax
            final.append(values)
        final_neg_entropy = -torch.cat([values[2] for values in final])

        rows_per_matmul = rows_fitting(vocab)
        for r0 in range(0, n_rows - 1, rows_per_matmul):
            r1 = min(r0 + rows_per_matmul, n_rows - 1)
            z = first[r0:r1] if first is not None else logits_of(hidden[r0:r1])  # [r, P, V]
            for row in z:
                for p0 in range(0, n_pos, _CELLS_AT_ONCE):
                    p1 = min(p0 + _CELLS_AT_ONCE, n_pos)
                    *values, _ = stats_of(row[p0:p1], final_p[p0:p1], final_neg_entropy[p0:p1])
                    add(values)
        for values in final:
            values[3] = torch.zeros_like(values[2])  # KL of the output to itself
            add(values)

    top_k = stats_of.top_k

    def cat(name: str, shape: tuple) -> np.ndarray:
        return torch.cat(out[name]).reshape(shape).cpu().numpy()

    stats = {
        "topk_ids": cat("ids", (n_rows, n_pos, top_k)),
        "topk_probs": cat("probs", (n_rows, n_pos, top_k)),
        "entropy": cat("ent", (n_rows, n_pos)),
        "kl_to_final": cat("kl", (n_rows, n_pos)),
    }
    if target_id is not None:
        stats["target_prob"] = cat("tp", (n_rows, n_pos))
        stats["target_rank"] = cat("tr", (n_rows, n_pos))
    return stats


def build_result(
    hidden: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
    *,
    model: str,
    backend: str,
    token_ids: Sequence[int],
    positions: Sequence[int],
    decode_one: Callable[[int], str],
    lens_kinds: Sequence[str] | None = None,
    top_k: int = 5,
    temperature: float = 1.0,
    target: tuple[str, int] | None = None,
    alternative: tuple[str, int] | None = None,
    info: dict | None = None,
    vocab_size: int | None = None,
    stats: dict | None = None,
) -> LensResult:
    """Everything a backend needs once it has the residual rows [rows, positions, d_model]
    and a way to project them to logits (see `summarize`). `alternative`: another spelling of
    the target (`api.other_spelling`), suggested when the output finds it likelier. `stats`:
    `summarize`'s dict (plus "alternative_prob") already computed where the model ran (the nnsight
    backend), instead of hidden and project."""
    if stats is not None:  # summarized where the model ran (nnsight): hidden and project are unused
        n_rows = len(stats["entropy"])
    else:
        n_rows = hidden.shape[0]
        stats = summarize(
            hidden,
            project,
            top_k=top_k,
            temperature=temperature,
            target_id=target[1] if target else None,
            vocab_size=vocab_size,
        )
    text = TokenText(decode_one)
    topk_tokens = [[[text(i) for i in cell] for cell in row] for row in stats["topk_ids"].tolist()]
    kinds = list(lens_kinds) if lens_kinds else ["logit"] * (n_rows - 1)
    result = LensResult(
        model=model,
        backend=backend,
        tokens=[text(i) for i in token_ids],
        token_ids=[int(i) for i in token_ids],
        positions=[int(p) for p in positions],
        layers=row_labels(n_rows - 1),
        lens=kinds[: n_rows - 1] + ["output"],
        topk_ids=stats["topk_ids"],
        topk_probs=stats["topk_probs"],
        topk_tokens=topk_tokens,
        entropy=stats["entropy"],
        kl_to_final=stats["kl_to_final"],
        target=(
            TargetTrace(target[0], target[1], stats["target_prob"], stats["target_rank"])
            if target
            else None
        ),
        temperature=temperature,
        info=dict(info or {}),
    )
    if target and alternative and stats.get("alternative_prob") is not None:
        p_alt = float(stats["alternative_prob"])
        if p_alt > float(result.target.prob[-1, -1]):
            result.target.suggestion, result.target.suggestion_prob = alternative[0], p_alt
    elif target and alternative:
        _suggest(result.target, alternative, hidden, project, temperature)
    return result


def _suggest(trace: TargetTrace, alternative: tuple[str, int], hidden, project, temperature: float) -> None:
    """Set `trace.suggestion` when `alternative` is likelier than the target at the output row's
    last traced position (one more cell projected)."""
    with torch.no_grad():
        z = project(hidden[-1:, -1:]).float()[0, 0] / temperature
        p_alt = float(torch.softmax(z, -1)[alternative[1]])
    if p_alt > float(trace.prob[-1, -1]):
        trace.suggestion, trace.suggestion_prob = alternative[0], p_alt
