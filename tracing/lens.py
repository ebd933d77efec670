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


@dataclass
class TargetTrace:
    """One token followed through every row and position."""

    token: str
    id: int
    prob: np.ndarray  # [rows, positions]
    rank: np.ndarray  # [rows, positions]; 1 = the top prediction

    def to_dict(self) -> dict:
        return {
            "token": self.token,
            "id": self.id,
            "prob": self.prob.tolist(),
            "rank": self.rank.tolist(),
        }


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


def summarize(
    hidden: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
    *,
    top_k: int = 5,
    temperature: float = 1.0,
    target_id: int | None = None,
) -> dict:
    """Project residual rows to logits and turn them into per-cell statistics.

    `hidden` is [rows, positions, d_model]: what enters the final norm at each row (for a tuned
    lens, already translated). `project` maps [r, positions, d_model] to logits
    [r, positions, vocab] (final norm, unembedding, any logit soft-capping). The last row is the
    model's own output: KL(final || row) is measured against it. Logits are divided by
    `temperature` before the softmax. Rows go through `project` in chunks, so a long prompt on a
    big vocabulary never holds more than ~256 MB of float32 logits at once.

    Returns numpy arrays: topk_ids, topk_probs [R, P, k]; entropy, kl_to_final [R, P]; and,
    when `target_id` is given, target_prob and target_rank [R, P].
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    n_rows, n_pos, _ = hidden.shape
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("ids", "probs", "ent", "kl", "tp", "tr")}

    def log_probs(rows: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(project(rows).float() / temperature, dim=-1)

    with torch.no_grad():
        final_logp = log_probs(hidden[-1:])  # [1, P, V]
        vocab = final_logp.shape[-1]
        top_k = max(1, min(top_k, vocab))
        final_p = final_logp.exp()
        final_neg_entropy = (final_p * final_logp).sum(-1)  # [1, P]

        def add(logp: torch.Tensor) -> None:
            top_logp, top_ids = logp.topk(top_k, dim=-1)
            out["ids"].append(top_ids)
            out["probs"].append(top_logp.exp())
            out["ent"].append(-(logp.exp() * logp).sum(-1))
            out["kl"].append((final_neg_entropy - (final_p * logp).sum(-1)).clamp_min(0.0))
            if target_id is not None:
                t = logp[..., target_id]
                out["tp"].append(t.exp())
                out["tr"].append((logp > t.unsqueeze(-1)).sum(-1) + 1)

        chunk = max(1, _CHUNK_BYTES // max(1, n_pos * vocab * 4))
        for r0 in range(0, n_rows - 1, chunk):
            add(log_probs(hidden[r0 : min(r0 + chunk, n_rows - 1)]))
        add(final_logp)

    def cat(name: str) -> np.ndarray:
        return torch.cat(out[name]).cpu().numpy()

    stats = {
        "topk_ids": cat("ids"),
        "topk_probs": cat("probs"),
        "entropy": cat("ent"),
        "kl_to_final": cat("kl"),
    }
    if target_id is not None:
        stats["target_prob"] = cat("tp")
        stats["target_rank"] = cat("tr")
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
    info: dict | None = None,
) -> LensResult:
    """Everything a backend needs once it has the residual rows [rows, positions, d_model]
    and a way to project them to logits (see `summarize`)."""
    n_rows = hidden.shape[0]
    stats = summarize(
        hidden, project, top_k=top_k, temperature=temperature, target_id=target[1] if target else None
    )
    text = TokenText(decode_one)
    topk_tokens = [[[text(i) for i in cell] for cell in row] for row in stats["topk_ids"].tolist()]
    kinds = list(lens_kinds) if lens_kinds else ["logit"] * (n_rows - 1)
    return LensResult(
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
