"""Streaming chat on any GGUF through llama.cpp: what the app and `python -m chat` both call.
Generation itself lives in `runtime.chat` (below both chat/ and tracing/); this module adds what a
person sees before it starts.

    for delta in stream_chat(None, [{"role": "user", "content": "Hi"}]):
        print(delta, end="")

`model_facts(model)` says what a GGUF is and whether it fits, from its header alone, before
anyone waits for a load. The model's own chat template (from the GGUF) is applied by
llama-cpp-python's `create_chat_completion`; generation stops on the model's end-of-turn tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from tracing.models import (
    DEFAULT_MODEL_NAME,
    SMALLER_MODEL_HINT,
    GGUFFacts,
    MemoryVerdict,
    human_bytes,
    human_count,
    memory_verdict,
)

from runtime.chat import ChatNotice, ChatStream, chat, gguf_path, load, stream_chat
from runtime.llama_cpp import context_for, describe_size, gguf_facts, gpu_layers, loaded_model, memory_needed

# Readable names for GGUF architectures, and for mixtures of experts that the header identifies
# by architecture and expert count. Only for display: any architecture llama.cpp knows will run.
FAMILIES = {
    "llama": "Llama",
    "llama4": "Llama 4",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "gemma3": "Gemma 3",
    "qwen2": "Qwen2",
    "qwen2moe": "Qwen2 MoE",
    "qwen3": "Qwen3",
    "qwen3moe": "Qwen3 MoE",
    "phi3": "Phi-3",
    "mistral3": "Mistral 3",
    "gpt-oss": "gpt-oss",
    "deepseek2": "DeepSeek V2/V3",
}
KNOWN_MOE = {("llama4", 16): "Llama 4 Scout", ("llama4", 128): "Llama 4 Maverick"}


# ---------------------------------------------------------------- facts


@dataclass(frozen=True)
class ModelFacts:
    """What a GGUF model is, read from its header without loading the weights."""

    name: str  # from the header (general.name), else the file name
    path: str
    architecture: str  # the GGUF architecture, e.g. "llama4"
    family: str  # readable, e.g. "Llama 4 Scout"
    parameters: int
    active_parameters: int | None  # per token, for a mixture of experts
    experts: int | None
    experts_per_token: int | None
    layers: int | None
    quantization: str  # the weight type holding the most bytes, e.g. "Q4_K"
    context_length: int | None  # what the model was trained for (tokens)
    chat_context: int  # what chat allocates: the above, capped by runtime.llama_cpp.max_context()
    file_bytes: int
    files: int  # 1, or the number of parts of a split model
    memory_needed: int  # bytes, weights + KV cache + compute buffers
    memory_free: int  # bytes available now
    fits: bool  # loads without a memory warning (or is loaded already); see `memory` for the verdict
    loaded: bool  # already in memory in this process
    chat_template: bool  # the GGUF carries a chat template
    summary: str  # one line for a person, ending with the memory verdict
    memory: MemoryVerdict | None = None  # the verdict a load gets ("fits", "warning", "refuse"); None once loaded


def model_facts(model: str | None = None) -> ModelFacts:
    """Read a GGUF's header and say what it is and whether it fits in this machine's memory.

    `model` is anything `tracing.models.resolve` takes (None: the bundled SmolLM2). Reads only the
    header (seconds, even for a 60 GB model). Raises ModelNotFound / BadModelFile for a missing
    or damaged file and UnsupportedModel for a source that is not a GGUF file. The memory verdict
    (`memory`) is the one `load` acts on: the same figures, the same rule, the same message.
    """
    path, display = gguf_path(model)
    shared = loaded_model(path)
    facts = shared.facts if shared and shared.facts else gguf_facts(path)
    context = shared.n_ctx if shared else context_for(facts)
    needed = memory_needed(facts, context)
    # As `runtime.llama_cpp.shared_llama` takes it (every layer on the GPU: Metal's limit applies).
    verdict = None if shared else memory_verdict(
        needed, f"'{path.name}' ({describe_size(facts)})", metal=gpu_layers() != 0, hint=SMALLER_MODEL_HINT
    )
    fits = shared is not None or verdict.fits
    family = _family(facts)
    active = _active_parameters(facts)
    used = _meta(facts, "expert_used_count")
    name = display if display == DEFAULT_MODEL_NAME or not facts.name else facts.name

    moe = f", mixture of {facts.n_experts} experts ({used or '?'} per token)" if facts.n_experts else ""
    active_text = f" ({human_count(active)} active)" if active else ""
    files = f" in {facts.n_files} files" if facts.n_files > 1 else ""
    trained = f"{facts.context_length:,}" if facts.context_length else "unknown"
    summary = (
        f"{name} — {family} ({facts.architecture}){moe}, {human_count(facts.n_params)} parameters{active_text}, "
        f"{facts.n_layers} layers, {facts.quantization}, context {trained} tokens (chat uses {context:,}), "
        f"{human_bytes(facts.file_bytes)}{files}. {'Loaded.' if verdict is None else verdict.short()}"
    )
    return ModelFacts(
        name=name,
        path=str(path),
        architecture=facts.architecture,
        family=family,
        parameters=facts.n_params,
        active_parameters=active,
        experts=facts.n_experts,
        experts_per_token=used,
        layers=facts.n_layers,
        quantization=facts.quantization,
        context_length=facts.context_length,
        chat_context=context,
        file_bytes=facts.file_bytes,
        files=facts.n_files,
        memory_needed=needed,
        memory_free=verdict.available if verdict else 0,
        fits=fits,
        loaded=shared is not None,
        chat_template=bool(facts.metadata.get("tokenizer.chat_template")),
        summary=summary,
        memory=verdict,
    )


def _meta(facts: GGUFFacts, key: str):
    return facts.metadata.get(f"{facts.architecture}.{key}")


def _family(facts: GGUFFacts) -> str:
    known = KNOWN_MOE.get((facts.architecture, facts.n_experts))
    return known or FAMILIES.get(facts.architecture, facts.architecture)


def _active_parameters(facts: GGUFFacts) -> int | None:
    """Parameters used per token in a mixture of experts: all but the unchosen experts' weights."""
    used = _meta(facts, "expert_used_count")
    if not facts.n_experts or not used:
        return None
    expert = sum(n for name, n in facts.tensor_elements.items() if "_exps" in name)  # llama.cpp's name for stacked experts
    return facts.n_params - expert + expert * int(used) // int(facts.n_experts)


__all__ = [
    "ChatNotice",
    "ChatStream",
    "ModelFacts",
    "chat",
    "load",
    "model_facts",
    "stream_chat",
]
