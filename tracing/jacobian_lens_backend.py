"""The Jacobian lens backend: TransformerLens's own `JacobianLens` (Gurnee et al. 2026) on the
TransformerLens backend's bridge.

Rows come from the same bridge hook points as `--backend transformer-lens` (the model loaded
once, the bridge built once); each block's output goes through the lens's own `transport`
(J_l h), then the bridge's final norm and unembedding, as `JacobianLens.readout` does. The
embeddings row, and a block the lens has no matrix for, is read as the logit lens (J = I); the
result's `lens` row labels say which.

The lens is a file in the reference artifact format (`--lens PATH`, a .pt file or a folder with
lens.pt), by default this model's fitted lens (`python -m tracing fit-lens --kind jacobian`).
A published artifact loads too (a hub file when online: `lens="hub:REPO/PATH.pt"`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import BadModelFile, ModelNotFound
from .learned_lens import JACOBIAN_FILE, ModelShape, check_jacobian, fingerprint, load_jacobian, translate_rows
from .loading import LoadedModelTracer, load_model
from .transformer_lens_backend import TransformerLensTracer

BACKEND = "jacobian-lens"


def default_jacobian_dir(source) -> Path:
    """Where `fit-lens --kind jacobian` writes, and this backend looks, for a model's J-lens."""
    from .tuned_lens_backend import default_lens_dir

    folder = default_lens_dir(source)
    return folder.with_name(folder.name + ".jacobian")


def model_shape(loaded) -> ModelShape:
    """A PyTorch model's width, block count and unembedding fingerprint (what a lens must match)."""
    tl = loaded.adapter("transformer-lens", TransformerLensTracer)
    weight = loaded.model.get_output_embeddings().weight
    return ModelShape(
        name=loaded.name,
        d_model=int(tl.lens.bridge.cfg.d_model),
        n_blocks=tl.lens.n_blocks,
        vocab_size=int(weight.shape[0]),
        fingerprint=fingerprint(lambda ids: weight[ids].detach().float().cpu().numpy(), int(weight.shape[0])),
    )


def bridge_of(loaded):
    """The TransformerLens backend's bridge on `loaded` (built once per model, raw weights)."""
    return loaded.adapter("transformer-lens", TransformerLensTracer).lens.bridge


class JacobianLensTracer(LoadedModelTracer):
    """The `Tracer` of the jacobian-lens backend (see tracing.api)."""

    backend = BACKEND

    def __init__(self, loaded, lens):
        super().__init__(loaded)
        self.tl = loaded.adapter("transformer-lens", TransformerLensTracer)
        check_jacobian(lens, model_shape(loaded))
        try:  # the library's own checks: a raw causal bridge, its provenance, its layer range
            lens.validate_model(self.tl.lens.bridge)
        except (TypeError, ValueError) as exc:
            raise BadModelFile(f"TransformerLens refuses the Jacobian lens '{getattr(lens, 'path', '')}' here: {exc}") from None
        self.jlens = lens
        self.info = {**self.info, "lens_file": str(getattr(lens, "path", "")), "lens_prompts": lens.n_prompts}

    def residuals(self, ids: list[int], last_only: bool) -> tuple[torch.Tensor, list[str]]:
        hidden, _ = self.tl.lens.residuals(self.input_ids(ids), last_only)
        return translate_rows(self.jlens, hidden)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tl.lens.project(hidden)


def jacobian_tracer(loaded, lens) -> JacobianLensTracer:
    """A J-lens (a `JacobianLens`, or a path to one) on a loaded model; built once per file version."""
    if not isinstance(lens, (str, Path)):
        return JacobianLensTracer(loaded, lens)
    file = _resolve(lens)
    stamp = file.stat().st_mtime_ns
    return loaded.adapter(f"{BACKEND}:{file.resolve()}:{stamp}", lambda l: JacobianLensTracer(l, load_jacobian(file)))


def _resolve(lens: str | Path) -> Path:
    """A local file or folder, or `hub:REPO/PATH.pt` downloaded through huggingface_hub."""
    text = str(lens)
    if text.startswith("hub:"):
        parts = text[4:].split("/")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo_id=repo, filename=filename))
        except Exception as exc:
            raise ModelNotFound(f"Could not download the Jacobian lens '{filename}' from {repo}: {exc}") from None
    path = Path(text).expanduser()
    return path / JACOBIAN_FILE if path.is_dir() else path


def open_tracer(model=None, device=None, lens=None, **load_options) -> JacobianLensTracer:
    """Backend "jacobian-lens": a J-lens on `model`, from `lens` (a file, folder or hub:REPO/FILE),
    else this model's fitted lens (where `python -m tracing fit-lens --kind jacobian` saves)."""
    from .models import resolve
    from .tuned_lens_backend import _model_arg

    source = resolve(model)
    if lens is None:
        lens = default_jacobian_dir(source)
        if not (lens / JACOBIAN_FILE).is_file():  # say so before loading the model
            raise ModelNotFound(
                f"There is no Jacobian lens for {source.name} yet. Fit one (minutes on a CPU for a small "
                f"model): python -m tracing fit-lens --kind jacobian{_model_arg(source)}. It is saved in "
                f"{lens} and used from then on. Or give a published lens file as lens=PATH."
            )
    loaded = load_model(model, device=device, **load_options)
    return jacobian_tracer(loaded, lens)


def fitted_lens_dir(model=None) -> Path | None:
    """This model's default J-lens folder if a lens was fitted there (for a UI to offer the J-lens)."""
    from .models import resolve

    folder = default_jacobian_dir(resolve(model))
    return folder if (folder / JACOBIAN_FILE).is_file() else None
