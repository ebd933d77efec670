"""Attention patterns and MoE routing vs a plain forward (PyTorch) and a plain eval (llama.cpp), side by side.

    .venv/bin/python bench/bench_attention.py [--model M] [--threads 1] [--repeats 5] [--json]

SmolLM2-135M (the bundled GGUF: dequantized into PyTorch for the hooks runtime, Q4_1 as it is for
llama.cpp), a short (14-token) and a long (~115-token) prompt. Interleaved medians, per runtime, of:
  plain       PyTorch: one forward as the model is loaded (SDPA), logits of the last position only;
              llama.cpp: one decode of the prompt on a fresh KV cache in a context with chat's
              settings (flash attention as chat has it), last logits
  patterns    tracing.attention_with: every layer and head, every query (30 x 9 x T x T floats),
              PyTorch switched to eager attention for the call, llama.cpp with flash attention off
  one-layer   the same for one layer (layer 15)
and, llama.cpp only, `fa-off`: the plain decode in the patterns' own context (flash attention off,
nothing read), which separates the cost of the graph without flash attention from the reading.
Target (issue 11): patterns <= 2x plain.

Routing: tracing.attention.routing_with on a tiny random Qwen3-MoE (4 experts, top 2; converted to
float32 by llama.cpp's converter, cached under .cache/) vs a plain forward / eval of the same prompt.

Memory: the pattern fetched is layers x heads x queries x keys float32; Scout on paper from it and
from the measured cost of copying one float out of llama.cpp's graph (time inside the node handlers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import interleaved_medians_ms  # noqa: E402

SHORT = "The capital of Germany is Berlin, and the capital of France is"
LONG = (
    "Berlin is the capital and largest city of Germany, by both area and population. With 3.7 million "
    "inhabitants it is the most populous city of the European Union. The city is also one of the states "
    "of Germany, and is the third smallest state in the country by area. Berlin is surrounded by the "
    "state of Brandenburg, and Brandenburg's capital Potsdam is nearby. The urban area of Berlin has a "
    "population of over 4.5 million and is therefore the most populous urban area in Germany. The "
    "capital of France, by contrast, is"
)
# Llama 4 Scout's text model: 48 layers of 40 query heads (8 KV heads).
SCOUT = {"layers": 48, "heads": 40}


def plain_fn(tracer, ids, flash_attn=None):
    """One plain forward / decode of `ids`, as the runtime runs it, logits of the last position."""
    if tracer.backend == "hooks":
        import torch

        model = tracer.lens.model
        x = torch.tensor([ids])

        def run():
            with torch.no_grad():
                model(input_ids=x, use_cache=False, logits_to_keep=1)

        return run
    from runtime.llama_cpp import GraphContext
    from tracing.attention import _UBATCH

    with tracer.lock():
        graph = GraphContext(tracer.shared, len(ids), _UBATCH, flash_attn=flash_attn, swa_full=flash_attn is False)
    tracer.__dict__.setdefault("_bench_graphs", []).append(graph)  # kept alive with the tracer

    def run():
        with tracer.lock():
            graph.clear()
            graph.decode(ids, 0, [i == len(ids) - 1 for i in range(len(ids))])

    return run, graph


def _threads(tracer, graph, threads: int) -> None:
    from llama_cpp import llama_cpp as C

    C.llama_set_n_threads(graph.ctx, threads, threads)


def measure(backend: str, model, threads: int, repeats: int) -> dict:
    import tracing
    from tracing.attention import attention_runtime, attention_with

    tracer = tracing.open_tracer(model, backend, **({"device": "cpu"} if backend == "hooks" else {}))
    runtime = attention_runtime(tracer)
    out = {"backend": backend, "layers": runtime.n_blocks, "heads": runtime.n_heads}
    for label, prompt in (("short", SHORT), ("long", LONG)):
        ids = tracer.encode(prompt)
        fns = {}
        if backend == "hooks":
            fns["plain"] = plain_fn(tracer, ids)
        else:
            fns["plain"], graph = plain_fn(tracer, ids)
            fa_off, graph_off = plain_fn(tracer, ids, flash_attn=False)
            runtime._context(len(ids))
            for g in (graph, graph_off, runtime._graph):
                _threads(tracer, g, threads)
            fns["fa-off"] = fa_off
        results, reads = {}, []

        def patterns(layers=None):
            def run():
                results[layers] = attention_with(tracer, ids=ids, layers=layers)
                if layers is None:
                    reads.append(results[layers].info["read_seconds"])
            return run

        fns["patterns"] = patterns()
        fns["one-layer"] = patterns((15,))
        ms = interleaved_medians_ms(fns, repeats)
        full = results[None]
        entry = {
            "tokens": len(ids),
            "ms": {k: round(v, 2) for k, v in ms.items()},
            "patterns_vs_plain": round(ms["patterns"] / ms["plain"], 3),
            "one_layer_vs_plain": round(ms["one-layer"] / ms["plain"], 3),
            "pattern_bytes": int(full.pattern.nbytes),
            "fetched": full.info["fetched"],
        }
        # Time inside the hooks / node handlers copying the probabilities out, per float fetched.
        entry["read_ms"] = round(1000 * statistics.median(reads), 3)
        entry["read_ns_per_float"] = round(1e9 * statistics.median(reads) / full.pattern.size, 3)
        if "fa-off" in ms:
            entry["fa_off_vs_plain"] = round(ms["fa-off"] / ms["plain"], 3)
        out[label] = entry
    return out


def routing_measure(backend: str, threads: int, repeats: int) -> dict:
    import tracing
    from tests.converted_models import converted
    from tracing.attention import attention_runtime, routing_with

    path = str(converted("qwen3_moe", "f32"))
    tracer = tracing.open_tracer(path, backend, **({"device": "cpu"} if backend == "hooks" else {}))
    runtime = attention_runtime(tracer)
    ids = tracer.encode(LONG)
    if backend == "hooks":
        plain = plain_fn(tracer, ids)
    else:
        plain, graph = plain_fn(tracer, ids)
        runtime._context(len(ids))
        for g in (graph, runtime._graph):
            _threads(tracer, g, threads)
    ms = interleaved_medians_ms({"plain": plain, "routing": lambda: routing_with(tracer, ids)}, repeats)
    return {"backend": backend, "tokens": len(ids), "ms": {k: round(v, 2) for k, v in ms.items()},
            "routing_vs_plain": round(ms["routing"] / ms["plain"], 3)}


def scout_on_paper(llama: dict, tokens: int = 1024) -> dict:
    """Scout's patterns: bytes of one query position over all layers and heads (keys = `tokens`), of the
    whole pattern, and the time to read one position's row at the per-float cost measured here."""
    per_position = SCOUT["layers"] * SCOUT["heads"] * tokens * 4
    ns = llama["long"].get("read_ns_per_float", 0.0)
    return {
        "tokens": tokens,
        "bytes_per_query_position": per_position,
        "bytes_all_queries": per_position * tokens,
        "read_ms_per_query_position": round(per_position / 4 * ns / 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = [measure(b, args.model, args.threads, args.repeats) for b in ("hooks", "llama-cpp")]
    routing = [routing_measure(b, args.threads, args.repeats) for b in ("hooks", "llama-cpp")]
    scout = scout_on_paper(rows[1])
    if args.json:
        print(json.dumps({"runtimes": rows, "routing": routing, "scout": scout}, indent=2))
        return
    print(f"Attention patterns, SmolLM2-135M ({rows[0]['layers']} layers x {rows[0]['heads']} heads), "
          f"{args.threads} thread(s), median of {args.repeats}; target: patterns <= 2x plain")
    print(f"{'':<12}{'prompt':>8}{'plain':>10}{'fa-off':>10}{'patterns':>10}{'ratio':>7}{'1 layer':>10}{'ratio':>7}"
          f"{'fetched':>10}")
    for r in rows:
        for label in ("short", "long"):
            e = r[label]
            fa = f"{e['ms']['fa-off']:>8.1f}ms" if "fa-off" in e["ms"] else f"{'':>10}"
            print(f"{r['backend']:<12}{e['tokens']:>5} tk{e['ms']['plain']:>8.1f}ms{fa}{e['ms']['patterns']:>8.1f}ms"
                  f"{e['patterns_vs_plain']:>6.2f}x{e['ms']['one-layer']:>8.1f}ms{e['one_layer_vs_plain']:>6.2f}x"
                  f"{e['pattern_bytes'] / 2**20:>8.2f}MB")
    for r in routing:
        print(f"routing, tiny Qwen3-MoE, {r['backend']}: {r['tokens']} tokens, plain {r['ms']['plain']:.1f} ms, "
              f"routing {r['ms']['routing']:.1f} ms ({r['routing_vs_plain']:.2f}x)")
    for r in rows:
        e = r["long"]
        fa = f"; flash attention off alone {e['fa_off_vs_plain']:.2f}x the plain eval" if "fa_off_vs_plain" in e else ""
        print(f"{r['backend']}: copying the {e['tokens']}-token pattern out took {e['read_ms']} ms "
              f"({e['read_ns_per_float']} ns a float){fa}")
    print(f"Scout on paper ({SCOUT['layers']} layers x {SCOUT['heads']} heads, {scout['tokens']} tokens): one query "
          f"position {scout['bytes_per_query_position'] / 2**20:.1f} MB, every query "
          f"{scout['bytes_all_queries'] / 2**30:.1f} GB; reading one position's row "
          f"{scout['read_ms_per_query_position']} ms here")


if __name__ == "__main__":
    main()
