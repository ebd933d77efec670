"""The lens backends side by side: same model, same prompt, one run.

    .venv/bin/python bench/bench_backends.py [--model M] [--threads 1] [--repeats 15]
    .venv/bin/python bench/bench_backends.py --train-text FILE [--train-steps 8]   # also train a tuned lens
    .venv/bin/python bench/bench_backends.py --lens DIR    # also time a tuned lens trained before

Medians (interleaved, so load from other processes hits all alike) of:
  floor               a forward pass plus ONE batched matmul of all (layers+1) x positions residual
                      rows through the unembedding: the arithmetic any all-positions lens must do
  hooks               tracing.trace_with on the PyTorch-hooks backend (every position, target included)
  transformer-lens    the same through TransformerLens's TransformerBridge
  tuned-lens          the same through tuned-lens's LogitLens
  tuned-lens-tuned    the same with a trained tuned lens (when --train-text trains one, or --lens DIR)
  tuned-lens's own    tuned-lens's PredictionTrajectory.from_lens_and_model with the same LogitLens (for
                      reference: what using its own pipeline would cost; it computes no top-k or KL)
Each as a ratio to the floor (target: every backend <= 2x, hooks the fastest), plus the largest
probability difference of each backend's top-k to the hooks backend's.

With --train-text, a tuned lens is first trained on that file (tracing.train_lens, saved in a
temporary folder) and the held-out mean KL of the logit and the tuned lens is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_lens import PROMPT, interleaved_medians_ms  # noqa: E402

BACKENDS = ("hooks", "transformer-lens", "tuned-lens")


def train(loaded, text_file: Path, steps: int, out: Path) -> dict:
    from tracing.train_lens import train_lens

    report = train_lens(loaded, text_file.read_text(encoding="utf-8", errors="replace"), steps=steps, out=out)
    print(report.summary(), file=sys.stderr)
    return {
        "train_steps": report.steps,
        "train_tokens_per_step": report.tokens_per_step,
        "train_seconds": round(report.seconds, 1),
        "held_out_tokens": report.held_out_tokens,
        "held_out_mean_kl_logit": round(report.mean_kl_logit, 3),
        "held_out_mean_kl_tuned": round(report.mean_kl_tuned, 3),
        "held_out_kl_logit_last": round(report.kl_logit[-1], 3),
        "held_out_kl_tuned_last": round(report.kl_tuned[-1], 3),
    }


def run(model, threads: int, repeats: int, text_file: Path | None, steps: int, lens: Path | None = None) -> dict:
    import numpy as np
    import torch
    from tuned_lens.plotting import PredictionTrajectory

    import tracing
    from tracing.loading import load_model

    torch.set_num_threads(threads)
    loaded = load_model(model, device="cpu")
    tracers = {name: tracing.open_tracer(model, name, device="cpu") for name in BACKENDS}
    results: dict = {"model": loaded.name, "threads": threads, "repeats": repeats}
    if text_file:
        out = Path(tempfile.mkdtemp(prefix="lensbench-lens-"))
        results.update(train(loaded, text_file, steps, out))
        lens = out
    if lens:
        tracers["tuned-lens-tuned"] = tracing.open_tracer(model, "tuned-lens-tuned", device="cpu", lens=str(lens))

    ids = loaded.encode(PROMPT)
    input_ids = torch.tensor([ids])
    unembed = loaded.model.get_output_embeddings().weight
    results.update(tokens=len(ids), rows=tracers["hooks"].lens.n_blocks + 1)

    def floor():
        with torch.no_grad():
            out = loaded.model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
            stacked = torch.cat(out.hidden_states)  # [rows, positions, d]
            stacked.reshape(-1, stacked.shape[-1]) @ unembed.T

    def tuned_lens_own():
        PredictionTrajectory.from_lens_and_model(
            tracers["tuned-lens"].lens, loaded.model, input_ids=ids, tokenizer=loaded.tokenizer
        )

    fns = {"floor": floor}
    fns.update({name: (lambda t=t: tracing.trace_with(t, PROMPT, target=" Paris")) for name, t in tracers.items()})
    fns["tuned-lens's own"] = tuned_lens_own
    medians = interleaved_medians_ms(fns, repeats)
    results["ms"] = {name: round(ms, 1) for name, ms in medians.items()}
    results["over_floor"] = {name: round(ms / medians["floor"], 2) for name, ms in medians.items() if name != "floor"}

    reference = tracing.trace_with(tracers["hooks"], PROMPT, target=" Paris")
    agreement = {}
    for name in ("transformer-lens", "tuned-lens"):
        other = tracing.trace_with(tracers[name], PROMPT, target=" Paris")
        agreement[name] = {
            "same_top1": bool((other.topk_ids[..., 0] == reference.topk_ids[..., 0]).all()),
            "max_prob_diff": float(np.abs(other.topk_probs - reference.topk_probs).max()),
        }
    results["agreement_with_hooks"] = agreement
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--train-text", type=Path, default=None, help="train a tuned lens on this text first")
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--lens", type=Path, default=None, help="time this trained lens (a tuned-lens folder) too")
    args = parser.parse_args()
    start = time.perf_counter()
    result = run(args.model, args.threads, args.repeats, args.train_text, args.train_steps, args.lens)
    print(f"{result['model']}, {result['tokens']} tokens, {result['rows']} rows, {args.threads} thread(s), "
          f"median of {args.repeats}")
    for name, ms in result["ms"].items():
        ratio = "" if name == "floor" else f"   {result['over_floor'][name]:.2f}x floor"
        print(f"  {name:<20} {ms:8.1f} ms{ratio}")
    for name, agree in result["agreement_with_hooks"].items():
        print(f"  {name} vs hooks: same top-1 in every cell: {agree['same_top1']}, "
              f"largest top-k probability difference {agree['max_prob_diff']:.1e}")
    if "train_steps" in result:
        print(f"  tuned lens: {result['train_steps']} steps of {result['train_tokens_per_step']} tokens in "
              f"{result['train_seconds']:.0f} s; held-out mean KL over layers {result['held_out_mean_kl_logit']:.2f} "
              f"(logit lens) -> {result['held_out_mean_kl_tuned']:.2f} (tuned lens), "
              f"{result['held_out_tokens']} held-out tokens")
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
