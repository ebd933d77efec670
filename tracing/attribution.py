"""Direct logit attribution: which blocks, and which attention heads, write the answer.

The residual stream at a position is a sum: the embeddings, plus what each block's attention
adds, plus what each block's MLP adds (Elhage et al. 2021, "A Mathematical Framework for
Transformer Circuits"). The logit of a token is the final norm of that sum, dotted with the
token's unembedding row. The final norm is not linear, but RMSNorm and LayerNorm are linear once
their denominator is frozen: N(x) = g * P(x) / s(x) + b, with P the centring (LayerNorm) or the
identity (RMSNorm) and s(x) = sqrt(mean(P(x)^2) + eps). With s taken at the final residual's own
value, every part v gets the logit share u . (g * P(v)) / s, and the shares add up exactly to the
model's logit minus one constant, u . b + the unembedding's bias (the `bias` term). With a
contrast token, u is the difference of the two rows and the shares add up to the logit difference.

What each part is, exactly: what is added to the residual stream, as added. For post-norm
families (Gemma 2/3, OLMo 2) that is the post-norm's output; for Granite, the output times
residual_multiplier. It is read as differences of the residual stream itself:
attention_i = residual after attention - residual before block i, mlp_i = residual after
block i - residual after attention; so embeddings + all parts = the final residual by construction.

Heads: the attention output is the output projection W_o applied to the heads' outputs side by
side, so head h's share is W_o[:, h] z_h; whatever follows W_o before the residual stream (its
bias, a post-norm frozen at its own input's scale, a residual multiplier) is applied to the
shares the same way, and the biases are kept apart (`head_bias`). Each block's heads are checked
to add up to its attention part, and omitted with the reason when they do not.

The technique is written once (`attribute_with`): validation, the projection, the result. A
runtime only reads the parts at one position:
- `TorchAttribution`: forward hooks on the hooks backend's model, one forward of the prompt up to
  the position (a causal model's residual there does not depend on later tokens).
- `LlamaCppAttribution`: the GGUF's own graph nodes through llama.cpp's eval callback: the
  embeddings node, the residual after attention (`ffn_inp-{i}`, Gemma's `sa_out-{i}`, found from
  the graph's structure by tracing.sublayers) and `l_out-{i}`; for heads, `kqv_out-{i}` (the
  heads' outputs before the output projection) and `blk.{i}.attn_output.weight` multiplied by
  ggml as llama.cpp does. Only the final norm and the two unembedding rows are applied here.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from .errors import BadPrompt, BadTarget, UnsupportedModel
from .lens import TokenText, row_labels
from .sublayers import _first_tensor, _graph_nodes, _sublayer_modules, find_sublayer_writes, graph_blocks

# Heads must add up to their block's attention part this closely (relative to its largest element),
# else they are left out: float32 rounding on PyTorch and for float GGUF weights. Where W_o is
# quantized, ggml rounds its input to 8 bits per block of 32 or 256 values; when a head is narrower
# than a block, the heads sharing one are multiplied separately, each rounded on its own scale, so
# their sum moves by about 1% from the whole row's product (measured with Q8_0 blocks of two to four
# heads); heads of whole blocks (SmolLM2's 64 in Q8_0/Q4_1, Gemma 3's 256) are exact.
_HEADS_TOLERANCE = 1e-3
_HEADS_TOLERANCE_QUANTIZED = 5e-2
# Tokens per llama.cpp decode in the attribution context: the lens's, which keeps llama.cpp's compute
# buffers small for large models (a longer prompt takes several decodes).
_LLAMA_UBATCH = 128


# ==================================================================== the final norm, frozen


@dataclass
class NormSpec:
    """An RMSNorm or LayerNorm as numbers: N(x) = gain * P(x) / sqrt(mean(P(x)^2) + eps) + bias."""

    kind: str  # "rms" or "layer" (P centres x)
    eps: float
    gain: np.ndarray  # [d], float64: Gemma's (1 + w) already added
    bias: np.ndarray | None = None

    def centre(self, v: np.ndarray) -> np.ndarray:
        return v - v.mean(-1, keepdims=True) if self.kind == "layer" else v

    def scale(self, x: np.ndarray) -> float:
        """The denominator at `x` [d]: what is frozen."""
        return math.sqrt(float(np.mean(self.centre(x) ** 2)) + self.eps)

    def linear(self, v: np.ndarray, scale: float) -> np.ndarray:
        """The norm frozen at `scale`, without its bias: gain * P(v) / scale, for rows v [..., d]."""
        return self.gain * self.centre(v) / scale

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self.linear(x, self.scale(x))
        return out + self.bias if self.bias is not None else out


_EPS_NAMES = ("variance_epsilon", "eps", "epsilon", "norm_eps")


def describe_norm(module: nn.Module, d: int) -> NormSpec | None:
    """The module as a NormSpec, measured (not looked up by class): None when it is not an RMSNorm
    or LayerNorm over the last dimension (checked on a random vector).

    Its epsilon is the module's own attribute; the gain, the bias and whether it centres come from
    three inputs: zeros give the bias, ones are centred to zero by a LayerNorm only, and a vector
    of alternating +-1 gives gain * u / sqrt(mean(u^2) + eps).
    """
    eps = next((float(v) for v in (getattr(module, n, None) for n in _EPS_NAMES) if isinstance(v, (int, float))), None)
    if eps is None:
        return None
    try:
        parameter = next(module.parameters(), None)
        dtype = parameter.dtype if parameter is not None else torch.float32
        device = parameter.device if parameter is not None else torch.device("cpu")
        m = d - d % 2
        alternating = torch.zeros(2, d, dtype=torch.float64)
        alternating[0, :m] = torch.tensor([1.0, -1.0]).repeat(m // 2)
        alternating[1, d - m :] = torch.tensor([1.0, -1.0]).repeat(m // 2)
        generator = torch.Generator().manual_seed(0)
        check = 3 * torch.randn(1, d, generator=generator, dtype=torch.float64)
        probes = torch.cat([torch.zeros(1, d, dtype=torch.float64), torch.ones(1, d, dtype=torch.float64),
                            alternating, check])
        with torch.no_grad():
            out = _first_tensor(module(probes.to(device=device, dtype=dtype))).cpu().double().numpy()
    except Exception:  # not a function of one [rows, d] tensor
        return None
    if out.shape != (5, d):
        return None
    bias = out[0]
    size = max(1.0, float(np.abs(out).max()))
    kind = "layer" if np.abs(out[1] - bias).max() <= 1e-5 * size else "rms"
    denominator = math.sqrt(m / d + eps)
    u = alternating.numpy()
    gain = np.where(u[0] != 0, (out[2] - bias) * denominator / np.where(u[0] != 0, u[0], 1),
                    (out[3] - bias) * denominator / np.where(u[1] != 0, u[1], 1))
    spec = NormSpec(kind, eps, gain, bias if np.abs(bias).max() > 0 else None)
    # float32: 1e-4 of the output's scale; half precision: 4 of its own rounding steps.
    tolerance = max(1e-4, 4 * torch.finfo(dtype).eps)
    if np.abs(spec(check.numpy()[0]) - out[4]).max() > tolerance * max(1.0, float(np.abs(out[4]).max())):
        return None
    return spec


# ==================================================================== the readout


@dataclass
class Readout:
    """How a runtime turns the final residual into one token's logit, as numbers."""

    norm: NormSpec
    rows: Callable[[list[int]], np.ndarray]  # token ids -> unembedding rows [k, d], float64
    unembed_bias: Callable[[list[int]], np.ndarray] | None  # token ids -> [k], or None
    scale: float = 1.0  # linear logit scaling (Granite's 1 / logits_scaling, Cohere's logit_scale)
    softcap: float | None = None  # Gemma 2's final soft-cap, applied after the sum


def classify_transforms(transforms, what: str) -> tuple[float, float | None]:
    """(linear scale, soft-cap or None) of a runtime's logit post-processing [(fn, value)], measured on a
    few numbers: each must be x -> c x or x -> tanh(x / v) v, the linear ones before any soft-cap."""
    t = torch.tensor([-7.0, -3.0, -0.5, 0.25, 2.0, 9.0], dtype=torch.float64)
    scale, softcap = 1.0, None
    for fn, value in transforms:
        out = fn(t.clone(), value).double()
        c = float(out[4] / t[4])
        if torch.allclose(out, c * t, rtol=1e-9, atol=1e-12):
            if softcap is not None:
                raise UnsupportedModel(f"{what} scales its logits after soft-capping them; direct logit "
                                       "attribution cannot split such a logit.")
            scale *= c
        elif torch.allclose(out, torch.tanh(t / value) * value, rtol=1e-9, atol=1e-12) and softcap is None:
            softcap = float(value)
        else:
            raise UnsupportedModel(f"{what} transforms its logits in a way direct logit attribution does not "
                                   "know (neither a scale nor a tanh soft-cap).")
    return scale, softcap


# ==================================================================== what a runtime reads


@dataclass
class Parts:
    """The residual stream at one position, split into what was added to it (float64 vectors [d])."""

    embeddings: np.ndarray  # [d]
    attention: np.ndarray  # [blocks, d]: what each block's attention added, as added
    mlp: np.ndarray  # [blocks, d]
    final: np.ndarray  # [d]: the residual entering the final norm
    logits: np.ndarray  # [vocab]: the model's own logits there, before any soft-cap
    output_logits: np.ndarray  # [vocab]: after it (= logits when there is none)
    heads: np.ndarray | None = None  # [blocks, heads, d]: each head's share of `attention`
    head_bias: np.ndarray | None = None  # [blocks, d]: the rest of `attention` (biases through the path)
    heads_note: str | None = None  # why there are no heads, when there are none
    facts: dict = field(default_factory=dict)


# The path from the heads' outputs to the residual stream, after W_o: ("bias", [d]) | ("norm", NormSpec)
# | ("scale", c), in the order they apply.
Step = tuple


def route_heads(raw: np.ndarray, steps: list[Step]) -> tuple[np.ndarray, np.ndarray]:
    """Heads' raw outputs through W_o [heads, d] -> (their shares of what reaches the residual stream
    [heads, d], the rest [d]: biases, carried along the same path). A norm on the path is frozen at
    its own input's scale (the sum of the heads and biases at that point), as the final norm is."""
    heads = raw.astype(np.float64)
    rest = np.zeros(raw.shape[-1])
    total = heads.sum(0)
    for kind, value in steps:
        if kind == "bias":
            rest, total = rest + value, total + value
        elif kind == "norm":
            scale = value.scale(total)
            heads, rest = value.linear(heads, scale), value.linear(rest, scale)
            if value.bias is not None:
                rest = rest + value.bias
            total = value(total)
        elif kind == "scale":
            heads, rest, total = heads * value, rest * value, total * value
        else:
            raise ValueError(kind)
    return heads, rest


def check_heads(heads: np.ndarray, rest: np.ndarray, attention: np.ndarray) -> float:
    """How far the heads and the rest are from the attention part (relative to its size)."""
    return float(np.abs(heads.sum(0) + rest - attention).max() / max(np.abs(attention).max(), 1e-12))


# ==================================================================== the result


@dataclass
class AttributionResult:
    """A token's logit at one position, split into what the embeddings, each block's attention (and
    each head) and each block's MLP wrote into the residual stream (in logits)."""

    model: str
    backend: str
    tokens: list[str]
    token_ids: list[int]
    position: int  # index into `tokens`: the logit is for the token after it
    target: str
    target_id: int
    contrast: str | None
    contrast_id: int | None
    metric: str  # "logit(' Berlin')" or "logit(' Berlin') - logit(' Paris')"
    layers: list[str]  # one label a block, as the lens's rows
    embeddings: float
    attention: np.ndarray  # [blocks]
    mlp: np.ndarray  # [blocks]
    bias: float  # the final norm's bias and the unembedding's bias: no part writes it
    total: float  # embeddings + attention + mlp + bias
    final_logit: float  # the model's own logit (difference), before any soft-cap
    heads: np.ndarray | None = None  # [blocks, heads]; they add up to attention - head_bias
    head_bias: np.ndarray | None = None  # [blocks]: the attention biases' share
    heads_note: str | None = None
    softcap: float | None = None
    output_logit: float | None = None  # after the soft-cap: what the model outputs
    info: dict = field(default_factory=dict)

    @property
    def error(self) -> float:
        """|total - final_logit|: how far the parts are from adding up to the model's own logit."""
        return abs(self.total - self.final_logit)

    def to_dict(self) -> dict:
        """The CLI's `--json`: tokens, position, target, contrast, layers, embeddings, attention [blocks],
        mlp [blocks], heads [blocks][heads] or null, bias, total, final_logit, info."""
        return {
            "tokens": self.tokens,
            "position": int(self.position),
            "target": self.target,
            "contrast": self.contrast,
            "layers": self.layers,
            "embeddings": float(self.embeddings),
            "attention": [float(v) for v in self.attention],
            "mlp": [float(v) for v in self.mlp],
            "heads": self.heads.tolist() if self.heads is not None else None,
            "bias": float(self.bias),
            "total": float(self.total),
            "final_logit": float(self.final_logit),
            "info": {k: v for k, v in self.info.items() if isinstance(v, (str, int, float, bool, type(None)))},
        }

    def table(self) -> str:
        """One line a block: attention, MLP, and the heads that wrote the most."""
        lines = [
            f"model: {self.model}   backend: {self.backend}",
            f"position {self.position} ({self.tokens[self.position]!r}) -> {self.metric}",
            f"{self.metric} = {self.final_logit:.4f}"
            + (f" before the soft-cap ({self.output_logit:.4f} after)" if self.softcap else "")
            + f"; parts add up to {self.total:.4f}",
            f"{'':<12}{'attention':>10}{'MLP':>10}   heads writing most",
            f"{'embeddings':<12}{self.embeddings:>10.4f}",
        ]
        for i, label in enumerate(self.layers):
            line = f"{label:<12}{self.attention[i]:>10.4f}{self.mlp[i]:>10.4f}"
            if self.heads is not None:
                order = np.argsort(-np.abs(self.heads[i]))[:3]
                line += "   " + ", ".join(f"H{h} {self.heads[i, h]:+.3f}" for h in order)
            lines.append(line)
        lines.append(f"{'bias':<12}{self.bias:>10.4f}")
        lines.append(f"{'total':<12}{self.total:>10.4f}   (model: {self.final_logit:.4f})")
        if self.heads is None and self.heads_note:
            lines.append(f"heads: {self.heads_note}")
        if self.info.get("note"):
            lines.append(f"note: {self.info['note']}")
        return "\n".join(lines)


# ==================================================================== the technique


def check_position(position: int, n_tokens: int) -> int:
    """The 0-based position; BadPrompt when it is outside the prompt."""
    try:
        p = int(position)
    except (TypeError, ValueError):
        raise BadPrompt(f"The position must be a whole number, not {position!r}.") from None
    if p != position or not -n_tokens <= p < n_tokens:
        raise BadPrompt(
            f"Position {position} is outside the prompt, which has {n_tokens} tokens: use 0 to {n_tokens - 1}, "
            "or -1 for the last."
        )
    return p % n_tokens


def _resolve_token(tracer, token) -> tuple[str, int] | None:
    """(text, id) of a target or contrast: a string of one token (the lens's rule and messages), or a
    token id (e.g. from a click on a table); None when not given."""
    from .api import resolve_target

    if token is None or isinstance(token, str) and token == "":
        return None
    if isinstance(token, (int, np.integer)):
        vocab = getattr(tracer, "vocab_size", None) or getattr(tracer, "n_vocab", None)
        if token < 0 or (vocab and token >= vocab):
            raise BadTarget(f"Token id {token} is not in this model's vocabulary.")
        return tracer.decode_one(int(token)), int(token)
    return resolve_target(tracer, token)


def attribute_with(
    tracer,
    prompt: str | None,
    target: str | int | None = None,
    contrast: str | int | None = None,
    position: int = -1,
    *,
    heads: bool = True,
    ids: list[int] | None = None,
) -> AttributionResult:
    """Direct logit attribution with an opened tracer (hooks or llama-cpp, see `tracing.open_tracer`).

    prompt: the text (or ready token `ids`). position: which token's prediction (default the last;
    negative counts from the end). target: one token (" Berlin"), the same rule as the lens, or a
    token id; None takes the model's own top prediction there. contrast: likewise, or None; with it the logit
    difference target - contrast is attributed. heads: also split attention by head, where the
    runtime can. Returns an AttributionResult whose parts and bias add up to the model's own
    logit (difference), before any final soft-cap.
    """
    runtime = attribution_runtime(tracer)
    if ids is None:
        if prompt is None or not str(prompt).strip():
            raise BadPrompt("The prompt is empty: type some text to attribute.")
        ids = tracer.encode(prompt)
    if not ids:
        raise BadPrompt("The prompt has no tokens.")
    if tracer.context_length and len(ids) > tracer.context_length:
        raise BadPrompt(f"The prompt is {len(ids)} tokens, longer than this model's context of "
                        f"{tracer.context_length} tokens. Shorten it.")
    p = check_position(position, len(ids))
    target_pair, contrast_pair = _resolve_token(tracer, target), _resolve_token(tracer, contrast)
    if target_pair and contrast_pair and target_pair[1] == contrast_pair[1]:
        raise BadTarget("The target and the contrast are the same token: the logit difference is always 0.")
    start = time.perf_counter()
    with tracer.lock():
        parts = runtime.read(list(ids[: p + 1]), heads)
    text = TokenText(tracer.decode_one)
    if target_pair is None:
        top = int(np.argmax(parts.output_logits))
        target_pair = (text(top), top)
        if contrast_pair and contrast_pair[1] == top:
            raise BadTarget("The contrast is the model's own top prediction here; name a target as well.")
    readout = runtime.readout
    wanted = [target_pair[1]] + ([contrast_pair[1]] if contrast_pair else [])
    signs = np.array([1.0, -1.0][: len(wanted)])
    rows = readout.rows(wanted)
    u = signs @ rows  # the unembedding direction [d]
    norm = readout.norm
    scale = norm.scale(parts.final)
    # u . (g * P(v)) / s = (P(g * u) / s) . v: one direction for every part.
    direction = readout.scale * norm.centre(norm.gain * u) / scale
    bias = float(u @ norm.bias) if norm.bias is not None else 0.0
    if readout.unembed_bias is not None:
        bias += float(signs @ readout.unembed_bias(wanted))
    bias *= readout.scale
    embeddings = float(parts.embeddings @ direction)
    attention = parts.attention @ direction
    mlp = parts.mlp @ direction
    total = embeddings + float(attention.sum()) + float(mlp.sum()) + bias
    final_logit = float(signs @ parts.logits[wanted].astype(np.float64))
    output_logit = float(signs @ parts.output_logits[wanted].astype(np.float64))
    head_logits = head_bias = None
    if parts.heads is not None:
        head_logits = parts.heads @ direction
        head_bias = parts.head_bias @ direction
    seconds = time.perf_counter() - start
    metric = f"logit({target_pair[0]!r})" + (f" - logit({contrast_pair[0]!r})" if contrast_pair else "")
    info = {
        **getattr(tracer, "info", {}),
        "model": tracer.model_name,
        "backend": tracer.backend,
        "metric": metric,
        "error": abs(total - final_logit),
        "final_norm": norm.kind,
        "frozen_norm_scale": scale,
        "logit_scale": readout.scale,
        "softcap": readout.softcap,
        "output_logit": output_logit,
        "heads_note": parts.heads_note if parts.heads is None else None,
        "seconds": round(seconds, 4),
        **parts.facts,
    }
    notes = [info.pop("note")] if "note" in info else []  # the runtime's, e.g. llama.cpp's rounding
    if readout.softcap:
        notes.insert(0, f"the model soft-caps its logits (tanh(x / {readout.softcap:g}) x {readout.softcap:g}) "
                        "after the sum: the parts add up to the logit before the soft-cap")
    if notes:
        info["note"] = "; ".join(notes)
    return AttributionResult(
        model=tracer.model_name,
        backend=tracer.backend,
        tokens=[text(i) for i in ids],
        token_ids=[int(i) for i in ids],
        position=p,
        target=target_pair[0],
        target_id=int(target_pair[1]),
        contrast=contrast_pair[0] if contrast_pair else None,
        contrast_id=int(contrast_pair[1]) if contrast_pair else None,
        metric=metric,
        layers=row_labels(len(attention))[1:],
        embeddings=embeddings,
        attention=attention,
        mlp=mlp,
        bias=bias,
        total=total,
        final_logit=final_logit,
        heads=head_logits,
        head_bias=head_bias,
        heads_note=parts.heads_note,
        softcap=readout.softcap,
        output_logit=output_logit,
        info=info,
    )


def attribute(
    prompt: str,
    model=None,
    backend: str = "hooks",
    target: str | None = None,
    contrast: str | None = None,
    position: int = -1,
    heads: bool = True,
    **options,
) -> AttributionResult:
    """Direct logit attribution of `target` (or target - `contrast`) at `position` of `prompt`.

    model: None for the bundled SmolLM2-135M-Instruct, a file or folder in models/, a path, or a hub id.
    backend: "hooks" (PyTorch) or "llama-cpp" (the GGUF itself). options: loading options, e.g.
    device="cpu". See `attribute_with` for the rest.

        >>> r = tracing.attribute("The capital of Germany is", target=" Berlin", contrast=" Paris")
        >>> r.embeddings + r.attention.sum() + r.mlp.sum() + r.bias, r.final_logit   # equal
    """
    from .api import BACKEND_ALIASES, open_tracer

    name = BACKEND_ALIASES.get(backend, backend)
    if name not in RUNTIMES:
        raise UnsupportedModel(
            f"Direct logit attribution runs on the backends {' and '.join(RUNTIMES)}, not '{backend}'."
        )
    if prompt is None or not str(prompt).strip():
        raise BadPrompt("The prompt is empty: type some text to attribute.")
    tracer = open_tracer(model, name, **options)
    return attribute_with(tracer, prompt, target, contrast, position, heads=heads)


# Backend name -> the runtime class for its tracer (in this file).
RUNTIMES = {"hooks": "TorchAttribution", "llama-cpp": "LlamaCppAttribution"}


def attribution_runtime(tracer):
    """The attribution runtime of an opened tracer, built once per tracer."""
    cls = RUNTIMES.get(tracer.backend)
    if cls is None:
        raise UnsupportedModel(
            f"Direct logit attribution runs on the backends {' and '.join(RUNTIMES)}, not '{tracer.backend}'."
        )
    runtime = getattr(tracer, "_attribution_runtime", None)
    if runtime is None or not runtime.alive():
        with tracer.lock():
            runtime = globals()[cls](tracer)
        tracer._attribution_runtime = runtime
    return runtime


# ==================================================================== PyTorch


class TorchAttribution:
    """Attribution on a transformers model: forward hooks on the hooks backend's blocks, found once.

    Per block: what its attention adds (`tracing.sublayers.find_sublayer_writes`: the attention
    module, or the post-norm after it, times the factor the block adds it with), and, for heads, the
    attention's output projection (the Linear whose output is the attention's output) with the
    input it gets, split per head.
    """

    backend = "hooks"

    def __init__(self, tracer):
        self.tracer = tracer
        self.model = tracer.lens.model
        parts = tracer.lens.parts
        self.blocks = parts.blocks
        self.n_blocks = len(self.blocks)
        self.device = next(self.model.parameters()).device
        probe = tracer.probe_ids()
        name = type(self.model).__name__
        writes, problem = find_sublayer_writes(self.model, self.blocks, probe)
        if problem is not None:
            raise UnsupportedModel(f"Direct logit attribution needs each block's attention and MLP outputs, "
                                   f"and in {name} {problem}.")
        self.writes = writes
        if len(parts.final) != 1:
            raise UnsupportedModel(
                f"{name} passes the last residual through {', '.join(parts.final_names)} before its "
                "unembedding; direct logit attribution knows how to linearize one final norm only."
            )
        unembed = parts.unembed
        weight = getattr(unembed, "weight", None)
        d = int(weight.shape[-1]) if weight is not None else 0
        self.d_model = d
        norm = describe_norm(parts.final[0], d) if d else None
        if norm is None:
            raise UnsupportedModel(
                f"{name}'s final norm ({parts.final_names[0]}) is not an RMSNorm or LayerNorm as lensbench "
                "measures them, so it cannot be linearized for direct logit attribution."
            )
        bias = getattr(unembed, "bias", None)
        scale, softcap = classify_transforms(parts.logit_transforms, name)
        weight_t = weight.detach()
        self.readout = Readout(
            norm=norm,
            rows=lambda ids: weight_t[ids].cpu().double().numpy(),
            unembed_bias=(lambda ids: bias.detach()[ids].cpu().double().numpy()) if bias is not None else None,
            scale=scale,
            softcap=softcap,
        )
        self.heads, self.heads_note = self._find_heads(probe)

    def alive(self) -> bool:
        return True

    def _find_heads(self, probe: torch.Tensor):
        """Per block: (output projection, heads, its weight per head [heads, head_dim, d], steps after it), or
        (None, why not). The output projection is the attention's Linear whose output is the
        attention's output (one probe forward)."""
        config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        attns = [_sublayer_modules(block)[0] for block in self.blocks]
        ran: dict[int, list] = {i: [] for i in range(self.n_blocks)}
        out: dict[int, torch.Tensor] = {}
        handles = []
        for i, attn in enumerate(attns):
            for m in attn.modules():
                if isinstance(m, nn.Linear):
                    handles.append(m.register_forward_hook(lambda mod, _a, o, i=i: ran[i].append((mod, o))))
            handles.append(attn.register_forward_hook(lambda _m, _a, o, i=i: out.__setitem__(i, _first_tensor(o))))
        try:
            with torch.no_grad():
                self.model(input_ids=probe, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        found = []
        for i, (attn, write) in enumerate(zip(attns, self.writes)):
            kind = type(attn).__name__
            o_proj = next((m for m, o in reversed(ran[i])
                           if i in out and o.shape == out[i].shape and torch.equal(o, out[i])), None)
            if o_proj is None:
                return None, (f"the output projection of {kind} (a Linear whose output is the attention's output) "
                              "cannot be found, so attention is not split by head")
            n_heads = getattr(attn, "num_heads", None) or getattr(getattr(attn, "config", None), "num_attention_heads", None)
            n_heads = int(n_heads or getattr(config, "num_attention_heads", 0) or 0)
            if not n_heads or o_proj.in_features % n_heads:
                return None, f"{kind}'s output projection does not split into its heads"
            steps: list[Step] = []
            if o_proj.bias is not None:
                steps.append(("bias", o_proj.bias.detach().cpu().double().numpy()))
            if write.attn is not attn:  # a post-norm: frozen at its own input's scale
                spec = describe_norm(write.attn, self.d_model)
                if spec is None:
                    return None, f"the norm after {kind} is not an RMSNorm or LayerNorm, so attention is not split by head"
                steps.append(("norm", spec))
            if write.attn_scale != 1:
                steps.append(("scale", write.attn_scale))
            weight = o_proj.weight.detach().cpu().double().numpy()  # [d, heads x head_dim]
            per_head = np.ascontiguousarray(weight.reshape(weight.shape[0], n_heads, -1).transpose(1, 2, 0))
            found.append((o_proj, n_heads, per_head, steps))  # [heads, head_dim, d]
        return found, None

    def read(self, ids: list[int], heads: bool) -> Parts:
        d = self.d_model
        last: dict = {}
        handles = []

        def keep(key):
            def hook(_m, _a, output):
                last[key] = _first_tensor(output).detach().reshape(-1, d)[-1]
            return hook

        def keep_input(key):
            def hook(_m, args, kwargs):
                x = args[0] if args else kwargs.get("hidden_states")
                last[key] = x.detach().reshape(-1, x.shape[-1])[-1]
            return hook

        with_heads = heads and self.heads is not None
        handles.append(self.blocks[0].register_forward_pre_hook(keep_input("embeddings"), with_kwargs=True))
        for i, (block, write) in enumerate(zip(self.blocks, self.writes)):
            handles.append(block.register_forward_hook(keep(("out", i))))
            handles.append(write.attn.register_forward_hook(keep(("attn", i))))
            if with_heads:
                handles.append(self.heads[i][0].register_forward_pre_hook(keep_input(("z", i)), with_kwargs=True))
        unembed = self.tracer.lens.parts.unembed
        handles.append(unembed.register_forward_hook(
            lambda _m, _a, o: last.__setitem__("logits", o.detach().reshape(-1, o.shape[-1])[-1])))
        kwargs = {"use_cache": False}
        if self.tracer.lens._keep_arg:
            kwargs["logits_to_keep"] = 1
        try:
            with torch.no_grad():
                output = self.model(input_ids=torch.tensor([ids], device=self.device), **kwargs).logits
        finally:
            for h in handles:
                h.remove()

        def vector(t: torch.Tensor) -> np.ndarray:
            return t.cpu().double().numpy()

        embeddings = vector(last["embeddings"])
        outs = np.stack([vector(last[("out", i)]) for i in range(self.n_blocks)])
        attention = np.stack([self.writes[i].attn_scale * vector(last[("attn", i)]) for i in range(self.n_blocks)])
        before = np.concatenate([embeddings[None], outs[:-1]])
        mlp = outs - before - attention
        # The model's own logits before any soft-cap: its unembedding's output, linearly scaled.
        logits = last["logits"].cpu().double().numpy() * self.readout.scale
        parts = Parts(embeddings, attention, mlp, outs[-1], logits,
                      output[0, -1].float().cpu().numpy(), heads_note=self.heads_note)
        if heads and self.heads is not None:
            shares, rests, worst = [], [], 0.0
            for i, (_, n_heads, weight, steps) in enumerate(self.heads):
                z = vector(last[("z", i)]).reshape(n_heads, -1)
                raw = np.matmul(z[:, None, :], weight)[:, 0]  # head h: z_h @ W_o[:, h].T
                share, rest = route_heads(raw, steps)
                worst = max(worst, check_heads(share, rest, attention[i]))
                shares.append(share)
                rests.append(rest)
            parts.facts["heads_error"] = worst
            if worst <= _HEADS_TOLERANCE:
                parts.heads, parts.head_bias = np.stack(shares), np.stack(rests)
            else:
                parts.heads_note = (f"the heads' shares do not add up to the attention output here (relative "
                                    f"error {worst:.1e}), so attention is not split by head")
        elif not heads:
            parts.heads_note = "not asked for"
        return parts


# ==================================================================== llama.cpp


def _op_float(value: int) -> float:
    """An op parameter ggml stores as a float in an int32 slot."""
    return struct.unpack("<f", struct.pack("<i", int(value)))[0]


class LlamaCppAttribution:
    """Attribution on the GGUF itself: llama.cpp's own graph nodes, read by the eval callback.

    A context of its own on the shared model. The nodes (found once from the graph's structure,
    for decodes of several tokens and for a one-token decode, whose last block has no GET_ROWS):
    the embeddings node, per block the residual after attention (an ADD, e.g. `ffn_inp-{i}`) and
    `l_out-{i}`, and for heads `kqv_out-{i}`, with the path from it to the residual stream.
    """

    backend = "llama-cpp"

    def __init__(self, tracer):
        from llama_cpp import llama_cpp as C

        from runtime.llama_cpp import GraphContext

        self._C = C
        self.tracer = tracer
        self.shared = tracer.shared
        self.n_blocks = tracer.n_blocks
        self.d_model = tracer.d_model
        self.n_heads = int(C.llama_model_n_head(tracer.shared.llama.model))
        self._GraphContext = GraphContext
        self.graph = GraphContext(self.shared, 64, _LLAMA_UBATCH)
        self.embeddings = self.graph.layout().embeddings
        head = tracer.head
        norm = NormSpec(head.norm, float(head.eps), head.norm_weight.double().numpy(),
                        head.norm_bias.double().numpy() if head.norm_bias is not None else None)
        scale, softcap = classify_transforms(head.transforms, f"'{tracer.model_name}'")
        unembed = head.unembed
        self.readout = Readout(norm, lambda ids: np.stack([_dequantize_row(unembed, i) for i in ids]), None,
                               scale, softcap)
        self._rounding_note = None
        if unembed.type_name not in ("f32", "f16"):
            self._rounding_note = (
                f"llama.cpp rounds the normed residual to 8 bits before multiplying it by the {unembed.type_name} "
                "output matrix, which no sum of parts reproduces: the parts add up to the logit without that "
                "rounding (the difference is the error)")
        self._tensors: dict[str, object] = {}
        probe = (tracer.encode("The lens") + [0, 0])[:3]
        self._layouts = {False: self._find(probe), True: None}
        self._probe_single = probe[:1]

    def alive(self) -> bool:
        return self.graph is not None and self.graph.alive and not self.shared.closed

    # -- finding the nodes

    def _find(self, ids: list[int]) -> dict:
        nodes = _graph_nodes(self.graph, ids)
        blocks, problem = graph_blocks(nodes, self.n_blocks, self.embeddings)
        if problem is not None:
            raise UnsupportedModel(f"Direct logit attribution cannot read '{self.tracer.model_name}' on llama.cpp: "
                                   f"{problem}.")
        sites = [block.sites()[0] for block in blocks]
        if any(not site.name for site in sites):
            raise UnsupportedModel(f"llama.cpp's graph of '{self.tracer.model_name}' does not name the residual "
                                   "after attention, so it cannot be read.")
        heads, note = self._find_heads(nodes, blocks)
        return {"mid": sites, "heads": heads, "heads_note": note}

    def _tensor(self, name: str):
        """A GGUF tensor of the model file (memory-mapped), by name, or None."""
        if name not in self._tensors:
            from runtime.ggml import GGUFHeader

            from .models import split_parts

            found = None
            for part in split_parts(self.shared.path):
                with GGUFHeader(part) as header:
                    found = header.tensor(name)
                if found is not None:
                    break
            self._tensors[name] = found
        return self._tensors[name]

    def _vector(self, name: str) -> np.ndarray | None:
        from runtime.ggml import GGML_TYPE_F16, GGML_TYPE_F32

        tensor = self._tensor(name)
        if tensor is None or tensor.type not in (GGML_TYPE_F32, GGML_TYPE_F16):
            return None
        dtype = np.float32 if tensor.type == GGML_TYPE_F32 else np.float16
        return np.frombuffer(tensor.data(), dtype=dtype).astype(np.float64)

    def _find_heads(self, nodes, blocks):
        """Per block: (W_o as a QuantizedMatrix, steps from W_o to the residual stream), or (None, why not).

        Walked back from the attention side of the residual-after-attention ADD to the MUL_MAT of
        `kqv_out-{i}`: GET_ROWS (the last block's output rows) is skipped; SCALE, an ADD of a bias
        tensor and a norm (RMS_NORM or NORM, times a weight tensor) are steps; anything else means no heads.
        """
        from runtime.ggml import QuantizedMatrix

        by_address = {n[0]: n for n in nodes}
        weights = set()
        for n in nodes:  # tensors of the model file appear as sources without being nodes
            weights.update(name for name, address in zip(n[4], n[3]) if address not in by_address)
        found = []
        for i, block in enumerate(blocks):
            steps: list[Step] = []
            node = block.attn
            why = None
            while True:
                op, srcs, names = node[2], node[3], node[4]
                if op == "MUL_MAT" and len(names) == 2 and names[1] == f"kqv_out-{i}" and names[0] in weights:
                    break
                if op == "GET_ROWS":
                    node = by_address.get(srcs[0])
                elif op == "SCALE":
                    factor, shift = _op_float(node[5][0]), _op_float(node[5][1])
                    if shift != 0:
                        why = "a scale-and-shift"
                        break
                    steps.insert(0, ("scale", factor))
                    node = by_address.get(srcs[0])
                elif op == "ADD" and len(names) == 2 and names[1] in weights and srcs[0] in by_address:
                    bias = self._vector(names[1])
                    if bias is None or bias.shape != (self.d_model,):
                        why = f"an addition of {names[1]}"
                        break
                    steps.insert(0, ("bias", bias))
                    node = by_address[srcs[0]]
                elif (op == "MUL" and len(names) == 2 and names[1] in weights and srcs[0] in by_address
                      and by_address[srcs[0]][2] in ("RMS_NORM", "NORM")):
                    normed = by_address[srcs[0]]
                    gain = self._vector(names[1])
                    if gain is None or gain.shape != (self.d_model,):
                        why = f"a multiplication by {names[1]}"
                        break
                    kind = "rms" if normed[2] == "RMS_NORM" else "layer"
                    steps.insert(0, ("norm", NormSpec(kind, _op_float(normed[5][0]), gain)))
                    node = by_address.get(normed[3][0])
                else:
                    why = f"a {op} node ({node[1]})"
                    break
                if node is None:
                    why = "a node that is not in the graph"
                    break
            if why is not None:
                return None, (f"in llama.cpp's graph, block {i}'s attention reaches the residual stream through "
                              f"{why} that cannot be split by head")
            tensor = self._tensor(node[4][0])
            if tensor is None:
                return None, f"the output projection {node[4][0]} is not in the model file"
            cols, rows = (int(n) for n in tensor.shape[:2])
            if rows != self.d_model or cols % self.n_heads:
                return None, f"{node[4][0]} [{rows}, {cols}] does not split into {self.n_heads} heads"
            found.append((QuantizedMatrix(tensor.data(), tensor.type, rows, cols), steps))
        return found, None

    def _layout(self, single: bool) -> dict:
        if self._layouts[single] is None:
            self._layouts[single] = self._find(self._probe_single)
        return self._layouts[single]

    # -- reading

    def _ensure(self, n_tokens: int):
        if not self.alive() or self.graph.n_ctx < n_tokens:
            self.graph.close()
            self.graph = self._GraphContext(self.shared, n_tokens, _LLAMA_UBATCH)
        return self.graph

    def read(self, ids: list[int], heads: bool) -> Parts:
        n = len(ids)
        # The wanted position is the last of `ids`. With more than one token, a decode's last block
        # keeps only the requested output rows (GET_ROWS): the layout found with three tokens.
        single = n == 1
        layout = self._layout(single)
        graph = self._ensure(n)
        chunk = min(n, graph.n_ubatch)
        first = n - chunk  # earlier tokens are decoded first, without reading anything
        wanted = chunk - 1  # the row of the wanted position in the last decode
        got: dict = {}

        def reader(key):
            def read(view):
                rows, width = view.shape
                if rows == chunk:
                    got[key] = view.rows(wanted, 1)[0]
                elif rows == 1:
                    got[key] = view.rows(0, 1)[0]
                else:
                    raise UnsupportedModel(f"llama.cpp's {view.name} has {rows} rows for a decode of {chunk} "
                                           "tokens; attribution does not know how to read it.")
            return read

        handlers: dict[bytes, list] = {}

        def add(name: str, key, site=None):
            handlers.setdefault(name.encode(), []).append((key, site))

        add(self.embeddings, "embeddings")
        for i in range(self.n_blocks):
            add(f"l_out-{i}", ("out", i))
            add(layout["mid"][i].name, ("mid", i), layout["mid"][i])
        with_heads = heads and layout["heads"] is not None
        if with_heads:
            for i in range(self.n_blocks):
                add(f"kqv_out-{i}", ("z", i))
        readers = {key: reader(key) for entries in handlers.values() for key, _ in entries}

        def dispatch(entries):
            def handler(view):
                for key, site in entries:
                    if site is not None and site.op and (
                            view.op != site.op or (view.src(0).name if view.src(0) else "") != site.src0):
                        continue
                    if key in got:  # a name shared by nodes: the first matching one is the site
                        continue
                    readers[key](view)
            return handler

        try:
            graph.clear()
            for start in range(0, first, graph.n_ubatch):
                piece = ids[start : min(first, start + graph.n_ubatch)]
                graph.decode(piece, start, [False] * len(piece))
            graph.callback.handlers = {name: dispatch(entries) for name, entries in handlers.items()}
            graph.decode(ids[first:], first, [i == wanted for i in range(chunk)])
            output = graph.logits(wanted).astype(np.float64)
        finally:
            graph.callback.handlers = {}
            graph.clear()
        missing = [key for key in readers if key not in got]
        if missing:
            raise UnsupportedModel(f"llama.cpp's graph did not hand over {missing[0]} while attributing; "
                                   "its layout is not the one found.")
        embeddings = got["embeddings"].astype(np.float64)
        outs = np.stack([got[("out", i)] for i in range(self.n_blocks)]).astype(np.float64)
        mids = np.stack([got[("mid", i)] for i in range(self.n_blocks)]).astype(np.float64)
        before = np.concatenate([embeddings[None], outs[:-1]])
        attention, mlp = mids - before, outs - mids
        softcap = self.readout.softcap
        logits = output if softcap is None else softcap * np.arctanh(np.clip(output / softcap, -1 + 1e-12, 1 - 1e-12))
        parts = Parts(embeddings, attention, mlp, outs[-1], logits, output, heads_note=layout["heads_note"])
        if self._rounding_note:
            parts.facts["note"] = self._rounding_note
        if with_heads:
            shares, rests, worst = [], [], 0.0
            threads = max(1, int(self._C.llama_n_threads(graph.ctx)))  # the context's own setting
            for i, (w_o, steps) in enumerate(layout["heads"]):
                w_o.n_threads = threads
                z = got[("z", i)].astype(np.float32)
                raw = _per_head(w_o, z.reshape(self.n_heads, -1)).astype(np.float64)
                share, rest = route_heads(raw, steps)
                worst = max(worst, check_heads(share, rest, attention[i]))
                shares.append(share)
                rests.append(rest)
            parts.facts["heads_error"] = worst
            quantized = any(w_o.type_name not in ("f32", "f16", "bf16") for w_o, _ in layout["heads"])
            if worst <= (_HEADS_TOLERANCE_QUANTIZED if quantized else _HEADS_TOLERANCE):
                parts.heads, parts.head_bias = np.stack(shares), np.stack(rests)
            else:
                parts.heads_note = (f"the heads' shares do not add up to llama.cpp's attention output here "
                                    f"(relative error {worst:.1e}), so attention is not split by head")
        elif not heads:
            parts.heads_note = "not asked for"
        return parts


def _per_head(w_o, z: np.ndarray) -> np.ndarray:
    """Head h's output through its own columns of W_o, [heads, d], by ggml as llama.cpp multiplies
    (`QuantizedMatrix.matmul_heads`: one matmul over a strided view); where the heads do not fill whole
    quantization blocks even in groups, one product of the whole matrix with each head's vector alone."""
    try:
        return w_o.matmul_heads(z)
    except ValueError:
        heads, width = z.shape
        masked = np.zeros((heads, heads * width), np.float32)
        for h in range(heads):
            masked[h, h * width : (h + 1) * width] = z[h]
        return w_o.matmul(masked)


def _dequantize_row(matrix, row: int) -> np.ndarray:
    """Row `row` of a QuantizedMatrix as float64 [cols] (the GGUF's own bytes, dequantized by gguf-py)."""
    from runtime.ggml import GGML_TYPE_F16, GGML_TYPE_F32

    size = matrix.data.nbytes // matrix.rows
    raw = np.asarray(matrix.data[row * size : (row + 1) * size])
    if matrix.type == GGML_TYPE_F32:
        return raw.view(np.float32).astype(np.float64)
    if matrix.type == GGML_TYPE_F16:
        return raw.view(np.float16).astype(np.float64)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(raw, GGMLQuantizationType(matrix.type)).reshape(-1).astype(np.float64)


# ==================================================================== command line


def run_attribute(argv: list[str]) -> int:
    """`python -m tracing attribute --prompt TEXT --target TOKEN [...]`: the table, or with --json
    exactly `AttributionResult.to_dict()`."""
    import argparse

    from .__main__ import print_result
    from .models import ignoring_memory_check, print_memory_warnings

    parser = argparse.ArgumentParser(
        prog="python -m tracing attribute",
        description="Direct logit attribution: how much the embeddings, each block's attention (and each head) "
                    "and each block's MLP add to one token's logit, through the final norm frozen at its scale.",
    )
    parser.add_argument("--prompt", required=True, help="the text, e.g. 'The capital of Germany is'")
    parser.add_argument("--target", required=True, help="the token whose logit is split, one token, e.g. ' Berlin'")
    parser.add_argument("--contrast", default=None, help="a second token, e.g. ' Paris': the logit difference "
                        "target - contrast is split instead")
    parser.add_argument("--position", type=int, default=-1, help="which token's prediction (default -1: the last)")
    parser.add_argument("--model", default=None, help="a file or folder in models/, a path, or a hub id (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--backend", default="hooks", help=f"one of: {', '.join(RUNTIMES)} (default: hooks)")
    parser.add_argument("--no-heads", action="store_true", help="do not split attention by head")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (hooks; default: the best available)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--ignore-memory-check", action="store_true",
                        help="load the model even if it looks bigger than this machine's memory")
    args = parser.parse_args(argv)
    options = {"device": args.device} if args.device and args.backend != "llama-cpp" else {}
    print_memory_warnings()
    with ignoring_memory_check(args.ignore_memory_check):
        result = attribute(args.prompt, model=args.model, backend=args.backend, target=args.target,
                           contrast=args.contrast, position=args.position, heads=not args.no_heads, **options)
    print_result(result, args.json)
    return 0


__all__ = ["attribute", "attribute_with", "AttributionResult", "Parts", "NormSpec", "Readout", "describe_norm",
           "route_heads", "attribution_runtime", "TorchAttribution", "LlamaCppAttribution"]
