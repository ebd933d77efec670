"""Attention patterns and MoE routing on PyTorch and on the GGUF through llama.cpp, on real models.

What must hold whatever the model: every row of a pattern sums to 1 and puts nothing on a later
key (causal), windows and chunks where the layer says. What the two runtimes must share: the
same patterns (within the rounding of llama.cpp's quantized activations and float16 KV cache) and
the same experts chosen for every token. Models: the bundled SmolLM2 (dequantized into PyTorch;
Q4_1 for llama.cpp), and tiny random models converted by llama.cpp's own converter
(tests/converted_models.py): PyTorch runs the very float32 weights that were converted.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import tracing
from tracing.attention import attention_with, routing_with
from tracing.errors import BadChoice, BadPrompt

PROMPT = "My friend lives in the capital of Germany. The city is called"  # 13 tokens for SmolLM2


@pytest.fixture(scope="module")
def smol_patterns(smollm2_hooks, smollm2_llama_cpp):
    """Every layer, head and query of PROMPT on both runtimes, from the same token ids."""
    ids = smollm2_llama_cpp.encode(PROMPT)
    return attention_with(smollm2_hooks, ids=ids), attention_with(smollm2_llama_cpp, ids=ids)


@pytest.fixture(scope="module")
def converted_pair():
    """`pair(name)`: (PyTorch tracer on the tiny model's float32 folder, llama.cpp tracer on its f32 GGUF)."""
    from tests.converted_models import converted, model_dir

    opened = {}

    def pair(name: str):
        if name not in opened:
            opened[name] = (tracing.open_tracer(str(model_dir(name)), "hooks", device="cpu"),
                            tracing.open_tracer(str(converted(name, "f32")), "llama-cpp"))
        return opened[name]

    return pair


def check_causal_rows(result, tolerance):
    p = result.pattern
    assert np.abs(p.sum(-1) - 1).max() < tolerance  # every query's probabilities sum to 1
    start, stop = result.queries
    for q in range(start, stop):
        assert not p[:, :, q - start, q + 1 :].any(), f"weight on a key after query {q}"


@pytest.mark.parametrize("runtime", [0, 1], ids=["hooks", "llama-cpp"])
def test_rows_sum_to_one_and_no_weight_on_future_keys(smol_patterns, runtime):
    result = smol_patterns[runtime]
    assert result.pattern.shape == (30, 9, 13, 13) and result.queries == (0, 13)
    assert result.layers == list(range(1, 31)) and result.heads == list(range(9))
    assert result.tokens[7] == " Germany" and result.routing is None  # SmolLM2 is dense
    check_causal_rows(result, 1e-5)
    assert "30 layers x 9 heads, queries 0-12" in result.info["fetched"]


def test_the_two_runtimes_agree_on_the_bundled_smollm2(smol_patterns):
    """PyTorch on the dequantized weights vs llama.cpp on the Q4_1 GGUF: the same weights, but llama.cpp
    rounds each matmul's activations to 8 bits and keeps K in float16. Measured: 0.056 at most in one
    probability of 4,563 rows (layer 16), 0.0009 on average; tolerances 0.1 and 0.003. Where each
    head's last query looks hardest is the same key in at least 95% of the 270 heads."""
    hooks, llama = smol_patterns
    difference = np.abs(hooks.pattern - llama.pattern)
    assert difference.max() < 0.1 and difference.mean() < 0.003
    same_argmax = (hooks.pattern[:, :, -1].argmax(-1) == llama.pattern[:, :, -1].argmax(-1)).mean()
    assert same_argmax >= 0.95


def test_grouped_query_heads_are_labelled_by_their_kv_group(smol_patterns):
    for result in smol_patterns:
        assert (result.n_heads, result.n_kv_heads) == (9, 3)  # SmolLM2-135M: 3 query heads per KV head
        assert result.kv_groups == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert result.head_labels[4] == "head 4 (KV group 1)"
        assert result.layer_labels == ["full attention"] * 30


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_the_two_runtimes_agree_on_converted_float32_models(converted_pair, name):
    """The same float32 weights on both runtimes; only llama.cpp's float16 KV cache differs. Measured:
    at most 5e-4 (Qwen 3) and 7.5e-3 (Gemma 3, heads 256 wide) in one probability. Gemma 3's blocks
    all slide a window of 8 tokens here: both runtimes put nothing before it."""
    hooks, llama = converted_pair(name)
    ids = llama.encode(PROMPT)
    a, b = attention_with(hooks, ids=ids), attention_with(llama, ids=ids)
    assert a.pattern.shape == b.pattern.shape == (4, 4, len(ids), len(ids))
    difference = np.abs(a.pattern - b.pattern)
    assert difference.max() < 0.02 and difference.mean() < 2e-4
    assert a.layer_labels == b.layer_labels
    for result in (a, b):
        check_causal_rows(result, 1e-5)
    if name == "gemma3":
        assert b.layer_labels == ["sliding window of 8 tokens"] * 4 and len(ids) > 16
        for result in (a, b):
            for q in range(8, len(ids)):
                assert not result.pattern[:, :, q, : q - 7].any()  # the 8 keys q-7..q only


def test_a_prompt_longer_than_one_llama_cpp_decode(smollm2_hooks, smollm2_llama_cpp):
    """Past 256 tokens llama.cpp decodes in several batches; KV cell j must still be position j."""
    ids = (smollm2_llama_cpp.encode(PROMPT) * 25)[:300]
    a = attention_with(smollm2_hooks, ids=ids, layers=[1, 30], queries=(250, 300))
    b = attention_with(smollm2_llama_cpp, ids=ids, layers=[1, 30], queries=(250, 300))
    assert a.pattern.shape == b.pattern.shape == (2, 9, 50, 300)
    check_causal_rows(b, 1e-5)
    assert np.abs(a.pattern - b.pattern).max() < 0.1 and np.abs(a.pattern - b.pattern).mean() < 1e-3


def test_a_query_range_is_the_same_slice_of_the_whole_pattern(smol_patterns, smollm2_llama_cpp, smollm2_hooks):
    ids = smollm2_llama_cpp.encode(PROMPT)
    for tracer, whole in zip((smollm2_hooks, smollm2_llama_cpp), smol_patterns):
        part = attention_with(tracer, ids=ids, layers=[3, 20], heads=[1, 4], queries=(2, 5))
        assert part.layers == [3, 20] and part.heads == [1, 4] and part.pattern.shape == (2, 2, 3, 5)
        expected = whole.pattern[[2, 19]][:, [1, 4]][:, :, 2:5, :5]
        np.testing.assert_allclose(part.pattern, expected, atol=1e-6 if tracer.backend == "hooks" else 2e-3)
        one = attention_with(tracer, ids=ids, layers=7, queries=12)
        assert one.pattern.shape == (1, 9, 1, 13)


def test_pytorch_goes_back_to_its_own_attention_after_the_call(smollm2_hooks, smol_patterns):
    assert smollm2_hooks.lens.model.config._attn_implementation == "sdpa"


def test_long_prompts_fetch_a_bounded_pattern_and_say_so(smollm2_llama_cpp):
    ids = smollm2_llama_cpp.encode(PROMPT)
    full = 4 * 30 * 9 * 13 * 13
    narrowed = attention_with(smollm2_llama_cpp, ids=ids, max_bytes=full // 4)
    assert narrowed.queries == (10, 13) and narrowed.pattern.shape == (30, 9, 3, 13)
    assert "the last 3 queries" in narrowed.info["fetched"] and "over the" in narrowed.info["fetched"]
    with pytest.raises(BadChoice, match=r"more than the .* fetched at once\. Ask for fewer layers \(--layer\)"):
        attention_with(smollm2_llama_cpp, ids=ids, queries=(0, 13), max_bytes=full // 4)
    assert tracing.attention.pattern_bytes(30, 9, 0, 1024) == 30 * 9 * 1024 * 1024 * 4  # 1.1 GB, the figure


def test_what_a_person_can_get_wrong(smollm2_llama_cpp):
    tracer = smollm2_llama_cpp
    with pytest.raises(BadChoice, match="layers 1 to 30; there is no layer 31"):
        attention_with(tracer, PROMPT, layers=[31])
    with pytest.raises(BadChoice, match="no layer 0"):
        attention_with(tracer, PROMPT, layers=0)
    with pytest.raises(BadChoice, match="heads 0 to 8; there is no head 9"):
        attention_with(tracer, PROMPT, heads=[9])
    with pytest.raises(BadChoice, match="outside the prompt: it has 13 tokens, positions 0 to 12"):
        attention_with(tracer, PROMPT, queries=(5, 14))
    with pytest.raises(BadChoice, match="outside the prompt"):
        attention_with(tracer, PROMPT, queries=13)
    with pytest.raises(BadPrompt, match="empty"):
        attention_with(tracer, "  ")
    with pytest.raises(tracing.UnsupportedModel, match="hooks and llama-cpp"):
        tracing.attention(PROMPT, backend="tuned-lens")


def test_gemma3_gguf_labels_its_sliding_layers_as_llama_cpp_runs_them(gemma3_llama_cpp):
    """Gemma 3 270M: a window of 512 tokens (its metadata) in five layers of every six (llama.cpp's rule)."""
    result = attention_with(gemma3_llama_cpp, PROMPT, layers=[1, 5, 6, 12], heads=[0])
    assert result.layer_labels == ["sliding window of 512 tokens"] * 2 + ["full attention"] * 2
    check_causal_rows(result, 1e-5)


# ---------------------------------------------------------------- Llama 4's layers and MoE routing


def test_llama4_layers_are_labelled_chunked_and_nope_and_both_runtimes_route_alike(converted_pair):
    """A tiny model in Scout's layout: blocks 1-3 chunked attention (chunks of 8192) with RoPE, block 4
    full attention without position encoding (NoPE); MoE on blocks 2 and 4, one expert of 4 a token,
    weighted by a sigmoid. PyTorch reads the labels from the config, llama.cpp from the GGUF's metadata
    by llama.cpp's own rules. Measured: patterns within 3e-4, the same expert for every token, weights
    within 2.5e-4."""
    hooks, llama = converted_pair("llama4")
    ids = llama.encode(PROMPT)
    a, b = attention_with(hooks, ids=ids), attention_with(llama, ids=ids)
    expected = ["chunked attention (chunks of 8192 tokens)"] * 3 + ["full attention, NoPE (no position encoding)"]
    assert a.layer_labels == b.layer_labels == expected
    assert a.head_labels == b.head_labels == ["head 0 (KV group 0)", "head 1 (KV group 0)",
                                              "head 2 (KV group 1)", "head 3 (KV group 1)"]
    assert np.abs(a.pattern - b.pattern).max() < 2e-3
    check_causal_rows(b, 1e-5)
    for r in (a.routing, b.routing):
        assert r.layers == [2, 4] and r.n_experts == 4 and r.experts.shape == (2, len(ids), 1)
    np.testing.assert_array_equal(a.routing.experts, b.routing.experts)
    np.testing.assert_allclose(a.routing.weights, b.routing.weights, atol=1e-3)
    assert (a.routing.weights > 0).all() and (a.routing.weights < 1).all()  # sigmoids, not normalized
    assert len(set(a.routing.experts.ravel().tolist())) > 1  # not one expert for everything


def test_qwen3_moe_routing_is_the_same_on_both_runtimes(converted_pair):
    """Qwen3-MoE: every block MoE, top 2 of 4 experts, softmax weights renormalized over the two (the
    fixture sets norm_topk_prob, which llama.cpp's qwen3moe always does). Measured: the same experts
    in the same order for every token and layer, weights within 4.6e-4."""
    hooks, llama = converted_pair("qwen3_moe")
    ids = llama.encode(PROMPT)
    a, b = routing_with(hooks, ids), routing_with(llama, ids)
    assert a.layers == b.layers == [1, 2, 3, 4] and a.experts.shape == b.experts.shape == (4, len(ids), 2)
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_allclose(a.weights, b.weights, atol=1e-3)
    np.testing.assert_allclose(b.weights.sum(-1), 1, atol=1e-5)
    assert (b.weights[..., 0] >= b.weights[..., 1]).all()  # heaviest first
    inside = attention_with(llama, ids=ids, layers=[1], heads=[0]).routing  # the attention result carries it too
    np.testing.assert_array_equal(inside.experts, b.experts)
    data = b.to_dict()
    assert list(data) == ["layers", "n_experts", "experts", "weights"] and len(data["experts"][0]) == len(ids)
    assert "layer 1" in b.table()


def test_dense_models_have_no_routing(smollm2_hooks, smollm2_llama_cpp):
    assert routing_with(smollm2_hooks, PROMPT) is None and routing_with(smollm2_llama_cpp, PROMPT) is None


# ---------------------------------------------------------------- command line


def test_command_line_json_table_and_errors(smollm2_llama_cpp, converted_pair, capsys):
    from tracing.__main__ import main

    args = ["attention", "--backend", "llama-cpp", "--prompt", PROMPT]
    assert main(args + ["--layer", "2", "--layer", "30", "--head", "0", "--queries", "10:13", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == ["tokens", "layers", "heads", "queries", "kv_groups", "head_labels", "layer_labels",
                          "fetched", "pattern", "routing"]
    assert data["layers"] == [2, 30] and data["heads"] == [0] and data["queries"] == [10, 13]
    assert np.asarray(data["pattern"]).shape == (2, 1, 3, 13) and data["routing"] is None
    assert data["head_labels"] == ["head 0 (KV group 0)"] and data["tokens"][7] == " Germany"
    assert main(args + ["--layer", "5", "--queries", "3:"]) == 0
    table = capsys.readouterr().out
    assert "query 12 ' called' attends to" in table and "head 8 (KV group 2)" in table
    for bad, message in ((["--layer", "31"], "there is no layer 31"), (["--head", "9"], "there is no head 9"),
                         (["--queries", "3:99"], "outside the prompt"), (["--queries", "x"], "--queries takes")):
        assert main(args + bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert main(["attention", "--backend", "llama-cpp", "--prompt", " "]) == 2
    assert "empty" in capsys.readouterr().err
    _, llama = converted_pair("qwen3_moe")
    assert main(["attention", "--backend", "llama-cpp", "--model", str(llama.shared.path), "--prompt", PROMPT,
                 "--layer", "1", "--json"]) == 0
    routing = json.loads(capsys.readouterr().out)["routing"]
    assert routing["layers"] == [1, 2, 3, 4] and np.asarray(routing["experts"]).shape[2] == 2
