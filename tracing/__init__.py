"""lensbench tracing: per-layer lenses on the residual stream of open-weights LLMs.

    >>> import tracing
    >>> result = tracing.trace("The capital of Germany is", target=" Berlin")
    >>> print(result.table())
    >>> grid = tracing.patch("The capital of Germany is", "The capital of France is", " Berlin", " Paris")
    >>> parts = tracing.attribute("The capital of Germany is", target=" Berlin", contrast=" Paris")
    >>> heads = tracing.attention("The capital of Germany is", layers=[10])

Backends return the same `LensResult`; errors a user can cause are `LensbenchError`s.
The names below load on first use, so `import tracing.models` (as chat/ does) never pays for
importing torch.
"""

from .errors import (
    BadModelFile,
    BadPrompt,
    BadChoice,
    BadTarget,
    LensbenchError,
    ModelNotFound,
    NotEnoughMemory,
    UnsupportedModel,
)

_LAZY = {
    "trace": "api",
    "trace_with": "api",
    "open_tracer": "api",
    "backend_names": "api",
    "LensResult": "lens",
    "TargetTrace": "lens",
    "patch": "patching",
    "patch_with": "patching",
    "PatchResult": "patching",
    "attribute": "attribution",
    "attribute_with": "attribution",
    "AttributionResult": "attribution",
    "attention": "attention",
    "attention_with": "attention",
    "routing_with": "attention",
    "AttentionResult": "attention",
    "RoutingResult": "attention",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'tracing' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "LensbenchError",
    "ModelNotFound",
    "BadModelFile",
    "UnsupportedModel",
    "NotEnoughMemory",
    "BadPrompt",
    "BadTarget",
    "BadChoice",
]
