"""Tiny random-config models of many decoder families, built in the test process (no download).

Weights are re-drawn with a large standard deviation, so norms have non-trivial weights (a lens
that forgot Gemma's (1 + weight) or a soft-cap would be caught) and logits are big enough that a
final soft-cap of 2.0 really bends them.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96
LAYERS = 3

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=24)

# model_type -> config overrides. One line a family: adding a family is adding a line.
ARCHITECTURES: dict[str, dict] = {
    "llama": dict(_COMMON, tie_word_embeddings=True),
    "mistral": dict(_COMMON, sliding_window=None),
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(_COMMON, tie_word_embeddings=True),
    "qwen2_moe": dict(_COMMON, **_MOE, num_experts=4, shared_expert_intermediate_size=24, decoder_sparse_step=1),
    "qwen3": dict(_COMMON),
    "qwen3_moe": dict(_COMMON, **_MOE, num_experts=4, decoder_sparse_step=1),
    "gemma": dict(_COMMON),
    "gemma2": dict(_COMMON, final_logit_softcapping=2.0, query_pre_attn_scalar=8, sliding_window=16),
    "gemma3_text": dict(_COMMON, final_logit_softcapping=2.0, query_pre_attn_scalar=8, sliding_window=16),
    "phi3": dict(_COMMON),
    "cohere": dict(_COMMON, logit_scale=0.25),
    "granite": dict(_COMMON, logits_scaling=4.0),
    "olmo2": dict(_COMMON),
    "starcoder2": dict(_COMMON),
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(_COMMON, rotary_pct=0.5, tie_word_embeddings=False),
    "opt": dict(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=LAYERS, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=16,  # exercises OPT's project_in / project_out
    ),
    "gptj": dict(
        vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, rotary_dim=4, n_positions=64, bos_token_id=1, eos_token_id=2,
    ),
    "llama4_text": dict(
        _COMMON, intermediate_size_mlp=48, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=1, attention_chunk_size=32,
    ),
}

# The Llama 4 Scout layout: a multimodal wrapper whose language model sits inside.
MULTIMODAL = "llama4"

GEMMA_FAMILY = {"gemma", "gemma2", "gemma3_text"}
SOFTCAPPED = {"gemma2", "gemma3_text"}
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "llama4_text", MULTIMODAL}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A float32 eval-mode causal LM of `model_type` with random weights."""
    torch.manual_seed(seed)
    if model_type == MULTIMODAL:
        from transformers import Llama4Config, Llama4ForConditionalGeneration

        text = {k: v for k, v in ARCHITECTURES["llama4_text"].items()}
        vision = dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
            image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
            projector_output_dim=32,
        )
        config = Llama4Config(text_config=text, vision_config=vision)
        config._attn_implementation = "eager"
        model = Llama4ForConditionalGeneration(config)
    else:
        config = AutoConfig.for_model(model_type, **ARCHITECTURES[model_type])
        config._attn_implementation = "eager"
        model = AutoModelForCausalLM.from_config(config)
    _randomize(model, seed)
    return model.float().eval()


def tiny_ids(length: int = 7, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, length), generator=generator)
