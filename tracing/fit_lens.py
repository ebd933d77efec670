"""Fit a learned lens: `python -m tracing fit-lens --kind {jacobian,tuned} [--model M] [--text FILE] [--out DIR]`.

- `--kind jacobian`: TransformerLens's `JacobianLens.fit` (Gurnee et al. 2026) on the
  TransformerLens backend's bridge, one text chunk at a time (so it shows progress and can be
  stopped between chunks), merged with the library's own `JacobianLens.merge` (the same
  prompt-weighted mean as one fit over all chunks). Saved in the reference format (lens.pt).
- `--kind tuned`: the tuned-lens trainer (tracing/train_lens.py; `train-lens` is the same).
- `--kind tuned --backend llama-cpp --model M.gguf`: a tuned lens trained from the GGUF alone
  (tracing/gguf_lens.py), for models that never fit in PyTorch.

With no `--text`, the text is sampled from the model itself (self-distillation, what the
tuned-lens authors recommend when a model's training data is unknown): through llama.cpp on a
GGUF, offline. Every fit holds out the last tenth of its text and reports the KL to the
model's output per layer before (the logit lens) and after. The lens is written to a temporary
folder renamed at the very end: a stopped fit leaves nothing half-written.

For a UI: `fit(kind, model, text=None, on_step=..., cancel=event)` returns a `FitReport`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BadPrompt, ModelNotFound, UnsupportedModel
from .learned_lens import JACOBIAN_FILE, stop_if, written_atomically

HELD_OUT_FRACTION = 0.1
# Openings for sampling (one completion each, cycled): varied so the text is not one long story.
OPENINGS = ["The", "In", "Once upon a time", "A recent study", "def ", "Question:", "My favourite", "Today",
            "The history of", "Here is", "Dear", "1."]


@dataclass
class FitReport:
    """What a fit did: held-out KL (nats) to the model's output per lens row (embeddings, layer 1, ...),
    with the logit lens (before) and the fitted lens (after)."""

    kind: str
    model: str
    out: Path
    seconds: float
    train_tokens: int
    held_out_tokens: int
    data: str  # e.g. "16 chunks of 64 tokens"
    kl_before: list[float] = field(default_factory=list)
    kl_after: list[float] = field(default_factory=list)

    @property
    def mean_before(self) -> float:
        return sum(self.kl_before) / len(self.kl_before)

    @property
    def mean_after(self) -> float:
        return sum(self.kl_after) / len(self.kl_after)

    def summary(self) -> str:
        return (
            f"Held-out mean KL to the model's output over {len(self.kl_before)} rows of {self.model} "
            f"({self.held_out_tokens} tokens): logit lens {self.mean_before:.2f} nats, {self.kind} lens "
            f"{self.mean_after:.2f} nats ({self.data}, {self.train_tokens} tokens, {self.seconds:.0f} s)."
        )

    def table(self) -> str:
        lines = [f"{'layer':<12} {'logit lens':>10} {self.kind + ' lens':>14}"]
        for i, (a, b) in enumerate(zip(self.kl_before, self.kl_after)):
            lines.append(f"{'embeddings' if i == 0 else f'layer {i}':<12} {a:10.3f} {b:14.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "model": self.model, "out": str(self.out), "seconds": self.seconds,
                "train_tokens": self.train_tokens, "held_out_tokens": self.held_out_tokens, "data": self.data,
                "kl_before": self.kl_before, "kl_after": self.kl_after}


# ---------------------------------------------------------------- text


def sample_text(model=None, *, tokens: int = 4096, seed: int = 0, on_step=None, cancel=None,
                max_tokens_each: int = 256) -> str:
    """About `tokens` tokens of text sampled from the GGUF `model` itself through llama.cpp
    (temperature 1, no top-k/top-p: the model's own distribution), from varied openings."""
    from runtime.llama_cpp import shared_llama

    from .models import resolve

    source = resolve(model)
    if source.kind != "gguf":
        raise UnsupportedModel(
            f"Sampling training text needs the model as a GGUF (llama.cpp); '{source.name}' is not one. "
            "Give a text file with --text."
        )
    shared = shared_llama(source.location)
    pieces, total, i = [], 0, 0
    while total < tokens:
        stop_if(cancel, "text sampling")
        opening = OPENINGS[i % len(OPENINGS)]
        with shared.lock:
            out = shared.llama.create_completion(
                opening, max_tokens=min(max_tokens_each, tokens - total + 16), temperature=1.0, top_p=1.0,
                top_k=0, min_p=0.0, repeat_penalty=1.0, seed=seed + i,
            )
        text = opening + out["choices"][0]["text"]
        pieces.append(text)
        total += int(out["usage"]["completion_tokens"]) + 1
        i += 1
        if on_step is not None:
            on_step(min(total, tokens), tokens, "sampling text from the model")
    return "\n\n".join(pieces)


def text_for(loaded_or_model, text: str | None, tokens: int, cancel=None, on_step=None) -> str:
    """`text`, or text sampled from the model (see `sample_text`)."""
    if text is not None:
        return text
    source = getattr(loaded_or_model, "source", None)
    model = source.location if source is not None else loaded_or_model
    return sample_text(model, tokens=tokens, cancel=cancel, on_step=on_step)


def held_out_kl(tracer, sequences, cancel=None) -> list[float]:
    """Mean KL(model output || lens row) per row but the output, over every position of every
    sequence (token-id lists), through the tracer's own lens (tracing.lens: one KL for all lenses)."""
    from .api import trace_with

    total = None
    for ids in sequences:
        stop_if(cancel, "lens fit")
        result = trace_with(tracer, None, ids=[int(i) for i in ids], top_k=1)
        per_row = result.kl_to_final[:-1].mean(axis=1)
        total = per_row if total is None else total + per_row
    return [float(v) / len(sequences) for v in total]


# ---------------------------------------------------------------- the Jacobian lens


@contextlib.contextmanager
def _token_prompts(bridge):
    """Let `JacobianLens.fit` take prompts as token-id lists: our tokenizer's ids, not the bridge's
    `to_tokens` (which prepends a BOS SmolLM2's tokenizer does not, and needs a tokenizer)."""
    device = bridge.cfg.device
    bridge.to_tokens = lambda ids, **_: torch.tensor([list(ids)], device=device)
    try:
        yield
    finally:
        del bridge.to_tokens


def fit_jacobian_lens(
    loaded,
    text: str | None = None,
    *,
    chunks: int = 16,
    seq_len: int = 64,
    skip_first: int = 4,
    dim_batch: int = 64,
    out: str | Path | None = None,
    progress: bool = True,
    on_step=None,
    cancel=None,
) -> FitReport:
    """Fit a J-lens for `loaded` on `chunks` chunks of `seq_len` tokens of `text` (default: sampled
    from the model), measure it on held-out chunks, save it in `out` (default: the model's J-lens folder).

    skip_first: leading positions of each chunk left out of the Jacobian average (attention sinks;
    the reference uses 16 of 128). dim_batch: output dimensions per backward pass (memory vs speed).
    on_step(done, total, message) after each chunk; `cancel` (threading.Event) stops between chunks.
    """
    from tqdm.auto import tqdm
    from transformer_lens.tools.analysis import JacobianLens

    from .jacobian_lens_backend import JacobianLensTracer, bridge_of, default_jacobian_dir, model_shape
    from .train_lens import sequences
    from .transformer_lens_backend import TransformerLensTracer

    start = time.perf_counter()
    seq_len = min(seq_len, loaded.context_length or seq_len)
    if seq_len <= skip_first + 1:
        raise BadPrompt(f"--seq-len must be above {skip_first + 1} (the skipped first positions and the last).")
    n_held = max(1, round(chunks * HELD_OUT_FRACTION / (1 - HELD_OUT_FRACTION)))
    text = text_for(loaded, text, (chunks + n_held) * seq_len + 64, cancel, on_step)
    data = sequences(loaded, text, seq_len)
    n_held = min(n_held, max(1, len(data) // 10))
    train, held = data[:-n_held][:chunks], data[-n_held:]
    if on_step is not None:
        on_step(0, len(train), "preparing the model for TransformerLens")
    bridge = bridge_of(loaded)
    stop_if(cancel, "Jacobian lens fit")
    corpus = f"lensbench:{loaded.name}:{len(text)} chars"
    parts = []
    bar = tqdm(total=len(train), desc="fitting the Jacobian lens", unit="chunk", disable=not progress, file=sys.stderr)
    with loaded.lock, _token_prompts(bridge), torch.no_grad():
        for i, ids in enumerate(train):
            stop_if(cancel, "Jacobian lens fit")
            parts.append(JacobianLens.fit(
                bridge, [ids.tolist()], corpus=corpus, dim_batch=dim_batch, max_seq_len=seq_len,
                skip_first_positions=skip_first, show_progress=False,
            ))
            bar.update(1)
            if on_step is not None:
                on_step(i + 1, len(train), f"fitting the Jacobian lens: chunk {i + 1} of {len(train)}")
    bar.close()
    lens = JacobianLens.merge(parts) if len(parts) > 1 else parts[0]
    shape = model_shape(loaded)
    lens.metadata.update(
        lensbench_n_blocks=shape.n_blocks,
        lensbench_unembedding_fingerprint=shape.fingerprint,
        lensbench_seq_len=seq_len,
    )
    stop_if(cancel, "Jacobian lens fit")
    held_ids = [row.tolist() for row in held]
    if on_step is not None:
        on_step(len(train), len(train), "measuring both lenses on held-out text")
    kl_before = held_out_kl(loaded.adapter("transformer-lens", TransformerLensTracer), held_ids, cancel)
    kl_after = held_out_kl(JacobianLensTracer(loaded, lens), held_ids, cancel)
    lens.metadata.update(lensbench_kl_logit=kl_before, lensbench_kl_jacobian=kl_after)
    out = Path(out).expanduser() if out else default_jacobian_dir(loaded.source)
    stop_if(cancel, "Jacobian lens fit")
    with written_atomically(out) as folder:
        lens.save(str(folder / JACOBIAN_FILE))
    return FitReport(
        kind="jacobian", model=loaded.name, out=out, seconds=time.perf_counter() - start,
        train_tokens=int(train.numel()), held_out_tokens=int(held.numel()),
        data=f"{len(train)} chunks of {seq_len} tokens", kl_before=kl_before, kl_after=kl_after,
    )


# ---------------------------------------------------------------- the tuned lens


def fit_tuned_lens(loaded, text: str | None = None, *, steps: int = 8, tokens_per_step: int = 1024,
                   seq_len: int = 256, out=None, progress: bool = True, on_step=None, cancel=None) -> FitReport:
    """Train a tuned lens (tracing/train_lens.py) on `text` (default: sampled from the model)."""
    from .train_lens import train_lens

    start = time.perf_counter()
    needed = int(steps * tokens_per_step / (1 - HELD_OUT_FRACTION)) + 2 * seq_len
    text = text_for(loaded, text, needed, cancel, on_step)
    report = train_lens(loaded, text, steps=steps, out=out, tokens_per_step=tokens_per_step, seq_len=seq_len,
                        progress=progress, on_step=on_step, cancel=cancel)
    return FitReport(
        kind="tuned", model=loaded.name, out=report.out, seconds=time.perf_counter() - start,
        train_tokens=min(report.steps * report.tokens_per_step, report.train_tokens), held_out_tokens=report.held_out_tokens,
        data=f"{report.steps} steps of {report.tokens_per_step} tokens", kl_before=report.kl_logit,
        kl_after=report.kl_tuned,
    )


def fit(kind: str, model=None, text: str | None = None, *, backend: str = "hooks", device=None,
        on_step=None, cancel=None, progress: bool = False, **options) -> FitReport:
    """Fit a lens of `kind` ("jacobian" or "tuned") for `model`: the entry point for a UI.

    backend: "llama-cpp" trains a tuned lens from the GGUF alone (no PyTorch copy of the model).
    on_step(done, total, message) reports progress; setting `cancel` (a threading.Event) stops the
    fit with FitStopped, leaving nothing written. The report holds the before/after KL per layer.
    """
    if kind not in ("jacobian", "tuned"):
        raise UnsupportedModel(f"Unknown lens kind '{kind}'. Choose jacobian or tuned.")
    if backend == "llama-cpp":
        if kind != "tuned":
            raise UnsupportedModel(
                "A Jacobian lens needs gradients through the model, so it is fitted in PyTorch (the GGUF's "
                "dequantized copy: leave out --backend llama-cpp); it then applies to the GGUF with "
                "--backend llama-cpp --lens-kind jacobian."
            )
        from .gguf_lens import train_tuned_lens_gguf

        return train_tuned_lens_gguf(model, text, on_step=on_step, cancel=cancel, progress=progress, **options)
    from .loading import load_model

    loaded = load_model(model, device=device)
    if kind == "jacobian":
        return fit_jacobian_lens(loaded, text, on_step=on_step, cancel=cancel, progress=progress, **options)
    return fit_tuned_lens(loaded, text, on_step=on_step, cancel=cancel, progress=progress, **options)


# ---------------------------------------------------------------- command line


def run_fit_lens(argv: list[str], default_kind: str | None = None) -> int:
    """The `fit-lens` subcommand (and `train-lens`, which is `fit-lens --kind tuned`)."""
    parser = argparse.ArgumentParser(
        prog="python -m tracing fit-lens",
        description="Fit a learned lens (Jacobian or tuned) for a model; saved where its backend finds it.",
    )
    parser.add_argument("--kind", choices=["jacobian", "tuned"], default=default_kind, required=default_kind is None)
    parser.add_argument("--model", default=None, help="as for the lens (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--backend", choices=["hooks", "llama-cpp"], default="hooks",
                        help="llama-cpp: train a tuned lens from the GGUF alone (default: hooks, PyTorch)")
    parser.add_argument("--text", default=None, help="a plain-text file (default: text sampled from the model)")
    parser.add_argument("--out", default=None, help="folder to write the lens to (default: the model's lens folder)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per chunk (default: 64 jacobian, 256 tuned)")
    parser.add_argument("--chunks", type=int, default=16, help="jacobian: chunks of text to average over (default: 16)")
    parser.add_argument("--skip-first", type=int, default=4, help="jacobian: leading positions left out (default: 4)")
    parser.add_argument("--steps", type=int, default=8, help="tuned: training steps (default: 8)")
    parser.add_argument("--tokens-per-step", type=int, default=1024, help="tuned: default 1024")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    text = None
    if args.text:
        path = Path(args.text).expanduser()
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise ModelNotFound(f"Cannot read the text file '{path}': {exc.strerror or exc}.") from None
    if args.kind == "jacobian":
        if args.chunks < 1:
            raise BadPrompt("--chunks must be at least 1.")
        options = dict(chunks=args.chunks, seq_len=args.seq_len or 64, skip_first=args.skip_first)
    else:
        if args.steps < 1:
            raise BadPrompt("--steps must be at least 1.")
        options = dict(steps=args.steps, tokens_per_step=args.tokens_per_step, seq_len=args.seq_len or 256)
    if args.backend == "hooks":
        options["device"] = args.device
    report = fit(args.kind, args.model, text, backend=args.backend, out=args.out, progress=True, **options)
    if args.json:
        import json

        print(json.dumps(report.to_dict()))
        return 0
    print(report.summary())
    print(report.table())
    print(f"Saved to {report.out}")
    model_arg = f" --model {args.model}" if args.model else ""
    lens_arg = f" --lens {report.out}" if args.out else ""
    if args.kind == "jacobian":
        print(f"Use it: python -m tracing --backend jacobian-lens{model_arg}{lens_arg} --prompt '...'")
    elif args.out is None and args.backend == "hooks":
        print(f"Use it: python -m tracing --backend tuned-lens-tuned{model_arg} --prompt '...'")
    else:
        print(f"Use it: python -m tracing --backend llama-cpp --lens-kind tuned{model_arg} --lens {report.out} --prompt '...'")
    return 0


def run_train_lens(argv: list[str]) -> int:
    """`train-lens`: `fit-lens --kind tuned` (kept for scripts written before fit-lens)."""
    return run_fit_lens(argv, default_kind="tuned")
