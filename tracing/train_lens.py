"""Train a tuned lens: `python -m tracing fit-lens --kind tuned [--text FILE] [--model M] [--steps N] [--out DIR]` (or `train-lens`).

As in the tuned-lens paper (Belrose et al. 2023) and its training loop: one affine translator
per layer (tuned-lens's `TunedLens`), trained so that each layer's lens distribution matches
the model's own output distribution at the same position (loss: KL(model || lens), summed
over layers), with SGD + Nesterov momentum (lr 1.0 x (1 - 0.9), momentum 0.9, weight decay
1e-3), a linear decay of the learning rate to zero, and gradients clipped to norm 1.

The text is cut into sequences of `--seq-len` tokens; the last tenth of them (at least one) is
held out and measures the lens before and after training: the mean over layers and tokens of
KL(model || lens). The lens is saved in tuned-lens's format (config.json + params.pt), by
default in this model's lens folder, where `--backend tuned-lens-tuned` finds it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BadPrompt

HELD_OUT_FRACTION = 0.1


@dataclass
class TrainReport:
    """What training did: held-out KL (nats) per lens row, before (logit lens) and after (tuned lens)."""

    out: Path
    steps: int
    tokens_per_step: int
    train_tokens: int
    held_out_tokens: int
    seconds: float
    kl_logit: list[float] = field(default_factory=list)  # per translated row (embeddings, layer 1, ...)
    kl_tuned: list[float] = field(default_factory=list)

    @property
    def mean_kl_logit(self) -> float:
        return sum(self.kl_logit) / len(self.kl_logit)

    @property
    def mean_kl_tuned(self) -> float:
        return sum(self.kl_tuned) / len(self.kl_tuned)

    def summary(self) -> str:
        return (
            f"Held-out mean KL to the model's output over {len(self.kl_logit)} layers "
            f"({self.held_out_tokens} tokens): logit lens {self.mean_kl_logit:.2f} nats, "
            f"tuned lens {self.mean_kl_tuned:.2f} nats "
            f"({self.steps} steps of {self.tokens_per_step} tokens, {self.seconds:.0f} s)."
        )


def sequences(loaded, text: str, seq_len: int) -> torch.Tensor:
    """The text as rows of `seq_len` token ids, each led by the special tokens the model's prompts get."""
    prefix = loaded.encode("")  # e.g. Gemma's BOS; nothing for SmolLM2
    body = loaded.encode_target(text)
    step = seq_len - len(prefix)
    if step < 1:
        raise BadPrompt(f"--seq-len must be above {len(prefix)}.")
    rows = [prefix + body[i : i + step] for i in range(0, len(body) - step + 1, step)]
    if len(rows) < 2:
        raise BadPrompt(
            f"The text is {len(body)} tokens: too short to train on and hold some out. Give at least "
            f"{2 * step} tokens (a few pages of text)."
        )
    return torch.tensor(rows)


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """Temporarily stop gradients into `module`'s parameters (the shared model's norm and
    unembedding): autograd then computes only what the translators need, and the model's
    parameters are left exactly as they were."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _rows_and_targets(tracer, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Residual rows [N+1] x [batch, T, d] and the model's log-probabilities [batch, T, V]."""
    from .hooks import capture_residuals

    parts = tracer.lens.parts
    with torch.no_grad(), capture_residuals(parts) as rows:
        tracer.loaded.model(input_ids=ids, use_cache=False)
        rows = list(rows)
        # The last row through the lens is exactly the model's logits (the hooks probe checks this).
        target = torch.log_softmax(parts.project(rows[-1]).float(), dim=-1)
    return rows, target


def _kl(target_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(target || softmax(logits))."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    return (target_logp.exp() * (target_logp - logq)).sum(-1).mean()


def held_out_kl(tracer, lens, batches: list[torch.Tensor], tuned: bool, cancel=None) -> list[float]:
    """Mean KL(model || lens) per translated row over `batches` (the logit lens when not `tuned`).
    `cancel` (a threading.Event) stops it between batches with FitStopped."""
    from .learned_lens import stop_if

    sums: list[float] = []
    with torch.no_grad():
        for ids in batches:
            stop_if(cancel, "tuned lens training")
            rows, target = _rows_and_targets(tracer, ids)
            values = [
                float(_kl(target, lens(h, i) if tuned else lens.unembed(h))) for i, h in enumerate(rows[:-1])
            ]
            sums = [a + b for a, b in zip(sums, values)] if sums else values
    return [total / len(batches) for total in sums]


def train_lens(
    loaded,
    text: str,
    *,
    steps: int = 8,
    out: str | Path | None = None,
    tokens_per_step: int = 1024,
    seq_len: int = 256,
    lr_scale: float = 1.0,
    progress: bool = True,
    on_step=None,
    cancel=None,
) -> TrainReport:
    """Train a tuned lens for `loaded` on `text`, save it in `out` (default: the model's lens folder).

    on_step(done, total, message): called after each step (a UI's progress bar).
    cancel: a threading.Event; once set, training stops at the next step with FitStopped and
    nothing is written (the lens is written to a temporary folder renamed at the very end).
    """
    from tqdm.auto import tqdm

    from .learned_lens import stop_if, written_atomically

    from .hooks import HooksTracer
    from .tuned_lens_backend import _unembed, default_lens_dir, new_tuned_lens

    start = time.perf_counter()
    seq_len = min(seq_len, loaded.context_length or seq_len)
    data = sequences(loaded, text, seq_len).to(loaded.device)
    n_held = max(1, round(len(data) * HELD_OUT_FRACTION))
    train, held = data[:-n_held], data[-n_held:]
    per_step = max(1, tokens_per_step // seq_len)  # sequences a step (one at a time: bounded memory)
    tracer = loaded.adapter("hooks", HooksTracer)
    unembed = _unembed(loaded)
    lens = new_tuned_lens(loaded.model, tracer.lens.parts, loaded.name, unembed)
    translators = list(lens.layer_translators.parameters())
    momentum = 0.9
    # tuned-lens's SGD: PyTorch's momentum scales the step by 1 / (1 - momentum); undo it.
    opt = torch.optim.SGD(
        translators, lr=lr_scale * (1 - momentum), momentum=momentum, nesterov=True, weight_decay=1e-3
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1 - step / steps))
    held_batches = [held[i : i + 1] for i in range(len(held))]

    with loaded.lock, frozen(unembed):
        if on_step is not None:
            on_step(0, steps, "measuring the logit lens on held-out text")
        kl_logit = held_out_kl(tracer, lens, held_batches, tuned=False, cancel=cancel)
        bar = tqdm(range(steps), desc="training the tuned lens", unit="step", disable=not progress, file=sys.stderr)
        for step in bar:
            stop_if(cancel, "tuned lens training")
            batch = [train[(step * per_step + j) % len(train)].unsqueeze(0) for j in range(per_step)]
            total = 0.0
            for ids in batch:
                rows, target = _rows_and_targets(tracer, ids)
                for i, h in enumerate(rows[:-1]):  # one layer at a time: one [T, vocab] graph in memory
                    stop_if(cancel, "tuned lens training")  # a step takes minutes on a CPU: stop within a layer
                    loss = _kl(target, lens(h, i)) / len(batch)
                    loss.backward()
                    total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(translators, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            schedule.step()
            bar.set_postfix(kl_per_layer=f"{total / len(rows[:-1]):.2f}")
            if on_step is not None:
                on_step(step + 1, steps, f"training KL per layer {total / len(rows[:-1]):.2f}")
        lens.eval()
        if on_step is not None:
            on_step(steps, steps, "measuring the trained lens on held-out text")
        kl_tuned = held_out_kl(tracer, lens, held_batches, tuned=True, cancel=cancel)

    stop_if(cancel, "tuned lens training")
    out = Path(out).expanduser() if out else default_lens_dir(loaded.source)
    with written_atomically(out) as folder:
        lens.save(folder)
    return TrainReport(
        out=out,
        steps=steps,
        tokens_per_step=per_step * seq_len,
        train_tokens=int(train.numel()),
        held_out_tokens=int(held.numel()),
        seconds=time.perf_counter() - start,
        kl_logit=kl_logit,
        kl_tuned=kl_tuned,
    )


def run_train_lens(argv: list[str]) -> int:
    """The `train-lens` subcommand: `fit-lens --kind tuned` (tracing/fit_lens.py)."""
    from .fit_lens import run_fit_lens

    return run_fit_lens(argv, default_kind="tuned")
