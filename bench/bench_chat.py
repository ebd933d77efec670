"""Chat speed through chat/ vs a bare llama_cpp.Llama, same model, prompts and settings, one run.

    python bench/bench_chat.py [--model PATH] [--runs 8] [--max-tokens 128]

Each run sends a new question to both (alternating which goes first), greedy, and measures time
to first token (from the call to the first text delta, everything chat/ does included: resolving
the model, fitting the context, the worker thread) and decode throughput (tokens after the first,
divided by the time after the first delta). Prints medians and the ratios; the target is
throughput >= 0.95x and time to first token <= 1.05x the bare call. Exits 1 if they ever answer
differently.

chat/ generates in a worker thread. On a busy 2-core Linux box, llama.cpp's OpenMP prompt
evaluation runs much faster from a fresh thread than from the main thread, so the bare call is
also timed inside a thread ("bare, thread"): chat vs that row is chat/'s own overhead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOPICS = [
    "a lighthouse keeper", "a clockmaker", "a river", "a lost kite", "an old library", "a mountain village",
    "a robot gardener", "a night train", "a fox and a crow", "a city under snow", "a glass of water", "a violin",
]


def timed(deltas) -> tuple[float, float, str]:
    """(seconds to the first delta, seconds in total, text) for an iterator of text deltas started just before."""
    start = time.perf_counter()
    first, parts = None, []
    for delta in deltas:
        if first is None:
            first = time.perf_counter() - start
        parts.append(delta)
    return first or 0.0, time.perf_counter() - start, "".join(parts)


def bare_deltas(llama, messages, max_tokens):
    for chunk in llama.create_chat_completion(messages, stream=True, temperature=0.0, top_p=0.95, max_tokens=max_tokens, seed=0):
        content = chunk["choices"][0]["delta"].get("content")
        if content:
            yield content


def in_thread(function, *args):
    out = []
    worker = threading.Thread(target=lambda: out.append(function(*args)))
    worker.start()
    worker.join()
    return out[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a GGUF (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args(argv)

    import llama_cpp

    from chat.engine import load, model_facts, stream_chat
    from runtime.llama_cpp import llama_cpp_workarounds, llama_options

    facts = model_facts(args.model)
    shared = load(args.model)
    with llama_cpp_workarounds():  # the same construction chat/ uses, without chat/ around it
        # One instance per variant: each sees the same prompts in the same order, so the KV-cache
        # reuse (and with it llama.cpp's float rounding) is the same and greedy answers must agree.
        bare, bare2 = (llama_cpp.Llama(model_path=str(shared.path), **llama_options(shared.n_ctx)) for _ in range(2))
    warm = [{"role": "user", "content": "Hello"}]
    timed(bare_deltas(bare, warm, 8))
    timed(bare_deltas(bare2, warm, 8))
    timed(stream_chat(args.model, warm, temperature=0, seed=0, max_tokens=8))

    rows = {"bare": [], "bare_thread": [], "chat": []}
    for i in range(args.runs):
        messages = [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}."}]
        order = list(rows) if i % 2 == 0 else list(rows)[::-1]
        texts = {}
        for who in order:
            if who == "bare":
                ttft, total, text = timed(bare_deltas(bare, messages, args.max_tokens))
            elif who == "bare_thread":
                ttft, total, text = in_thread(lambda: timed(bare_deltas(bare2, messages, args.max_tokens)))
            else:
                ttft, total, text = timed(stream_chat(args.model, messages, temperature=0, seed=0, max_tokens=args.max_tokens))
            tokens = len(bare.tokenize(text.encode(), add_bos=False, special=True))
            rows[who].append({"ttft": ttft, "tokens": tokens, "tps": (tokens - 1) / max(total - ttft, 1e-9)})
            texts[who] = text
        if len(set(texts.values())) != 1:
            print(f"run {i}: the answers differ: {texts}", file=sys.stderr)
            return 1

    def median(who, key):
        return statistics.median(r[key] for r in rows[who])

    result = {
        "model": facts.name,
        "threads": bare.n_threads,
        "runs": args.runs,
        "tokens_per_answer": median("bare", "tokens"),
        "bare_tokens_per_s": median("bare", "tps"),
        "chat_tokens_per_s": median("chat", "tps"),
        "bare_thread_tokens_per_s": median("bare_thread", "tps"),
        "bare_ttft_ms": 1000 * median("bare", "ttft"),
        "chat_ttft_ms": 1000 * median("chat", "ttft"),
        "bare_thread_ttft_ms": 1000 * median("bare_thread", "ttft"),
    }
    result["throughput_ratio"] = result["chat_tokens_per_s"] / result["bare_tokens_per_s"]
    result["ttft_ratio"] = result["chat_ttft_ms"] / result["bare_ttft_ms"]
    result["throughput_ratio_vs_thread"] = result["chat_tokens_per_s"] / result["bare_thread_tokens_per_s"]
    result["ttft_ratio_vs_thread"] = result["chat_ttft_ms"] / result["bare_thread_ttft_ms"]
    print(f"{facts.name}, {args.runs} answers of ~{result['tokens_per_answer']:.0f} tokens, {result['threads']} thread(s), medians:")
    print(f"  bare llama_cpp.Llama: {result['bare_tokens_per_s']:6.1f} tokens/s, first token {result['bare_ttft_ms']:6.1f} ms")
    print(f"  bare, thread:         {result['bare_thread_tokens_per_s']:6.1f} tokens/s, first token {result['bare_thread_ttft_ms']:6.1f} ms")
    print(f"  chat.stream_chat:     {result['chat_tokens_per_s']:6.1f} tokens/s, first token {result['chat_ttft_ms']:6.1f} ms")
    print(f"  chat/bare:         throughput {result['throughput_ratio']:.3f}x (target >= 0.95), time to first token {result['ttft_ratio']:.3f}x (target <= 1.05)")
    print(f"  chat/bare, thread: throughput {result['throughput_ratio_vs_thread']:.3f}x, time to first token {result['ttft_ratio_vs_thread']:.3f}x")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
