"""One loaded `llama_cpp.Llama` per GGUF path, shared by chat sessions and the llama.cpp lens.

A `Llama` is not thread-safe: every use goes through `SharedLlama.lock`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

_LOADED: dict[str, "SharedLlama"] = {}
_LOAD_LOCK = threading.Lock()


@dataclass
class SharedLlama:
    path: Path
    llama: object  # llama_cpp.Llama
    lock: threading.RLock = field(default_factory=threading.RLock)


def shared_llama(path: str | Path, n_ctx: int = 4096) -> SharedLlama:
    """The loaded model for `path`, loading it on first use (a second call returns the same object)."""
    key = str(Path(path).resolve())
    with _LOAD_LOCK:
        if key not in _LOADED:
            import llama_cpp

            llama = llama_cpp.Llama(model_path=key, n_ctx=n_ctx, n_gpu_layers=-1, verbose=False)
            _LOADED[key] = SharedLlama(Path(key), llama)
        return _LOADED[key]
