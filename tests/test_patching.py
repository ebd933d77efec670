"""Activation patching on PyTorch and on the GGUF through llama.cpp, by identities that must hold,
against TransformerLens's own patching functions, and the two runtimes against each other.

Identities (each a restored run that IS another run): restoring the embedding of the only
differing token gives the clean run (effect 1); restoring the last row at the last position gives
the clean logits (effect 1); any cell before the first differing token changes nothing (effect 0).
They are checked with every cell really run (skip_identical=False), and the grid with skipped
cells must equal it.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import tracing
from tracing.errors import BadPrompt, BadTarget, UnsupportedModel
from tracing.patching import (
    PatchCancelled,
    find_sublayers,
    patch_runtime,
    patch_with,
    plan_cells,
)

CLEAN, CORRUPT, TARGET, CONTRAST = "The capital of Germany is", "The capital of France is", " Berlin", " Paris"
GERMANY = 3  # the only differing position: 'The' ' capital' ' of' ' Germany' ' is'


@pytest.fixture(scope="module")
def hooks_full(smollm2_hooks):
    """Every cell run (nothing skipped), logit difference, with sublayers, on PyTorch."""
    return patch_with(smollm2_hooks, CLEAN, CORRUPT, TARGET, CONTRAST, skip_identical=False)


@pytest.fixture(scope="module")
def llama_full(smollm2_llama_cpp):
    return patch_with(smollm2_llama_cpp, CLEAN, CORRUPT, TARGET, CONTRAST, skip_identical=False)


@pytest.fixture(scope="module")
def hooks_grid(smollm2_hooks):
    return patch_with(smollm2_hooks, CLEAN, CORRUPT, TARGET, CONTRAST)


@pytest.fixture(scope="module")
def llama_grid(smollm2_llama_cpp):
    return patch_with(smollm2_llama_cpp, CLEAN, CORRUPT, TARGET, CONTRAST)


def check_identities(result, tolerance):
    assert result.clean_tokens[GERMANY] == " Germany" and result.corrupt_tokens[GERMANY] == " France"
    assert result.effect.shape == (31, 5) and result.attn_effect.shape == result.mlp_effect.shape == (30, 5)
    assert abs(result.effect[0, GERMANY] - 1) < tolerance  # the embedding of ' Germany' restores everything
    assert abs(result.effect[-1, -1] - 1) < tolerance  # the last row at the last position is the clean output
    assert result.patched_top1[-1][-1] == " Berlin" and result.patched_top1[0][GERMANY] == " Berlin"
    top = result.patched_topk[-1][-1]  # the clean run's answers, restored
    assert [t for t, _ in top] == [t for t, _ in result.clean_top[:3]]
    assert [p for _, p in top] == pytest.approx([p for _, p in result.clean_top[:3]], abs=1e-3)
    for grid in (result.effect, result.attn_effect, result.mlp_effect):
        assert np.abs(grid[:, :GERMANY]).max() < tolerance  # nothing before the first difference matters
    # and the corrupted answer stays where nothing changed
    assert result.patched_top1[5][0] == " Paris" and result.corrupt_top[0][0] == " Paris"


@pytest.mark.parametrize("runtime", ["hooks", "llama"])
def test_the_identities_hold_with_every_cell_run(runtime, request):
    result = request.getfixturevalue(f"{runtime}_full")
    assert result.info["cells_skipped"] == 0 and result.info["cells_run"] == 31 * 5 + 2 * 30 * 5
    # float32 summation order (PyTorch batches), llama.cpp's f16 KV cache and Q8 activations
    check_identities(result, 1e-4 if runtime == "hooks" else 2e-3)


@pytest.mark.parametrize("runtime", ["hooks", "llama"])
def test_skipping_identical_cells_changes_no_number(runtime, request):
    full, grid = request.getfixturevalue(f"{runtime}_full"), request.getfixturevalue(f"{runtime}_grid")
    assert grid.info["cells_run"] < full.info["cells_run"] / 2
    # llama.cpp's numbers for one cell depend a little on what else is in its decode (its kernels
    # are chosen by batch size): up to 0.0025 measured between the two plans.
    tolerance = 1e-4 if runtime == "hooks" else 5e-3
    for a, b in ((full.effect, grid.effect), (full.attn_effect, grid.attn_effect), (full.mlp_effect, grid.mlp_effect)):
        np.testing.assert_allclose(b, a, atol=tolerance, rtol=0)
    check_identities(grid, 1e-4 if runtime == "hooks" else 2e-3)


def test_the_answer_sits_on_the_subject_until_layer_23_then_moves_to_the_last_position(hooks_grid):
    """Meng et al.'s picture on a real model: early rows restore at the subject token, late rows at the end."""
    e = hooks_grid.effect
    assert (e[1:23, GERMANY] > 0.9).all() and (e[25:, -1] > 0.95).all()
    assert (np.abs(e[1:23, -1]) < 0.1).all() and (np.abs(e[26:, GERMANY]) < 0.1).all()
    assert hooks_grid.clean_top[0][0] == " Berlin" and hooks_grid.corrupt_top[0][0] == " Paris"


def test_the_two_runtimes_agree_on_the_bundled_gguf(hooks_grid, llama_grid):
    """PyTorch on the dequantized weights vs llama.cpp on the Q4_1 GGUF itself. The weights are the
    same numbers; llama.cpp rounds each matmul's activations to 8 bits (Q8_0/Q8_1) and keeps K and V
    in float16, PyTorch does neither: the logit difference moves by ~0.08 (4.78 vs 4.70) and the
    normalized effects by at most 0.024 in every cell of all three grids (measured). Tolerance 0.05."""
    assert hooks_grid.clean_value == pytest.approx(llama_grid.clean_value, abs=0.3)
    assert hooks_grid.corrupt_value == pytest.approx(llama_grid.corrupt_value, abs=0.3)
    for a, b in ((hooks_grid.effect, llama_grid.effect), (hooks_grid.attn_effect, llama_grid.attn_effect),
                 (hooks_grid.mlp_effect, llama_grid.mlp_effect)):
        np.testing.assert_allclose(b, a, atol=0.05, rtol=0)
    assert hooks_grid.patched_top1[-1] == llama_grid.patched_top1[-1]


def test_prefix_reuse_gives_the_same_grid_as_whole_prompts(smollm2_hooks, hooks_grid):
    runtime = patch_runtime(smollm2_hooks)
    runtime.prefix_reuse = False
    try:
        whole = patch_with(smollm2_hooks, CLEAN, CORRUPT, TARGET, CONTRAST, sublayers=False)
    finally:
        runtime.prefix_reuse = True
    assert whole.info["prefix_reuse"] is False and hooks_grid.info["prefix_reuse"] is True
    np.testing.assert_allclose(whole.effect, hooks_grid.effect, atol=1e-4, rtol=0)
    assert whole.attn_effect is None


def test_probability_metric_and_json(smollm2_llama_cpp):
    result = patch_with(smollm2_llama_cpp, CLEAN, CORRUPT, TARGET, sublayers=False)
    assert result.metric == "p(' Berlin')"
    assert result.clean_value == pytest.approx(result.clean_top[0][1]) and result.clean_value > 0.7
    assert result.corrupt_value < 0.01
    data = result.to_dict()
    assert list(data) == ["clean_tokens", "corrupt_tokens", "layers", "positions", "metric", "clean_value",
                          "corrupt_value", "effect"]
    assert np.asarray(data["effect"]).shape == (31, 5) and data["layers"][0] == "embeddings"
    assert "residual stream" in result.table() and "attention output" not in result.table()


# ---------------------------------------------------------------- against TransformerLens's own functions


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_same_effects_as_transformer_lens_patching(tiny_loaded, arch):
    import transformer_lens.patching as tl_patching

    from tracing.hooks import HooksTracer
    from tracing.transformer_lens_backend import build_bridge

    loaded = tiny_loaded(arch)
    tracer = loaded.adapter("hooks", HooksTracer)
    result = patch_with(tracer, "w5 w6 w7 w8 w9 w10", "w5 w6 w11 w8 w9 w10", "w12", "w13")
    assert result.sublayer_note is None
    bridge = build_bridge(loaded.model)
    bridge.eval()
    clean = torch.tensor([result.clean_ids])
    corrupt = torch.tensor([result.corrupt_ids])
    with torch.no_grad():
        _, cache = bridge.run_with_cache(clean)
        clean_value = float(metric_of(bridge(clean)))
        corrupt_value = float(metric_of(bridge(corrupt)))
    assert clean_value == pytest.approx(result.clean_value, abs=1e-4)
    assert corrupt_value == pytest.approx(result.corrupt_value, abs=1e-4)

    def normalized(logits):
        return (metric_of(logits) - corrupt_value) / (clean_value - corrupt_value)

    with torch.no_grad():
        resid_pre = tl_patching.get_act_patch_resid_pre(bridge, corrupt, cache, normalized).numpy()
        resid_post = tl_patching.generic_activation_patch(
            bridge, corrupt, cache, normalized, patch_setter=tl_patching.layer_pos_patch_setter,
            activation_name="resid_post", index_axis_names=("layer", "pos")).numpy()
        attn = tl_patching.get_act_patch_attn_out(bridge, corrupt, cache, normalized).numpy()
        mlp = tl_patching.get_act_patch_mlp_out(bridge, corrupt, cache, normalized).numpy()
    np.testing.assert_allclose(result.effect[:-1], resid_pre, atol=1e-4, rtol=0)
    np.testing.assert_allclose(result.effect[1:], resid_post, atol=1e-4, rtol=0)
    np.testing.assert_allclose(result.attn_effect, attn, atol=1e-4, rtol=0)
    np.testing.assert_allclose(result.mlp_effect, mlp, atol=1e-4, rtol=0)
    assert np.abs(result.effect).max() > 0.2 and np.abs(result.mlp_effect).max() > 0.05  # not a grid of zeros


def test_a_prompt_longer_than_a_sliding_window_runs_whole_prompts(tiny_loaded):
    """Gemma 3's sliding-window layers keep only the last window of keys and values, which cannot be
    cut back to an earlier position: past the window, every cell runs the whole prompt, and the
    identities still hold."""
    from tracing.hooks import HooksTracer

    tracer = tiny_loaded("gemma3_text").adapter("hooks", HooksTracer)  # sliding window 16
    words = [f"w{i}" for i in range(20, 40)]
    short = patch_with(tracer, " ".join(words[:6]), " ".join(["w50"] + words[1:6]), "w12", "w13")
    long = patch_with(tracer, " ".join(words), " ".join(["w50"] + words[1:]), "w12", "w13")
    assert short.info["prefix_reuse"] is True and long.info["prefix_reuse"] is False
    assert abs(long.effect[0, 0] - 1) < 1e-4 and abs(long.effect[-1, -1] - 1) < 1e-4


def metric_of(logits):
    return logits[0, -1, 12] - logits[0, -1, 13]


# ---------------------------------------------------------------- finding the sublayers


def test_post_norm_families_patch_what_is_added_to_the_residual_stream(tiny_loaded):
    from tests.tiny_models import tiny_ids

    for arch, attn_kind, mlp_kind in (("gemma3_text", "RMSNorm", "RMSNorm"), ("olmo2", "RMSNorm", "RMSNorm"),
                                      ("llama", "Attention", "MLP"), ("gpt2", "Attention", "MLP")):
        model = tiny_loaded(arch).model
        from tracing.hooks import find_lens_parts

        parts = find_lens_parts(model, tiny_ids())
        sites, problem = find_sublayers(model, parts.blocks, tiny_ids())
        assert problem is None, (arch, problem)
        attn, mlp = sites[0]
        assert attn_kind in type(attn).__name__ and mlp_kind in type(mlp).__name__, (arch, attn, mlp)


def test_a_family_whose_sublayers_cannot_be_found_is_said_so(tiny_loaded):
    from tests.tiny_models import tiny_ids
    from tracing.hooks import find_lens_parts

    model = tiny_loaded("opt").model  # OPT's MLP is two bare Linear layers in the block
    parts = find_lens_parts(model, tiny_ids())
    sites, problem = find_sublayers(model, parts.blocks, tiny_ids())
    assert sites is None and "OPTDecoderLayer" in problem and "only the residual stream" in problem


def test_llama_cpp_sublayers_come_from_the_graph(smollm2_llama_cpp, gemma3_llama_cpp):
    smol = patch_runtime(smollm2_llama_cpp)
    assert smol.sublayer_problem() is None
    attn, mlp = smol._sites[29]
    assert (attn.name, mlp.name) == ("attn_out-29", "ffn_out-29") and mlp.op == "MUL_MAT"
    gemma = patch_runtime(gemma3_llama_cpp)  # post-norm: the normed outputs are what is added
    assert gemma.sublayer_problem() is None
    assert [s.name for s in gemma._sites[0]] == ["attn_post_norm-0", "ffn_post_norm-0"]


def test_gemma3_gguf_identities(gemma3_llama_cpp):
    result = patch_with(gemma3_llama_cpp, "The capital of Germany is", "The capital of France is", " Berlin",
                        " Paris", skip_identical=False)
    position = result.clean_tokens.index(" Germany")
    assert abs(result.effect[0, position] - 1) < 5e-3 and abs(result.effect[-1, -1] - 1) < 5e-3
    assert np.abs(result.effect[:, :position]).max() < 5e-3 and np.abs(result.mlp_effect[:, :position]).max() < 5e-3


def test_scout_layout_gguf_mixture_of_experts_sublayers_and_identities():
    """A tiny model in Llama 4 Scout's layout (llama4: dense and MoE blocks with a shared expert),
    converted by llama.cpp's own converter to float32: the MoE block's MLP output is the merged
    experts + shared expert, and the identities hold to float32 precision."""
    from tests import converted_models

    tracer = tracing.open_tracer(str(converted_models.converted("llama4")), "llama-cpp")
    runtime = patch_runtime(tracer)
    assert runtime.sublayer_problem() is None
    assert [s.name for s in runtime._sites[0]] == ["attn_out-0", "ffn_out-0"]  # a dense block
    assert [s.name for s in runtime._sites[-1]] == ["attn_out-3", "ffn_moe_out_merged-3"]
    result = patch_with(tracer, CLEAN, CORRUPT, TARGET, CONTRAST, skip_identical=False)
    assert abs(result.effect[0, GERMANY] - 1) < 1e-4 and abs(result.effect[-1, -1] - 1) < 1e-4
    for grid in (result.effect, result.attn_effect, result.mlp_effect):
        assert np.abs(grid[:, :GERMANY]).max() < 1e-4


# ---------------------------------------------------------------- what a person can get wrong


def test_prompts_of_different_lengths_say_how_each_tokenizes(smollm2_hooks):
    with pytest.raises(BadPrompt) as info:
        patch_with(smollm2_hooks, CLEAN, "The capital of the United Kingdom is", TARGET)
    message = str(info.value)
    assert "5 tokens ('The' ' capital' ' of' ' Germany' ' is')" in message
    assert "' United' ' Kingdom'" in message


def test_identical_prompts_and_equal_targets_are_refused(smollm2_hooks):
    with pytest.raises(BadPrompt, match="same tokens.*undefined"):
        patch_with(smollm2_hooks, CLEAN, CLEAN, TARGET)
    with pytest.raises(BadPrompt, match="empty"):
        tracing.patch(" ", CORRUPT, TARGET)
    with pytest.raises(BadTarget, match="same token"):
        patch_with(smollm2_hooks, CLEAN, CORRUPT, TARGET, TARGET)
    with pytest.raises(BadTarget, match="2 tokens"):
        patch_with(smollm2_hooks, CLEAN, CORRUPT, "Berlin")
    with pytest.raises(UnsupportedModel, match="hooks and llama-cpp"):
        tracing.patch(CLEAN, CORRUPT, TARGET, backend="tuned-lens")


def test_stop_ends_the_grid(smollm2_hooks):
    stop = threading.Event()
    seen = []

    def progress(fraction, text):
        seen.append(fraction)
        if fraction > 0:
            stop.set()

    with pytest.raises(PatchCancelled):
        patch_with(smollm2_hooks, CLEAN, CORRUPT, TARGET, progress=progress, cancel=stop)
    assert seen[0] == 0.0 and 0 < seen[-1] < 1


def test_plan_skips_only_what_cannot_change():
    run, skipped = plan_cells(3, [1, 2, 3, 4], [1, 2, 9, 4], sublayers=True, skip_identical=True)
    cells = {(c.site, c.row, c.position) for c in run}
    assert ("resid", 0, 2) in cells and ("resid", 0, 3) not in cells and ("resid", 1, 1) not in cells
    assert ("resid", 3, 3) in cells and ("resid", 3, 2) not in cells and ("mlp", 3, 2) not in cells
    assert ("attn", 2, 3) in cells and len(run) + len(skipped) == 4 * 4 + 2 * 3 * 4


# ---------------------------------------------------------------- command line


def test_command_line_json_and_errors(smollm2_llama_cpp, capsys):
    import json

    from tracing.__main__ import main

    args = ["patch", "--backend", "llama-cpp", "--clean", CLEAN, "--corrupt", CORRUPT, "--target", TARGET]
    assert main(args + ["--contrast", CONTRAST, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == ["clean_tokens", "corrupt_tokens", "layers", "positions", "metric", "clean_value",
                          "corrupt_value", "effect", "attn_effect", "mlp_effect"]
    assert data["metric"] == "logit(' Berlin') - logit(' Paris')" and len(data["attn_effect"]) == 30
    assert main(args + ["--no-sublayers"]) == 0
    table = capsys.readouterr().out
    assert "residual stream" in table and "embeddings" in table and "MLP output" not in table
    assert main(["patch", "--clean", CLEAN, "--corrupt", "The capital of the UK is", "--target", TARGET,
                 "--backend", "llama-cpp"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The prompts must have the same number of tokens") and err.count("\n") == 1
