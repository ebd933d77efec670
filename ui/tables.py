"""The top-k table at one position, a one-paragraph summary, and the JSON / CSV downloads."""

from __future__ import annotations

import csv
import json
import re
import tempfile
import time
from pathlib import Path

import pandas as pd

from tracing.lens import LensResult

from .plots import percent, row_labels
from .tokens import TokenLabels, readable

DOWNLOAD_DIR = Path(tempfile.gettempdir()) / "lensbench-downloads"
_KEEP_SECONDS = 3600


def position_choices(result: LensResult, labels: TokenLabels) -> list[tuple[str, int]]:
    """(label, column index) for each traced position: "4: ␣is → ␣Berlin" (input token → final top-1)."""
    out = []
    for c, p in enumerate(result.positions):
        token = labels(result.tokens[p], result.token_ids[p])
        final = labels(result.topk_tokens[-1][c][0], int(result.topk_ids[-1, c, 0]))
        out.append((f"{p}: {token} → {final}", c))
    return out


def topk_table(result: LensResult, column: int = -1, labels: TokenLabels | None = None) -> pd.DataFrame:
    """One row per layer at one traced position, output on top as in the heatmap: the top-k as
    "token probability", entropy and KL to the output (nats), and the target's probability and rank."""
    labels = labels or TokenLabels()
    col = column % len(result.positions)
    k = result.topk_ids.shape[-1]
    records = []
    for r, layer in enumerate(row_labels(result)):
        rec = {"layer": layer}
        for i in range(k):
            tok = labels(result.topk_tokens[r][col][i], int(result.topk_ids[r, col, i]))
            rec[f"#{i + 1}"] = f"{tok} {percent(float(result.topk_probs[r, col, i]))}"
        rec["entropy"] = round(float(result.entropy[r, col]), 2)
        rec["KL"] = round(float(result.kl_to_final[r, col]), 2)
        if result.target is not None:
            rec[f"p({readable(result.target.token)})"] = percent(float(result.target.prob[r, col]))
            rec["rank"] = int(result.target.rank[r, col])
        records.append(rec)
    return pd.DataFrame.from_records(records[::-1])


def token_at(result: LensResult, column: int, table_row: int, table_column: int) -> str | None:
    """The token in a cell of `topk_table(result, column)`, or None outside the top-k columns."""
    k = result.topk_ids.shape[-1]
    if not 1 <= table_column <= k or not 0 <= table_row < result.n_rows:
        return None
    return result.topk_tokens[result.n_rows - 1 - table_row][column % len(result.positions)][table_column - 1]


def table_widths(result: LensResult) -> list[str]:
    """Column widths (percent of the table) for `topk_table`, so that it fits without scrolling."""
    k = result.topk_ids.shape[-1]
    fixed = [11] + [0] * k + [9, 7] + ([10, 7] if result.target is not None else [])
    each = (100 - sum(fixed)) / k
    return [f"{w}%" if w else f"{each:.1f}%" for w in fixed]


def summary(result: LensResult, column: int = -1, labels: TokenLabels | None = None) -> str:
    """A short markdown account: what the model predicts, where the target becomes top-1, timings."""
    labels = labels or TokenLabels()
    col = column % len(result.positions)
    pos = result.positions[col]
    after = labels(result.tokens[pos], result.token_ids[pos])
    top = labels(result.topk_tokens[-1][col][0], int(result.topk_ids[-1, col, 0]))
    start = result.positions[0]
    since = f" (from token {start})" if 0 < start and len(result.positions) > 1 else ""
    lines = [f"**{result.model}** · backend **{result.backend}** · {len(result.token_ids)} tokens, "
             f"{len(result.positions)} traced{since} × {result.n_rows} rows"]
    lines.append(f"After `{after}` the model predicts `{top}` ({result.topk_probs[-1, col, 0]:.1%}).")
    if result.target is not None:
        t = result.target
        token = labels(t.token)
        ranks = t.rank[:, col]
        first_top = next((r for r in range(result.n_rows) if int(ranks[r]) == 1), None)
        story = " → ".join(f"{_pct(float(t.prob[r, col]))} ({result.layers[r]})" for r in _story_rows(result.n_rows))
        where = (f"first becomes top-1 at **{result.layers[first_top]}**" if first_top is not None
                 else f"never becomes top-1 (final rank {int(ranks[-1])})")
        lines.append(f"Target `{token}`: {where}; probability across depth {story}.")
    if result.temperature != 1.0:
        how = "sharper" if result.temperature < 1 else "flatter"
        lines.append(f"Probabilities at temperature {result.temperature:g}: {how} than the model's own (temperature 1).")
    seconds = result.info.get("seconds")
    if seconds is not None:
        lines.append(f"Traced in {seconds:.2f} s.")
    lines += weights_notes(result)
    return "  \n".join(lines)


def weights_notes(result: LensResult) -> list[str]:
    """What the summary says about the weights (PyTorch backends): the dtype and device, why half
    precision when it is not float32, and a memory warning from the load."""
    notes = []
    dtype, device = result.info.get("dtype"), result.info.get("device")
    if dtype == "float32":
        notes.append(f"Weights in float32{f' on {device}' if device else ''}.")
    elif dtype:
        notes.append(f"⚠️ Weights in {result.info.get('dtype_reason') or dtype}.")
    if result.info.get("memory_warning"):
        notes.append(f"⚠️ {result.info['memory_warning']}")
    return notes


def _story_rows(n_rows: int) -> list[int]:
    """A few rows for a one-line account: embeddings, middle, the last two layers."""
    last = n_rows - 1
    return sorted({0, last // 2, max(0, last - 1), last})


def _pct(p: float) -> str:
    return f"{p:.0%}" if p >= 0.01 or p == 0 else f"{p:.1%}" if p >= 0.001 else "<0.1%"


def _prune(folder: Path) -> None:
    cutoff = time.time() - _KEEP_SECONDS
    for old in folder.glob("*"):
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass


def _stem(result: LensResult) -> str:
    model = re.sub(r"[^A-Za-z0-9._-]+", "-", result.model).strip("-")[:60]
    return f"lens-{model}-{result.backend}"


def write_downloads(result: LensResult) -> tuple[str, str]:
    """Write the result as JSON (`LensResult.to_dict`) and as a long CSV; return both paths."""
    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    _prune(DOWNLOAD_DIR)
    folder = Path(tempfile.mkdtemp(dir=DOWNLOAD_DIR))
    json_path = folder / f"{_stem(result)}.json"
    json_path.write_text(json.dumps(result.to_dict(), ensure_ascii=False))
    csv_path = folder / f"{_stem(result)}.csv"
    write_csv(result, csv_path)
    return str(json_path), str(csv_path)


def write_csv(result: LensResult, path: Path) -> None:
    """One line per (row, position, k): layer, lens, position, input token, rank k, token, id, prob,
    the cell's entropy and KL, and the target's probability and rank."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["row", "layer", "lens", "position", "input_token", "k", "token", "token_id", "prob",
                      "entropy", "kl_to_final", "target", "target_prob", "target_rank"])
        t = result.target
        for r, (layer, kind) in enumerate(zip(result.layers, result.lens)):
            for c, pos in enumerate(result.positions):
                tail = [float(result.entropy[r, c]), float(result.kl_to_final[r, c])]
                tail += [t.token, float(t.prob[r, c]), int(t.rank[r, c])] if t is not None else ["", "", ""]
                for k, (tok, tid, p) in enumerate(
                    zip(result.topk_tokens[r][c], result.topk_ids[r, c], result.topk_probs[r, c]), 1
                ):
                    out.writerow([r, layer, kind, pos, result.tokens[pos], k, tok, int(tid), float(p), *tail])


def patch_summary(result, labels: TokenLabels | None = None) -> str:
    """The clean and corrupted answers and the metric, above the patching heatmaps (markdown)."""
    labels = labels or TokenLabels()

    def answers(top) -> str:
        return ", ".join(f"`{labels(t)}` {_pct(p)}" for t, p in top[:3])

    info = result.info
    lines = [
        f"**Clean** answers {answers(result.clean_top)} · **corrupted** answers {answers(result.corrupt_top)}",
        f"Metric `{result.metric}`: clean {result.clean_value:.4g}, corrupted {result.corrupt_value:.4g}. "
        "Each cell: the corrupted prompt run again with that one vector taken from the clean run; "
        "100% = the clean answer fully restored, 0 = no effect.",
        f"{info.get('cells_run', 0)} cells run, {info.get('cells_skipped', 0)} known without running "
        f"(nothing differs there yet), {info.get('seconds', 0):.1f} s.",
    ]
    if result.sublayer_note:
        lines.append(f"Sublayers: {result.sublayer_note}.")
    return "  \n".join(lines)
