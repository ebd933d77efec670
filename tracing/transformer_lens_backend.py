"""The TransformerLens backend: the lens read through TransformerLens 4's `TransformerBridge`.

The residual stream comes from the bridge's own hook points (`blocks.0.hook_resid_pre`, then
`blocks.{i}.hook_resid_post`), cached with a `names_filter` so nothing else is kept; the lens
is the bridge's `ln_final`, `unembed` and the architecture's own logit transform (Gemma's
soft-cap). No weight processing (`enable_compatibility_mode` folds norms into the weights).

The bridge is built around the model lensbench already loaded, never a second copy of the
weights. Building it rewires the module tree it is given (bridge components replace the
model's submodules) and switches its config to eager attention, so it gets a *structural*
copy: new module objects and config, the very same parameter tensors. The shared model the
other backends use keeps its modules and its attention implementation; the bridge costs no
weight memory.

`build_bridge_from_module` is used rather than `boot_transformers`: both wrap a loaded model,
but the latter also rebuilds the tokenizer (from the hub when the model came from there, and
in place, adding special tokens) although this backend feeds token ids, never text (the
bridge's `to_tokens` would prepend a BOS the model's tokenizer doesn't).
"""

from __future__ import annotations

import copy
import inspect
from importlib.metadata import version

import torch
from torch import nn

from .errors import UnsupportedModel
from .loading import LoadedModelTracer, load_model

# Multimodal wrappers whose text model TransformerLens bridges on its own: class -> attribute.
# (Bridging Llama 4's multimodal class itself fails inside transformers' forward on text.)
TEXT_MODEL_INSIDE: dict[str, str] = {
    "Llama4ForConditionalGeneration": "language_model",
}

# Bridge components between the last block and the unembedding, in order, where an adapter
# mounts them: the final norm; OPT-350m's projection down to the embedding width.
READOUT = ("ln_final", "project_out")

# The bridge's lens must reproduce the model's own logits this closely (relative to their scale).
_PROBE_TOLERANCE = 1e-3

_USE_HOOKS = "Use the PyTorch hooks backend (--backend hooks), which traces any transformers decoder."


def _library() -> str:
    return f"TransformerLens {version('transformer-lens')}"


def text_model(model: nn.Module) -> nn.Module:
    """The causal LM to bridge: the model itself, or the language model inside a multimodal wrapper."""
    attribute = TEXT_MODEL_INSIDE.get(type(model).__name__)
    return getattr(model, attribute) if attribute else model


def structural_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules and config that shares its parameter tensors (no weight memory).

    Buffers are copied (rotary tables, masks: small), so nothing the bridge does to its copy
    reaches the original.
    """
    shared = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo=shared)


def supported_architectures() -> set[str]:
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return set(SUPPORTED_ARCHITECTURES)


def build_bridge(model: nn.Module, name: str = "lensbench"):
    """A TransformerBridge over a structural copy of `model` (see the module docstring)."""
    target = text_model(model)
    architecture = type(target).__name__
    if architecture not in supported_architectures():
        raise UnsupportedModel(
            f"{_library()} has no adapter for {architecture}, so it cannot trace this model. {_USE_HOOKS}"
        )
    from transformer_lens.model_bridge.sources import build_bridge_from_module
    from transformer_lens.utilities.attn_implementation import force_eager_attention

    view = structural_copy(target)
    force_eager_attention(view)  # what boot_transformers does: attention hooks need eager
    try:
        return build_bridge_from_module(view, architecture, hf_config=view.config, model_name=name)
    except Exception as exc:  # the library's own error says what it could not map
        raise UnsupportedModel(
            f"{_library()} could not wrap this {architecture}: {type(exc).__name__}: {exc}. {_USE_HOOKS}"
        ) from None


class TransformerLensLens:
    """Per-layer lens on a TransformerBridge: residual hook points in, logits out."""

    def __init__(self, model: nn.Module, probe_ids: torch.Tensor, name: str = "lensbench"):
        self.bridge = build_bridge(model, name)
        self.bridge.eval()
        self.n_blocks = int(self.bridge.cfg.n_layers)
        self.hook_names = ["blocks.0.hook_resid_pre"] + [
            f"blocks.{i}.hook_resid_post" for i in range(self.n_blocks)
        ]
        if "unembed" not in self.bridge._modules:
            raise UnsupportedModel(
                f"{_library()}'s adapter for {self.bridge.cfg.architecture} maps no unembedding, "
                f"so it has no lens. {_USE_HOOKS}"
            )
        self.readout_names = [name for name in READOUT if name in self.bridge._modules]
        self.readout = [getattr(self.bridge, name) for name in self.readout_names]
        original = text_model(model)
        self._keep_arg = "logits_to_keep" in inspect.signature(original.forward).parameters
        with torch.no_grad():
            logits = original(input_ids=probe_ids, use_cache=False).logits[0]
        self._check(probe_ids, logits)

    def _check(self, probe_ids: torch.Tensor, logits: torch.Tensor) -> None:
        """The bridge's lens on its last block's output must give the (unbridged) model's own logits."""
        try:
            hidden, _ = self.residuals(probe_ids, last_only=False)
            lens_logits = self.project(hidden[-1]).float()
        except UnsupportedModel:
            raise
        except Exception as exc:
            raise UnsupportedModel(
                f"{_library()} failed running this {self.bridge.cfg.architecture}: {type(exc).__name__}: {exc}. "
                f"{_USE_HOOKS}"
            ) from None
        scale = logits.float().abs().max().clamp_min(1e-6)
        self.probe_error = float((lens_logits - logits.float()).abs().max() / scale)
        if not self.probe_error < _PROBE_TOLERANCE:
            raise UnsupportedModel(
                f"{_library()}'s lens ({' -> '.join([*self.readout_names, 'unembed'])}) does not reproduce this "
                f"{self.bridge.cfg.architecture}'s own output (relative error {self.probe_error:.2e}). {_USE_HOOKS}"
            )

    def residuals(self, input_ids: torch.Tensor, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the bridge once: (rows [N+1, positions, d], the model's logits at the last position)."""
        kwargs = {"use_cache": False}
        if self._keep_arg:
            # The lens computes every row itself: the model's head need only run on one position
            # (the bridge passes keywords it doesn't know through to the transformers forward).
            kwargs["logits_to_keep"] = 1
        with torch.no_grad():
            logits, cache = self.bridge.run_with_cache(input_ids, names_filter=self.hook_names, **kwargs)
        rows = [cache[name][0] for name in self.hook_names]
        if len(rows) != self.n_blocks + 1:
            raise UnsupportedModel(f"{_library()} returned {len(rows)} residual snapshots, not {self.n_blocks + 1}.")
        hidden = torch.stack([r[-1:] if last_only else r for r in rows])
        return hidden, logits[0, -1]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Residual [..., d_model] -> logits [..., vocab]: ln_final, unembed, the logit transform."""
        with torch.no_grad():
            x = hidden.reshape(1, -1, hidden.shape[-1])  # the bridge's norms expect [batch, pos, d]
            for component in self.readout:
                x = component(x)
            logits = self.bridge.adapter.apply_output_logits_transform(self.bridge.unembed(x))
        return logits.reshape(*hidden.shape[:-1], logits.shape[-1])


class TransformerLensTracer(LoadedModelTracer):
    """The `Tracer` of the TransformerLens backend (see tracing.api)."""

    backend = "transformer-lens"

    def __init__(self, loaded):
        super().__init__(loaded)
        self.lens = TransformerLensLens(loaded.model, self.probe_ids(), name=loaded.name)


def open_tracer(model=None, device=None, **load_options) -> TransformerLensTracer:
    """Load `model` (see tracing.models.resolve), shared with the other backends, and bridge it once."""
    loaded = load_model(model, device=device, **load_options)
    return loaded.adapter("transformer-lens", TransformerLensTracer)
