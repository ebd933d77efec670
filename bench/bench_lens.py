"""Lens cost vs what no lens can avoid, measured side by side in one run.

    .venv/bin/python bench/bench_lens.py [--threads 1] [--repeats 15]

On the default model (SmolLM2-135M-Instruct) and one 14-token prompt, medians of:
  forward      a plain forward pass (model(ids), logits for every position)
  floor        that forward plus ONE batched matmul of all (layers+1) x positions residual rows
               through the unembedding: the arithmetic any all-positions lens must do
  lens-all     tracing.trace_with(...), every position (top-k, entropy, KL, target included)
  lens-last    tracing.trace_with(..., last_only=True)
Targets (issue 2): lens-all <= 1.25x floor; lens-last <= 1.3x forward.
Peak memory is measured in a fresh subprocess: what tracing adds to the peak RSS of a loaded,
warmed model, plus the weights, against the weights (target <= 1.2x); and, for the whole
picture, the process's RSS growth from loading and tracing (imports excluded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import interleaved_medians_ms  # noqa: E402

PROMPT = "The capital of Germany is Berlin, and the capital of France is"  # 14 tokens for SmolLM2


def timings(threads: int, repeats: int) -> dict:
    import torch

    import tracing

    torch.set_num_threads(threads)
    tracer = tracing.open_tracer(None, "hooks", device="cpu")
    model = tracer.loaded.model
    ids = tracer.encode(PROMPT)
    input_ids = torch.tensor([ids])
    unembed = model.get_output_embeddings().weight
    rows = tracer.lens.n_blocks + 1

    def forward():
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)

    def floor():
        with torch.no_grad():
            out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
            stacked = torch.cat(out.hidden_states)  # [rows, positions, d]
            stacked.reshape(-1, stacked.shape[-1]) @ unembed.T

    results = {
        "model": tracer.model_name,
        "tokens": len(ids),
        "rows": rows,
        "threads": threads,
        "repeats": repeats,
    }
    medians = interleaved_medians_ms(
        {
            "forward_ms": forward,
            "floor_ms": floor,
            "lens_all_ms": lambda: tracing.trace_with(tracer, PROMPT, target=" Paris"),
            "lens_last_ms": lambda: tracing.trace_with(tracer, PROMPT, target=" Paris", last_only=True),
        },
        repeats,
    )
    results.update(medians)
    results["lens_all_over_floor"] = results["lens_all_ms"] / results["floor_ms"]
    results["lens_last_over_forward"] = results["lens_last_ms"] / results["forward_ms"]
    return results


def _memory_child(threads: int) -> None:
    """Run in a fresh process: RSS after imports, after loading, and the peak after tracing."""
    import resource

    import psutil
    import torch

    import tracing
    from tracing.loading import load_model

    torch.set_num_threads(threads)
    process = psutil.Process()
    base = process.memory_info().rss
    loaded = load_model(None, device="cpu")
    after_load = process.memory_info().rss
    tracer = tracing.open_tracer(None, "hooks", device="cpu")  # its probe forward pages the weights in
    warm = process.memory_info().rss
    sampled = [warm]
    done = threading.Event()

    def sample() -> None:  # ru_maxrss can't separate the trace's peak from the load's
        while not done.is_set():
            sampled.append(process.memory_info().rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    tracing.trace_with(tracer, PROMPT, target=" Paris")
    done.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    print(json.dumps({
        "weights_bytes": loaded.weights_bytes,
        "load_rss_bytes": after_load - base,
        "warm_rss_bytes": warm - base,
        "peak_rss_bytes": peak - base,
        "trace_extra_bytes": max(sampled) - warm,
    }))


def memory(threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", "--threads", str(threads)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    data["peak_over_weights"] = data["peak_rss_bytes"] / data["weights_bytes"]
    data["model_plus_lens_over_weights"] = (data["weights_bytes"] + data["trace_extra_bytes"]) / data["weights_bytes"]
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.threads)
        return
    result = timings(args.threads, args.repeats)
    result.update(memory(args.threads))
    mb = 2**20
    print(f"{result['model']}, {result['tokens']} tokens, {result['rows']} rows, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print(f"  forward            {result['forward_ms']:8.1f} ms")
    print(f"  floor              {result['floor_ms']:8.1f} ms")
    print(f"  lens, all pos.     {result['lens_all_ms']:8.1f} ms   {result['lens_all_over_floor']:.2f}x floor (target <= 1.25)")
    print(f"  lens, last pos.    {result['lens_last_ms']:8.1f} ms   {result['lens_last_over_forward']:.2f}x forward (target <= 1.3)")
    print(f"  weights            {result['weights_bytes'] / mb:8.0f} MB")
    print(f"  lens peak extra    {result['trace_extra_bytes'] / mb:8.0f} MB   weights + lens = {result['model_plus_lens_over_weights']:.2f}x weights (target <= 1.2)")
    print(f"  process RSS growth {result['peak_rss_bytes'] / mb:8.0f} MB   {result['peak_over_weights']:.2f}x weights "
          "(imports excluded; includes tokenizer and transformers' own objects)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
