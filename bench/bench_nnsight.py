"""The nnsight backend against the hooks backend: same model, same prompt, one run.

    .venv/bin/python bench/bench_nnsight.py [--model M] [--threads 1] [--repeats 15]

Medians (interleaved, so load from other processes hits both alike) of:
  hooks, nnsight              tracing.trace_with, every position, a target followed
  hooks last, nnsight last    the same at the last position only
  patch hooks, patch nnsight  one activation-patching grid with attention and MLP (--patch-repeats times)
and the ratio nnsight / hooks of each; plus what a remote trace would move: the serialized request
(built, not sent) and the saved statistics per traced position, against the residual rows and the
logits a trace could ship instead.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_lens import PROMPT, interleaved_medians_ms  # noqa: E402

CLEAN, CORRUPT, TARGET, CONTRAST = "The capital of Germany is", "The capital of France is", " Berlin", " Paris"


def run(model, threads: int, repeats: int, patch_repeats: int) -> dict:
    import numpy as np
    import torch

    import tracing
    from tracing.nnsight_backend import NnsightTracer, build_request
    from tracing.patching import patch_with

    torch.set_num_threads(threads)
    hooks = tracing.open_tracer(model, "hooks", device="cpu")
    wrapped = tracing.open_tracer(model, "nnsight", device="cpu")
    ids = hooks.encode(PROMPT)
    rows, d = hooks.lens.n_blocks + 1, int(hooks.lens.parts.unembed.weight.shape[1])
    results: dict = {"model": hooks.model_name, "threads": threads, "repeats": repeats, "tokens": len(ids), "rows": rows}

    fns = {
        "hooks": lambda: tracing.trace_with(hooks, PROMPT, target=" Paris"),
        "nnsight": lambda: tracing.trace_with(wrapped, PROMPT, target=" Paris"),
        "hooks last": lambda: tracing.trace_with(hooks, PROMPT, target=" Paris", last_only=True),
        "nnsight last": lambda: tracing.trace_with(wrapped, PROMPT, target=" Paris", last_only=True),
    }
    medians = interleaved_medians_ms(fns, repeats)
    patches = interleaved_medians_ms({
        "patch hooks": lambda: patch_with(hooks, CLEAN, CORRUPT, TARGET, CONTRAST),
        "patch nnsight": lambda: patch_with(wrapped, CLEAN, CORRUPT, TARGET, CONTRAST),
    }, patch_repeats)
    medians.update(patches)
    results["ms"] = {name: round(ms, 1) for name, ms in medians.items()}
    results["nnsight_over_hooks"] = {
        "all positions": round(medians["nnsight"] / medians["hooks"], 2),
        "last position": round(medians["nnsight last"] / medians["hooks last"], 2),
        "patching grid": round(medians["patch nnsight"] / medians["patch hooks"], 2),
    }
    a = tracing.trace_with(hooks, PROMPT, target=" Paris")
    b = tracing.trace_with(wrapped, PROMPT, target=" Paris")
    results["agreement"] = {
        "same_top1": bool((a.topk_ids[..., 0] == b.topk_ids[..., 0]).all()),
        "max_prob_diff": float(np.abs(a.topk_probs - b.topk_probs).max()),
    }

    # What a remote trace moves. The request: built exactly as nnsight would send it.
    import nnsight.modeling.huggingface as hf

    repo = "HuggingFaceTB/SmolLM2-135M-Instruct"
    hf._ID_CACHE.setdefault(repo, repo)  # the hub's canonical id, given (no network here)
    remote = NnsightTracer(hooks.loaded, remote=True, repo_id=repo)
    target_id = hooks.encode_target(" Paris")[0]
    request, blob = build_request(remote, ids, list(range(len(ids))), target_id=target_id)
    stats = wrapped.lens.statistics(ids, list(range(len(ids))), top_k=5, temperature=1.0, target_id=target_id,
                                    alternative_id=None)
    arrays = sum(v.nbytes for v in stats.values() if hasattr(v, "nbytes"))
    vocab = int(hooks.lens.parts.unembed.weight.shape[0])
    results["bytes"] = {
        "request_payload": len(blob),
        "statistics_per_position": round(arrays / len(ids)),
        "statistics_pickled_per_position": round(len(pickle.dumps(stats)) / len(ids)),
        "residual_rows_per_position_fp32": rows * d * 4,
        "logits_per_position_fp32": rows * vocab * 4,
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--patch-repeats", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    result = run(args.model, args.threads, args.repeats, args.patch_repeats)
    print(f"{result['model']}, {result['tokens']} tokens, {result['rows']} rows, {args.threads} thread(s), "
          f"median of {args.repeats} (patching: {args.patch_repeats})")
    for name, ms in result["ms"].items():
        print(f"  {name:<16} {ms:9.1f} ms")
    for name, ratio in result["nnsight_over_hooks"].items():
        print(f"  nnsight / hooks, {name}: {ratio:.2f}x")
    agree = result["agreement"]
    print(f"  same top-1 in every cell: {agree['same_top1']}, largest probability difference {agree['max_prob_diff']:.1e}")
    size = result["bytes"]
    print(f"  remote: request {size['request_payload']:,} bytes; back per position {size['statistics_per_position']:,} "
          f"bytes of statistics (vs {size['residual_rows_per_position_fp32']:,} of float32 residual rows, "
          f"{size['logits_per_position_fp32']:,} of logits)")
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
