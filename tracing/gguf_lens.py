"""A tuned lens trained from the GGUF alone: `python -m tracing fit-lens --kind tuned --backend llama-cpp --model M.gguf`.

For models that never fit in PyTorch (Llama 4 Scout on a 64 GB Mac). llama.cpp runs the model
forward only, through the llama.cpp backend's capture: each training chunk is decoded once,
giving every block's output (the residual rows) and llama.cpp's own logits at every position.
Only the translators are trained (h -> h + W h + b per row, identity at the start), with the
same loss, optimizer and schedule as the PyTorch trainer (tracing/train_lens.py: KL(model ||
lens) per layer, SGD + Nesterov, lr decayed linearly, gradients clipped to 1), against the
model's frozen final norm and unembedding:

- Forward: the GGUF's final norm (in PyTorch, as ggml computes it) and the quantized
  unembedding multiplied by ggml itself (`LensHead`), so the lens's last row is exactly
  llama.cpp's output, as the llama.cpp lens reads it.
- Backward: the gradient through the unembedding needs W itself (d logits / d h = W), which
  ggml cannot multiply in transpose. The unembedding is dequantized once and kept: as float32
  when that takes under 1 GB (SmolLM2: 113 MB), else as bfloat16 (Scout's 202k x 5120: 2.1 GB,
  against the 4.1 GB a float32 copy would take) and multiplied in row chunks. This is the full
  KL over the whole vocabulary, the loss the PyTorch trainer uses: a top-k or sampled KL would
  save little (the lens's own softmax needs every logit anyway, and the chunk's logits are
  computed one layer at a time) and would bias the translators towards the head of the
  distribution.

Memory beyond the GGUF llama.cpp maps: the kept unembedding, one chunk's residual rows
(layers x tokens x d floats) and llama.cpp's logits for it (tokens x vocabulary floats), and
one layer's lens logits with their gradient. The lens is saved in tuned-lens's format.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from .learned_lens import Translators, dequantize_rows, stop_if, written_atomically

_FLOAT32_BUDGET = 2**30  # bytes: keep the dequantized unembedding as float32 below this, else bfloat16
_ROWS_PER_CHUNK = 8192  # unembedding rows dequantized (and multiplied) at a time


class DequantizedUnembedding:
    """The GGUF's unembedding W [vocab, d] dequantized once, for the backward pass: g [n, vocab] -> g W."""

    def __init__(self, matrix):
        dtype = torch.float32 if matrix.rows * matrix.cols * 4 <= _FLOAT32_BUDGET else torch.bfloat16
        self.weight = torch.empty(matrix.rows, matrix.cols, dtype=dtype)
        for start in range(0, matrix.rows, _ROWS_PER_CHUNK):
            stop = min(start + _ROWS_PER_CHUNK, matrix.rows)
            self.weight[start:stop] = torch.from_numpy(dequantize_rows(matrix, start, stop))
        self.dtype = dtype

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float32:
            return grad @ self.weight
        out = torch.zeros(grad.shape[0], self.weight.shape[1])
        for start in range(0, self.weight.shape[0], _ROWS_PER_CHUNK):
            stop = min(start + _ROWS_PER_CHUNK, self.weight.shape[0])
            out += grad[:, start:stop] @ self.weight[start:stop].float()
        return out


class _QuantizedLogits(torch.autograd.Function):
    """normed [n, d] -> logits [n, vocab]: ggml's quantized matmul forward, the dequantized W backward."""

    @staticmethod
    def forward(ctx, normed, head, dequantized):
        ctx.dequantized = dequantized
        return torch.from_numpy(head.unembed.matmul(normed.detach().contiguous().numpy()))

    @staticmethod
    def backward(ctx, grad):
        return ctx.dequantized.backward(grad.float()), None, None


def lens_logits(head, dequantized: DequantizedUnembedding, h: torch.Tensor) -> torch.Tensor:
    """The GGUF's head on residual rows h [n, d], differentiable in h: final norm, unembedding, transforms."""
    logits = _QuantizedLogits.apply(head.normalize(h), head, dequantized)
    for transform, value in head.transforms:
        logits = transform(logits, value)
    return logits


def capture(tracer, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One llama.cpp forward over `ids`: residual rows [n_blocks + 1, T, d] and the model's
    log-probabilities [T, vocab] (from llama.cpp's own logits at every position)."""
    with tracer.lock():
        tracer.keep_all_logits = True
        try:
            hidden, _ = tracer.residuals(ids, False)
            logits = torch.from_numpy(np.array(tracer.logits, copy=True))
        finally:
            tracer.keep_all_logits = False
    return hidden, torch.log_softmax(logits.float(), dim=-1)


def new_translators(tracer) -> torch.nn.ModuleList:
    """One zero-initialized affine translator per row but the output (the identity: the logit lens)."""
    layers = torch.nn.ModuleList(torch.nn.Linear(tracer.d_model, tracer.d_model) for _ in range(tracer.n_blocks))
    for layer in layers:
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return layers


def save_translators(layers: torch.nn.ModuleList, tracer, folder: Path) -> None:
    """tuned-lens's format: config.json + params.pt (keys "0.weight", "0.bias", ...)."""
    import json

    from tuned_lens.nn import TunedLensConfig

    config = TunedLensConfig(base_model_name_or_path=tracer.model_name, d_model=tracer.d_model,
                             num_hidden_layers=tracer.n_blocks)
    torch.save(layers.state_dict(), folder / "params.pt")
    (folder / "config.json").write_text(json.dumps(config.to_dict()))


def as_translators(layers: torch.nn.ModuleList, path: Path) -> Translators:
    return Translators([l.weight.detach().clone() for l in layers], [l.bias.detach().clone() for l in layers], {}, path)


def train_tuned_lens_gguf(
    model=None,
    text: str | None = None,
    *,
    steps: int = 8,
    tokens_per_step: int = 1024,
    seq_len: int = 256,
    out: str | Path | None = None,
    lr_scale: float = 1.0,
    progress: bool = True,
    on_step=None,
    cancel=None,
):
    """Train a tuned lens for the GGUF `model` from llama.cpp's forward passes alone (see the module
    docstring); `text` defaults to text sampled from the model. Returns a `fit_lens.FitReport`."""
    from tqdm.auto import tqdm

    from .api import open_tracer
    from .fit_lens import HELD_OUT_FRACTION, FitReport, held_out_kl, text_for
    from .learned_lens import LearnedLensTracer
    from .train_lens import _kl, sequences
    from .tuned_lens_backend import default_lens_dir

    start = time.perf_counter()
    tracer = open_tracer(model, "llama-cpp")
    seq_len = min(seq_len, tracer.context_length or seq_len)
    needed = int(steps * tokens_per_step / (1 - HELD_OUT_FRACTION)) + 2 * seq_len
    text = text_for(tracer.source.location, text, needed, cancel, on_step)
    data = sequences(tracer, text, seq_len)
    n_held = max(1, round(len(data) * HELD_OUT_FRACTION))
    train, held = data[:-n_held], data[-n_held:]
    per_step = max(1, tokens_per_step // seq_len)
    dequantized = DequantizedUnembedding(tracer.head.unembed)
    layers = new_translators(tracer)
    params = list(layers.parameters())
    momentum = 0.9
    opt = torch.optim.SGD(params, lr=lr_scale * (1 - momentum), momentum=momentum, nesterov=True, weight_decay=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1 - step / steps))
    held_ids = [row.tolist() for row in held]
    if on_step is not None:
        on_step(0, steps, "measuring the logit lens on held-out text")
    kl_before = held_out_kl(tracer, held_ids, cancel)

    bar = tqdm(range(steps), desc="training the tuned lens on llama.cpp", unit="step", disable=not progress,
               file=sys.stderr)
    for step in bar:
        stop_if(cancel, "tuned lens training")
        total = 0.0
        for j in range(per_step):
            ids = train[(step * per_step + j) % len(train)].tolist()
            hidden, target = capture(tracer, ids)
            for i in range(tracer.n_blocks):  # one layer at a time: one [T, vocab] graph in memory
                stop_if(cancel, "tuned lens training")  # a step takes minutes on a big model: stop within a layer
                h = hidden[i] + layers[i](hidden[i])
                loss = _kl(target, lens_logits(tracer.head, dequantized, h)) / per_step
                loss.backward()
                total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        bar.set_postfix(kl_per_layer=f"{total / tracer.n_blocks:.2f}")
        if on_step is not None:
            on_step(step + 1, steps, f"training KL per layer {total / tracer.n_blocks:.2f}")

    out = Path(out).expanduser() if out else default_lens_dir(tracer.source)
    if on_step is not None:
        on_step(steps, steps, "measuring the trained lens on held-out text")
    kl_after = held_out_kl(LearnedLensTracer(tracer, as_translators(layers, out), "tuned"), held_ids, cancel)
    stop_if(cancel, "tuned lens training")
    with written_atomically(out) as folder:
        save_translators(layers, tracer, folder)
    return FitReport(
        kind="tuned", model=tracer.model_name, out=out, seconds=time.perf_counter() - start,
        train_tokens=min(steps * per_step, len(train)) * seq_len, held_out_tokens=int(held.numel()),
        data=f"{steps} steps of {per_step * seq_len} tokens, llama.cpp forward only", kl_before=kl_before,
        kl_after=kl_after,
    )
