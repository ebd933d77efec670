"""The PyTorch-hooks backend: a lens on any transformers decoder, found by watching it run.

No table of model types. One short probe forward, with a hook on every module, shows:
- the decoder blocks: the outermost list of same-class modules that ran (a vision tower of a
  multimodal wrapper does not run on text, so Llama 4 Scout's language model is found inside);
- the final modules: whatever ran after the last block and before the unembedding (the final
  norm, with its own quirks such as Gemma's (1 + weight); OPT's projection too);
- the unembedding: `get_output_embeddings()` (tied or not).
The probe then checks that this lens reproduces the model's own logits, so a model that does
something unexpected is reported instead of silently mis-traced.

The residual stream is read where it really flows: the input of the first block (embeddings,
after Gemma's scaling or GPT-2's position embeddings) and the output of every block. Only those
snapshots are kept (and only the last position, when asked).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import UnsupportedModel
from .loading import LoadedModelTracer, load_model

# Logit post-processing that a causal LM's forward applies after its unembedding: config
# attribute -> how it changes the logits. Data, not code paths: adding one is adding a line.
LOGIT_TRANSFORMS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "final_logit_softcapping": lambda x, cap: torch.tanh(x / cap) * cap,  # Gemma 2, Gemma 3
    "logit_scale": lambda x, scale: x * scale,  # Cohere
    "logits_scaling": lambda x, scale: x / scale,  # Granite
}

# The probe's lens must match the model's own logits this closely (relative to their scale).
_PROBE_TOLERANCE = 1e-3


@dataclass
class LensParts:
    """Where the lens reads and how it projects: found once per model."""

    blocks: nn.ModuleList
    blocks_name: str
    final: list[nn.Module]
    final_names: list[str]
    unembed: nn.Module
    logit_transforms: list[tuple[Callable[[torch.Tensor, float], torch.Tensor], float]]
    probe_error: float

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Residual [..., d_model] -> logits [..., vocab], exactly as the model does it."""
        for module in self.final:
            hidden = module(hidden)
        logits = self.unembed(hidden)
        for transform, value in self.logit_transforms:
            logits = transform(logits, value)
        return logits


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "hidden_states", None) or getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot find the hidden state in a {type(output).__name__}")


def _block_lists(model: nn.Module) -> dict[str, nn.ModuleList]:
    """Every non-empty ModuleList whose modules are all of one class."""
    lists = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1:
                lists[name] = module
    return lists


def find_lens_parts(model: nn.Module, probe_ids: torch.Tensor) -> LensParts:
    """Find blocks, final modules and unembedding of `model` by running it once on `probe_ids`."""
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembed is None:
        raise UnsupportedModel(
            f"{type(model).__name__} has no output embedding (language-model head), so there is "
            "nothing to project the residual stream through."
        )
    names = {module: name for name, module in model.named_modules()}
    order: list[nn.Module] = []
    unembed_start: list[int] = []
    handles = []

    def on_end(module, _args, _output):
        order.append(module)

    def on_unembed_start(_module, _args):
        if not unembed_start:
            unembed_start.append(len(order))

    try:
        for module in names:
            if module is not model:
                handles.append(module.register_forward_hook(on_end))
        handles.append(unembed.register_forward_pre_hook(on_unembed_start))
        with torch.no_grad():
            logits = model(input_ids=probe_ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    if not unembed_start:
        raise UnsupportedModel(f"{type(model).__name__} did not use its output embedding in a forward pass.")
    finished = order[: unembed_start[0]]
    position = {module: i for i, module in enumerate(finished)}

    # The decoder blocks: the outermost homogeneous ModuleList whose blocks all ran; the last such
    # list to finish before the unembedding (an encoder's or vision tower's list would run earlier).
    candidates = [
        (name, blocks)
        for name, blocks in _block_lists(model).items()
        if all(b in position for b in blocks)
    ]
    candidates = [
        (name, blocks)
        for name, blocks in candidates
        if not any(other != name and name.startswith(other + ".") for other, _ in candidates)
    ]
    if not candidates:
        raise UnsupportedModel(f"Could not find the decoder blocks of {type(model).__name__}.")
    blocks_name, blocks = max(candidates, key=lambda item: position[item[1][-1]])
    last_block = position[blocks[-1]]

    # The final modules: outermost modules that finished after the last block and before the unembedding,
    # excluding containers of the blocks (the decoder model itself).
    after = [m for m in finished[last_block + 1 :] if not _contains(m, blocks[-1])]
    final = [m for m in after if not any(o is not m and _contains(o, m) for o in after)]
    final = [m for m in final if any(True for _ in m.parameters()) or len(list(m.children())) == 0]

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    transforms = [
        (fn, float(getattr(config, attr)))
        for attr, fn in LOGIT_TRANSFORMS.items()
        if getattr(config, attr, None)  # None or 0 means "not used"
    ]
    parts = LensParts(blocks, blocks_name, final, [names[m] for m in final], unembed, transforms, 0.0)

    # Check: the lens on the last block's output must give the model's own logits.
    with torch.no_grad(), capture_residuals(parts, last_only=False) as rows:
        model(input_ids=probe_ids, use_cache=False)
        lens_logits = parts.project(rows[-1]).float()
    scale = logits.float().abs().max().clamp_min(1e-6)
    parts.probe_error = float((lens_logits - logits.float()).abs().max() / scale)
    if not parts.probe_error < _PROBE_TOLERANCE:
        raise UnsupportedModel(
            f"The hooks lens cannot reproduce {type(model).__name__}'s own output (relative error "
            f"{parts.probe_error:.2e} after {blocks_name} -> {parts.final_names} -> unembedding); "
            "this model transforms its logits in a way lensbench does not know."
        )
    return parts


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return outer is inner or any(m is inner for m in outer.modules())


class capture_residuals:
    """Context manager: while active, forwards of the model record the residual stream.

    `rows` becomes [embeddings, after block 1, ..., after block N], each [batch, positions, d]
    (positions = 1 when `last_only`). Only these snapshots are kept.
    """

    def __init__(self, parts: LensParts, last_only: bool = False):
        self.parts = parts
        self.last_only = last_only
        self.rows: list[torch.Tensor] = []
        self._handles = []

    def _keep(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden[:, -1:, :] if self.last_only else hidden).detach()

    def __enter__(self) -> list[torch.Tensor]:
        self.rows.clear()

        def on_first_input(_module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            self.rows.append(self._keep(hidden))

        def on_block_output(_module, _args, output):
            self.rows.append(self._keep(_first_tensor(output)))

        blocks = self.parts.blocks
        self._handles.append(blocks[0].register_forward_pre_hook(on_first_input, with_kwargs=True))
        for block in blocks:
            self._handles.append(block.register_forward_hook(on_block_output))
        return self.rows

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class HooksLens:
    """Per-layer lens on a transformers causal LM through forward hooks."""

    name = "hooks"

    def __init__(self, model: nn.Module, probe_ids: torch.Tensor | None = None):
        self.model = model.eval()
        device = next(model.parameters()).device
        if probe_ids is None:
            probe_ids = torch.tensor([[1, 2, 3]], device=device)
        self.parts = find_lens_parts(model, probe_ids.to(device))
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters

    @property
    def n_blocks(self) -> int:
        return len(self.parts.blocks)

    def residuals(self, input_ids: torch.Tensor, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model once; return (rows [N+1, positions, d], model logits [positions, vocab]).

        Model logits cover the last position only when `last_only`.
        """
        kwargs = {"use_cache": False}
        if self._keep_arg:
            # The lens computes every row itself; the model's own head is only needed for the
            # positions we return, and only as a check.
            kwargs["logits_to_keep"] = 1 if last_only else 0
        with torch.no_grad(), capture_residuals(self.parts, last_only) as rows:
            logits = self.model(input_ids=input_ids, **kwargs).logits
        if len(rows) != self.n_blocks + 1:
            raise UnsupportedModel(
                f"Expected {self.n_blocks + 1} residual snapshots, got {len(rows)}: the model skipped or "
                "repeated decoder blocks."
            )
        hidden = torch.cat([r[:1] for r in rows])  # [N+1, P, d]
        return hidden, logits[0, -hidden.shape[1] :]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.parts.project(hidden)


class HooksTracer(LoadedModelTracer):
    """The `Tracer` of the hooks backend (see tracing.api)."""

    backend = "hooks"

    def __init__(self, loaded):
        super().__init__(loaded)
        self.lens = HooksLens(loaded.model, self.probe_ids())


def open_tracer(model=None, device=None, **load_options) -> HooksTracer:
    """Load `model` (see tracing.models.resolve) and its hooks lens, both reused on later calls."""
    loaded = load_model(model, device=device, **load_options)
    return loaded.adapter("hooks", HooksTracer)
