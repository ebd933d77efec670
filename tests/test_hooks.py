"""The hooks lens is exact on every modern decoder family (tiny random models built here)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.tiny_models import ARCHITECTURES, GEMMA_FAMILY, MOE, MULTIMODAL, SOFTCAPPED, tiny_ids, tiny_model
from tracing.errors import UnsupportedModel
from tracing.hooks import HooksLens

ALL = list(ARCHITECTURES) + [MULTIMODAL]


def test_covers_the_families_the_issue_names():
    required = {
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
        "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt", "gptj", "llama4_text",
    }
    assert required <= set(ALL)
    assert len(ALL) >= 14


@pytest.fixture(scope="module", params=ALL)
def traced(request):
    model = tiny_model(request.param)
    ids = tiny_ids()
    lens = HooksLens(model, ids[:, :3])
    hidden, _ = lens.residuals(ids)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return request.param, model, lens, ids, hidden, out


def test_last_row_is_the_models_own_logits(traced):
    _, _, lens, _, hidden, out = traced
    assert hidden.shape[0] == len(lens.parts.blocks) + 1
    diff = (lens.project(hidden[-1]) - out.logits[0]).abs().max().item()
    assert diff <= 1e-4


def test_rows_are_the_block_outputs(traced):
    """Row 0 is the embeddings entering block 0; row i the output of block i.

    transformers' hidden_states[i] are the same for i < N; its last entry is already normalized,
    which is why the lens hooks the blocks instead of trusting output_hidden_states.
    """
    _, _, lens, _, hidden, out = traced
    states = out.hidden_states
    assert len(states) == hidden.shape[0]
    for i in range(len(states) - 1):
        torch.testing.assert_close(hidden[i], states[i][0], atol=1e-6, rtol=0)
    final_normed = hidden[-1]
    for module in lens.parts.final:
        final_normed = module(final_normed)
    if lens.parts.final_names[-1].endswith("project_out"):
        return  # OPT with a projection: its hidden_states[-1] is taken before project_out
    torch.testing.assert_close(states[-1][0], final_normed, atol=1e-5, rtol=0)
    assert not torch.allclose(states[-1][0], hidden[-1], atol=1e-3)


def test_last_position_only_matches_all_positions(traced):
    _, _, lens, ids, hidden, _ = traced
    last, logits = lens.residuals(ids, last_only=True)
    assert last.shape[1] == 1
    torch.testing.assert_close(last[:, 0], hidden[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lens.project(last[-1:])[0, 0], logits[-1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", sorted(GEMMA_FAMILY))
def test_gemma_norm_is_one_plus_weight_and_embeddings_are_scaled(arch):
    model = tiny_model(arch)
    ids = tiny_ids()
    lens = HooksLens(model, ids)
    hidden, _ = lens.residuals(ids)
    embed = model.get_input_embeddings().weight[ids[0]]
    scale = math.sqrt(model.config.hidden_size)
    torch.testing.assert_close(hidden[0], embed * scale, atol=1e-4, rtol=1e-4)
    norm = lens.parts.final[0]
    x = hidden[-1]
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    torch.testing.assert_close(norm(x), rms * (1.0 + norm.weight), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(norm(x), rms * norm.weight, atol=1e-3)


@pytest.mark.parametrize("arch", sorted(SOFTCAPPED))
def test_final_logit_softcap_is_applied(arch):
    model = tiny_model(arch)
    ids = tiny_ids()
    lens = HooksLens(model, ids)
    hidden, logits = lens.residuals(ids)
    cap = model.config.final_logit_softcapping
    raw = lens.parts.unembed(lens.parts.final[0](hidden[-1]))
    assert raw.abs().max() > 2 * cap, "the test model must produce logits the cap really bends"
    capped = lens.project(hidden[-1])
    assert capped.abs().max() <= cap
    torch.testing.assert_close(capped, logits, atol=1e-5, rtol=0)


def test_tied_embeddings_are_the_unembedding():
    model = tiny_model("llama")
    assert model.config.tie_word_embeddings
    lens = HooksLens(model, tiny_ids())
    assert lens.parts.unembed.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    untied = tiny_model("mistral")
    untied_lens = HooksLens(untied, tiny_ids())
    assert untied_lens.parts.unembed.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("arch", sorted(MOE))
def test_moe_blocks_are_found_as_whole_blocks(arch):
    model = tiny_model(arch)
    lens = HooksLens(model, tiny_ids())
    text_config = model.config.get_text_config()
    assert len(lens.parts.blocks) == text_config.num_hidden_layers
    assert not any("expert" in name for name in [lens.parts.blocks_name, *lens.parts.final_names])


def test_multimodal_wrapper_finds_the_language_model_inside():
    model = tiny_model(MULTIMODAL)
    assert type(model).__name__ == "Llama4ForConditionalGeneration"
    lens = HooksLens(model, tiny_ids())
    assert lens.parts.blocks_name.startswith("language_model.") or "language_model" in lens.parts.blocks_name
    assert all("vision" not in name for name in [lens.parts.blocks_name, *lens.parts.final_names])


def test_unknown_logit_transform_is_reported_not_mis_traced():
    """A model whose head does something the lens doesn't know gets a clear error."""
    from transformers import LlamaForCausalLM

    class DoubledLogits(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2 + 1
            return out

    base = tiny_model("llama")
    model = DoubledLogits(base.config)
    model.load_state_dict(base.state_dict())
    with pytest.raises(UnsupportedModel, match="cannot reproduce"):
        HooksLens(model.eval(), tiny_ids())


def test_snapshots_keep_only_the_residual_stream():
    """Memory: one [positions, d] snapshot per block, nothing else is retained."""
    model = tiny_model("qwen3_moe")
    ids = tiny_ids(length=9)
    lens = HooksLens(model, ids)
    hidden, _ = lens.residuals(ids)
    assert hidden.shape == (len(lens.parts.blocks) + 1, 9, model.config.hidden_size)
    last, _ = lens.residuals(ids, last_only=True)
    assert last.shape == (len(lens.parts.blocks) + 1, 1, model.config.hidden_size)
    # No hook is left behind on any module.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
