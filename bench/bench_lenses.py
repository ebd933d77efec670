"""Learned lenses on the bundled SmolLM2: fit and training time with their data size, held-out KL
per layer for the logit, tuned and Jacobian lens, and the J-lens readout against the logit lens.

    python bench/bench_lenses.py [--chunks 2] [--jacobian-seq-len 32] [--steps 2] [--tokens-per-step 512]
                                 [--lenses DIR] [--reuse] [--json]

Text: sampled from the model through llama.cpp (the fits' offline default), one text to train
on and another, with other seeds, held out. Fits: the Jacobian lens (TransformerLens's
JacobianLens, PyTorch), the tuned lens trained in PyTorch, the tuned lens trained from the GGUF
alone (llama.cpp forward only). Every lens is then measured on the same held-out chunks:
KL(model output || lens) per row, averaged over every position, through tracing.lens.
Readout: one prompt, all positions, interleaved medians: the jacobian-lens backend vs the
transformer-lens backend (same bridge, same rows: J-lens costs the transport), and on llama.cpp
the J-lens vs the logit lens. Target: <= 1.3x. --reuse: measure lenses already in --lenses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "The capital of Germany is Berlin, and the capital of France is Paris. The Eiffel Tower stands in"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--jacobian-seq-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokens-per-step", type=int, default=512)
    parser.add_argument("--sample-tokens", type=int, default=4000, help="training text sampled from the model")
    parser.add_argument("--held-out", type=int, default=2, help="held-out chunks of 64 tokens")
    parser.add_argument("--lenses", default=str(Path(__file__).resolve().parent.parent / ".cache" / "bench-lenses"))
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--resample", action="store_true", help="sample new texts (default: reuse those in --lenses)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from bench.measure import interleaved_medians_ms
    from tracing.api import open_tracer, trace_with
    from tracing.fit_lens import fit_jacobian_lens, fit_tuned_lens, held_out_kl, sample_text
    from tracing.gguf_lens import train_tuned_lens_gguf
    from tracing.loading import load_model

    torch.manual_seed(0)
    lenses = Path(args.lenses)
    lenses.mkdir(parents=True, exist_ok=True)
    report: dict = {"threads": torch.get_num_threads()}

    text_file, held_file = lenses / "train.txt", lenses / "held.txt"
    if args.resample or not (text_file.is_file() and held_file.is_file()):
        start = time.perf_counter()
        text_file.write_text(sample_text(None, tokens=args.sample_tokens, seed=0))
        report["sample_seconds"] = round(time.perf_counter() - start, 1)
        report["sample_tokens"] = args.sample_tokens
        held_file.write_text(sample_text(None, tokens=64 * args.held_out + 200, seed=1000))
    text = text_file.read_text()
    loaded = load_model(None, device="cpu")
    from tracing.train_lens import sequences

    held = [row.tolist() for row in sequences(loaded, held_file.read_text(), 64)[: args.held_out]]

    fits = {}
    if not args.reuse:
        r = fit_jacobian_lens(loaded, text, chunks=args.chunks, seq_len=args.jacobian_seq_len, skip_first=4,
                              out=lenses / "jacobian")
        fits["jacobian"] = {"seconds": round(r.seconds, 1), "data": r.data, "tokens": r.train_tokens}
        r = fit_tuned_lens(loaded, text, steps=args.steps, tokens_per_step=args.tokens_per_step, out=lenses / "tuned")
        fits["tuned (PyTorch)"] = {"seconds": round(r.seconds, 1), "data": r.data, "tokens": r.train_tokens}
        r = train_tuned_lens_gguf(None, text, steps=args.steps, tokens_per_step=args.tokens_per_step,
                                  out=lenses / "tuned-gguf")
        fits["tuned (GGUF, llama.cpp)"] = {"seconds": round(r.seconds, 1), "data": r.data, "tokens": r.train_tokens}
        (lenses / "fits.json").write_text(json.dumps(fits))
    else:
        fits = json.loads((lenses / "fits.json").read_text())
    report["fits"] = fits

    tracers = {
        "logit": open_tracer(None, "transformer-lens", device="cpu"),
        "tuned": open_tracer(None, "tuned-lens-tuned", device="cpu", lens=str(lenses / "tuned")),
        "jacobian": open_tracer(None, "jacobian-lens", device="cpu", lens=str(lenses / "jacobian")),
        "logit (llama.cpp)": open_tracer(None, "llama-cpp"),
        "tuned (llama.cpp)": open_tracer(None, "llama-cpp", lens_kind="tuned", lens=str(lenses / "tuned")),
        "tuned from GGUF (llama.cpp)": open_tracer(None, "llama-cpp", lens_kind="tuned", lens=str(lenses / "tuned-gguf")),
        "jacobian (llama.cpp)": open_tracer(None, "llama-cpp", lens_kind="jacobian", lens=str(lenses / "jacobian")),
    }
    kl = {name: held_out_kl(tracer, held) for name, tracer in tracers.items()}
    report["held_out_tokens"] = sum(len(h) for h in held)
    report["kl"] = kl

    ids = loaded.encode(PROMPT)
    times = interleaved_medians_ms({
        "transformer-lens": lambda: trace_with(tracers["logit"], None, ids=ids),
        "jacobian-lens": lambda: trace_with(tracers["jacobian"], None, ids=ids),
        "llama-cpp logit": lambda: trace_with(tracers["logit (llama.cpp)"], None, ids=ids),
        "llama-cpp jacobian": lambda: trace_with(tracers["jacobian (llama.cpp)"], None, ids=ids),
    }, args.repeats)
    report["readout_ms"] = {k: round(v, 1) for k, v in times.items()}
    report["readout_tokens"] = len(ids)
    report["jacobian_vs_logit"] = round(times["jacobian-lens"] / times["transformer-lens"], 3)
    report["jacobian_vs_logit_llama_cpp"] = round(times["llama-cpp jacobian"] / times["llama-cpp logit"], 3)

    out = Path(__file__).resolve().parent / "results" / "lenses.json"
    out.write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report))
        return 0
    names = list(kl)
    print(f"held-out KL (nats) to the model's output, {report['held_out_tokens']} tokens")
    print("| row | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for r in range(len(kl["logit"])):
        label = "embeddings" if r == 0 else f"layer {r}"
        print(f"| {label} | " + " | ".join(f"{kl[n][r]:.2f}" for n in names) + " |")
    print("| mean | " + " | ".join(f"{sum(kl[n]) / len(kl[n]):.2f}" for n in names) + " |")
    for name, fit in fits.items():
        print(f"fit {name}: {fit['seconds']} s, {fit['data']} ({fit['tokens']} tokens)")
    print(f"readout ({len(ids)} tokens, medians ms): {report['readout_ms']}")
    print(f"J-lens / logit lens: {report['jacobian_vs_logit']}x (PyTorch), {report['jacobian_vs_logit_llama_cpp']}x (llama.cpp)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
