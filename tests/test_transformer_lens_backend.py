"""The TransformerLens backend agrees with the hooks backend, on tiny models of every family and
on the two real models, without changing the shared model the other backends use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny_models import ARCHITECTURES, MULTIMODAL, _randomize, tiny_ids
from tracing.api import trace, trace_with
from tracing.errors import UnsupportedModel
from tracing.hooks import HooksTracer
from tracing.transformer_lens_backend import TransformerLensTracer

PROMPT = "The capital of Germany is Berlin, and the capital of France is"

# tests/tiny_models.py's OPT is pre-norm AND projects down before the unembedding (final norm, then
# project_out), a layout no released OPT has; TransformerLens's OPT adapter maps one or the other.
# The real layouts (OPT-125m: norm; OPT-350m: projection) are checked below.
NOT_BRIDGEABLE = {"opt"}


def hooks_and(loaded, build):
    return loaded.adapter("hooks", HooksTracer), loaded.adapter("transformer-lens", build)


def assert_same_lens(reference, other, tolerance=1e-3):
    """Same top-1 token in every cell; probabilities (top-k, target) within `tolerance`."""
    assert reference.layers == other.layers
    np.testing.assert_array_equal(reference.topk_ids[..., 0], other.topk_ids[..., 0])
    np.testing.assert_allclose(other.topk_probs, reference.topk_probs, atol=tolerance, rtol=0)
    if reference.target is not None:
        np.testing.assert_allclose(other.target.prob, reference.target.prob, atol=tolerance, rtol=0)


def realistic(loaded):
    # GPT-NeoX has no grouped-query attention: its configs have no num_key_value_heads, but the tiny
    # one inherits the shared value 2, which TransformerLens would read. Drop it, as real configs are.
    config = loaded.model.config
    if config.model_type == "gpt_neox" and "num_key_value_heads" in config.__dict__:
        del config.num_key_value_heads
    return loaded


@pytest.mark.parametrize("arch", [a for a in [*ARCHITECTURES, MULTIMODAL] if a not in NOT_BRIDGEABLE])
def test_agrees_with_hooks_on_every_tiny_architecture(tiny_loaded, arch):
    loaded = realistic(tiny_loaded(arch))
    hooks, bridged = hooks_and(loaded, TransformerLensTracer)
    ids = tiny_ids()[0].tolist()
    reference = trace_with(hooks, None, ids=ids, top_k=3, target="w5")
    result = trace_with(bridged, None, ids=ids, top_k=3, target="w5")
    assert result.backend == "transformer-lens"
    assert result.lens == ["logit"] * (len(result.layers) - 1) + ["output"]
    assert_same_lens(reference, result, tolerance=1e-5)
    assert bridged.lens.probe_error < 1e-5


def test_multimodal_wrapper_is_bridged_through_its_language_model(tiny_loaded):
    loaded = tiny_loaded(MULTIMODAL)
    tracer = loaded.adapter("transformer-lens", TransformerLensTracer)
    assert type(loaded.model).__name__ == "Llama4ForConditionalGeneration"
    assert tracer.lens.bridge.cfg.architecture == "Llama4ForCausalLM"


@pytest.mark.parametrize(
    "layout", [dict(word_embed_proj_dim=32), dict(word_embed_proj_dim=16, do_layer_norm_before=False)],
    ids=["opt-125m-like", "opt-350m-like"],
)
def test_real_opt_layouts_agree(layout):
    from transformers import OPTConfig, OPTForCausalLM

    from tracing.hooks import HooksLens
    from tracing.transformer_lens_backend import TransformerLensLens

    config = OPTConfig(
        vocab_size=96, hidden_size=32, ffn_dim=48, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=64, **layout,
    )
    model = OPTForCausalLM(config)
    _randomize(model, 0)
    model.eval()
    ids = tiny_ids()
    hooks, bridged = HooksLens(model, ids), TransformerLensLens(model, ids)
    hidden, _ = hooks.residuals(ids)
    rows, _ = bridged.residuals(ids)
    torch.testing.assert_close(rows, hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(bridged.project(rows), hooks.project(hidden), atol=1e-4, rtol=0)


def test_a_layout_transformer_lens_cannot_map_says_to_use_hooks(tiny_loaded):
    loaded = tiny_loaded("opt")
    with pytest.raises(UnsupportedModel, match=r"does not reproduce.*--backend hooks"):
        TransformerLensTracer(loaded)
    # ...while the hooks backend traces it exactly (tests/test_hooks.py).
    assert loaded.adapter("hooks", HooksTracer).lens.parts.probe_error < 1e-5


def test_an_architecture_transformer_lens_has_no_adapter_for_says_to_use_hooks(tiny_loaded):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.tiny_models import _COMMON
    from tracing.transformer_lens_backend import TransformerLensLens

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("helium", **_COMMON)).eval()
    with pytest.raises(UnsupportedModel, match=r"no adapter for HeliumForCausalLM.*--backend hooks"):
        TransformerLensLens(model, tiny_ids())


def test_library_failure_inside_the_bridge_is_a_clear_error(tiny_loaded):
    """A config TransformerLens misreads (a stray num_key_value_heads on GPT-NeoX) fails in its
    forward: the user gets one message naming the backend that works, not a traceback."""
    from tests.tiny_models import tiny_model
    from tracing.transformer_lens_backend import TransformerLensLens

    model = tiny_model("gpt_neox")
    assert model.config.num_key_value_heads != model.config.num_attention_heads
    with pytest.raises(UnsupportedModel, match=r"TransformerLens .* failed running this GPTNeoXForCausalLM.*--backend hooks"):
        TransformerLensLens(model, tiny_ids())


def test_the_shared_model_is_not_changed(tiny_loaded):
    """The bridge rewires a structural copy: same parameter tensors, the original's modules,
    attention implementation and results untouched."""
    from tests.tiny_models import tiny_model

    model = tiny_model("qwen3")
    model.config._attn_implementation = "sdpa"  # what a loaded model runs; the bridge wants eager
    modules_before = dict(model.named_modules())
    ids = tiny_ids()
    with torch.no_grad():
        logits_before = model(input_ids=ids).logits
    from tracing.transformer_lens_backend import TransformerLensLens

    lens = TransformerLensLens(model, ids)
    assert dict(model.named_modules()) == modules_before
    assert model.config._attn_implementation == "sdpa"
    bridged_weights = {p.data_ptr() for p in lens.bridge.parameters()}
    assert {p.data_ptr() for p in model.parameters()} <= bridged_weights  # shared, not copied
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits_before, atol=0, rtol=0)


@pytest.fixture(scope="module")
def smollm2_bridged(smollm2):
    from tracing.api import open_tracer

    return open_tracer(None, "transformer-lens", device="cpu")


def test_agrees_with_hooks_on_smollm2(smollm2, smollm2_hooks, smollm2_bridged):
    reference = trace_with(smollm2_hooks, PROMPT, target=" Paris")
    result = trace_with(smollm2_bridged, PROMPT, target=" Paris")
    assert_same_lens(reference, result)
    assert result.top1()[-1][-1] == " Paris"
    assert smollm2.model.config._attn_implementation != "eager"  # the shared model kept its attention


def test_last_position_only_on_smollm2(smollm2_bridged):
    every = trace_with(smollm2_bridged, PROMPT, top_k=3)
    last = trace_with(smollm2_bridged, PROMPT, top_k=3, last_only=True)
    np.testing.assert_array_equal(last.topk_ids[:, 0], every.topk_ids[:, -1])
    np.testing.assert_allclose(last.topk_probs[:, 0], every.topk_probs[:, -1], atol=1e-5)


def test_agrees_with_hooks_on_gemma3(gemma3, gemma3_gguf):
    from tracing.api import open_tracer

    hooks = open_tracer(str(gemma3_gguf), "hooks", device="cpu")
    bridged = open_tracer(str(gemma3_gguf), "transformer-lens", device="cpu")
    assert bridged.lens.bridge.cfg.architecture == "Gemma3ForCausalLM"
    prompt = "The capital of Germany is"
    assert_same_lens(trace_with(hooks, prompt, target=" Berlin"), trace_with(bridged, prompt, target=" Berlin"))


def test_trace_api_and_cli(smollm2_bridged, capsys):
    from tracing.__main__ import main

    result = trace("The capital of Germany is", backend="transformer-lens", device="cpu", target=" Berlin")
    assert result.backend == "transformer-lens" and result.top1()[-1][-1] == " Berlin"
    assert main(["--backend", "transformer-lens", "--prompt", "The capital of Germany is", "--device", "cpu"]) == 0
    assert "backend: transformer-lens" in capsys.readouterr().out
