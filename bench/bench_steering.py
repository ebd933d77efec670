"""Steering: chat speed with a control vector vs without, and the time to build a vector, one run.

    python bench/bench_steering.py [--model PATH] [--runs 6] [--max-tokens 96] [--json]

Chat: the same questions through `chat.engine.stream_chat`, greedy, alternating the order of three
variants: no vector, the love-hate vector at strength 0 (llama.cpp's control vector set, adding
zeros: the same answer, so the same tokens are timed), and at strength 0.2 on layers 8-20 (a
steered answer). Decode throughput = tokens after the first / time after the first delta; the
target is >= 0.95x without a vector. A steered answer drops chat's prompt cache when the vector is
set and again when it is taken off, so its time to first token includes the whole prompt.

Build: the worked example (2 x 32 texts) on llama.cpp and on PyTorch; and, per text, a plain
llama.cpp eval of the same tokens without the capture, so the capture's own cost per layer can
be scaled to Llama 4 Scout's 48 layers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOPICS = [
    "a lighthouse keeper", "a clockmaker", "a river", "a lost kite", "an old library", "a mountain village",
    "a robot gardener", "a night train", "a fox and a crow", "a city under snow", "a glass of water", "a violin",
]
SCOUT_LAYERS = 48


def timed(stream) -> tuple[float, float, str]:
    start = time.perf_counter()
    first, parts = None, []
    for delta in stream:
        if first is None:
            first = time.perf_counter() - start
        parts.append(delta)
    return first or 0.0, time.perf_counter() - start, "".join(parts)


def chat_speed(model, vector, runs: int, max_tokens: int) -> dict:
    from chat.engine import load, stream_chat
    from tracing.steering import Steering

    shared = load(model)
    variants = {
        "none": None,
        "strength 0": Steering.of(vector, 0.0, "8-20"),
        "strength 0.2": Steering.of(vector, 0.2, "8-20"),
    }
    for steering in variants.values():  # warm-up
        timed(stream_chat(model, [{"role": "user", "content": "Hello"}], temperature=0, seed=0, max_tokens=8, steering=steering))
    rows = {name: [] for name in variants}
    for i in range(runs):
        messages = [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}."}]
        order = list(variants) if i % 2 == 0 else list(variants)[::-1]
        texts = {}
        for name in order:
            ttft, total, text = timed(stream_chat(model, messages, temperature=0, seed=0, max_tokens=max_tokens,
                                                  steering=variants[name]))
            tokens = len(shared.llama.tokenize(text.encode(), add_bos=False, special=True))
            rows[name].append({"ttft": ttft, "tokens": tokens, "tps": (tokens - 1) / max(total - ttft, 1e-9)})
            texts[name] = text
        if texts["none"] != texts["strength 0"]:
            raise SystemExit(f"run {i}: strength 0 answered differently from no vector:\n{texts}")
    out = {}
    for name in variants:
        out[name] = {
            "tokens_per_s": statistics.median(r["tps"] for r in rows[name]),
            "ttft_ms": 1000 * statistics.median(r["ttft"] for r in rows[name]),
            "tokens": statistics.median(r["tokens"] for r in rows[name]),
        }
    for name in ("strength 0", "strength 0.2"):
        out[name]["throughput_ratio"] = out[name]["tokens_per_s"] / out["none"]["tokens_per_s"]
    return out


def build_speed(model) -> dict:
    from runtime.llama_cpp import GraphContext
    from tracing.api import open_tracer
    from tracing.steering import build_with, example

    positive, negative = example()
    texts = positive + negative
    out = {}
    gguf = open_tracer(model, "llama-cpp")
    build_with(gguf, positive[:2], negative[:2])  # warm-up
    start = time.perf_counter()
    vector = build_with(gguf, positive, negative)
    out["llama_cpp_build_s"] = time.perf_counter() - start
    # The capture's own cost: the same texts through a plain llama.cpp eval (no node asked for).
    ids = [gguf.encode(t) for t in texts]
    graph = GraphContext(gguf.shared, 64)
    plain, captured = [], []
    try:
        for _ in range(3):
            for tokens in ids:
                with gguf.lock():
                    start = time.perf_counter()
                    graph.clear()
                    graph.decode(tokens, 0, [i == len(tokens) - 1 for i in range(len(tokens))])
                    plain.append(time.perf_counter() - start)
                start = time.perf_counter()
                gguf.residuals(tokens, True)
                captured.append(time.perf_counter() - start)
    finally:
        graph.close()
    out["tokens_per_text"] = statistics.mean(len(t) for t in ids)
    out["plain_eval_ms_per_text"] = 1000 * statistics.median(plain)
    out["capture_ms_per_text"] = 1000 * statistics.median(captured)
    out["capture_overhead_ms_per_layer"] = (out["capture_ms_per_text"] - out["plain_eval_ms_per_text"]) / gguf.n_blocks
    out["n_blocks"] = gguf.n_blocks
    hooks = open_tracer(model, "hooks", device="cpu")
    build_with(hooks, positive[:2], negative[:2])
    start = time.perf_counter()
    build_with(hooks, positive, negative)
    out["pytorch_build_s"] = time.perf_counter() - start
    out["texts"] = len(texts)
    out["vector_separation_max"] = float(max(s for s in vector.separation[1:]))
    return out, vector


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a GGUF (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args(argv)

    from chat.engine import model_facts

    facts = model_facts(args.model)
    build, vector = build_speed(args.model)
    chat = chat_speed(args.model, vector, args.runs, args.max_tokens)
    print(f"{facts.name}: building from {build['texts']} texts of ~{build['tokens_per_text']:.0f} tokens")
    print(f"  llama.cpp: {build['llama_cpp_build_s']:.2f} s ({1000 * build['llama_cpp_build_s'] / build['texts']:.0f} ms a text, "
          f"lens reading included); PyTorch: {build['pytorch_build_s']:.2f} s")
    print(f"  per text: plain llama.cpp eval {build['plain_eval_ms_per_text']:.1f} ms, with the capture "
          f"{build['capture_ms_per_text']:.1f} ms: {build['capture_overhead_ms_per_layer']:.2f} ms a layer")
    scout = SCOUT_LAYERS * build["capture_overhead_ms_per_layer"]
    print(f"  Llama 4 Scout ({SCOUT_LAYERS} layers): the capture adds ~{scout:.0f} ms a text to its own eval of the text")
    print(f"chat, {args.runs} answers of up to {args.max_tokens} tokens, greedy, medians:")
    for name, row in chat.items():
        ratio = f", {row['throughput_ratio']:.3f}x without (target >= 0.95)" if "throughput_ratio" in row else ""
        print(f"  {name:<13} {row['tokens_per_s']:6.1f} tokens/s, first token {row['ttft_ms']:6.1f} ms{ratio}")
    if args.json:
        print(json.dumps({"model": facts.name, "build": build, "chat": chat}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
