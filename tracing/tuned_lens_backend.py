"""The tuned-lens backend: tuned-lens's own `LogitLens` and `TunedLens` modules on any decoder.

tuned-lens 0.2.0 (the current release, from 2023) breaks on today's stack in six ways. This
module is the one adapter that makes it work from the outside, without forking it:

1. `LogitLens.from_model` / `TunedLens.from_model` fail for every model while TransformerLens 4
   is installed: tuned-lens's `model_surgery` asks for `HookedTransformer`, removed in 4.0.
2. `model_surgery` finds the final norm with an isinstance table: "Unknown model type" for
   Mistral, Gemma 1-3, Qwen 2-3 and anything newer.
   -> For both, the lenses are never built through `from_model`: `ModelUnembed` is a
   tuned-lens `Unembed` whose final norm and unembedding come from the hooks backend's
   structure finder (`tracing.hooks.find_lens_parts`, which works on every decoder and checks
   itself against the model's own logits), and the lenses are constructed around it.
3. `Unembed` ignores Gemma 2/3's final logit soft-capping.
   -> `ModelUnembed.forward` applies the logit transforms the structure finder found.
4. `PredictionTrajectory.from_lens_and_model` asserts on a one-token prompt (its `.squeeze()`
   drops the position axis), and re-runs the model.
   -> `trajectory(tracer, ids)` builds one from the rows the tracer already captured.
5. Its plotly heatmaps fail on plotly 7 (`colorbar.titleside` was removed).
   -> `figure(statistic)` passes the colorbar title the plotly 7 way.
6. Its CLI does not import (`torchdata.dataloader2` is gone, `simple_parsing` is not needed
   otherwise), so it cannot train.
   -> `python -m tracing train-lens` (tracing/train_lens.py) trains its `TunedLens` and
   writes its format.

A trained lens is a folder in tuned-lens's own format: `config.json` + `params.pt` (the layer
translators' state dict, read with `weights_only=True`), the same as the lenses tuned-lens
publishes, so a downloaded lens loads here and a lens trained here loads in tuned-lens.

Residuals are captured by the hooks backend's forward hooks on the shared model (tuned-lens
itself reads `output_hidden_states`, whose last entry transformers now returns already
normalized); the lens modules here only translate and project them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from tuned_lens.nn import LogitLens, TunedLens, TunedLensConfig, Unembed

from .errors import BadModelFile, ModelNotFound
from .hooks import HooksTracer, LensParts
from .loading import LoadedModelTracer

LENS_FILES = ("config.json", "params.pt")


class ModelUnembed(Unembed):
    """tuned-lens's `Unembed` for any decoder (breakages 1, 2 and 3 above).

    `final_norm` is the model's own final module(s) (Gemma's (1 + w) RMSNorm; OPT's norm, then
    its projection), `unembedding` its output embedding: both shared with the model, not copied
    (Gemma 3's unembedding alone is 670 MB). The logit transforms (soft-capping) follow.
    """

    def __init__(self, parts: LensParts):
        nn.Module.__init__(self)  # Unembed.__init__ would consult model_surgery
        self.final_norm = nn.Sequential(*parts.final)
        self.unembedding = parts.unembed
        self.logit_transforms = list(parts.logit_transforms)
        self._hash: str | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = super().forward(h)
        for transform, value in self.logit_transforms:
            logits = transform(logits, value)
        return logits

    def unembedding_hash(self) -> str:
        if self._hash is None:  # tuned-lens's own hash (published lenses carry it), computed once
            self._hash = super().unembedding_hash()
        return self._hash


def lens_config(model: nn.Module, parts: LensParts, name: str) -> TunedLensConfig:
    """tuned-lens's config for a lens on `model`: one translator per row but the last (the output)."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return TunedLensConfig(
        base_model_name_or_path=name, d_model=int(text.hidden_size), num_hidden_layers=len(parts.blocks)
    )


def new_tuned_lens(model: nn.Module, parts: LensParts, name: str, unembed: ModelUnembed | None = None) -> TunedLens:
    """An untrained `TunedLens` for `model`: every translator starts as the identity."""
    lens = TunedLens(unembed or ModelUnembed(parts), lens_config(model, parts, name))
    return lens.to(next(model.parameters()).device)


def load_tuned_lens(
    folder: str | Path, model: nn.Module, parts: LensParts, name: str, unembed: ModelUnembed | None = None
) -> TunedLens:
    """Load a tuned lens saved in tuned-lens's format (config.json + params.pt) for `model`.

    Local folders only (given anything else, tuned-lens would try its hub Space). Raises
    ModelNotFound for a missing folder or file, BadModelFile for a lens that is unreadable or
    was made for a model of another shape. `lens.matches_unembedding` says whether it was
    trained on this very unembedding (a lens for the unquantized original still applies).
    """
    folder = Path(folder).expanduser()
    missing = [f for f in LENS_FILES if not (folder / f).is_file()]
    if missing:
        raise ModelNotFound(
            f"No tuned lens in '{folder}': {' and '.join(missing)} missing. A tuned lens is a folder with "
            "config.json and params.pt (tuned-lens's format); train one with "
            "'python -m tracing train-lens --text FILE'."
        )
    expected = lens_config(model, parts, name)
    try:
        config = json.loads((folder / "config.json").read_text())
        shape = (int(config["num_hidden_layers"]), int(config["d_model"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadModelFile(f"'{folder / 'config.json'}' is not a tuned-lens config: {exc}") from None
    if shape != (expected.num_hidden_layers, expected.d_model):
        raise BadModelFile(
            f"The tuned lens in '{folder}' was trained for "
            f"{config.get('base_model_name_or_path') or 'another model'} ({shape[0]} layers of width {shape[1]}); "
            f"{name} has {expected.num_hidden_layers} layers of width {expected.d_model}."
        )
    unembed = unembed or ModelUnembed(parts)
    try:
        lens = TunedLens.from_unembed_and_pretrained(unembed, str(folder), weights_only=True, map_location="cpu")
    except Exception as exc:  # unpickling refused, wrong keys or shapes, truncated file
        raise BadModelFile(f"Could not read the tuned lens in '{folder}': {type(exc).__name__}: {exc}") from None
    lens.matches_unembedding = config.get("unembed_hash") in (None, unembed.unembedding_hash())
    return lens.to(next(model.parameters()).device)


def default_lens_dir(source) -> Path:
    """Where `train-lens` writes, and the tuned backend looks, for a model's lens by default."""
    from .loading import cache_dir

    name = source.location if source.kind == "hub" else Path(source.location).name
    name = name.removesuffix(".gguf")
    return cache_dir() / "lenses" / re.sub(r"[^\w.-]+", "--", name)


class TunedLensTracer(LoadedModelTracer):
    """The `Tracer` of the tuned-lens backends (see tracing.api): a tuned-lens `Lens` on the residuals."""

    def __init__(self, loaded, lens: LogitLens | TunedLens, backend: str):
        super().__init__(loaded)
        self.hooks = loaded.adapter("hooks", HooksTracer)  # the residual capture, shared
        self.lens = lens.eval()
        self.tuned = isinstance(lens, TunedLens)
        self.backend = backend

    def residuals(self, ids: list[int], last_only: bool) -> tuple[torch.Tensor, list[str]]:
        hidden, _ = self.hooks.lens.residuals(self.input_ids(ids), last_only)
        n = hidden.shape[0] - 1
        if not self.tuned:
            return hidden, ["logit"] * n
        with torch.no_grad():  # row i goes through translator i; the last row is the output
            rows = [self.lens.transform_hidden(hidden[i], i) for i in range(n)] + [hidden[n]]
        return torch.stack(rows), ["tuned"] * n

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.lens.unembed(hidden)


def _parts(loaded) -> LensParts:
    return loaded.adapter("hooks", HooksTracer).lens.parts


def _unembed(loaded) -> ModelUnembed:
    """One `ModelUnembed` per loaded model, shared by its logit and tuned lenses."""
    return loaded.adapter("tuned-lens:unembed", lambda l: ModelUnembed(_parts(l)))


def logit_lens_tracer(loaded) -> TunedLensTracer:
    """tuned-lens's `LogitLens` on a loaded model (built once per model)."""
    return loaded.adapter("tuned-lens", lambda l: TunedLensTracer(l, LogitLens(_unembed(l)), "tuned-lens"))


def tuned_lens_tracer(loaded, folder: str | Path) -> TunedLensTracer:
    """The tuned lens saved in `folder` on a loaded model (read again when its files change)."""
    folder = Path(folder).expanduser()
    stamp = tuple((folder / f).stat().st_mtime_ns for f in LENS_FILES if (folder / f).is_file())

    def build(loaded) -> TunedLensTracer:
        lens = load_tuned_lens(folder, loaded.model, _parts(loaded), loaded.name, _unembed(loaded))
        tracer = TunedLensTracer(loaded, lens, "tuned-lens-tuned")
        tracer.lens_dir = folder
        return tracer

    return loaded.adapter(f"tuned-lens-tuned:{folder.resolve()}:{stamp}", build)


def open_tracer(model=None, device=None, **load_options) -> TunedLensTracer:
    """Backend "tuned-lens": the logit lens computed by tuned-lens's `LogitLens`, on `model`
    (loaded once and shared with the other backends)."""
    from .loading import load_model

    return logit_lens_tracer(load_model(model, device=device, **load_options))


def open_tuned_tracer(model=None, device=None, lens=None, **load_options) -> TunedLensTracer:
    """Backend "tuned-lens-tuned": a trained tuned lens on `model`, from the folder `lens`, or else
    from this model's default lens folder (where `python -m tracing train-lens` saves)."""
    from .loading import load_model
    from .models import resolve

    source = resolve(model)
    folder = Path(lens).expanduser() if lens else default_lens_dir(source)
    if not lens and not (folder / "params.pt").is_file():  # say so before loading the model
        raise ModelNotFound(
            f"There is no tuned lens for {source.name} yet. Train one on some text (a few minutes): "
            f"python -m tracing train-lens{_model_arg(source)} --text FILE. It is saved in {folder} and "
            "used from then on. Or give the folder of a downloaded lens (config.json + params.pt) "
            "as lens=DIR."
        )
    return tuned_lens_tracer(load_model(model, device=device, **load_options), folder)


def trained_lens_dir(model=None) -> Path | None:
    """The default lens folder of `model` if a lens was trained there (for a UI to offer the tuned lens)."""
    from .models import resolve

    folder = default_lens_dir(resolve(model))
    return folder if all((folder / f).is_file() for f in LENS_FILES) else None


def _model_arg(source) -> str:
    from .models import DEFAULT_MODEL_NAME

    if source.name == DEFAULT_MODEL_NAME:
        return ""
    location = source.location
    return f" --model '{location}'" if " " in location else f" --model {location}"


# ---- tuned-lens's prediction trajectories and plots, working (breakages 4 and 5) ----


def trajectory(tracer, ids: list[int], targets: list[int] | None = None):
    """tuned-lens's `PredictionTrajectory` for token `ids`, from `tracer`'s rows (any length, one token too).

    `log_probs` is [rows, positions, vocab]; its last row is the model's own output.
    """
    import numpy as np
    from tuned_lens.plotting import PredictionTrajectory

    with tracer.lock():
        hidden, _ = tracer.residuals(list(ids), last_only=False)
        with torch.no_grad():
            log_probs = torch.log_softmax(tracer.project(hidden).float(), dim=-1)
    return PredictionTrajectory(
        log_probs=log_probs.cpu().numpy(),
        input_ids=np.asarray(ids, dtype=np.int64),
        targets=None if targets is None else np.asarray(targets, dtype=np.int64),
        tokenizer=getattr(getattr(tracer, "loaded", None), "tokenizer", None),
    )


def figure(statistic, title: str = "", colorscale: str = "rdbu_r", token_width: int = 80):
    """`TrajectoryStatistic.figure()` that works on plotly 7 (its colorbar `titleside` is gone)."""
    import plotly.graph_objects as go

    label = f"{statistic.name} ({statistic.units})" if statistic.units else statistic.name
    heatmap = statistic.heatmap(colorscale, colorbar=dict(title=dict(text=label, side="right")))
    return go.Figure(heatmap).update_layout(
        title_text=title,
        title_x=0.5,
        width=200 + token_width * statistic.stats.shape[1],
        xaxis_title="Input",
        yaxis_title="Layer",
    )
