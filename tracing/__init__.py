"""lensbench tracing: per-layer lenses on the residual stream of open-weights LLMs.

    >>> import tracing
    >>> result = tracing.trace("The capital of Germany is", target=" Berlin")
    >>> print(result.table())

Backends return the same `LensResult`; errors a user can cause are `LensbenchError`s.
"""

from .api import backend_names, open_tracer, trace, trace_with
from .errors import (
    BadModelFile,
    BadPrompt,
    BadTarget,
    LensbenchError,
    ModelNotFound,
    NotEnoughMemory,
    UnsupportedModel,
)
from .lens import LensResult, TargetTrace

__all__ = [
    "trace",
    "trace_with",
    "open_tracer",
    "backend_names",
    "LensResult",
    "TargetTrace",
    "LensbenchError",
    "ModelNotFound",
    "BadModelFile",
    "UnsupportedModel",
    "NotEnoughMemory",
    "BadPrompt",
    "BadTarget",
]
