"""The llama.cpp lens on the real quantized GGUFs (SmolLM2 Q4_1, Gemma 3 270M Q4_K_M).

Measured against: the hooks backend on the same GGUF dequantized into PyTorch, llama.cpp's own
logits and greedy choices, chat's shared `Llama` (same weights, same memory), and synthetic
GGUFs that lack what the lens needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import tracing
from tracing import BadPrompt, UnsupportedModel
from tracing.errors import BadModelFile
from tracing.llama_cpp_backend import trace_reply
from tracing.models import bundled_gguf

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The capital of Germany is",
    "Berlin is the capital of",
    "def fibonacci(n):\n    return",
    "In 1969, Neil Armstrong became the first person to walk on the",
]
QUESTION = [{"role": "user", "content": "What is the capital of Germany?"}]


def top1_agreement(lens_cpp, hooks, prompts) -> float:
    agree = cells = 0
    for prompt in prompts:
        ids = hooks.encode(prompt)
        assert lens_cpp.encode(prompt) == ids  # same tokenizer: cells line up
        ours = tracing.trace_with(lens_cpp, prompt, ids=ids, top_k=1)
        theirs = tracing.trace_with(hooks, prompt, ids=ids, top_k=1)
        assert ours.topk_ids.shape == theirs.topk_ids.shape
        same = ours.topk_ids[..., 0] == theirs.topk_ids[..., 0]
        agree, cells = agree + int(same.sum()), cells + same.size
    return agree / cells


def test_smollm2_agrees_with_the_hooks_backend_on_the_dequantized_model(smollm2_llama_cpp, smollm2_hooks):
    # The two differ only by quantization: llama.cpp rounds activations to 8 bits before each
    # quantized matmul, transformers multiplies float32 by the dequantized weights. Measured 97.5%.
    assert top1_agreement(smollm2_llama_cpp, smollm2_hooks, PROMPTS[:3]) >= 0.90


def test_gemma3_agrees_with_the_hooks_backend_on_the_dequantized_model(gemma3_llama_cpp, gemma3_hooks):
    # Gemma: scaled embeddings read where llama.cpp scales them, the (1 + w) final norm as stored. Measured 96%.
    assert top1_agreement(gemma3_llama_cpp, gemma3_hooks, PROMPTS[:3]) >= 0.90


@pytest.mark.parametrize("lens", ["smollm2_llama_cpp", "gemma3_llama_cpp"])
def test_last_layer_lens_is_llama_cpps_own_logits(lens, request):
    """The lens's last row against llama.cpp's logits, at every position.

    Tolerance, and why: the lens multiplies by the unembedding with ggml's own CPU kernel on the
    GGUF's own bytes (the normed activation is quantized to the weight's dot-product type, Q8_0
    here, exactly as llama.cpp does), and the final norm sums in float64 like ggml. The only
    possible difference is the last bit of a norm result, which can move one 8-bit rounding:
    bounded far below 1e-3 of the logits' scale. Measured: 0.0 on both models. (A float32 lens on
    the dequantized matrix is off by 0.23 on SmolLM2, which is why the lens does not do that.)
    """
    tracer = request.getfixturevalue(lens)
    ids = tracer.encode(PROMPTS[0])
    tracer.keep_all_logits = True
    try:
        with tracer.lock():
            hidden, _ = tracer.residuals(ids, last_only=False)
            own = tracer.logits.copy()
    finally:
        tracer.keep_all_logits = False
    lens_logits = tracer.project(hidden[-1:]).numpy()[0]
    assert lens_logits.shape == own.shape == (len(ids), tracer.n_vocab)
    scale = np.abs(own).max()
    assert np.abs(lens_logits - own).max() <= 1e-3 * scale
    assert (lens_logits.argmax(-1) == own.argmax(-1)).all()


def test_last_rows_top1_is_what_llama_cpp_generates(smollm2_llama_cpp):
    """The lens's output row at the last position = the token chat's own Llama picks greedily."""
    tracer = smollm2_llama_cpp
    for prompt in PROMPTS[:3]:
        result = tracing.trace_with(tracer, prompt, last_only=True, top_k=1)
        ids = tracer.encode(prompt)
        with tracer.lock():
            out = tracer.llama.create_completion(ids, max_tokens=1, temperature=0.0, repeat_penalty=1.0)
        assert result.topk_tokens[-1][0][0] == out["choices"][0]["text"], prompt


def test_trace_api_with_the_backend_name(smollm2_llama_cpp):
    result = tracing.trace(PROMPTS[0], backend="llama-cpp", target=" Berlin", top_k=3)
    assert result.backend == "llama-cpp" and result.model == "SmolLM2-135M-Instruct (bundled)"
    assert result.topk_ids.shape == (31, len(result.tokens), 3) and result.layers[0] == "embeddings"
    assert result.topk_tokens[-1][-1][0] == " Berlin" and result.target.rank[-1, -1] == 1
    assert 0.6 < result.target.prob[-1, -1] < 0.9  # 0.770 quantized; 0.796 dequantized
    assert result.target.prob[0, -1] < 0.01
    assert np.allclose(result.kl_to_final[-1], 0, atol=1e-6)
    last = tracing.trace(PROMPTS[0], backend="llama-cpp", target=" Berlin", top_k=3, last_only=True)
    assert last.positions == [len(result.tokens) - 1]
    np.testing.assert_array_equal(last.topk_ids[:, 0], result.topk_ids[:, -1])
    np.testing.assert_allclose(last.target.prob[:, 0], result.target.prob[:, -1], atol=1e-6)
    cooler = tracing.trace(PROMPTS[0], backend="llama-cpp", last_only=True, temperature=0.5)
    assert cooler.topk_probs[-1, 0, 0] > last.topk_probs[-1, 0, 0]


def greedy_reply(tracer, messages, max_tokens=12):
    """What chat's shared Llama answers when it always takes the likeliest token."""
    with tracer.lock():
        out = tracer.llama.create_chat_completion(
            messages, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0, seed=0
        )
    return out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"]


def test_trace_reply_traces_the_reply_after_the_chat_template(smollm2_llama_cpp):
    tracer = smollm2_llama_cpp
    reply, finish = greedy_reply(tracer, QUESTION)
    assert "Berlin" in reply
    result = trace_reply(None, QUESTION, reply, target=" Berlin")
    n_prompt = result.info["prompt_tokens"]
    assert result.positions == list(range(n_prompt, len(result.tokens)))
    assert "".join(result.tokens[n_prompt:]) == reply
    prompt = "".join(result.tokens[:n_prompt])
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n") and "What is the capital" in prompt
    # Greedy decoding: at every reply position the output row's top-1 is the next reply token,
    # and after the last one the model ends its turn.
    top1 = [cell[0] for cell in result.topk_tokens[-1]]
    assert top1[:-1] == result.tokens[n_prompt + 1 :]
    if finish == "stop":
        assert top1[-1] == "<|im_end|>"
    # The positions that predict each reply token instead: column j shows how reply token j formed.
    before = trace_reply(None, QUESTION, reply, predicting_reply=True, top_k=1)
    assert before.positions == list(range(n_prompt - 1, len(result.tokens) - 1))
    assert [cell[0] for cell in before.topk_tokens[-1]] == result.tokens[n_prompt:]
    np.testing.assert_array_equal(before.topk_ids[:, 1:, 0], result.topk_ids[:, :-1, 0])
    # The conversation may be passed with the reply at its end.
    whole = trace_reply(None, QUESTION + [{"role": "assistant", "content": reply}], reply, top_k=1)
    assert whole.positions == result.positions and whole.token_ids == result.token_ids


def test_trace_reply_on_gemma_uses_llama_cpps_chat_format(gemma3_llama_cpp, gemma3_gguf):
    reply, _ = greedy_reply(gemma3_llama_cpp, QUESTION, max_tokens=6)
    result = trace_reply(str(gemma3_gguf), QUESTION, reply, top_k=2)
    n_prompt = result.info["prompt_tokens"]
    top1 = [cell[0] for cell in result.topk_tokens[-1]]
    assert top1[:-1] == result.tokens[n_prompt + 1 :]
    assert result.topk_ids.shape == (19, len(result.tokens) - n_prompt, 2)


def test_trace_reply_bad_input(smollm2_llama_cpp):
    with pytest.raises(BadPrompt, match="reply is empty"):
        trace_reply(None, QUESTION, "  ")
    with pytest.raises(BadPrompt, match="conversation is empty"):
        trace_reply(None, [], "Berlin.")
    with pytest.raises(BadPrompt, match="top-k"):
        trace_reply(None, QUESTION, "Berlin.", top_k=0)
    with pytest.raises(tracing.BadTarget):
        trace_reply(None, QUESTION, "Berlin.", target=" Berlin is")
    with pytest.raises(BadPrompt, match="longer than this model's context"):
        trace_reply(None, QUESTION, " Berlin" * (smollm2_llama_cpp.context_length + 1))


def test_chat_and_the_lens_share_one_model(smollm2_llama_cpp):
    from runtime.llama_cpp import shared_llama

    shared = shared_llama(bundled_gguf())
    assert smollm2_llama_cpp.llama is shared.llama and smollm2_llama_cpp.lock() is shared.lock
    assert tracing.open_tracer(None, "llama-cpp") is smollm2_llama_cpp


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, sys.argv[2])
    import torch
    from bench.measure import resident  # the GGUF's pages once, everything else by its share
    from tracing.lens import summarize
    from tracing.llama_cpp_backend import trace_reply
    import tracing
    from runtime.llama_cpp import shared_llama

    path = os.path.realpath(sys.argv[1])
    # Warm torch's lens math first: its code pages are the process's, not the model's.
    summarize(torch.randn(2, 2, 8), lambda x: x @ torch.randn(8, 1000), target_id=1)
    before = resident(path)
    shared = shared_llama(path)
    question = [{"role": "user", "content": "What is the capital of Germany?"}]
    with shared.lock:
        reply = shared.llama.create_chat_completion(question, max_tokens=8, temperature=0)["choices"][0]["message"]["content"]
    chat = resident(path)
    trace_reply(path, question, reply)
    tracing.trace("The capital of Germany is", model=path, backend="llama-cpp")
    after = resident(path)
    print(json.dumps({"chat": chat - before, "lens": after - chat, "total": after - before, "gguf": os.path.getsize(path)}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="measures Linux PSS")
def test_chat_and_trace_in_one_process_count_the_weights_once(gemma3_gguf):
    """Gemma 3 270M (241 MB): chat, then a reply trace and a prompt trace, in a fresh process.

    Resident memory counts the GGUF's pages once (chat's llama.cpp and the lens map the same
    file) plus everything else, after a garbage collection and malloc_trim; the context is capped
    at 256 tokens. Measured: chat grows memory by 1.32x the GGUF (its weights, plus ~80 MB of
    llama.cpp buffers that do not depend on the lens), the lens adds 0.13-0.15x (its own small
    llama.cpp context: KV cache, ~16 MB of requested logits and their compute buffer, captured
    rows). On a 60 GB model those fixed buffers vanish next to the weights (~1.02x in all). A
    second copy of the weights (+1x), a float32 unembedding (+2.7x) or even a float16 one
    (+1.3x) would fail this.
    """
    env = dict(os.environ, LENSBENCH_MAX_CONTEXT="256", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(gemma3_gguf), str(ROOT)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    grown = json.loads(out.stdout.strip().splitlines()[-1])
    print({key: f"{value / grown['gguf']:.2f}x" for key, value in grown.items()})
    assert grown["lens"] < 0.25 * grown["gguf"]
    assert grown["total"] < grown["chat"] + 0.25 * grown["gguf"] < 2 * grown["gguf"]


def write_gguf(path: Path, tensors: dict[str, np.ndarray], arch: str = "llama") -> Path:
    """A small synthetic GGUF with the given tensors (float32) and a minimal llama header."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_without_final_norm_or_output_gets_a_clear_message(tmp_path):
    embed = np.zeros((32, 8), np.float32)
    no_norm = write_gguf(tmp_path / "no-norm.gguf", {"token_embd.weight": embed})
    with pytest.raises(UnsupportedModel, match=r"no final norm \('output_norm.weight'\).*hooks backend"):
        tracing.trace("Hello", model=str(no_norm), backend="llama-cpp")
    no_output = write_gguf(tmp_path / "no-output.gguf", {"output_norm.weight": np.ones(8, np.float32)})
    with pytest.raises(UnsupportedModel, match="no output matrix"):
        tracing.trace("Hello", model=str(no_output), backend="llama-cpp")
    no_eps = tmp_path / "no-eps.gguf"
    import gguf

    writer = gguf.GGUFWriter(str(no_eps), "mystery")
    writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
    writer.add_tensor("output.weight", embed)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(UnsupportedModel, match="does not say which final norm"):
        tracing.trace("Hello", model=str(no_eps), backend="llama-cpp")


def test_files_that_are_not_ggufs_get_clear_messages(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf" * 10)
    with pytest.raises(BadModelFile, match="not a GGUF file"):
        tracing.trace("Hello", model=str(fake), backend="llama-cpp")
    folder = tmp_path / "hf-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(UnsupportedModel, match="reads GGUF files.*hooks backend"):
        tracing.trace("Hello", model=str(folder), backend="llama-cpp")


def test_cli_backend_switch():
    out = subprocess.run(
        [sys.executable, "-m", "tracing", "--prompt", PROMPTS[0], "--backend", "llama-cpp",
         "--last-only", "--json", "--top-k", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert data["backend"] == "llama-cpp" and data["topk"][-1][0][0]["token"] == " Berlin"


def test_the_lens_follows_chat_when_it_releases_and_reloads_the_model(tmp_path):
    import shutil

    from runtime.llama_cpp import release

    path = tmp_path / "smol.gguf"
    shutil.copy(bundled_gguf(), path)
    first = tracing.open_tracer(str(path), "llama-cpp")
    before = tracing.trace_with(first, PROMPTS[0], last_only=True)
    assert release(path)
    with pytest.raises(UnsupportedModel, match="was unloaded"):
        tracing.trace_with(first, PROMPTS[0], last_only=True)
    second = tracing.open_tracer(str(path), "llama-cpp")
    assert second is not first and second.model_loaded()
    after = tracing.trace_with(second, PROMPTS[0], last_only=True)
    np.testing.assert_array_equal(after.topk_ids, before.topk_ids)
    release(path)
