"""Activation patching: the whole grid vs one plain forward per cell, on PyTorch and llama.cpp, side by side.

    .venv/bin/python bench/bench_patching.py [--model M] [--threads 1] [--repeats 3] [--json]

SmolLM2-135M (the bundled GGUF: dequantized into PyTorch for the hooks runtime, Q4_1 as it is for
llama.cpp), a 13-token pair of prompts differing in one word (position 7), target " Berlin",
contrast " Paris", the residual stream plus attention and MLP outputs: 31 x 13 + 2 x 30 x 13 =
1183 cells. Interleaved medians, per runtime, of:
  forward     one plain forward of the corrupted prompt (PyTorch: logits of the last position
              only; llama.cpp: one decode on a fresh KV cache, last logits)
  grid        tracing.patching.patch_with: the whole grid (clean and corrupted runs included)
  grid-all    the same with no cell skipped (skip_identical=False): batching and prefix reuse
              alone (timed once, after the others)
Reported against naive = cells x forward (what a loop of patched forwards costs, TransformerLens's
way), and against the cells that must run x forward. Target (issue 10): grid <= 0.5x naive.

Memory: what the clean run's capture holds (rows x positions x d_model float32, per site), and for
llama.cpp the KV cache of the patching context; resident growth of this process across the first
grid on each runtime (PyTorch activations of a batch included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import interleaved_medians_ms, resident  # noqa: E402

CLEAN = "My friend lives in the capital of Germany. The city is called"
CORRUPT = "My friend lives in the capital of France. The city is called"
TARGET, CONTRAST = " Berlin", " Paris"
# Llama 4 Scout's text model, for the on-paper projection: 17.2B active parameters a token, of which
# 2 x 202,048 x 5120 = 2.07B are the embedding (looked up, not multiplied) and the output matrix
# (multiplied once a cell, for its last token): 15.1B in the blocks.
SCOUT = {"layers": 48, "d_model": 5120, "block_params": 15.1e9}


def forward_fn(tracer, ids):
    """One plain forward of `ids`, as the runtime runs it, logits of the last position."""
    if tracer.backend == "hooks":
        import torch

        model = tracer.lens.model
        x = torch.tensor([ids])

        def run():
            with torch.no_grad():
                model(input_ids=x, use_cache=False, logits_to_keep=1)

        return run
    from runtime.llama_cpp import GraphContext

    graph = GraphContext(tracer.shared, len(ids))
    tracer._plain_graph = graph  # kept alive with the tracer

    def run():
        with tracer.lock():
            graph.clear()
            graph.decode(ids, 0, [i == len(ids) - 1 for i in range(len(ids))])

    return run


def measure(backend: str, model, threads: int, repeats: int) -> dict:
    import tracing
    from tracing.patching import patch_runtime, patch_with

    tracer = tracing.open_tracer(model, backend, **({"device": "cpu"} if backend == "hooks" else {}))
    if backend == "llama-cpp":
        from llama_cpp import llama_cpp as C

        runtime = patch_runtime(tracer)
        C.llama_set_n_threads(runtime.graph.ctx, threads, threads)
    ids = tracer.encode(CORRUPT)
    forward = forward_fn(tracer, ids)
    if backend == "llama-cpp":
        from llama_cpp import llama_cpp as C

        C.llama_set_n_threads(tracer._plain_graph.ctx, threads, threads)
    before = resident(_gguf())
    results = {}

    def grid(skip: bool):
        def run():
            results[skip] = patch_with(tracer, CLEAN, CORRUPT, TARGET, CONTRAST, skip_identical=skip)
        return run

    grid(True)()
    grown = resident(_gguf()) - before
    times = interleaved_medians_ms({"forward": forward, "grid": grid(True)}, repeats)
    start = time.perf_counter()
    grid(False)()  # once: it only shows what batching and prefix reuse do without skipping
    times["grid-all"] = (time.perf_counter() - start) * 1000
    result = results[True]
    cells = result.info["cells_run"] + result.info["cells_skipped"]
    naive = cells * times["forward"]
    rows, positions = result.n_rows, len(result.positions)
    d = tracer.d_model if backend == "llama-cpp" else tracer.lens.model.config.hidden_size
    capture = (rows + 2 * (rows - 1)) * positions * d * 4
    out = {
        "backend": backend,
        "tokens": positions,
        "cells": cells,
        "cells_run": result.info["cells_run"],
        "tokens_run": result.info.get("tokens_run"),
        "forward_ms": round(times["forward"], 1),
        "grid_ms": round(times["grid"], 1),
        "grid_all_ms": round(times["grid-all"], 1),
        "naive_ms": round(naive, 1),
        "grid_vs_naive": round(times["grid"] / naive, 3),
        "grid_all_vs_naive": round(times["grid-all"] / naive, 3),
        "grid_vs_cells_run_x_forward": round(times["grid"] / (result.info["cells_run"] * times["forward"]), 3),
        "capture_bytes": capture,
        "resident_growth_bytes": grown,
        "effect_at_subject_row_10": round(float(result.effect[10, 7]), 3),
    }
    if backend == "llama-cpp":
        runtime = patch_runtime(tracer)
        meta = tracer.shared.facts.metadata
        arch = tracer.shared.facts.architecture
        kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", 1))
        head = d // int(meta.get(f"{arch}.attention.head_count", 1))
        out["patch_context_tokens"] = runtime.graph.n_ctx
        out["kv_cache_bytes"] = runtime.graph.n_ctx * tracer.n_blocks * kv_heads * head * 2 * 2
        out["ms_per_token_per_layer"] = round(times["grid"] / result.info["tokens_run"] / tracer.n_blocks, 4)
    return out


def _gguf() -> str:
    from tracing.models import bundled_gguf

    return str(Path(bundled_gguf()).resolve())


def scout_on_paper(llama: dict, positions: int = 13) -> dict:
    """Scout's clean capture and a cell's cost, from the SmolLM2 measurement (a token's compute
    scales with the parameters its blocks multiply: 106.7M for SmolLM2, 15.1B for Scout)."""
    rows = SCOUT["layers"] + 1
    capture = (rows + 2 * SCOUT["layers"]) * positions * SCOUT["d_model"] * 4
    smol_blocks = 134.5e6 - 49152 * 576  # SmolLM2's blocks (its tied embedding is looked up, not multiplied)
    per_token_ms = llama["grid_ms"] / llama["tokens_run"] * SCOUT["block_params"] / smol_blocks
    return {
        "capture_bytes_13_tokens": capture,
        "capture_bytes_per_position": capture // positions,
        "tokens_run_13_tokens": llama["tokens_run"],
        "ms_per_cell_token_one_core_here": round(per_token_ms, 1),
        "grid_seconds_one_core_here": round(per_token_ms * llama["tokens_run"] / 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = [measure(b, args.model, args.threads, args.repeats) for b in ("hooks", "llama-cpp")]
    scout = scout_on_paper(rows[1])
    if args.json:
        print(json.dumps({"runtimes": rows, "scout": scout}, indent=2))
        return
    print(f"Activation patching, SmolLM2-135M, {rows[0]['tokens']} tokens, {rows[0]['cells']} cells "
          f"(residual + attention + MLP), {args.threads} thread(s), median of {args.repeats}")
    print(f"{'':<12}{'forward':>9}{'naive':>10}{'grid':>9}{'ratio':>7}{'grid-all':>10}{'ratio':>7}"
          f"{'cells run':>10}{'vs run x fwd':>13}")
    for r in rows:
        print(f"{r['backend']:<12}{r['forward_ms']:>7.1f}ms{r['naive_ms'] / 1000:>8.1f} s{r['grid_ms'] / 1000:>7.2f} s"
              f"{r['grid_vs_naive']:>6.2f}x{r['grid_all_ms'] / 1000:>8.2f} s{r['grid_all_vs_naive']:>6.2f}x"
              f"{r['cells_run']:>10}{r['grid_vs_cells_run_x_forward']:>12.2f}x")
    for r in rows:
        extra = f", KV cache of the patching context {r['kv_cache_bytes'] / 2**20:.1f} MB ({r['patch_context_tokens']} tokens)" \
            if "kv_cache_bytes" in r else ""
        print(f"{r['backend']}: clean capture {r['capture_bytes'] / 2**20:.2f} MB{extra}; resident growth over "
              f"the first grid {r['resident_growth_bytes'] / 2**20:+.0f} MB")
    print(f"llama.cpp: {rows[1]['tokens_run']} tokens decoded for the grid, "
          f"{rows[1]['ms_per_token_per_layer']} ms per token per layer")
    print(f"Scout on paper: clean capture {scout['capture_bytes_13_tokens'] / 2**20:.1f} MB for 13 tokens "
          f"({scout['capture_bytes_per_position'] / 2**20:.2f} MB a position); "
          f"{scout['ms_per_cell_token_one_core_here']} ms per cell token on one core here, "
          f"{scout['grid_seconds_one_core_here']} s for the grid")


if __name__ == "__main__":
    main()
