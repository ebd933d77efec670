"""The llama.cpp lens vs a plain llama.cpp eval of the same prompt, measured side by side in one run.

    .venv/bin/python bench/bench_llama_cpp.py [--model PATH] [--moe ARCH] [--threads 1] [--repeats 9] [--json]

On the default model (the bundled SmolLM2 GGUF) and on a tiny mixture-of-experts model converted by
llama.cpp's own converter (tests/converted_models.py; default llama4, Scout's layout, Q8_0), for a
short and a long prompt, interleaved medians of:
  eval-last     llama_decode of the prompt, logits for the last token, on a context like the
                lens's (same model, threads, batch) but with no eval callback
  capture-last  the lens's capture: the same decode with the callback copying every block's output
  eval-all      plain decode, logits for every position (what the all-positions lens asks llama.cpp for)
  capture-all   the capture for every position
  lens-last     tracing.trace_with(..., last_only=True): capture + projection of every row + lens math
  lens-all      tracing.trace_with(...): every position
Target (issue 5): capture <= 1.10x the plain eval. The full lens also projects (layers + 1) x
positions rows through the vocabulary, work no plain eval does; it is reported as measured.

Memory, in a fresh process: resident growth when the lens opens and traces on top of chat's loaded
model (the GGUF's pages counted once), against the GGUF's size.

Projection throughput: ggml's quantized matmul (what the lens uses for the unembedding) on
Llama 4 Scout-shaped output rows (5120 wide) in the types Scout GGUFs use, for the README's
on-paper projection of the Scout case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import interleaved_medians_ms, resident  # noqa: E402

SHORT = "The capital of Germany is Berlin, and the capital of France is"
LONG = (
    "Berlin is the capital and largest city of Germany, by both area and population. With 3.7 million "
    "inhabitants it is the most populous city of the European Union. The city is also one of the states "
    "of Germany, and is the third smallest state in the country by area. Berlin is surrounded by the "
    "state of Brandenburg, and Brandenburg's capital Potsdam is nearby. The urban area of Berlin has a "
    "population of over 4.5 million and is therefore the most populous urban area in Germany. The "
    "capital of France, by contrast, is"
)
# Llama 4 Scout (17B active, 109B total, 16 experts): its text model's shape.
SCOUT = {"layers": 48, "d_model": 5120, "vocab": 202048}


def timings(model, threads: int, repeats: int) -> dict:
    import tracing
    from runtime.llama_cpp import graph_context_params
    from tracing.llama_cpp_backend import _UBATCH, decode_spans

    tracer = tracing.open_tracer(model, "llama-cpp")
    C = tracer._C
    out = {"model": tracer.model_name, "layers": tracer.n_blocks, "d_model": tracer.d_model, "vocab": tracer.n_vocab}
    for label, prompt in (("short", SHORT), ("long", LONG)):
        ids = tracer.encode(prompt)
        with tracer.lock():
            lens_ctx = tracer._context(len(ids)).ctx
            plain_ctx = C.llama_init_from_model(tracer._model, graph_context_params(tracer.llama, len(ids), _UBATCH))
            for ctx in (lens_ctx, plain_ctx):
                C.llama_set_n_threads(ctx, threads, threads)
        tracer.head.unembed.n_threads = threads
        batch = C.llama_batch_init(len(ids), 0, 1)
        ubatch = int(C.llama_n_ubatch(plain_ctx))

        def plain_eval(all_positions: bool) -> None:
            traced = np.ones(len(ids), bool) if all_positions else np.arange(len(ids)) == len(ids) - 1
            with tracer.lock():
                C.llama_memory_clear(C.llama_get_memory(plain_ctx), True)
                for start, end in decode_spans(traced, ubatch, tracer._max_outputs):
                    for i in range(end - start):
                        batch.token[i], batch.pos[i] = ids[start + i], start + i
                        batch.n_seq_id[i], batch.seq_id[i][0] = 1, 0
                        batch.logits[i] = bool(traced[start + i])
                    batch.n_tokens = end - start
                    assert C.llama_decode(plain_ctx, batch) == 0

        fns = {
            "eval-last": lambda: plain_eval(False),
            "capture-last": lambda: tracer.residuals(ids, last_only=True),
            "eval-all": lambda: plain_eval(True),
            "capture-all": lambda: tracer.residuals(ids, last_only=False),
            "lens-last": lambda: tracing.trace_with(tracer, prompt, ids=ids, last_only=True),
            "lens-all": lambda: tracing.trace_with(tracer, prompt, ids=ids),
        }
        ms = interleaved_medians_ms(fns, repeats)
        C.llama_batch_free(batch)
        C.llama_free(plain_ctx)
        out[label] = {
            "tokens": len(ids),
            "ms": {k: round(v, 2) for k, v in ms.items()},
            "capture_last_vs_eval": round(ms["capture-last"] / ms["eval-last"], 3),
            "capture_all_vs_eval_all": round(ms["capture-all"] / ms["eval-all"], 3),
            "lens_last_vs_eval": round(ms["lens-last"] / ms["eval-last"], 2),
            "lens_all_vs_eval_all": round(ms["lens-all"] / ms["eval-all"], 2),
            # what capturing one layer adds to one decode (all positions; never below 0 in noise)
            "capture_ms_per_layer_per_decode": round(
                max(0.0, ms["capture-all"] - ms["eval-all"])
                / tracer.n_blocks
                / sum(1 for _ in decode_spans(np.ones(len(ids), bool), ubatch, tracer._max_outputs)),
                4,
            ),
        }
    return out


def converted_moe(arch: str) -> Path:
    """A tiny random-weight MoE model of `arch`, converted to Q8_0 by llama.cpp's own converter (cached)."""
    from tests.converted_models import converted

    return converted(arch, "q8_0")


def projection_throughput(threads: int, repeats: int) -> dict:
    """Giga multiply-adds per second of ggml's matmul on Scout-wide quantized rows (random bytes:
    the kernels' speed does not depend on the values)."""
    from runtime.ggml import QuantizedMatrix, ggml

    g = ggml()
    rows, n = 8192, SCOUT["layers"] + 1  # one position's rows: embeddings + 48 blocks
    x = np.random.default_rng(0).standard_normal((n, SCOUT["d_model"])).astype(np.float32)
    out = {}
    for name, ggml_type in (("Q8_0", 8), ("Q6_K", 14), ("Q4_K", 12)):
        nbytes = g.row_size(ggml_type, SCOUT["d_model"]) * rows
        data = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
        matrix = QuantizedMatrix(data, ggml_type, rows, SCOUT["d_model"], threads)
        ms = interleaved_medians_ms({name: lambda: matrix.matmul(x)}, repeats)[name]
        out[name] = round(rows * SCOUT["d_model"] * n / (ms / 1000) / 1e9, 2)
    return out


MEMORY_CHILD = "--memory-child"


def memory_child(model) -> None:
    import torch

    import tracing
    from runtime.llama_cpp import shared_llama
    from tracing.lens import summarize
    from tracing.llama_cpp_backend import trace_reply
    from tracing.models import resolve

    path = os.path.realpath(resolve(model).location)
    summarize(torch.randn(2, 2, 8), lambda x: x @ torch.randn(8, 1000), target_id=1)  # torch's own pages
    start = resident(path)
    shared = shared_llama(path)
    question = [{"role": "user", "content": "What is the capital of Germany?"}]
    with shared.lock:
        answer = shared.llama.create_chat_completion(question, max_tokens=16, temperature=0)
    reply = answer["choices"][0]["message"]["content"]
    chat = resident(path)
    tracing.trace(LONG, model=path, backend="llama-cpp")
    tracing.trace(SHORT, model=path, backend="llama-cpp", last_only=True)
    trace_reply(path, question, reply)
    lens = resident(path)
    print(json.dumps({"gguf": os.path.getsize(path), "chat": chat - start, "lens": lens - chat, "n_ctx": shared.n_ctx}))


def memory(model) -> dict:
    command = [sys.executable, __file__, MEMORY_CHILD] + ([model] if model else [])
    out = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode != 0:
        return {"error": out.stderr[-1000:]}
    grown = json.loads(out.stdout.strip().splitlines()[-1])
    gguf = grown["gguf"]
    return {
        "gguf_mb": round(gguf / 2**20, 1),
        "context_tokens": grown["n_ctx"],
        "chat_growth_mb": round(grown["chat"] / 2**20, 1),
        "lens_growth_mb": round(grown["lens"] / 2**20, 1),
        "chat_vs_gguf": round(grown["chat"] / gguf, 2),
        "lens_vs_gguf": round(grown["lens"] / gguf, 3),
        "total_vs_gguf": round((grown["chat"] + grown["lens"]) / gguf, 2),
    }


def scout_on_paper(result: dict) -> dict:
    """Llama 4 Scout from the measured costs: projection time per traced position, capture overhead."""
    rows = SCOUT["layers"] + 1
    macs = rows * SCOUT["vocab"] * SCOUT["d_model"]  # one position, every row through the unembedding
    per_position = {name: round(macs / (gmacs * 1e9), 2) for name, gmacs in result["projection_gmacs"].items()}
    measured = [t for t in (result["timings"], result.get("moe_timings")) if t]
    per_layer = max(t[label]["capture_ms_per_layer_per_decode"] for t in measured for label in ("short", "long"))
    return {
        "unembedding_gb_float32": round(SCOUT["vocab"] * SCOUT["d_model"] * 4 / 1e9, 2),
        "projection_gmac_per_position": round(macs / 1e9, 1),
        "projection_seconds_per_position_by_type": per_position,
        "capture_ms_per_decode": round(per_layer * SCOUT["layers"], 2),
        "hidden_rows_mb_per_position": round(rows * SCOUT["d_model"] * 4 / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a GGUF (default: the bundled SmolLM2)")
    parser.add_argument("--moe", default="llama4", help="a converted test architecture to time too ('' for none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = {
        "threads": args.threads,
        "timings": timings(args.model, args.threads, args.repeats),
        "moe_timings": timings(str(converted_moe(args.moe)), args.threads, args.repeats) if args.moe else None,
        "projection_gmacs": projection_throughput(args.threads, max(3, args.repeats // 3)),
        "memory": memory(args.model),
    }
    result["scout_on_paper"] = scout_on_paper(result)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for t in (result["timings"], result["moe_timings"]):
        if t is None:
            continue
        print(f"{t['model']}: {t['layers']} layers, d_model {t['d_model']}, vocab {t['vocab']}; {args.threads} thread(s)")
        for label in ("short", "long"):
            r = t[label]
            cells = "  ".join(f"{k} {v:.1f}" for k, v in r["ms"].items())
            print(f"  {label} prompt, {r['tokens']} tokens (ms): {cells}")
            print(
                f"    capture vs plain eval: last {r['capture_last_vs_eval']:.3f}x, all positions "
                f"{r['capture_all_vs_eval_all']:.3f}x (target <= 1.10x); full lens: last "
                f"{r['lens_last_vs_eval']:.2f}x, all {r['lens_all_vs_eval_all']:.2f}x"
            )
    print(f"  projection (ggml quantized matmul, Scout-wide rows): {result['projection_gmacs']} GMAC/s")
    print(f"  memory: {result['memory']}")
    print(f"  Scout on paper: {result['scout_on_paper']}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == MEMORY_CHILD:
        memory_child(sys.argv[2] if len(sys.argv) > 2 else None)
    else:
        main()
