"""Direct logit attribution at the last position vs a plain forward, on PyTorch and llama.cpp, side by side.

    .venv/bin/python bench/bench_attribution.py [--model M] [--threads 1] [--repeats 5] [--json]

SmolLM2-135M (the bundled GGUF: dequantized into PyTorch for the hooks runtime, Q4_1 as it is for
llama.cpp), target " Berlin", contrast " Paris", at the last position of a short prompt (13 tokens)
and a long one (the same text repeated, ~130 tokens). Interleaved medians, per runtime and prompt, of:
  forward     one plain forward of the prompt (PyTorch: logits of the last position only;
              llama.cpp: one decode on a fresh KV cache, last logits)
  dla         tracing.attribution.attribute_with: the parts, per-head shares included
  dla-blocks  the same without heads (heads=False)
Target (issue 11): dla <= 1.5x forward on both runtimes.

Memory: what one position's capture holds (the embeddings, the residual after attention and after
each block, and each block's heads' outputs before the output projection, float32), and, on paper,
the same for Llama 4 Scout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import interleaved_medians_ms  # noqa: E402

SHORT = "My friend lives in the capital of Germany. The city is called"
LONG = " ".join([SHORT.replace(" called", " called Berlin.")] * 9) + " " + SHORT
TARGET, CONTRAST = " Berlin", " Paris"
# Llama 4 Scout's text model, for the on-paper projection (48 blocks, d_model 5120, 40 query heads of 128).
SCOUT = {"layers": 48, "d_model": 5120, "heads": 40, "head_dim": 128, "active_params": 17.2e9}


def forward_fn(tracer, ids):
    """One plain forward of `ids`, as the runtime runs it, logits of the last position (llama.cpp: a
    context like attribution's and the lens's, 128 tokens a decode)."""
    if tracer.backend == "hooks":
        import torch

        model = tracer.lens.model
        x = torch.tensor([ids])

        def run():
            with torch.no_grad():
                model(input_ids=x, use_cache=False, logits_to_keep=1)

        return run
    from runtime.llama_cpp import GraphContext

    graph = GraphContext(tracer.shared, len(ids), 128)
    tracer._plain_graph = graph  # kept alive with the tracer
    step = graph.n_ubatch

    def run():
        with tracer.lock():
            graph.clear()
            for start in range(0, len(ids), step):
                piece = ids[start : start + step]
                graph.decode(piece, start, [start + i == len(ids) - 1 for i in range(len(piece))])

    return run


def measure(backend: str, model, threads: int, repeats: int) -> list[dict]:
    import tracing
    from tracing.attribution import attribute_with, attribution_runtime

    tracer = tracing.open_tracer(model, backend, **({"device": "cpu"} if backend == "hooks" else {}))
    runtime = attribution_runtime(tracer)
    rows = []
    for name, prompt in (("short", SHORT), ("long", LONG)):
        ids = tracer.encode(prompt)
        forward = forward_fn(tracer, ids)
        if backend == "llama-cpp":
            from llama_cpp import llama_cpp as C

            runtime._ensure(len(ids))
            C.llama_set_n_threads(tracer._plain_graph.ctx, threads, threads)
            C.llama_set_n_threads(runtime.graph.ctx, threads, threads)
        results = {}

        def dla(heads: bool):
            def run():
                results[heads] = attribute_with(tracer, None, TARGET, CONTRAST, ids=ids, heads=heads)
            return run

        times = interleaved_medians_ms({"forward": forward, "dla": dla(True), "dla-blocks": dla(False)}, repeats)
        result = results[True]
        if backend == "hooks":
            config = tracer.lens.model.config
            d, heads, head_dim = config.hidden_size, config.num_attention_heads, config.hidden_size // config.num_attention_heads
        else:
            d, heads = tracer.d_model, runtime.n_heads
            head_dim = d // heads
        blocks = len(result.attention)
        rows.append({
            "backend": backend,
            "prompt": name,
            "tokens": len(ids),
            "forward_ms": round(times["forward"], 1),
            "dla_ms": round(times["dla"], 1),
            "dla_blocks_ms": round(times["dla-blocks"], 1),
            "dla_vs_forward": round(times["dla"] / times["forward"], 3),
            "dla_blocks_vs_forward": round(times["dla-blocks"] / times["forward"], 3),
            "capture_bytes": ((1 + 2 * blocks) * d + blocks * heads * head_dim) * 4,
            "error": result.error,
            "final_logit": round(result.final_logit, 4),
            "top_head": f"L{int(result.heads.argmax()) // heads + 1}H{int(result.heads.argmax()) % heads}",
        })
    return rows


def scout_on_paper(llama: dict) -> dict:
    """One position's capture for Scout, and the extra work beyond the prompt's forward: each head's
    output through its own columns of W_o (`QuantizedMatrix.matmul_heads`; with Q4_K's 256-wide
    blocks and 128-wide heads, two heads share a block and each is multiplied by both heads' columns:
    2 x 5120 x 5120 multiply-adds a block) against a token's forward (2 x 17.2B)."""
    s = SCOUT
    capture = ((1 + 2 * s["layers"]) * s["d_model"] + s["layers"] * s["heads"] * s["head_dim"]) * 4
    heads_flops = 2 * s["layers"] * s["d_model"] * s["heads"] * s["head_dim"] * 2
    token_flops = 2 * s["active_params"]
    return {
        "capture_bytes_per_position": capture,
        "parts_float64_bytes": (1 + 2 * s["layers"] + s["layers"] * s["heads"]) * s["d_model"] * 8,
        "heads_gflop": round(heads_flops / 1e9, 1),
        "token_forward_gflop": round(token_flops / 1e9, 1),
        "heads_in_tokens_of_forward": round(heads_flops / token_flops, 2),
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
    rows = [row for backend in ("hooks", "llama-cpp") for row in measure(backend, args.model, args.threads, args.repeats)]
    scout = scout_on_paper(rows[-1])
    if args.json:
        print(json.dumps({"runs": rows, "scout": scout}, indent=2))
        return
    print(f"Direct logit attribution at the last position, SmolLM2-135M, logit(' Berlin') - logit(' Paris'), "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'':<12}{'tokens':>7}{'forward':>10}{'dla':>10}{'ratio':>7}{'dla-blocks':>12}{'ratio':>7}"
          f"{'capture':>10}{'error':>9}  top head")
    for r in rows:
        print(f"{r['backend']:<12}{r['tokens']:>7}{r['forward_ms']:>8.1f}ms{r['dla_ms']:>8.1f}ms"
              f"{r['dla_vs_forward']:>6.2f}x{r['dla_blocks_ms']:>10.1f}ms{r['dla_blocks_vs_forward']:>6.2f}x"
              f"{r['capture_bytes'] / 1024:>7.0f} KB{r['error']:>9.1e}  {r['top_head']}")
    print(f"Scout on paper, one position: capture {scout['capture_bytes_per_position'] / 2**20:.1f} MB "
          f"(parts as float64 {scout['parts_float64_bytes'] / 2**20:.0f} MB); heads through W_o "
          f"{scout['heads_gflop']} GFLOP = {scout['heads_in_tokens_of_forward']} tokens of forward "
          f"({scout['token_forward_gflop']} GFLOP a token)")


if __name__ == "__main__":
    main()
